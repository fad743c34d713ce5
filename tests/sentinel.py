"""A replicated Redis with three Sentinels on loopback: a primary, a replica, `redis-server --sentinel` x3.

The Sentinel timings are the ones docker-compose.yml's `ha` profile runs with (5 s to call a master down), so the
failover the tests measure is the one that profile gives.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from producer import devstack

MASTER = "kiq"
DOWN_AFTER_MS = 5000
FAILOVER_TIMEOUT_MS = 30000


@dataclass
class RedisHA:
    root: Path
    stack: devstack.Stack = field(default_factory=devstack.Stack)
    ports: dict[str, int] = field(default_factory=dict)
    sentinel_ports: list[int] = field(default_factory=list)
    procs: dict[str, object] = field(default_factory=dict)

    def start(self) -> RedisHA:
        primary, replica = devstack.free_port(), devstack.free_port()
        self.ports = {"primary": primary, "replica": replica}
        self._server("primary", primary)
        self._server("replica", replica, "--replicaof", "127.0.0.1", str(primary))
        devstack.wait_until(lambda: self._linked(replica), 30, "replica in sync")
        for n in range(3):
            port = devstack.free_port()
            conf = self.root / f"sentinel-{n}.conf"  # Sentinel rewrites its own config: each gets a file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.root}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            self.procs[f"sentinel-{n}"] = self.stack.spawn(
                ["redis-server", str(conf), "--sentinel"], self.root / f"sentinel-{n}.log"
            )
            self.sentinel_ports.append(port)
        # A failover needs a quorum of Sentinels that know each other and the replica (hello messages, ~2 s).
        devstack.wait_until(self._sentinels_ready, 60, "Sentinels aware of each other and of the replica")
        return self

    def _server(self, name: str, port: int, *extra: str) -> None:
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory),
                "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", *extra]  # fmt: skip
        self.procs[name] = proc = self.stack.spawn(argv, self.root / f"{name}.log")
        url = f"redis://127.0.0.1:{port}/0"
        devstack.wait_until(lambda: devstack.redis_ping(url), 20, f"redis-server ({name})", proc)

    def _linked(self, port: int) -> bool:
        info = redis.Redis(port=port).info("replication")
        return info.get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            try:
                client = redis.Redis(port=port, decode_responses=True)
                others = client.execute_command("SENTINEL", "SENTINELS", MASTER)
                replicas = client.execute_command("SENTINEL", "REPLICAS", MASTER)
            except redis.RedisError:
                return False
            if len(others) < 2 or not replicas:
                return False
        return True

    @property
    def url(self) -> str:
        """kombu's form: every Sentinel, the database on the last."""
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports) + "/0"

    def master_port(self) -> int | None:
        """The port the Sentinels name as master now (None if none answers)."""
        for port in self.sentinel_ports:
            try:
                addr = redis.Redis(port=port).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
                return int(addr[1])
            except (redis.RedisError, TypeError):
                continue
        return None

    def kill_primary(self) -> float:
        """SIGKILL the primary (no shutdown, no last fsync); returns the monotonic time of the kill."""
        proc = self.procs["primary"]
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        proc.wait()  # type: ignore[attr-defined]
        return time.monotonic()

    def restart_old_primary(self) -> None:
        """Bring the killed primary back on its port and data; the Sentinels make it the new master's replica."""
        self._server("primary", self.ports["primary"])
        master = redis.Redis(port=self.master_port() or 0)
        devstack.wait_until(
            lambda: master.info("replication").get("connected_slaves", 0) >= 1, 60, "old primary as replica"
        )
        devstack.wait_until(lambda: self._linked(self.ports["primary"]), 60, "old primary in sync")

    def close(self) -> None:
        self.stack.close()
