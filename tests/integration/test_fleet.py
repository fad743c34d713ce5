"""One supervisor, two CPU device workers: concurrency, metrics, `kiq fleet`, a SIGKILLed child, SIGTERM drain."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from kiq.settings import Settings
from producer import devstack
from producer.client import Client
from tests.helpers import FAST_REDELIVERY, count_in_logs, objects_of, wait_for_step
from tests.integration.jobs import tiny_job

DEVICES = 2


@pytest.fixture(scope="module")
def fleet(env, logs):
    metrics_port = devstack.free_port() + 10
    overrides = {
        "KIQ_QUEUE": f"kiq-fleet-{uuid.uuid4().hex[:8]}", "KIQ_METRICS_PORT": str(metrics_port), **FAST_REDELIVERY,
        "KIQ_SHUTDOWN_GRACE_S": "30", "KIQ_RESTART_MAX": "3",
    }  # fmt: skip
    fleet_env = {**env, **overrides}
    client = Client(Settings.from_env(fleet_env))
    log = logs / "supervisor.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--devices", f"0-{DEVICES - 1}"],
                                env=fleet_env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    queue = overrides["KIQ_QUEUE"]
    mine = lambda: [w for w in client.fleet() if w["queues"] == queue]  # noqa: E731
    try:  # a supervisor left running would keep its two workers for the rest of the run
        try:
            devstack.wait_until(lambda: len(mine()) == DEVICES, 240, "supervised workers", proc, log)
        except devstack.StackError as exc:  # what the heartbeats said, beside the log's "ready"
            beats = "unreadable"
            with contextlib.suppress(Exception):
                beats = str(client.fleet())
            raise devstack.StackError(f"{exc}\nheartbeats now: {beats}") from None
        yield proc, client, log, metrics_port, fleet_env, mine
    finally:
        devstack.stop(proc, grace_s=60)


def test_two_device_workers_share_the_queue_and_each_job_runs_once(fleet, s3, settings):
    _, client, log, *_ = fleet
    ids = [client.submit(tiny_job(decoder_steps=6, seed=n)) for n in range(6)]
    finals = [client.wait(job_id, timeout=180) for job_id in ids]
    assert all(f.state == "SUCCESS" for f in finals), [f.error for f in finals]
    assert {f.result.device for f in finals} == {"cpu:0", "cpu:1"}
    for job_id in ids:
        assert objects_of(s3, settings, job_id) == [f"jobs/{job_id}/0.png"]
        assert count_in_logs([log], f"[{job_id}] succeeded") == 1


def test_kiq_fleet_lists_both_workers(fleet):
    fleet_env = fleet[4]
    done = subprocess.run([sys.executable, "-m", "producer.cli", "fleet", "--json"], env=fleet_env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    listed = [w for w in json.loads(done.stdout) if w["queues"] == fleet_env["KIQ_QUEUE"]]
    assert sorted(w["device"] for w in listed) == ["cpu:0", "cpu:1"]
    assert all(w["hostname"].startswith("kiq@") and w["hostname"].endswith(("-cpu0", "-cpu1")) for w in listed)
    assert sum(int(w["done"]) for w in listed) >= 6


def test_each_worker_serves_prometheus_metrics(fleet):
    port = fleet[3]
    for device in range(DEVICES):
        with urllib.request.urlopen(f"http://127.0.0.1:{port + device}/metrics", timeout=5) as response:
            text = response.read().decode()
        success = [line for line in text.splitlines() if line.startswith('kiq_jobs_total{outcome="success"}')]
        assert success and float(success[0].split()[-1]) >= 1
        for name in ("kiq_job_duration_seconds_count", 'kiq_stage_duration_seconds_count{stage="decoder"}',
                     "kiq_queue_wait_seconds_count", "kiq_model_load_seconds"):  # fmt: skip
            assert name in text, name


def test_sigkilled_child_is_restarted_and_its_job_completes_once(fleet, s3, settings):
    proc, client, log, _, _, mine = fleet
    job_id = client.submit(tiny_job(decoder_steps=10, num_images=1))
    wait_for_step(client, job_id)
    running = lambda: [w for w in mine() if w["current_job"] == job_id]  # noqa: E731
    devstack.wait_until(lambda: bool(running()), 10, "heartbeat naming the running job")
    victim = running()[0]
    os.kill(int(victim["pid"]), signal.SIGKILL)
    final = client.wait(job_id, timeout=120)
    assert final.state == "SUCCESS", final.error
    assert objects_of(s3, settings, job_id) == [f"jobs/{job_id}/0.png"]
    assert count_in_logs([log], f"[{job_id}] succeeded") == 1
    devstack.wait_until(lambda: len(mine()) == DEVICES and victim["pid"] not in [w["pid"] for w in mine()], 120,
                        "restarted worker", proc, log)  # fmt: skip
    assert "restarting in" in log.read_text()


def test_sigterm_lets_running_jobs_finish_then_stops(fleet):
    proc, client, log, *_ = fleet
    job_id = client.submit(tiny_job(decoder_steps=12))
    wait_for_step(client, job_id, step=1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert client.status(job_id).state == "SUCCESS"
    assert "Warm shutdown" in log.read_text()
    time.sleep(0.5)
    assert count_in_logs([log], f"[{job_id}] succeeded") == 1
