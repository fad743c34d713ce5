"""Bring up, on this machine, whatever kiq needs and is not running: Redis, a local S3 server, a worker.

Used by `kiq demo` and by the integration tests. Every process started here is stopped by `Stack.close()`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


class StackError(RuntimeError):
    pass


@dataclass
class Stack:
    """Processes this stack started, stopped in reverse order."""

    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, argv: list[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=dict(env or os.environ))
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.processes):
            stop(proc)
        self.processes.clear()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *_: object) -> None:  # also when a start fails: nothing half-started outlives its fixture
        self.close()


def stop(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], bool],
    timeout_s: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode}{_tail(log)}")
        time.sleep(0.2)
    since = time.strftime("%H:%M:%S", time.localtime(time.time() - timeout_s))  # to read the log's times against
    raise StackError(f"{what} not ready after {timeout_s:.0f} s (waiting since {since}){_tail(log)}")


def _tail(log: Path | None, lines: int = 30) -> str:
    if log is None or not log.exists():
        return ""
    return "\n--- " + str(log) + " ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def redis_ping(url: str) -> bool:
    from kiq import redisconn
    from kiq.settings import Settings

    settings = Settings(broker_url=url)
    try:
        return bool(redisconn.connect(settings.broker_server, settings, socket_connect_timeout=1).ping())
    except redisconn.REDIS_ERRORS:
        return False


def ensure_redis(stack: Stack, url: str, log_dir: Path) -> None:
    """Start a throwaway redis-server for a loopback URL when none answers there."""
    from kiq import redisurl

    if redis_ping(url):
        return
    parts = urlsplit(url)
    local = parts.scheme == "redis" and parts.hostname in ("localhost", "127.0.0.1")
    if not local or shutil.which("redis-server") is None:
        shown = redisurl.redact(url)
        raise StackError(f"no Redis answers at {shown}, and kiq can only start one locally (needs redis-server)")
    log = log_dir / "redis.log"
    argv = [
        "redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        str(parts.port or 6379),
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    proc = stack.spawn(argv, log)
    wait_until(lambda: redis_ping(url), 20, "redis-server", proc, log)


def http_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


def start_s3_server(stack: Stack, log_dir: Path, port: int | None = None) -> str:
    """moto's standalone S3-compatible server on loopback; returns its endpoint URL."""
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = log_dir / "s3.log"
    proc = stack.spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log)
    wait_until(lambda: http_up(endpoint + "/moto-api/"), 30, "S3 server (moto)", proc, log)
    return endpoint


def ensure_bucket(endpoint_url: str | None, bucket: str, region: str) -> None:
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region)
    with suppress(ClientError):
        s3.head_bucket(Bucket=bucket)
        return
    s3.create_bucket(Bucket=bucket)


def kiq_command() -> list[str]:
    return [sys.executable, "-m", "producer.cli"]


def start_worker(stack: Stack, env: Mapping[str, str], log: Path, timeout_s: float = 180) -> subprocess.Popen[bytes]:
    """`kiq worker` in its own process; returns once it logs that it is ready to consume."""
    proc = stack.spawn([*kiq_command(), "worker"], log, env)
    wait_until(lambda: log.exists() and " ready." in log.read_text(errors="replace"), timeout_s, "worker", proc, log)
    return proc


def make_tiny_models(directory: Path, env: Mapping[str, str] | None = None) -> tuple[Path, Path]:
    """Write the tiny pipelines once (in a child process, so this one never imports MindSpore)."""
    prior, decoder = directory / "prior", directory / "decoder"
    if not (prior / "model_index.json").exists() or not (decoder / "model_index.json").exists():
        argv = [*kiq_command(), "make-tiny-models", str(directory)]
        done = subprocess.run(argv, env=dict(env or os.environ), capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"make-tiny-models failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return prior, decoder
