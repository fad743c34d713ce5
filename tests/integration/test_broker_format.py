"""Moving a broker that kiq used with kombu's `sep` set to ':' (before issue 20): real lists and binding tables
written by a real kombu producer on the old options, then kiq.brokerformat and a real worker."""

from __future__ import annotations

import json
import uuid

import pytest
from celery import Celery

from kiq import brokerformat
from kiq.celeryconf import KOMBU_SEP, OLD_SEP, broker_transport_options, common_config, priority_lists
from kiq.settings import Settings
from producer import devstack
from producer.client import Client
from tests.integration.conftest import REDIS_URL
from tests.integration.jobs import tiny_job


def old_kiq_app(settings: Settings) -> Celery:
    """kiq's Celery config as released before issue 20: the same, with kombu's `sep` set to ':'."""
    app = Celery("kiq-old", set_as_current=False)
    app.conf.update(common_config(settings))
    app.conf.broker_transport_options = {**broker_transport_options(settings), "sep": OLD_SEP}
    return app


def queue_settings(env, queue: str) -> Settings:
    return Settings.from_env({**env, "KIQ_QUEUE": queue})


def ids_in(redis_client, key: str) -> list[str]:
    """The task ids in a kombu list, in the order a worker takes them (BRPOP: from the right)."""
    return [json.loads(m)["headers"]["id"] for m in reversed(redis_client.lrange(key, 0, -1))]


def binding_members(redis_client, exchange: str) -> set[bytes]:
    return redis_client.smembers(f"_kombu.binding.{exchange}")


def test_old_lists_move_ahead_of_new_messages_in_order_and_old_bindings_are_rewritten(env, redis_client):
    queue = f"kiq-old-{uuid.uuid4().hex[:8]}"
    settings = queue_settings(env, queue)
    old = old_kiq_app(settings)
    sent = {p: [str(uuid.uuid4()) for _ in range(3)] for p in (0, 3, 9)}  # kombu priorities: steps 0, 3, 9
    for p, ids in sent.items():
        for task_id in ids:
            old.send_task("kiq.generate", args=[tiny_job()], task_id=task_id, queue=queue, priority=p)
    old_lists, new_lists = priority_lists(queue, OLD_SEP), priority_lists(queue)
    assert [ids_in(redis_client, k) for k in old_lists] == [sent[0], sent[3], [], sent[9]]
    assert binding_members(redis_client, queue) == {f"{queue}::{queue}".encode()}
    # A foreign client's message already waits on a new list; a member nobody can parse sits in the table.
    foreign = str(uuid.uuid4())
    plain = Celery("plain", broker=REDIS_URL, set_as_current=False)
    redis_client.lpush(new_lists[1], json.dumps({"headers": {"id": foreign}}))
    redis_client.sadd(f"_kombu.binding.{queue}", "a:b:c:d")
    named = {"queue": queue, "exchange": queue, "routing_key": queue}  # through the binding table, not anonymous
    with pytest.raises(ValueError, match="unpack"):  # what a publish naming the exchange met before the move
        plain.send_task("kiq.generate", args=[tiny_job()], **named)

    done = brokerformat.migrate(redis_client, [queue])

    assert done.messages_moved == 6 and done.bindings_dropped == 1 and done.bindings_rewritten >= 1
    assert not any(redis_client.exists(k) for k in old_lists[1:])
    assert ids_in(redis_client, new_lists[0]) == sent[0]  # the base list has one name in both
    assert ids_in(redis_client, new_lists[1]) == [*sent[3], foreign]  # old ones first, in their order
    assert ids_in(redis_client, new_lists[3]) == sent[9]  # renamed whole
    for key in redis_client.scan_iter(match="_kombu.binding*", _type="set"):
        assert all(len(m.split(KOMBU_SEP.encode())) == 3 for m in redis_client.smembers(key)), key
    assert binding_members(redis_client, queue) == {KOMBU_SEP.join([queue, "", queue]).encode()}
    assert not brokerformat.migrate(redis_client, [queue])  # idempotent: nothing left to do
    # Publishing works again, for kiq's own app and a plain one.
    Client(settings).app.send_task("kiq.generate", args=[tiny_job()], priority=3, **named)
    plain.send_task("kiq.generate", args=[tiny_job()], priority=5, **named)
    assert redis_client.llen(new_lists[1]) == 6


def test_a_long_old_list_moves_in_batches_onto_a_nonempty_new_one(env, redis_client, monkeypatch):
    queue = f"kiq-long-{uuid.uuid4().hex[:8]}"
    old_list, new_list = priority_lists(queue, OLD_SEP)[2], priority_lists(queue)[2]
    redis_client.lpush(old_list, *[f"old-{n}" for n in range(25)])  # LPUSHed like kombu: old-0 is served first
    redis_client.lpush(new_list, "new-0")
    monkeypatch.setattr(brokerformat, "MOVE_BATCH", 10)
    assert brokerformat.migrate(redis_client, [queue]).messages_moved == 25
    served = [m.decode() for m in reversed(redis_client.lrange(new_list, 0, -1))]
    assert served == [*[f"old-{n}" for n in range(25)], "new-0"]
    assert not redis_client.exists(old_list)


def test_a_new_worker_runs_the_jobs_an_old_release_queued_and_queues(env, spawn_worker, redis_client):
    queue = f"kiq-upgrade-{uuid.uuid4().hex[:8]}"
    settings = queue_settings(env, queue)
    old_client = Client(settings, app=old_kiq_app(settings))  # submit writes records, as the old release did
    ids = [old_client.submit(tiny_job(priority=p, seed=p)) for p in (0, 2, 5, 9)]  # steps 9, 6, 3, 0
    assert redis_client.exists(*priority_lists(queue, OLD_SEP)[1:]) == 3
    _, log = spawn_worker("upgraded", KIQ_QUEUE=queue)
    client = Client(settings)
    for job_id in ids:
        assert client.wait(job_id, timeout=180).state == "SUCCESS"
    assert not redis_client.exists(*priority_lists(queue, OLD_SEP)[1:])
    # An old producer still running in a rolling upgrade: its job is moved by the worker's periodic recheck.
    late = old_client.submit(tiny_job(priority=5))
    assert client.wait(late, timeout=120).state == "SUCCESS"
    assert f"moved 1 message(s) from the old priority lists of ['{queue}']" in log.read_text()
    devstack.wait_until(lambda: client.queue_depths([queue])[queue] == {"7-9": 0, "4-6": 0, "1-3": 0, "0": 0}, 5,
                        "empty queue")  # fmt: skip
