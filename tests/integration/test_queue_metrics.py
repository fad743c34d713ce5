"""Queue metrics (producer/metrics.py) on a real `kiq api` process's /metrics and a `kiq exporter` process,
against the machine's Redis and the session's worker. They also pin kombu's Redis layout: one list per priority
step, LPUSHed and BRPOPed (the tail is the next job)."""

import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiq.celeryconf import priority_lists
from kiq.names import WEBHOOK_QUEUE
from kiq.settings import Settings
from kiq.webhooks import queue_webhook
from producer import devstack
from producer.client import Client
from producer.metrics import QueueCollector
from tests.integration.jobs import tiny_job


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(url, timeout=30).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def value(samples, name, **labels) -> float:
    return samples[name, frozenset(labels.items())]


@pytest.fixture(scope="module")
def idle_queue() -> str:
    return f"kiq-qm-{uuid.uuid4().hex[:8]}"  # no worker consumes it: what is queued stays queued


@pytest.fixture(scope="module")
def metrics_env(env, idle_queue):
    return {**env, "KIQ_METRICS_QUEUES": idle_queue, "KIQ_API_PORT": str(devstack.free_port())}


@pytest.fixture(scope="module")
def queued(metrics_env, idle_queue, redis_client):
    """Two priority-9 jobs (the first 2 s older than the rest) and three priority-0 jobs on the idle queue."""
    client = Client(Settings.from_env(metrics_env))
    before_first = time.time()
    client.submit(tiny_job(queue=idle_queue, priority=9))
    after_first = time.time()
    time.sleep(2)
    client.submit(tiny_job(queue=idle_queue, priority=9))
    for _ in range(3):
        client.submit(tiny_job(queue=idle_queue, priority=0))
    yield before_first, after_first
    for name in _lists(idle_queue):
        redis_client.delete(name)


def check_queue(samples, queue, queued, started, ended):
    before_first, after_first = queued
    assert value(samples, "kiq_queue_depth", queue=queue, priority="7-9") == 2
    assert value(samples, "kiq_queue_depth", queue=queue, priority="0") == 3
    assert value(samples, "kiq_queue_depth", queue=queue, priority="4-6") == 0
    age = value(samples, "kiq_queue_oldest_age_seconds", queue=queue, priority="7-9")
    assert started - after_first <= age <= ended - before_first, (age, started - after_first)
    assert value(samples, "kiq_queue_oldest_age_seconds", queue=queue, priority="4-6") == 0
    assert value(samples, "kiq_queue_workers", queue=queue) == 0
    assert value(samples, "kiq_jobs", state="queued") >= 5
    assert value(samples, "kiq_queue_scrape_ok") == 1


def test_api_metrics_show_what_is_queued_and_who_consumes(metrics_env, idle_queue, queued, worker, logs, env):
    with devstack.Stack() as stack:
        base = f"http://127.0.0.1:{metrics_env['KIQ_API_PORT']}"
        proc = stack.spawn([*devstack.kiq_command(), "api"], logs / "api-metrics.log", metrics_env)
        devstack.wait_until(lambda: devstack.http_up(base + "/healthz"), 60, "kiq api", proc, logs / "api-metrics.log")
        started = time.time()
        samples = scrape(base + "/metrics")
        check_queue(samples, idle_queue, queued, started, time.time())
        # the session's worker (CPU) beats into the fleet index and consumes KIQ_QUEUE
        assert value(samples, "kiq_workers", device_kind="cpu") >= 1
        assert value(samples, "kiq_queue_workers", queue=env["KIQ_QUEUE"]) >= 1


def test_exporter_serves_the_same_metrics_and_the_webhook_backlog(metrics_env, idle_queue, queued, logs):
    client = Client(Settings.from_env(metrics_env))
    job_id = f"qm-{uuid.uuid4().hex[:8]}"
    # the oldest webhook must be this test's: earlier files in this database (a purge with no webhook worker
    # running) may have left theirs queued
    client.broker_redis.delete(*priority_lists(WEBHOOK_QUEUE))
    assert queue_webhook(client.app, client.redis, job_id, "http://127.0.0.1:9/hook", 60)
    port = devstack.free_port()
    with devstack.Stack() as stack:
        log = logs / "exporter.log"
        proc = stack.spawn([*devstack.kiq_command(), "exporter", "--port", str(port), "--host", "127.0.0.1"],
                           log, metrics_env)  # fmt: skip
        url = f"http://127.0.0.1:{port}/metrics"
        devstack.wait_until(lambda: devstack.http_up(url), 60, "kiq exporter", proc, log)
        started = time.time()
        samples = scrape(url)
        check_queue(samples, idle_queue, queued, started, time.time())
        assert value(samples, "kiq_webhook_backlog") >= 1
        assert 0 < value(samples, "kiq_webhook_oldest_age_seconds") < 120


class Counting:
    """A Redis client whose pipelines count the commands they send and the bytes of the replies' strings."""

    def __init__(self, redis):
        self.redis, self.commands, self.reply_bytes, self.pipelines = redis, 0, 0, 0

    def pipeline(self, transaction=False):
        pipe, outer = self.redis.pipeline(transaction=transaction), self
        real = pipe.execute

        def execute():
            outer.pipelines += 1
            outer.commands += len(pipe.command_stack)
            replies = real()
            outer.reply_bytes += sum(len(r) for r in replies if isinstance(r, bytes))
            return replies

        pipe.execute = execute
        return pipe


def test_a_scrape_is_one_pipeline_whose_work_does_not_grow_with_queued_jobs(settings, redis_client):
    queue = f"kiq-qm-{uuid.uuid4().hex[:8]}"
    client = Client(settings)
    counted = []
    try:
        for n in (10, 1000):
            while int(sum(redis_client.llen(q) for q in _lists(queue))) < n:
                client.submit(tiny_job(queue=queue, priority=n % 10))
            counting = Counting(redis_client)
            collector = QueueCollector(settings, counting, counting, [queue])
            snap = collector.read()
            assert snap.depth[queue, "7-9" if n % 10 >= 7 else "0"] == n
            counted.append((counting.pipelines, counting.commands, counting.reply_bytes))
    finally:
        for name in _lists(queue):
            redis_client.delete(name)
    (p10, c10, b10), (p1000, c1000, b1000) = counted
    assert p10 == p1000 == 1
    assert c10 == c1000  # LLEN and LINDEX per list: the same commands for 10 jobs and for 1,000
    assert b1000 <= b10 * 1.1, counted  # one message per list, whatever the depth


def _lists(queue):
    from kiq.celeryconf import priority_lists

    return priority_lists(queue)
