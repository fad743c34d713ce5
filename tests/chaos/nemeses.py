"""The faults, and the seeded schedule that picks them: one fault at a time, each with its start and stop recorded.

Partitions and packet drops are iptables rules inside the target's namespace; pauses are SIGSTOP/SIGCONT; kills
are SIGKILL followed by a restart, as a supervisor (or systemd) would; connection kills are Redis CLIENT KILL;
latency is a delay proxy (tests/chaos/delayproxy.py) that the target's new TCP connections to Redis, the
Sentinels and S3 are DNATed to (no netem in this kernel) — the target's open Redis connections are killed at
the start so that they reconnect through it; clock skew rewrites the target's skew file (services.py): its wall
clock jumps while it runs, as after an NTP step, and jumps back at the end.
"""

from __future__ import annotations

import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from tests.chaos.services import (
    REDIS_PORT,
    S3_PORT,
    SENTINEL_PORT,
    SENTINELS,
    VISIBILITY_TIMEOUT_S,
    WORKERS,
    Cluster,
    Service,
)

KINDS = (
    "partition-worker-redis", "partition-api-redis", "partition-worker-s3", "partition-sentinel-minority",
    "pause-worker", "kill-worker", "kill-redis-primary", "kill-connections", "packet-drops", "latency",
    "clock-skew",
)  # fmt: skip
PROXY_PORT, PROXY_MARK = 7777, "0x2a"


@dataclass
class Fault:
    n: int
    kind: str
    target: str
    at_s: float  # offset from the campaign's start
    duration_s: float
    params: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0  # wall times, once applied
    stopped: float = 0.0
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """For History.add("nemesis", ...): the fault's kind under `nemesis`."""
        fields = asdict(self)
        fields["nemesis"] = fields.pop("kind")
        return fields


def schedule(seed: int, minutes: float) -> list[Fault]:
    """The campaign's faults in order, from `seed` alone: the same seed gives the same schedule."""
    rng = random.Random(seed)
    faults: list[Fault] = []
    at, end = rng.uniform(5, 10), minutes * 60
    while at < end:
        kind = rng.choice(KINDS)
        target, duration, params = _pick(rng, kind)
        faults.append(Fault(len(faults), kind, target, round(at, 1), round(duration, 1), params))
        at += duration + rng.uniform(4, 10)
    return faults


def _pick(rng: random.Random, kind: str) -> tuple[str, float, dict[str, Any]]:
    worker = rng.choice(WORKERS)
    if kind in ("partition-worker-redis", "partition-worker-s3"):
        return worker, rng.uniform(8, 25), {}
    if kind == "partition-api-redis":
        return "api", rng.uniform(5, 20), {}
    if kind == "partition-sentinel-minority":
        return rng.choice(SENTINELS), rng.uniform(10, 30), {}
    if kind == "pause-worker":  # past the visibility timeout: its jobs are handed out again meanwhile
        return worker, VISIBILITY_TIMEOUT_S + rng.uniform(3, 15), {}
    if kind == "kill-worker":
        return worker, rng.uniform(1, 4), {}
    if kind == "kill-redis-primary":
        return "master", rng.uniform(10, 20), {}
    if kind == "kill-connections":
        return rng.choice([*WORKERS, "api", "hooks", "all"]), 1.0, {}
    if kind == "packet-drops":
        return rng.choice([*WORKERS, "api", "master"]), rng.uniform(10, 25), {"p": round(rng.uniform(0.1, 0.3), 2)}
    if kind == "latency":
        return rng.choice([*WORKERS, "api"]), rng.uniform(10, 25), {"delay_ms": rng.randrange(50, 400)}
    sign = rng.choice((-1, 1))
    return rng.choice([*WORKERS, "api"]), rng.uniform(15, 40), {"skew_s": sign * rng.randrange(30, 301)}


class Nemesis:
    """Applies and heals faults on a running cluster."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster, self.net = cluster, cluster.net
        self._undo: list[tuple[str, ...]] = []  # iptables rules to delete: (host, table, *rule)
        self._proxy: Service | None = None
        self.active: Fault | None = None

    def start(self, fault: Fault) -> None:
        fault.started = time.time()
        self.active = fault
        getattr(self, "_start_" + fault.kind.replace("-", "_"))(fault)

    def stop(self, fault: Fault) -> None:
        getattr(self, "_stop_" + fault.kind.replace("-", "_"), self._heal)(fault)
        fault.stopped = time.time()
        self.active = None

    # partitions and drops: iptables rules, deleted on heal
    def _rule(self, host: str, *rule: str, table: str = "filter") -> None:
        self.net.iptables(host, "-I", *rule, table=table)
        self._undo.append((host, table, *rule))

    def _heal(self, _: Fault | None = None) -> None:
        while self._undo:
            host, table, *rule = self._undo.pop()
            self.net.iptables(host, "-D", *rule, table=table)

    def _cut(self, host: str, peers: list[str]) -> None:
        for peer in peers:
            ip = self.net.ip(peer)
            self._rule(host, "INPUT", "-s", ip, "-j", "DROP")
            self._rule(host, "OUTPUT", "-d", ip, "-j", "DROP")

    def _start_partition_worker_redis(self, fault: Fault) -> None:
        self._cut(fault.target, ["r1", "r2"])

    def _start_partition_api_redis(self, fault: Fault) -> None:
        self._cut(fault.target, ["r1", "r2"])

    def _start_partition_worker_s3(self, fault: Fault) -> None:
        self._cut(fault.target, ["obj"])

    def _start_partition_sentinel_minority(self, fault: Fault) -> None:
        cidr = self.net.cidr
        self._rule(fault.target, "INPUT", "!", "-i", "lo", "-s", cidr, "-j", "DROP")
        self._rule(fault.target, "OUTPUT", "!", "-o", "lo", "-d", cidr, "-j", "DROP")

    def _start_packet_drops(self, fault: Fault) -> None:
        host = self._resolve(fault)
        p = str(fault.params["p"])
        for chain in ("INPUT", "OUTPUT"):
            self._rule(host, chain, "-p", "tcp", "-m", "statistic", "--mode", "random", "--probability", p,
                       "-j", "DROP")  # fmt: skip

    # processes
    def _start_pause_worker(self, fault: Fault) -> None:
        self.cluster.services[fault.target].signal(signal.SIGSTOP)

    def _stop_pause_worker(self, fault: Fault) -> None:
        self.cluster.services[fault.target].signal(signal.SIGCONT)

    def _start_kill_worker(self, fault: Fault) -> None:
        self.cluster.services[fault.target].kill()

    def _stop_kill_worker(self, fault: Fault) -> None:
        self.cluster.services[fault.target].start(self.net)  # a supervisor's restart

    def _start_kill_redis_primary(self, fault: Fault) -> None:
        host = self._resolve(fault)
        self.cluster.services[host].kill()

    def _stop_kill_redis_primary(self, fault: Fault) -> None:
        host = fault.params["resolved"]
        self.cluster.services[host].start(self.net)  # back on its data; the Sentinels make it a replica

    def _start_kill_connections(self, fault: Fault) -> None:
        host = fault.target
        fault.notes.append(f"killed {self._kill_clients(None if host == 'all' else self.net.ip(host))} connections")

    def _kill_clients(self, ip: str | None) -> int:
        master = self.cluster.master()
        if master is None:
            return 0
        client = redis.Redis(self.net.ip(master), REDIS_PORT, socket_timeout=2, socket_connect_timeout=2)
        try:
            if ip is None:
                return int(client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))
            killed = 0
            for entry in client.client_list():
                if entry.get("addr", "").rsplit(":", 1)[0] == ip:
                    killed += int(client.execute_command("CLIENT", "KILL", "ID", entry["id"]))
            return killed
        except redis.RedisError:
            return 0  # Redis itself is down: nothing to kill

    # clock skew
    def _start_clock_skew(self, fault: Fault) -> None:
        self.cluster.set_skew(fault.target, int(fault.params["skew_s"]))

    def _stop_clock_skew(self, fault: Fault) -> None:
        self.cluster.set_skew(fault.target, 0)

    # latency
    def _start_latency(self, fault: Fault) -> None:
        host = fault.target
        own = self.net.ip(host)
        argv = [sys.executable, "-m", "tests.chaos.delayproxy", own, str(PROXY_PORT), str(fault.params["delay_ms"]),
                PROXY_MARK]  # fmt: skip
        proxy = Service(f"proxy-{host}", host, argv, self.cluster.kiq_env(), self.cluster.root / f"proxy-{host}.log")
        proxy.start(self.net)
        self._proxy = proxy
        time.sleep(0.5)  # listening before traffic is sent to it
        ports = f"{REDIS_PORT},{SENTINEL_PORT},{S3_PORT}"
        self._rule(host, "OUTPUT", "-p", "tcp", "-d", self.net.cidr, "-m", "multiport", "--dports", ports, "-m",
                   "mark", "!", "--mark", PROXY_MARK, "-j", "DNAT", "--to-destination", f"{own}:{PROXY_PORT}",
                   table="nat")  # fmt: skip
        fault.notes.append(f"killed {self._kill_clients(own)} Redis connections to reconnect through the proxy")

    def _stop_latency(self, fault: Fault) -> None:
        self._heal(fault)
        if self._proxy is not None:  # its proxied connections break: the clients reconnect directly
            self._proxy.stop()
            self._proxy = None

    def _resolve(self, fault: Fault) -> str:
        host = fault.target
        if host == "master":
            host = self.cluster.master() or "r1"
        fault.params["resolved"] = host
        return host

    def heal_all(self) -> None:
        """Undo whatever is still applied (a campaign that ends, or fails, mid-fault)."""
        if self.active is not None:
            try:
                self.stop(self.active)
            except Exception:  # noqa: BLE001 - the rules go with the namespaces anyway
                pass
        self._heal()
        for name in (*WORKERS, "api"):
            service = self.cluster.services.get(name)
            if service is not None:
                service.signal(signal.SIGCONT)
                self.cluster.set_skew(name, 0)
