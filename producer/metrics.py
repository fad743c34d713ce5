"""Queue metrics for Prometheus, read from Redis at each scrape: the API's `/metrics` and `kiq exporter`.

A scrape is one pipeline per Redis server (the broker, and the results' server where it is another one): per
queue and priority list its length (LLEN) and its next job (LINDEX -1: kombu LPUSHes and BRPOPs, so the tail is
the oldest waiting message, and its `kiq_submitted_at` header its submit time), the size of the unacked hash, and
the live workers from the fleet index (one EVAL). A queue's tenant queues (fair share, kiq/fairshare.py) count
as the queue: the same pipeline reads them (HKEYS per queue) for the next scrape, and a scrape that finds them
changed reads again. The work grows with queues x tenants x 4 lists and with workers, never with the number of
queued jobs. Private kombu layout:
tests/integration/test_queue_metrics.py pins it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kiq import redisconn
from kiq.celeryconf import PRIORITY_STEPS, priority_lists
from kiq.names import FLEET_INDEX, WEBHOOK_QUEUE, tenant_queues_key, unacked_keys
from kiq.settings import Settings

log = logging.getLogger(__name__)
# kombu's priority step -> the job priorities it holds (as in producer/client.py's PRIORITY_CLASSES)
CLASSES = {0: "7-9", 3: "4-6", 6: "1-3", 9: "0"}
LIVE_S = 15.0  # a heartbeat older than this is a dead worker (worker/fleet.py beats every 5 s, expires after 15)
MAX_QUEUES = 256  # queues learned from workers are remembered up to this many
# Live workers from the index: device, queues and current job of each, without a SCAN of the keyspace.
FLEET_SCRIPT = """
local out = {}
for _, key in ipairs(redis.call('zrangebyscore', KEYS[1], ARGV[1], '+inf')) do
  local f = redis.call('hmget', key, 'device', 'queues', 'current_job')
  if f[1] then out[#out + 1] = {f[1], f[2] or '', f[3] or ''} end
end
return out
"""


@dataclass
class Snapshot:
    """What one scrape read."""

    depth: dict[tuple[str, str], int] = field(default_factory=dict)  # (queue, priority class) -> jobs waiting
    oldest: dict[tuple[str, str], float] = field(default_factory=dict)  # (queue, class) -> age of its next job, s
    webhook_backlog: int = 0
    webhook_oldest: float = 0.0
    unacked: int = 0  # delivered to a worker, not yet acknowledged (running or prefetched)
    workers: list[tuple[str, str, str]] = field(default_factory=list)  # (device, queues, current job)
    seconds: float = 0.0
    stale: bool = False  # a queue's tenant queues changed during the read: its depths miss the new ones


class QueueCollector:
    """A prometheus_client collector: every collect() is one read of Redis."""

    def __init__(self, settings: Settings, broker: Any, results: Any, queues: Iterable[str] = ()) -> None:
        self.broker, self.results = broker, results
        self.unacked_key = unacked_keys(settings.visibility_timeout_s)["unacked_key"]
        configured = [settings.queue, settings.large_queue, *settings.metrics_queues.split(","), *queues]
        self.queues = sorted({q.strip() for q in configured if q.strip()})
        self.tenant_queues: dict[str, list[str]] = {}  # queue -> its tenant queues, as the last scrape read them
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, queues: Iterable[str] = ()) -> QueueCollector:
        broker = redisconn.connect(settings.broker_server, settings)
        same = settings.broker_server == settings.results_server
        results = broker if same else redisconn.connect(settings.results_server, settings)
        return cls(settings, broker, results, queues)

    def read(self, now: float | None = None) -> Snapshot:
        start = time.perf_counter()
        now = time.time() if now is None else now
        with self._lock:
            queues = list(self.queues)
            members = {q: [q, *self.tenant_queues.get(q, [])] for q in queues} | {WEBHOOK_QUEUE: [WEBHOOK_QUEUE]}
        snap = Snapshot()
        broker = self.broker.pipeline(transaction=False)
        fleet = broker if self.results is self.broker else self.results.pipeline(transaction=False)
        fleet.eval(FLEET_SCRIPT, 1, FLEET_INDEX, now - LIVE_S)
        for queue in queues:
            fleet.hkeys(tenant_queues_key(queue))
        for queue in [*queues, WEBHOOK_QUEUE]:
            for name in (name for member in members[queue] for name in priority_lists(member)):
                broker.llen(name)
                broker.lindex(name, -1)
        broker.hlen(self.unacked_key)
        replies = broker.execute()
        if fleet is broker:
            fleet_replies, replies = replies[: 1 + len(queues)], replies[1 + len(queues) :]
        else:
            fleet_replies = fleet.execute()
        workers, found = fleet_replies[0], fleet_replies[1:]
        snap.stale = self._learn_tenants(queues, found)
        snap.workers = [tuple(_text(v) for v in w) for w in workers]  # type: ignore[misc]
        snap.unacked = int(replies.pop())
        self._fill(snap, queues, members, replies, now)
        self._learn(snap.workers)
        snap.seconds = time.perf_counter() - start
        return snap

    def _learn_tenants(self, queues: list[str], found: list[list[bytes]]) -> bool:
        """Remember each queue's tenant queues (fair share: their jobs count as the queue's); True if they changed
        since the scrape read the lists (then collect reads again)."""
        now = {queue: sorted(k.decode() for k in keys) for queue, keys in zip(queues, found, strict=True)}
        with self._lock:
            stale = any(now[q] != self.tenant_queues.get(q, []) for q in queues)
            self.tenant_queues.update(now)
        return stale

    def _fill(self, snap: Snapshot, queues: list[str], members: dict[str, list[str]], replies: list[Any],
              now: float) -> None:  # fmt: skip
        it = iter(replies)
        for queue in [*queues, WEBHOOK_QUEUE]:
            for _ in members[queue]:
                for step in PRIORITY_STEPS:
                    length, tail = int(next(it)), next(it)
                    age = _age(tail, now) if length else 0.0
                    if queue == WEBHOOK_QUEUE:
                        snap.webhook_backlog += length
                        snap.webhook_oldest = max(snap.webhook_oldest, age)
                    else:
                        key = queue, CLASSES[step]
                        snap.depth[key] = snap.depth.get(key, 0) + length
                        snap.oldest[key] = max(snap.oldest.get(key, 0.0), age)

    def _learn(self, workers: list[tuple[str, str, str]]) -> None:
        """Remember the queues live workers consume: once they are gone, their queues still report 0 workers."""
        seen = {q for _, queues, _ in workers for q in queues.split(",") if q}
        with self._lock:
            new = sorted(seen - set(self.queues))[: max(0, MAX_QUEUES - len(self.queues))]
            self.queues = sorted({*self.queues, *new})

    def collect(self) -> Iterator[Any]:
        try:
            snap = self.read()
            for _ in range(2):  # a worker named a new queue, or a tenant came: report it in this scrape already
                if not (snap.stale or any(q not in {k[0] for k in snap.depth} for q in self.queues)):
                    break
                snap = self.read()  # a queue learned on the read before may bring its own tenant queues
        except redisconn.REDIS_ERRORS as exc:
            log.warning("queue metrics: Redis unavailable: %s", exc)
            yield _scrape_ok(0)
            return
        yield _scrape_ok(1)
        yield from families(snap)


def _scrape_ok(value: int) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    ok = GaugeMetricFamily("kiq_queue_scrape_ok", "1 if the last read of the queues from Redis succeeded")
    ok.add_metric([], value)
    return ok


def families(snap: Snapshot) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    def gauge(name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], float]]) -> Any:
        family = GaugeMetricFamily(name, doc, labels=labels)
        for values, value in rows:
            family.add_metric(values, value)
        return family

    by_queue = sorted({q for q, _ in snap.depth})
    workers_of = {q: sum(q in w[1].split(",") for w in snap.workers) for q in by_queue}
    kinds: dict[str, int] = {}
    for device, _, _ in snap.workers:
        kinds[device.partition(":")[0]] = kinds.get(device.partition(":")[0], 0) + 1
    yield gauge("kiq_queue_depth", "Jobs waiting, by queue and job priority class", ["queue", "priority"],
                ([list(k), v] for k, v in sorted(snap.depth.items())))  # fmt: skip
    yield gauge("kiq_queue_oldest_age_seconds", "Age of the next job to be served (0: none waiting)",
                ["queue", "priority"], ([list(k), v] for k, v in sorted(snap.oldest.items())))  # fmt: skip
    yield gauge("kiq_queue_workers", "Live workers consuming the queue", ["queue"],
                (([q], workers_of[q]) for q in by_queue))  # fmt: skip
    running = sum(1 for w in snap.workers if w[2])
    states = {"queued": sum(snap.depth.values()), "running": running, "unacked": snap.unacked}
    yield gauge("kiq_jobs", "Jobs by state: queued (waiting), running (on a worker's device now), unacked "
                "(delivered, not yet acknowledged: running or prefetched)", ["state"],
                (([s], v) for s, v in states.items()))  # fmt: skip
    yield gauge("kiq_webhook_backlog", "Webhooks waiting to be delivered", [], [([], snap.webhook_backlog)])
    yield gauge("kiq_webhook_oldest_age_seconds", "Age of the next webhook to be delivered", [],
                [([], snap.webhook_oldest)])  # fmt: skip
    yield gauge("kiq_workers", "Live workers by device kind", ["device_kind"], (([k], v) for k, v in kinds.items()))
    yield gauge("kiq_queue_scrape_seconds", "How long the last read of the queues took", [], [([], snap.seconds)])


def _age(raw: Any, now: float) -> float:
    """The age of a kombu message from its kiq_submitted_at header; 0 if it has none (a plain Celery client)."""
    try:
        submitted = json.loads(raw)["headers"]["kiq_submitted_at"]
        return max(0.0, now - float(submitted))
    except (TypeError, ValueError, KeyError):
        return 0.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def registry(collector: QueueCollector) -> Any:
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)  # no describe(): registering must not read Redis
    reg.register(collector)  # type: ignore[arg-type]
    return reg


def install(app: Any, settings: Settings, client: Any, queues: Iterable[str] = ()) -> None:
    """`GET /metrics` on the API (not in the OpenAPI schema), on the client's Redis connections."""
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    same = settings.broker_server == settings.results_server
    broker = client.redis if same else client.broker_redis
    reg = registry(QueueCollector(settings, broker, client.redis, queues))

    @app.get("/metrics", include_in_schema=False)
    def metrics_page() -> Response:
        return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)


def run_exporter(settings: Settings, port: int, host: str, queues: Iterable[str] = ()) -> None:
    """`kiq exporter`: the same metrics for deployments without the API."""
    from prometheus_client import start_http_server

    start_http_server(port, host, registry=registry(QueueCollector.from_settings(settings, queues)))
    log.info("kiq exporter: queue metrics on %s:%d/metrics", host, port)
    threading.Event().wait()
