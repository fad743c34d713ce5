"""kiq's services, each in its own namespace: Redis primary and replica, three Sentinels, the S3 server (moto), the
API, the webhook worker and three job workers (one with decoder batching).

Every output line is stamped with the host's wall time as it arrives (`<unix time> <line>`), so the worker logs
give execution times on one clock even while a worker's own clock is skewed.

Workers and the API get their wall clock skewed by tests/chaos/clockshim (a sitecustomize on their PYTHONPATH
that offsets `time.time` by the seconds in their skew file, re-read while they run). Not libfaketime: probed on
this machine, 2026-12-06 (Debian's faketime 0.9.10, libfaketimeMT): it hangs redis-server; with its default
(monotonic clocks faked too) Python's `threading.Event().wait(0.5)` never returns — kiq's lease renewer and
heartbeat threads would never run, and every job would be handed out again after the visibility timeout; with
FAKETIME_DONT_FAKE_MONOTONIC=1 every `time.sleep` raises OSError EINVAL; FAKETIME_FORCE_MONOTONIC_FIX=1 does not
help either.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.chaos.hosts import Net

MASTER = "kiq"
REDIS_PORT, SENTINEL_PORT, S3_PORT, API_PORT = 6379, 26379, 5000, 8000
SENTINELS = ("s1", "s2", "s3")
WORKERS = ("w1", "w2", "w3")
BATCHING_WORKER = "w3"
SKEWED = (*WORKERS, "api")
HOSTS = ("r1", "r2", *SENTINELS, "obj", "api", "hooks", *WORKERS)
CLOCKSHIM = Path(__file__).resolve().parent / "clockshim"
VISIBILITY_TIMEOUT_S = 10
BUCKET = "kiq-chaos"
EXIT_MARK = "<<chaos: process exited>>"
TENANTS = {"alpha": {"key": "chaos-alpha-key", "max_priority": 9}, "beta": {"key": "chaos-beta-key"}}


@dataclass
class Service:
    name: str
    host: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: list[float] = field(default_factory=list)
    deaths: list[float] = field(default_factory=list)  # killed by a nemesis or found dead

    def start(self, net: Net) -> None:
        self.proc = subprocess.Popen(net.exec_argv(self.host, self.argv), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=self.env, start_new_session=True)  # fmt: skip
        self.starts.append(time.time())
        threading.Thread(target=_stamp, args=(self.proc, self.log), daemon=True).start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            assert self.proc is not None
            self.proc.wait(10)
        self.deaths.append(time.time())

    def stop(self) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        os.kill(self.pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(30)  # a worker's warm shutdown ends its small job first
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _stamp(proc: subprocess.Popen[bytes], log: Path) -> None:
    assert proc.stdout is not None
    with log.open("ab") as out:
        for line in proc.stdout:
            out.write(f"{time.time():.3f} ".encode() + line)
            out.flush()
        out.write(f"{time.time():.3f} {EXIT_MARK}\n".encode())  # the process is gone: its executions end here


@dataclass
class Cluster:
    net: Net
    root: Path
    models: tuple[Path, Path]
    webhook_secret: str
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def sentinel_url(self) -> str:
        return ";".join(f"sentinel://{self.net.ip(s)}:{SENTINEL_PORT}" for s in SENTINELS) + "/0"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.net.ip('obj')}:{S3_PORT}"

    @property
    def api_url(self) -> str:
        return f"http://{self.net.ip('api')}:{API_PORT}"

    def kiq_env(self) -> dict[str, str]:
        """The settings every kiq process (and the campaign's own client) runs with."""
        prior, decoder = self.models
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("KIQ_") and k != "PYTHONPATH"},
            "PYTHONUNBUFFERED": "1",
            "AWS_ACCESS_KEY_ID": "chaos", "AWS_SECRET_ACCESS_KEY": "chaos-secret",
            "KIQ_BROKER_URL": self.sentinel_url,
            "KIQ_S3_ENDPOINT_URL": self.s3_endpoint,
            "KIQ_S3_BUCKET": BUCKET,
            "KIQ_PRIOR_MODEL": str(prior), "KIQ_DECODER_MODEL": str(decoder),
            "KIQ_DEVICE_TARGET": "CPU",
            "KIQ_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
            "KIQ_FETCH_ALLOW": self.net.gateway,  # the campaign's webhook receiver
            "KIQ_WEBHOOK_SECRET": self.webhook_secret,
            "KIQ_WEBHOOK_RETRY_S": "3600",
            "KIQ_API_TENANTS": str(self.root / "tenants.json"),
        }  # fmt: skip

    def skew_file(self, name: str) -> Path:
        return self.root / f"skew-{name}"

    def set_skew(self, name: str, seconds: int) -> None:
        """Set `name`'s wall clock `seconds` off the host's, while it runs (see tests/chaos/clockshim)."""
        tmp = self.skew_file(name).with_suffix(".tmp")
        tmp.write_text(f"{seconds}\n")
        tmp.replace(self.skew_file(name))  # atomic: the shim never reads half a number

    def start(self) -> None:
        (self.root / "tenants.json").write_text(json.dumps({"tenants": [{"name": n, **t} for n, t in TENANTS.items()]}))
        self._redis("r1")
        self._redis("r2", "--replicaof", self.net.ip("r1"), str(REDIS_PORT))
        for name in SENTINELS:
            self._sentinel(name)
        self._add("obj", [sys.executable, "-m", "moto.server", "-H", self.net.ip("obj"), "-p", str(S3_PORT)])
        self._wait(lambda: self.master() is not None and self._sentinels_ready(), 90, "Sentinels")
        self._wait(self._bucket, 60, "S3 server and bucket")
        kiq = [sys.executable, "-m", "producer.cli"]
        self._add("api", [*kiq, "api", "--host", self.net.ip("api"), "--port", str(API_PORT)], skew=True)
        self._add("hooks", [*kiq, "webhook-worker"])
        for name in WORKERS:
            extra = {"KIQ_DECODER_BATCH": "2"} if name == BATCHING_WORKER else {}
            self._add(name, [*kiq, "worker", f"--hostname=kiq@{name}"], skew=True, **extra)
        for name in ("hooks", *WORKERS):
            self._wait(lambda n=name: " ready." in self.services[n].log.read_text(errors="replace"), 400, name)
        self._wait(self._api_up, 60, "API")

    def _add(self, name: str, argv: list[str], skew: bool = False, **extra: str) -> Service:
        env = {**self.kiq_env(), **extra}
        if skew:
            self.set_skew(name, 0)
            env.update(KIQ_CHAOS_SKEW_FILE=str(self.skew_file(name)), PYTHONPATH=str(CLOCKSHIM))
        service = Service(name, name, argv, env, self.root / f"{name}.log")
        self.services[name] = service
        service.start(self.net)
        return service

    def _redis(self, name: str, *extra: str) -> None:
        data = self.root / name
        data.mkdir(exist_ok=True)
        argv = [
            "redis-server",
            "--bind",
            self.net.ip(name),
            "--port",
            str(REDIS_PORT),
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--protected-mode",
            "no",
            *extra,
        ]
        self._add(name, argv)  # fmt: skip
        self._wait(lambda: self._ping(self.net.ip(name), REDIS_PORT), 20, name)

    def _sentinel(self, name: str) -> None:
        conf = self.root / f"{name}.conf"  # Sentinel rewrites its config: one file each
        conf.write_text(
            f"port {SENTINEL_PORT}\nbind {self.net.ip(name)}\nprotected-mode no\ndir {self.root}\n"
            f"sentinel monitor {MASTER} {self.net.ip('r1')} {REDIS_PORT} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 5000\nsentinel failover-timeout {MASTER} 30000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        self._add(name, ["redis-server", str(conf), "--sentinel"])

    def restart(self, name: str) -> None:
        service = self.services[name]
        service.stop()
        service.start(self.net)

    def master(self) -> str | None:
        """The host the Sentinels name as master now (asked from the root namespace)."""
        by_ip = {self.net.ip(h): h for h in ("r1", "r2")}
        for name in SENTINELS:
            try:
                client = redis.Redis(self.net.ip(name), SENTINEL_PORT, socket_timeout=1, socket_connect_timeout=1)
                addr = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
                return by_ip.get(addr[0].decode())
            except (redis.RedisError, TypeError, IndexError):
                continue
        return None

    def _sentinels_ready(self) -> bool:
        for name in SENTINELS:
            try:
                client = redis.Redis(self.net.ip(name), SENTINEL_PORT, socket_timeout=1)
                if len(client.execute_command("SENTINEL", "SENTINELS", MASTER)) < 2:
                    return False
                if not client.execute_command("SENTINEL", "REPLICAS", MASTER):
                    return False
            except redis.RedisError:
                return False
        return True

    def _ping(self, host: str, port: int) -> bool:
        try:
            return bool(redis.Redis(host, port, socket_timeout=1, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def _bucket(self) -> bool:
        import boto3

        try:
            s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1",
                              aws_access_key_id="chaos", aws_secret_access_key="chaos-secret")  # fmt: skip
            s3.create_bucket(Bucket=BUCKET)
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def _api_up(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.api_url + "/healthz", timeout=2):
                return True
        except OSError:
            return False

    def _wait(self, check: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            dead = [s.name for s in self.services.values() if not s.alive()]
            if dead:
                raise RuntimeError(f"waiting for {what}: {', '.join(dead)} exited (logs in {self.root})")
            time.sleep(0.5)
        raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s (logs in {self.root})")

    def close(self) -> None:
        """SIGTERM every service at once, then wait for each (the namespaces' cleanup kills what is left)."""
        running = [s for s in self.services.values() if s.alive()]
        for service in running:
            service.signal(signal.SIGCONT)
            service.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10  # the campaign is over: running jobs need not finish
        for service in running:
            assert service.proc is not None
            try:
                service.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait(10)
