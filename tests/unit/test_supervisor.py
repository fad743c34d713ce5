import os
import signal
import subprocess
import sys
import time

import pytest

from kiq.contract import parse_job
from kiq.errors import SettingsError
from kiq.settings import Settings
from producer.client import route
from producer.fleet import render_fleet
from worker.supervisor import Child, Supervisor, child_env, parse_devices


@pytest.mark.parametrize(
    ("text", "devices"), [("0-7", list(range(8))), ("0,2,5", [0, 2, 5]), ("0-3,6", [0, 1, 2, 3, 6]), ("3", [3])]
)
def test_parse_devices(text, devices):
    assert parse_devices(text) == devices


@pytest.mark.parametrize("text", ["", "a-b", "-1", "3-x", ","])
def test_bad_devices(text):
    with pytest.raises(SettingsError, match="--devices"):
        parse_devices(text)


def test_ascend_child_sees_only_its_npu():
    env = child_env({"PATH": "/bin"}, Settings(device_target="Ascend", metrics_port=9100), 3)
    assert env["KIQ_DEVICE_ID"] == "3" and env["ASCEND_RT_VISIBLE_DEVICES"] == "3"
    assert env["KIQ_DEVICE_RUNTIME_ID"] == "0" and env["KIQ_METRICS_PORT"] == "9103"
    cpu = child_env({}, Settings(device_target="CPU"), 1)
    assert cpu == {"KIQ_DEVICE_ID": "1"}


def test_gpu_child_sees_only_its_gpu():
    env = child_env({"PATH": "/bin"}, Settings(device_target="GPU"), 5)
    assert env["KIQ_DEVICE_ID"] == "5" and env["CUDA_VISIBLE_DEVICES"] == "5" and env["KIQ_DEVICE_RUNTIME_ID"] == "0"
    assert "ASCEND_RT_VISIBLE_DEVICES" not in env


class DeadProc:
    returncode = 1

    def poll(self):
        return 1


def test_restarts_with_backoff_then_leaves_a_crashing_device_down():
    sup = Supervisor(Settings(device_target="CPU", restart_max=3, restart_window_s=100), [0], [], {})
    started = []
    sup._start = lambda child: (started.append(child.device), setattr(child, "proc", DeadProc()))
    child: Child = sup.children[0]
    sup.tick(0.0)  # first start
    sup.tick(0.1)  # died: restart due in 1 s
    assert child.start_at == pytest.approx(1.1) and not child.down
    sup.tick(1.2)  # restarted
    sup.tick(1.3)  # died again: 2 s
    assert child.start_at == pytest.approx(3.3)
    sup.tick(3.4)
    sup.tick(3.5)  # third death within the window: down
    assert child.down and started == [0, 0, 0]
    sup.tick(100.0)
    assert started == [0, 0, 0]


def test_routing():
    settings = Settings(queue="kiq", large_queue="kiq.large", large_pixels=1024 * 1024)
    small = parse_job({"inputs": [{"text": "a", "weight": 1}]})
    large = parse_job({"inputs": [{"text": "a", "weight": 1}], "height": 1536, "width": 1536})
    named = parse_job(
        {"inputs": [{"text": "a", "weight": 1}], "height": 1536, "width": 1536, "queue": "kiq.v22-custom"}
    )
    assert [route(j, settings) for j in (small, large, named)] == ["kiq", "kiq.large", "kiq.v22-custom"]
    assert route(large, Settings()) == "kiq"


def test_fleet_table():
    workers = [{"hostname": "kiq@h-cpu0", "device": "cpu:0", "current_job": "", "done": "3", "failed": "1",
                "started_at": "1000", "queues": "kiq", "decoder_step_s": "31.4159", "speed_source": "jobs"},
               {"hostname": "kiq@old", "device": "cpu:1", "done": "0", "failed": "0", "started_at": "1000"},
               ]  # fmt: skip
    table = render_fleet(workers, now=1000 + 3725)
    assert "kiq@h-cpu0  cpu:0   idle" in table and "1h02m" in table and table.endswith("2 worker(s)")
    assert "31.4 (jobs)" in table and "STEP S @768²" in table


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_its_supervisor_even_when_the_supervisor_is_sigkilled(tmp_path):
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (  # a stand-in supervisor: starts a child as kiq's does
        "import subprocess, sys, time; from worker.supervisor import dying_with_parent\n"
        "child = subprocess.Popen(['sleep', '60'], preexec_fn=dying_with_parent())\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")])  # fmt: skip
    deadline = time.monotonic() + 20
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline and parent.poll() is None, "the stand-in supervisor never started"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the child outlived its SIGKILLed supervisor"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie (dead, not yet reaped by init) counts as gone
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_drained_child_is_left_down_and_a_fully_drained_supervisor_exits_0():
    from worker.tenantqueues import DRAINED_EXIT

    class DrainedProc(DeadProc):
        returncode = DRAINED_EXIT

        def poll(self):
            return DRAINED_EXIT

    sup = Supervisor(Settings(device_target="CPU"), [0], [], {})
    started = []
    sup._start = lambda child: (started.append(child.device), setattr(child, "proc", DrainedProc()))
    sup.tick(0.0)
    sup.tick(0.1)
    sup.tick(60.0)
    assert started == [0] and sup.children[0].down and sup.children[0].drained
    sup.tick = lambda now: None  # the loop's own ticks: nothing more happens
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert sup.run() == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
