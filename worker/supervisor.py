"""`kiq worker --devices 0-7`: one worker process per device, each pinned to it, restarted with backoff.

A child that keeps dying (KIQ_RESTART_MAX times within KIQ_RESTART_WINDOW_S) is reported and left down.
SIGTERM or SIGINT: every child gets SIGTERM (Celery's warm shutdown: the running job finishes), then
SIGKILL after KIQ_SHUTDOWN_GRACE_S; a killed child's job is redelivered. If the supervisor itself dies, the
kernel SIGTERMs its children (Linux). Imports no model framework.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kiq import logs
from kiq.errors import SettingsError
from kiq.settings import Settings
from worker.tenantqueues import DRAINED_EXIT

log = logging.getLogger("kiq.supervisor")
BACKOFF_BASE_S, BACKOFF_CAP_S = 1.0, 60.0


def parse_devices(text: str) -> list[int]:
    """'0-7', '0,2,5' or '0-3,6' -> sorted unique device ids."""
    devices: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = part.partition("-")
            devices.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise SettingsError(f"--devices: expected ids like 0-7 or 0,2,5, got {text!r}") from None
    if not devices or min(devices) < 0:
        raise SettingsError(f"--devices: expected ids like 0-7 or 0,2,5, got {text!r}")
    return sorted(devices)


def child_env(base: Mapping[str, str], settings: Settings, device: int) -> dict[str, str]:
    env = {**base, "KIQ_DEVICE_ID": str(device)}
    visible = {"Ascend": "ASCEND_RT_VISIBLE_DEVICES", "GPU": "CUDA_VISIBLE_DEVICES"}.get(settings.device_target)
    if visible:
        env[visible] = str(device)  # the child sees one NPU or GPU, as its device 0
        env["KIQ_DEVICE_RUNTIME_ID"] = "0"
    if settings.metrics_port:
        env["KIQ_METRICS_PORT"] = str(settings.metrics_port + device)
    if settings.health_port:
        env["KIQ_HEALTH_PORT"] = str(settings.health_port + device)
    return env


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def dying_with_parent() -> Callable[[], None] | None:
    """A child setup that makes the kernel SIGTERM the child when its supervisor dies, even by SIGKILL: orphaned
    workers would otherwise hold their devices, and a restarted supervisor would start a second worker on each.
    Linux only (None elsewhere). libc is looked up here, before the fork: the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def child_setup(settings: Settings, device: int) -> Callable[[], None] | None:
    """What runs in the child between fork and exec: tie it to the supervisor, then pin it (CPU)."""
    steps = [step for step in (dying_with_parent(), cpu_pinning(settings, device)) if step is not None]

    def setup() -> None:
        for step in steps:
            step()

    return setup if steps else None


def cpu_pinning(settings: Settings, device: int) -> Callable[[], None] | None:
    """On CPU a 'device' is one core (mod the core count), so N devices do not fight over every core."""
    if settings.device_target != "CPU" or not hasattr(os, "sched_setaffinity"):
        return None
    core = sorted(os.sched_getaffinity(0))[device % len(os.sched_getaffinity(0))]
    return lambda: os.sched_setaffinity(0, {core})


@dataclass
class Child:
    device: int
    proc: subprocess.Popen[bytes] | None = None
    deaths: deque[float] = field(default_factory=deque)
    start_at: float = 0.0
    down: bool = False
    drained: bool = False  # left down on purpose (kiq fleet drain)


class Supervisor:
    def __init__(self, settings: Settings, devices: list[int], argv: list[str], env: Mapping[str, str]) -> None:
        self.settings, self.argv, self.env = settings, argv, env
        self.children = [Child(device) for device in devices]
        self.stopping = False

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        log.info("supervising %d %s device(s): %s", len(self.children), self.settings.device_target,
                 [c.device for c in self.children])  # fmt: skip
        while not self.stopping:
            self.tick(time.monotonic())
            if all(c.down for c in self.children):
                if all(c.drained for c in self.children):
                    log.info("every device worker was drained; exiting")
                    return 0
                log.error("every device worker is down; giving up")
                return 1
            time.sleep(0.2)
        self.drain()
        return 0

    def tick(self, now: float) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                self._died(child, now)
            if child.proc is None and not child.down and now >= child.start_at:
                self._start(child)

    def _start(self, child: Child) -> None:
        env = child_env(self.env, self.settings, child.device)
        child.proc = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "worker", *self.argv], env=env,
            preexec_fn=child_setup(self.settings, child.device),
        )  # fmt: skip
        log.info("device %d: worker started, pid %d", child.device, child.proc.pid)

    def _died(self, child: Child, now: float) -> None:
        code = child.proc.returncode if child.proc else None
        child.proc = None
        if code == DRAINED_EXIT:
            child.down = child.drained = True
            log.info("device %d: worker drained (kiq fleet drain); leaving it down", child.device)
            return
        child.deaths.append(now)
        while child.deaths and now - child.deaths[0] > self.settings.restart_window_s:
            child.deaths.popleft()
        if len(child.deaths) >= self.settings.restart_max:
            child.down = True
            log.error("device %d: worker died %d times within %.0f s (last exit %s); leaving it down",
                      child.device, len(child.deaths), self.settings.restart_window_s, code)  # fmt: skip
            return
        delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (len(child.deaths) - 1))
        child.start_at = now + delay
        log.warning("device %d: worker exited with %s; restarting in %.0f s", child.device, code, delay)

    def _stop(self, signum: int, _: Any) -> None:
        self.stopping = True

    def drain(self) -> None:
        running = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        log.info("stopping: %d worker(s) finish their current job (grace %.0f s)", len(running),
                 self.settings.shutdown_grace_s)  # fmt: skip
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d still busy after the grace period; killing it (its job is redelivered)", proc.pid)
                proc.kill()
                proc.wait()


def supervise(settings: Settings, devices: str, argv: list[str]) -> int:
    logs.setup(settings, "supervisor")  # JSON mode; else the basicConfig below
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/supervisor] %(message)s")
    return Supervisor(settings, parse_devices(devices), argv, os.environ).run()
