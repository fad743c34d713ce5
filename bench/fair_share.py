"""Fair share: tenant A has a backlog queued, tenant B submits one job; how many jobs start before B's, in job
times per device. And what a worker's BRPOP costs Redis with N tenant queues.

Jobs are submitted through kiq's own `Client.submit` (owner A or B: each tenant's queue and its registry entry, as
the API does); a device is a kombu consumer on kiq's worker transport (`kiq.transport`, the worker's transport
options, `kiq.fairshare.FairCycle`) that takes one message at a time (prefetch 1, as the solo pool) and acks it at
once: one delivery is one job time, whatever the model's speed. The same run with KIQ_FAIR_SHARE=0 is the
baseline (one FIFO queue per priority).

    .venv/bin/python bench/fair_share.py [--backlog 500] [--redis redis://127.0.0.1:6379/7]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

import redis
from kombu import Consumer, Exchange, Queue

from kiq import fairshare
from kiq.celeryconf import broker_transport_options, priority_lists
from kiq.names import tenant_queues_key, tenant_queues_version_key
from kiq.settings import Settings
from kiq.transport import Connection
from producer.client import Client

JOB = {"inputs": [{"text": "a cat", "weight": 1.0}], "height": 64, "width": 64, "prior_steps": 2, "decoder_steps": 1}


class Device:
    """One worker's intake: BRPOP over the routed queue and its tenant queues, one message at a time."""

    def __init__(self, settings: Settings) -> None:
        options = {**broker_transport_options(settings), "queue_order_strategy": fairshare.STRATEGY}
        self.conn = Connection(settings.broker_url, transport_options=options)
        self.channel = self.conn.channel()
        self.channel.basic_qos(0, 1, False)
        self.taken: list[str] = []
        self.consumer = Consumer(self.channel, [_queue(settings.queue)], callbacks=[self._take], accept=["json"])
        self.consumer.consume()

    def learn(self, results: Any, base: str) -> None:
        """What worker/tenantqueues.py does each poll: read the tenant queues, consume the new ones."""
        queues = fairshare.parse_registry(results.hgetall(tenant_queues_key(base)))
        fairshare.learn(base, queues)
        for name in sorted(set(queues) - {q.name for q in self.consumer.queues}):
            self.consumer.add_queue(_queue(name))
        self.consumer.consume()

    def _take(self, body: Any, message: Any) -> None:
        self.taken.append(message.headers.get("kiq_owner", ""))
        message.ack()

    def take(self) -> str:
        before = len(self.taken)
        while len(self.taken) == before:
            self.conn.drain_events(timeout=10)
        return self.taken[-1]

    def close(self) -> None:
        self.conn.release()


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name), routing_key=name)


def b_wait(url: str, backlog: int, fair: bool) -> tuple[int, float]:
    """Jobs started after B's submit and before B's (job times, one device), and the run's seconds."""
    queue = f"bench-fair-{uuid.uuid4().hex[:8]}"
    settings = Settings.from_env({"KIQ_BROKER_URL": url, "KIQ_QUEUE": queue, "KIQ_FAIR_SHARE": "1" if fair else "0"})
    client = Client(settings)
    device = Device(settings)
    start = time.perf_counter()
    try:
        for n in range(backlog):
            client.submit({**JOB, "seed": n}, owner="tenant-a")
        device.learn(client.redis, queue)
        assert device.take() == "tenant-a"  # A's first job runs when B arrives
        client.submit({**JOB, "seed": 0}, owner="tenant-b")
        device.learn(client.redis, queue)  # the worker's next poll (KIQ_FAIR_SHARE_POLL_S)
        waited = 0
        while device.take() != "tenant-b":
            waited += 1
        return waited, time.perf_counter() - start
    finally:
        device.close()
        _clean(client.redis, queue)


def _clean(r: Any, queue: str) -> None:
    names = [queue, *(k.decode() for k in r.hkeys(tenant_queues_key(queue)))]
    r.delete(*(key for name in names for key in priority_lists(name)), tenant_queues_key(queue),
             tenant_queues_version_key(queue))  # fmt: skip


def brpop_cost(url: str, tenants: int, calls: int) -> tuple[float, float]:
    """Microseconds per BRPOP over the routed queue and `tenants` tenant queues (4 lists each, priority-major as
    kombu orders them) when only the last list holds a message (Redis checks every key before it): the median
    round trip from Python (building the command included), and Redis's own time (INFO commandstats)."""
    r = redis.Redis.from_url(url)
    base = f"bench-brpop-{uuid.uuid4().hex[:8]}"
    names = [base, *(f"{base}.t.{n:016x}" for n in range(tenants))]
    keys = [lists[step] for step in range(4) for lists in (priority_lists(n) for n in names)]
    try:
        times, before = [], _brpop_stats(r)
        for _ in range(calls):
            r.lpush(keys[-1], b"x")
            start = time.perf_counter()
            r.brpop(keys, timeout=1)
            times.append(time.perf_counter() - start)
        after = _brpop_stats(r)  # other clients' BRPOPs meanwhile blur this a little: a shared server
        server = (after[1] - before[1]) / max(1, after[0] - before[0])
        return statistics.median(times) * 1e6, server
    finally:
        r.delete(*keys)


def _brpop_stats(r: Any) -> tuple[int, int]:
    stats = r.info("commandstats").get("cmdstat_brpop", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=500)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/7")
    args = parser.parse_args()
    for fair in (False, True):
        waited, seconds = b_wait(args.redis, args.backlog, fair)
        label = "fair share" if fair else "FIFO (KIQ_FAIR_SHARE=0)"
        print(f"{label:24s} A's backlog {args.backlog}: B's job starts after {waited} job time(s) per device "
              f"(run {seconds:.1f} s)")  # fmt: skip
    print("BRPOP, only the last of the keys non-empty: median round trip from Python / Redis's own time per call")
    for tenants in (0, 10, 100, 1000):
        trip, server = brpop_cost(args.redis, tenants, args.calls)
        print(f"  {tenants:5d} tenant queues ({4 * (tenants + 1):5d} keys): {trip:8.0f} µs / {server:6.0f} µs")


if __name__ == "__main__":
    main()
