"""kiq/publish.py against the real Redis (KIQ_TEST_REDIS_URL): a job's publish commits its Idempotency-Key in the
same script, once, and only while the key's pending mark is the submit's own."""

import inspect
import json
import uuid

import pytest
import redis
from kombu.connection import ConnectionPool
from kombu.transport import redis as kombu_redis

from kiq import library_internals as internals
from kiq import publish
from kiq.celeryconf import priority_lists
from kiq.errors import SubmitAbandoned
from kiq.names import GENERATE_TASK
from kiq.settings import Settings
from producer.client import Client
from tests.helpers import redis_databases

REDIS_URL, SPARE_URL = redis_databases()


@pytest.fixture
def setup():
    queue, mark = f"kiq-publish-{uuid.uuid4().hex[:8]}", f"kiq:test:idem:{uuid.uuid4().hex}"
    client = Client(Settings.from_env({"KIQ_BROKER_URL": REDIS_URL, "KIQ_QUEUE": queue}))
    db = redis.Redis.from_url(REDIS_URL)
    yield client, db, queue, mark
    publish.disarm()
    db.delete(mark, *priority_lists(queue))
    client.app.close()


def send(client, queue, job_id):
    client.app.send_task(GENERATE_TASK, args=[{}], task_id=job_id, queue=queue)


def ids_on(db, queue):
    return [json.loads(raw)["headers"]["id"] for name in priority_lists(queue) for raw in db.lrange(name, 0, -1)]


def test_the_publish_pushes_and_commits_once_and_a_retried_publish_pushes_nothing(setup):
    client, db, queue, mark = setup
    job_id = str(uuid.uuid4())
    db.set(mark, "pending-ours", px=60_000)
    commit = publish.Commit(job_id, mark, "pending-ours", "committed", 600)
    publish.arm(commit)
    send(client, queue, job_id)
    assert commit.done and ids_on(db, queue) == [job_id]
    assert db.get(mark) == b"committed" and 590 < db.ttl(mark) <= 600
    with client.app.producer_or_acquire() as producer:  # Celery's pool: kiq's transport as well
        assert isinstance(producer.channel, publish.Channel)
    send(client, queue, job_id)  # kombu's publish retry after a lost reply: the script finds it committed
    assert ids_on(db, queue) == [job_id]
    assert publish.disarm() is commit and publish.disarm() is None


def test_a_mark_that_is_no_longer_the_submits_own_enqueues_nothing(setup):
    client, db, queue, mark = setup
    job_id = str(uuid.uuid4())
    db.set(mark, "pending-another-request", px=60_000)
    publish.arm(publish.Commit(job_id, mark, "pending-ours", "committed", 600))
    with pytest.raises(SubmitAbandoned):
        send(client, queue, job_id)
    db.delete(mark)  # lapsed
    with pytest.raises(SubmitAbandoned):
        send(client, queue, job_id)
    assert ids_on(db, queue) == [] and db.get(mark) is None


def test_other_messages_publish_as_kombu_does(setup):
    client, db, queue, mark = setup
    armed, other = str(uuid.uuid4()), str(uuid.uuid4())
    publish.arm(publish.Commit(armed, mark, "pending-ours", "committed", 600))
    send(client, queue, other)  # not the armed job: no script, no commit
    assert ids_on(db, queue) == [other] and db.get(mark) is None


def test_only_one_redis_database_for_broker_and_results_commits_in_the_publish():
    assert publish.shares_redis(Settings.from_env({"KIQ_BROKER_URL": REDIS_URL}))
    split = Settings.from_env({"KIQ_BROKER_URL": REDIS_URL, "KIQ_RESULT_BACKEND": SPARE_URL})
    assert not publish.shares_redis(split)


def test_kombus_put_is_still_the_one_overridden():
    """kiq/publish.py replaces kombu 5.7's Redis `_put` for armed messages: fail loudly if it changes."""
    source = inspect.getsource(kombu_redis.Channel._put)
    parts = (
        "_get_message_priority(message, reverse=False)",
        "self._q_for_pri(queue, pri)",
        "kwargs.pop('_publish_batch', None)",
        "client.lpush(key, dumps(message))",
        "self._expires",
    )
    assert [part for part in parts if part not in source] == []
    assert "PooledConnection(self, **dict(self.connection._info(resolve=False)))" in inspect.getsource(
        ConnectionPool.new)  # fmt: skip
    assert list(inspect.signature(kombu_redis.Channel._put).parameters) == ["self", "queue", "message", "kwargs"]
    assert "EVAL" not in kombu_redis.GlobalKeyPrefixMixin.PREFIXED_COMPLEX_COMMANDS  # the script prefixes its keys
    for channel in (publish.Channel, publish.SentinelChannel):
        assert channel._put is internals.PutHook._put  # nothing between the hook and kombu's _put overrides it


def test_a_plain_celery_apps_pool_for_the_same_broker_is_not_shared(setup):
    """kombu pools connections process-wide by broker, not by class: kiq's producer must still get its own."""
    from celery import Celery

    from kiq.celeryconf import common_config

    client = setup[0]
    plain = Celery("plain", set_as_current=False)
    plain.conf.update(common_config(client.settings))
    with plain.producer_or_acquire() as producer:
        assert not isinstance(producer.channel, publish.Channel)
    with client.app.producer_or_acquire() as producer:
        assert isinstance(producer.channel, publish.Channel)
    plain.close()


def test_a_replay_writes_back_a_forgotten_record_but_never_a_deleted_jobs(setup):
    from kiq.contract import parse_job
    from kiq.names import deleted_key, job_record_key, jobs_index_key

    client, db = setup[:2]
    owner, forgotten, deleted = f"owner-{uuid.uuid4().hex[:6]}", str(uuid.uuid4()), str(uuid.uuid4())
    job = parse_job({"inputs": [{"text": "a cat", "weight": 1.0}], "webhook_url": "https://example.com/hook"})
    db.set(deleted_key(deleted), "1")
    try:
        client.keep_record(forgotten, job, owner)
        client.keep_record(deleted, job, owner)
        record = json.loads(db.get(job_record_key(forgotten)))
        assert record == {"owner": owner, "webhook_url": "https://example.com/hook"}
        assert [m.decode() for m in db.zrange(jobs_index_key(owner), 0, -1)] == [forgotten]
        assert db.get(job_record_key(deleted)) is None
        db.set(job_record_key(forgotten), "as it was")
        client.keep_record(forgotten, job, owner)  # an existing record is left alone
        assert db.get(job_record_key(forgotten)) == b"as it was"
    finally:
        db.delete(deleted_key(deleted), job_record_key(forgotten), jobs_index_key(owner))
