"""kiq/claim.py on real parts: a kombu consumer on kiq's transport, the machine's Redis (KIQ_TEST_REDIS_URL), a TCP
proxy between them, kiq's producer client and a plain Celery app.

The lost-reply test fails on kombu's BRPOP (the job is popped and has no unacked entry: lost) and passes with the
claim (the entry is there, the sweep hands the job back after the visibility timeout, it is consumed once)."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import redis
from celery import Celery
from kombu import Connection as KombuConnection
from kombu import Exchange, Queue

from kiq import claim
from kiq.celeryconf import broker_transport_options, priority_lists
from kiq.names import GENERATE_TASK
from kiq.settings import Settings
from kiq.transport import Connection
from producer.client import Client
from tests.helpers import redis_databases
from tests.integration.jobs import tiny_job
from tests.proxy import Proxy

REDIS_URL, _ = redis_databases()
pytestmark = pytest.mark.integration
VISIBILITY_S = 5


@pytest.fixture
def names():
    tag = uuid.uuid4().hex[:10]
    client = redis.Redis.from_url(REDIS_URL)
    yield tag, client
    keys = list(client.scan_iter(match=f"*{tag}*", count=1000))
    if keys:
        client.delete(*keys)


def options(tag: str) -> dict:
    return {"unacked_key": f"claimit:{tag}:unacked", "unacked_index_key": f"claimit:{tag}:unacked_index",
            "unacked_mutex_key": f"claimit:{tag}:mutex", "visibility_timeout": VISIBILITY_S,
            "unacked_restore_throttle": 1, "unacked_mutex_expire": 5, "priority_steps": [0, 3, 6, 9],
            "queue_order_strategy": "priority"}  # fmt: skip


def drain_for(conn, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            pass


@pytest.mark.parametrize("idle", [False, True], ids=["waiting-job", "idle-consumer"])
def test_a_claim_whose_reply_never_arrives_is_handed_back_by_the_sweep_and_consumed_once(names, idle):
    """waiting-job: the job is there when the consumer starts (its claim goes alone); idle-consumer: the consumer
    waits on its doorbell first (the claim is pipelined after the BLPOP), then the job and its doorbell come."""
    tag, client = names
    name = f"claimit-{tag}"
    queue = Queue(name, Exchange(name, "direct"), name)
    job_id = f"job-{uuid.uuid4().hex}"

    def publish() -> None:
        with KombuConnection(REDIS_URL, transport_options=options(tag)) as producer:
            producer.Producer().publish({"n": 1}, exchange=queue.exchange, routing_key=name, declare=[queue],
                                        headers={"id": job_id})  # fmt: skip
        with client.pipeline() as pipe:
            claim.ring(pipe, name)
            pipe.execute()

    if not idle:
        publish()
    proxy = Proxy(client.connection_pool.connection_kwargs["port"])
    proxy.start()
    db = REDIS_URL.rsplit("/", 1)[1]
    got = []
    try:
        proxy.cut_on(job_id.encode())  # the reply carrying the job is dropped, its connection cut
        with Connection(f"redis://127.0.0.1:{proxy.port}/{db}", transport_options=options(tag)) as cut_off:
            with cut_off.Consumer(queue, callbacks=[lambda body, message: got.append(message)]):
                if idle:
                    drain_for(cut_off, 2.5)
                    publish()
                with pytest.raises(cut_off.connection_errors):
                    cut_off.drain_events(timeout=10)
        assert proxy.cut.is_set() and got == []
    finally:
        proxy.stop()
    assert not any(client.llen(key) for key in priority_lists(name))  # Redis popped it
    entries = client.hgetall(options(tag)["unacked_key"])
    assert [json.loads(raw)[0]["headers"]["id"] for raw in entries.values()] == [job_id], (
        "the job was popped and has no unacked entry: lost"
    )
    (tag_held,) = entries
    assert client.zscore(options(tag)["unacked_index_key"], tag_held) is not None

    started = time.monotonic()
    with Connection(REDIS_URL, transport_options=options(tag)) as conn:
        with conn.Consumer(queue, callbacks=[lambda body, message: got.append(message)]):
            while not got and time.monotonic() - started < 6 * VISIBILITY_S:
                drain_for(conn, 1)
            assert [m.headers["id"] for m in got] == [job_id], "the sweep never handed the job back"
            assert got[0].delivery_info.get("redelivered")
            print(f"handed back and consumed {time.monotonic() - started:.1f} s after the lost reply")
            got[0].ack()
            drain_for(conn, 2 * VISIBILITY_S)  # never a second time
    assert len(got) == 1
    assert not client.exists(options(tag)["unacked_key"], options(tag)["unacked_index_key"])


def test_a_doorbell_wakes_an_idle_consumer_and_a_plain_celery_publish_is_claimed_without_one(names):
    tag, client = names
    env = {"KIQ_BROKER_URL": REDIS_URL, "KIQ_QUEUE": f"claimit-{tag}", "KIQ_FAIR_SHARE": "0"}
    settings = Settings.from_env(env)
    kiq_client = Client(settings)
    plain = Celery("plain", broker=REDIS_URL, set_as_current=False)  # Celery's defaults: no doorbell
    queue = Queue(settings.queue, Exchange(settings.queue, "direct"), settings.queue)
    delivered: dict[str, float] = {}
    stop = threading.Event()
    ready = threading.Event()

    def consume() -> None:
        opts = {**broker_transport_options(settings), **options(tag)}
        with Connection(REDIS_URL, transport_options=opts) as conn:

            def on_message(body, message):
                delivered[message.headers["id"]] = time.monotonic()
                message.ack()

            with conn.Consumer(queue, callbacks=[on_message]):
                ready.set()
                while not stop.is_set():
                    drain_for(conn, 0.2)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    try:
        assert ready.wait(10)
        latencies: dict[str, list[float]] = {"doorbell (kiq client)": [], "no doorbell (plain Celery)": []}
        for _ in range(5):
            for how, send in (("doorbell (kiq client)", lambda: kiq_client.submit(tiny_job(), feasible=True)),
                              ("no doorbell (plain Celery)", lambda: plain.send_task(
                                  GENERATE_TASK, args=[tiny_job()], queue=settings.queue).id)):  # fmt: skip
                time.sleep(1.5)  # the consumer is idle, waiting on its doorbell
                sent = time.monotonic()
                job_id = send()
                deadline = time.monotonic() + 10
                while job_id not in delivered and time.monotonic() < deadline:
                    time.sleep(0.002)
                assert job_id in delivered, f"{how}: never delivered"
                latencies[how].append(delivered[job_id] - sent)
        for how, seen in latencies.items():
            print(f"pickup latency, {how}: median {sorted(seen)[len(seen) // 2] * 1000:.1f} ms, "
                  f"max {max(seen) * 1000:.1f} ms over {len(seen)}")  # fmt: skip
    finally:
        stop.set()
        consumer.join(10)
        plain.close()
        if delivered:
            client.delete(*(f"kiq:job:{job}" for job in delivered))
