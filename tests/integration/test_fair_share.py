"""Fair share and admin controls on real parts: one `kiq worker` (solo pool) of its own queue, a `kiq api` with
five tenant keys (one of weight 2, one admin), the session's Redis and S3 server. Jobs' start order is read from
their event streams (the STARTED entry's id is Redis's clock in ms)."""

import json
import subprocess
import time
import uuid

import httpx
import pytest
from celery import Celery

from kiq.names import events_key, tenant_queues_key, webhook_queued_key
from kiq.settings import Settings
from producer import devstack
from producer.client import Client
from producer.metrics import QueueCollector
from tests.helpers import Receiver, wait_state
from tests.integration.conftest import REDIS_URL
from tests.integration.jobs import tiny_job
from worker.tenantqueues import DRAINED_EXIT

KEYS = {name: f"fair-{name}-key-{uuid.uuid4().hex[:8]}" for name in ("a", "b", "c", "d", "root")}
TENANTS = {"tenants": [
    {"name": "a", "key": KEYS["a"], "max_priority": 9}, {"name": "b", "key": KEYS["b"]},
    {"name": "c", "key": KEYS["c"], "weight": 2}, {"name": "d", "key": KEYS["d"]},
    {"name": "root", "key": KEYS["root"], "admin": True},
]}  # fmt: skip
HEADERS = {name: {"Authorization": f"Bearer {key}"} for name, key in KEYS.items()}
BLOCKER_STEPS = 12  # a job that keeps the one worker busy while a test queues the jobs it orders


@pytest.fixture(scope="module")
def fair(env, logs):
    overrides = {"KIQ_QUEUE": f"kiq-fair-{uuid.uuid4().hex[:8]}", "KIQ_DEVICE_ID": "5", "KIQ_FAIR_SHARE_POLL_S": "0.2",
                 "KIQ_API_TENANTS": json.dumps(TENANTS), "KIQ_API_PORT": str(devstack.free_port()),
                 "KIQ_WEBHOOK_SECRET": "fair-share-webhook-secret"}  # fmt: skip
    fair_env = {**env, **overrides}
    with devstack.Stack() as stack:
        worker = devstack.start_worker(stack, fair_env, logs / "fair-worker.log")
        with start_api(stack, fair_env, logs / "fair-api.log") as api:
            yield api, Client(Settings.from_env(fair_env)), fair_env, worker


def start_api(stack, api_env, log) -> httpx.Client:
    base = f"http://127.0.0.1:{api_env['KIQ_API_PORT']}"
    proc = stack.spawn([*devstack.kiq_command(), "api"], log, api_env)
    devstack.wait_until(lambda: devstack.http_up(base + "/healthz"), 60, "kiq api", proc, log)
    return httpx.Client(base_url=base, timeout=60)


def submit(api, tenant: str, **job) -> str:
    response = api.post("/v1/jobs", json=tiny_job(**job), headers=HEADERS[tenant])
    assert response.status_code == 202, response.text
    return response.json()["id"]


def started_ms(client: Client, job_id: str) -> int:
    for entry_id, fields in client.redis.xrange(events_key(job_id)):
        if json.loads(fields[b"meta"])["status"] == "STARTED":
            return int(entry_id.split(b"-")[0])
    raise AssertionError(f"{job_id} has no STARTED event")


def start_order(client: Client, jobs: dict[str, str]) -> list[str]:
    """Wait for every job (id -> label) to succeed; their labels in the order the worker started them."""
    for job_id, label in jobs.items():
        devstack.wait_until(lambda j=job_id: client.status(j).state == "SUCCESS", 240, f"{label}'s job {job_id}")
    return [jobs[j] for j in sorted(jobs, key=lambda j: started_ms(client, j))]


def blocked(client: Client) -> str:
    """A job of no tenant that the worker has started: what the test queues next waits behind it."""
    job_id = client.submit(tiny_job(decoder_steps=BLOCKER_STEPS, seed=1))
    devstack.wait_until(lambda: client.status(job_id).state in ("STARTED", "PROGRESS"), 120, "the blocking job")
    return job_id


def test_b_does_not_wait_for_as_backlog(fair):
    api, client, *_ = fair
    backlog = [submit(api, "a", seed=n) for n in range(5)]
    seconds, micros = client.redis.time()
    b_submitted_ms = seconds * 1000 + micros // 1000
    b = submit(api, "b", seed=99)
    order = start_order(client, {**dict.fromkeys(backlog, "a"), b: "b"})
    a_between = [j for j in backlog if b_submitted_ms <= started_ms(client, j) < started_ms(client, b)]
    # At most the job that began while the worker learned b's new queue (KIQ_FAIR_SHARE_POLL_S).
    assert len(a_between) <= 1, order
    assert order.index("b") <= 2, order


def test_a_weight_2_tenant_gets_two_turns_per_round(fair):
    api, client, *_ = fair
    blocker = blocked(client)
    jobs = {submit(api, "c", seed=n): "c" for n in range(3)}
    jobs.update({submit(api, "d", seed=n): "d" for n in range(3)})
    order = start_order(client, {blocker: "blocker", **jobs})
    assert order[0] == "blocker"
    rounds = order[1:]
    assert rounds[:3].count("c") == 2 and rounds[3:5].count("c") == 1, order  # c c d, then c once more with d


def test_a_more_urgent_job_still_goes_first_across_tenants(fair):
    api, client, *_ = fair
    blocker = blocked(client)
    b_low = submit(api, "b", priority=0, seed=3)
    a_high = submit(api, "a", priority=9, seed=4)
    order = start_order(client, {blocker: "blocker", b_low: "b", a_high: "a"})
    assert order == ["blocker", "a", "b"]


def test_a_plain_celery_send_to_the_routed_queue_takes_the_default_tenants_turn(fair):
    api, client, fair_env, _ = fair
    blocker = blocked(client)
    backlog = {submit(api, "a", seed=n): "a" for n in range(3)}
    foreign = str(uuid.uuid4())
    plain = Celery("plain", broker=REDIS_URL, set_as_current=False)
    try:
        plain.send_task("kiq.generate", args=[tiny_job(seed=12)], task_id=foreign, queue=fair_env["KIQ_QUEUE"])
    finally:
        plain.close()
    order = start_order(client, {blocker: "blocker", **backlog, foreign: "foreign"})
    assert order.index("foreign") <= 2, order


def test_depths_count_tenant_queues_and_only_admins_see_each_tenants(fair):
    api, client, fair_env, _ = fair
    queue = fair_env["KIQ_QUEUE"]
    blocker = blocked(client)
    jobs = [submit(api, "a", seed=n) for n in range(2)] + [submit(api, "b", seed=5)]
    try:
        assert sum(client.queue_depths([queue])[queue].values()) == 3
        assert sum(api.get("/v1/fleet", headers=HEADERS["b"]).json()["queues"][queue].values()) == 3
        collector = QueueCollector.from_settings(client.settings, [queue])
        first = collector.read()  # finds the tenant queues: stale, so a scrape reads again
        again = collector.read()
        for _ in range(3):  # each read may also learn a live worker's queue (other tests' workers) and its tenants
            if not again.stale:
                break
            again = collector.read()
        assert first.stale and not again.stale
        assert sorted(collector.tenant_queues[queue]) == sorted(k.decode() for k in client.redis.hkeys(
            tenant_queues_key(queue)))  # fmt: skip
        assert sum(n for (name, _), n in again.depth.items() if name == queue) == 3
        denied = api.get(f"/v1/admin/queues/{queue}", headers=HEADERS["a"])
        assert denied.status_code == 403 and denied.json()["detail"][0]["type"] == "AdminOnly"
        per_tenant = api.get(f"/v1/admin/queues/{queue}", headers=HEADERS["root"]).json()
        assert sorted(n for n in per_tenant.values() if n) == [1, 2] and per_tenant[queue] == 0
    finally:
        start_order(client, {blocker: "blocker", **dict.fromkeys(jobs, "a")})
    # A plain `celery inspect` still answers (between jobs: a solo pool reads control messages only then), and
    # lists the tenant queues the worker added.
    plain = Celery("plain", broker=REDIS_URL, set_as_current=False)
    try:
        replies = plain.control.inspect(timeout=10).active_queues() or {}
    finally:
        plain.close()
    names = {q["name"] for queues in replies.values() for q in queues}
    assert set(per_tenant) <= names, replies


def test_purge_a_tenants_queued_jobs_over_the_api(fair):
    api, client, fair_env, _ = fair
    queue = fair_env["KIQ_QUEUE"]
    with Receiver() as receiver:
        blocker = blocked(client)
        a_jobs = [submit(api, "a", seed=n, webhook_url=receiver.url) for n in range(3)]
        b_job = submit(api, "b", seed=9)
        body = {"queue": queue, "tenant": "a", "confirm": queue}
        denied = api.post("/v1/admin/purge", json=body, headers=HEADERS["a"])
        assert denied.status_code == 403 and denied.json()["detail"][0]["type"] == "AdminOnly"
        unconfirmed = api.post("/v1/admin/purge", json={**body, "confirm": "kiq"}, headers=HEADERS["root"])
        assert unconfirmed.status_code == 422 and unconfirmed.json()["detail"][0]["type"] == "NotConfirmed"
        unknown = api.post("/v1/admin/purge", json={**body, "tenant": "nobody"}, headers=HEADERS["root"])
        assert unknown.status_code == 404
        purged = api.post("/v1/admin/purge", json=body, headers=HEADERS["root"])
        assert purged.status_code == 200 and purged.json()["purged"] == 3, purged.text
        for job_id in a_jobs:
            status = api.get(f"/v1/jobs/{job_id}", headers=HEADERS["a"]).json()
            assert status["state"] == "REVOKED", status
            assert client.redis.exists(webhook_queued_key(job_id))
        assert wait_state(api, b_job, HEADERS["b"])["state"] == "SUCCESS"
        assert client.status(blocker).state == "SUCCESS"
        time.sleep(1)  # a purged job a worker took meanwhile would show STARTED by now
        assert {api.get(f"/v1/jobs/{j}", headers=HEADERS["a"]).json()["state"] for j in a_jobs} == {"REVOKED"}


def test_kiq_purge_a_whole_queue_needs_its_name_typed_again(fair):
    api, client, fair_env, _ = fair
    queue = fair_env["KIQ_QUEUE"]
    blocker = blocked(client)
    jobs = [submit(api, "a", seed=n) for n in range(2)] + [submit(api, "d", seed=3)]
    plain = Celery("plain", broker=REDIS_URL, set_as_current=False)
    foreign = str(uuid.uuid4())
    try:
        plain.send_task("kiq.generate", args=[tiny_job(seed=12)], task_id=foreign, queue=queue)
    finally:
        plain.close()
    command = [*devstack.kiq_command(), "purge", queue, "--yes-i-mean-it"]
    refused = subprocess.run([*command, "kiq"], env=fair_env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--yes-i-mean-it" in refused.stderr
    done = subprocess.run([*command, queue], env=fair_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["purged"] == 4
    assert {client.status(j).state for j in [*jobs, foreign]} == {"REVOKED"}
    assert sum(client.queue_depths([queue])[queue].values()) == 0
    devstack.wait_until(lambda: client.status(blocker).state == "SUCCESS", 120, "the blocking job")


def test_drain_a_worker_finishes_its_job_then_exits_and_keeps_the_queued_one(fair, spawn_worker):
    api, _, fair_env, _ = fair
    queue = f"kiq-drain-{uuid.uuid4().hex[:8]}"
    proc, _ = spawn_worker("drain", KIQ_QUEUE=queue, KIQ_DEVICE_ID="6", KIQ_FAIR_SHARE_POLL_S="0.2")
    other = Client(Settings.from_env({**fair_env, "KIQ_QUEUE": queue}))
    (hostname,) = {w["hostname"] for w in other.fleet() if w["queues"] == queue}
    running = other.submit(tiny_job(decoder_steps=BLOCKER_STEPS, seed=1))
    queued = other.submit(tiny_job(seed=2))
    devstack.wait_until(lambda: other.status(running).state in ("STARTED", "PROGRESS"), 120, "the running job")
    denied = api.post(f"/v1/admin/fleet/{hostname}/drain", headers=HEADERS["b"])
    assert denied.status_code == 403 and denied.json()["detail"][0]["type"] == "AdminOnly"
    assert api.post("/v1/admin/fleet/kiq@nowhere/drain", headers=HEADERS["root"]).status_code == 404
    drained = api.post(f"/v1/admin/fleet/{hostname}/drain", headers=HEADERS["root"])
    assert drained.status_code == 202 and drained.json() == {"worker": hostname, "processes": 1}
    assert proc.wait(timeout=180) == DRAINED_EXIT
    assert other.status(running).state == "SUCCESS"
    assert other.status(queued).state == "PENDING"
    assert sum(other.queue_depths([queue])[queue].values()) == 1  # still queued for the next worker


def test_a_message_handed_back_returns_to_its_tenant_queue(env):
    """A delivery that is not acknowledged (a worker lost its connection) goes back to the tenant's queue, not
    the routed one: kombu restores it by the exchange and routing key it was sent with."""
    from kombu import Consumer, Exchange, Queue

    from kiq.celeryconf import broker_transport_options, priority_lists
    from kiq.names import tenant_queue
    from kiq.transport import Connection

    settings = Settings.from_env({**env, "KIQ_QUEUE": f"kiq-back-{uuid.uuid4().hex[:8]}"})
    client = Client(settings)
    job_id = client.submit(tiny_job(), owner="0123456789abcdef")
    mine = tenant_queue(settings.queue, "0123456789abcdef")
    depth = lambda name: sum(client.redis.llen(key) for key in priority_lists(name))  # noqa: E731
    assert (depth(mine), depth(settings.queue)) == (1, 0)
    taken = []
    with Connection(settings.broker_url, transport_options=broker_transport_options(settings)) as conn:
        channel = conn.channel()
        channel.basic_qos(0, 1, False)
        consumer = Consumer(channel, [Queue(mine, Exchange(mine), routing_key=mine)], accept=["json"],
                            callbacks=[lambda body, message: taken.append(message.headers["id"])])  # fmt: skip
        consumer.consume()
        conn.drain_events(timeout=10)
        assert taken == [job_id] and depth(mine) == 0
    assert (depth(mine), depth(settings.queue)) == (1, 0)  # handed back on close, to the tenant's queue
    client.redis.delete(*priority_lists(mine))
