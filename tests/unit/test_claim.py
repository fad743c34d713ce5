"""kiq/claim.py's claim script and channel against the real Redis (KIQ_TEST_REDIS_URL): the list order, the unacked
entry it writes (kombu's own `restore_by_tag` reads it back), no entry where nothing acks, undecodable payloads
still delivered, the global key prefix, Redis's clock."""

import json
import uuid

import pytest
import redis
from kombu import Connection as KombuConnection
from kombu import Exchange, Queue
from kombu.transport import redis as kombu_redis

from kiq import claim
from kiq.celeryconf import PRIORITY_STEPS, priority_lists
from kiq.names import doorbell_key
from kiq.transport import Connection
from tests.helpers import redis_databases

REDIS_URL, _ = redis_databases()  # this test process's own database (pytest-xdist)


@pytest.fixture
def names():
    """A fresh queue and unacked keys; every key they name (any prefix) is deleted afterwards."""
    tag = uuid.uuid4().hex[:10]
    client = redis.Redis.from_url(REDIS_URL)
    keys = {k: f"claimtest:{tag}:{k}" for k in ("unacked_key", "unacked_index_key", "unacked_mutex_key")}
    yield {"queue": f"claim-{tag}", **keys}
    keys = list(client.scan_iter(match=f"*{tag}*", count=1000))
    if keys:
        client.delete(*keys)


def options(names, **more):
    keys = {k: v for k, v in names.items() if k != "queue"}
    return {**keys, "priority_steps": list(PRIORITY_STEPS), "queue_order_strategy": "priority", **more}


def eval_claim(client, names, lists, prefix=""):
    return client.execute_command(*claim.claim_command(prefix, names["unacked_key"], names["unacked_index_key"], lists))


def publish(names, body, prefix="", priority=0):
    queue = Queue(names["queue"], Exchange(names["queue"], "direct"), names["queue"])
    with KombuConnection(REDIS_URL, transport_options=options(names, global_keyprefix=prefix)) as conn:
        conn.Producer().publish(body, exchange=queue.exchange, routing_key=names["queue"], declare=[queue],
                                priority=priority)  # fmt: skip
    return queue


def test_the_first_non_empty_list_in_the_given_order_is_claimed(names):
    client = redis.Redis.from_url(REDIS_URL)
    a, b = (f"{names['queue']}-{x}" for x in "ab")
    order = [a, b, f"{a}\x06\x163", f"{b}\x06\x163"]  # priority-major, as kombu's BRPOP names them
    client.lpush(order[3], "b3")
    client.lpush(order[1], "b0-old", "b0-new")
    client.lpush(order[2], "a3")
    got = [eval_claim(client, names, [(key, False) for key in order]) for _ in range(5)]
    assert got == [[order[1].encode(), b"b0-old"], [order[1].encode(), b"b0-new"], [order[2].encode(), b"a3"],
                   [order[3].encode(), b"b3"], None]  # fmt: skip
    assert not client.exists(names["unacked_key"], names["unacked_index_key"])  # nobody acks: no entries


def test_the_entry_is_kombus_own_and_kombus_restore_by_tag_puts_the_message_back(names):
    client = redis.Redis.from_url(REDIS_URL)
    queue = publish(names, {"job": "restore-me"}, priority=5)
    lists = priority_lists(names["queue"])
    (raw,) = [item for key in lists for item in client.lrange(key, 0, -1)]
    before = client.time()
    key, payload = eval_claim(client, names, [(key, True) for key in lists])
    after = client.time()
    assert (key.decode(), payload) == (lists[1], raw)  # priority 5 is sent as 9 - 5: step 3
    message = json.loads(raw)
    tag = message["properties"]["delivery_tag"]
    entry = client.hget(names["unacked_key"], tag)
    info = message["properties"]["delivery_info"]
    assert entry == b"[" + raw + b"," + json.dumps(info["exchange"]).encode() + b"," + json.dumps(
        info["routing_key"]).encode() + b"]"  # fmt: skip
    score = client.zscore(names["unacked_index_key"], tag)
    assert before[0] + before[1] / 1e6 <= score <= after[0] + after[1] / 1e6  # Redis's clock, to the microsecond
    with Connection(REDIS_URL, transport_options=options(names)) as conn:
        channel = conn.default_channel
        # what kombu's own QoS.append would have written for this message: the same JSON
        kombu_entry = kombu_redis.dumps([json.loads(payload), info["exchange"], info["routing_key"]])
        assert json.loads(entry) == json.loads(kombu_entry)
        queue(channel).declare()
        kombu_redis.QoS.restore_by_tag(channel.qos, tag)  # kombu's own, not kiq's copy
    assert not client.hexists(names["unacked_key"], tag) and client.zscore(names["unacked_index_key"], tag) is None
    (back,) = [item for key in lists for item in client.lrange(key, 0, -1)]
    assert json.loads(back)["body"] == message["body"] and json.loads(back)["properties"]["delivery_tag"] == tag


def test_no_entry_for_a_queue_consumed_without_acks(names):
    client = redis.Redis.from_url(REDIS_URL)
    publish(names, {"reply": 1})
    _, payload = eval_claim(client, names, [(key, False) for key in priority_lists(names["queue"])])
    assert json.loads(payload)["properties"]["delivery_tag"]
    assert not client.exists(names["unacked_key"], names["unacked_index_key"])


UNTAGGED = [b"not json {", b'{"properties": {}}', b'{"properties": {"delivery_tag": 7}}', b"[1, 2]",
            b'{"properties": {"delivery_tag": "t", "delivery_info": {}}}']  # fmt: skip


@pytest.mark.parametrize("payload", UNTAGGED)
def test_a_payload_without_a_delivery_tag_is_still_claimed_without_an_entry(names, payload):
    client = redis.Redis.from_url(REDIS_URL)
    client.lpush(names["queue"], payload)
    assert eval_claim(client, names, [(names["queue"], True)]) == [names["queue"].encode(), payload]
    assert not client.exists(names["queue"], names["unacked_key"], names["unacked_index_key"])


def drain(conn, timeout=5.0):
    try:
        conn.drain_events(timeout=timeout)
    except TimeoutError:
        pass


@pytest.mark.parametrize("prefix", ["", "pfx-{tag}:"])
def test_a_consumer_that_acks_gets_an_entry_and_a_no_ack_consumer_none_with_or_without_a_key_prefix(names, prefix):
    prefix = prefix.format(tag=names["queue"])
    client = redis.Redis.from_url(REDIS_URL)
    queue = publish(names, {"n": 1}, prefix=prefix)
    publish(names, {"n": 2}, prefix=prefix)
    got = []
    with Connection(REDIS_URL, transport_options=options(names, global_keyprefix=prefix)) as conn:
        with conn.Consumer(queue, callbacks=[lambda body, message: got.append(message)]):
            drain(conn)
        (message,) = got
        assert message.payload == {"n": 1} and message.delivery_info["routing_key"] == names["queue"]
        tag = message.delivery_tag
        assert client.hexists(prefix + names["unacked_key"], tag)
        assert client.zscore(prefix + names["unacked_index_key"], tag) is not None
        message.ack()
        assert not client.exists(prefix + names["unacked_key"], prefix + names["unacked_index_key"])
        with conn.Consumer(queue, callbacks=[lambda body, message: got.append(message)], no_ack=True):
            drain(conn)
        assert [m.payload for m in got] == [{"n": 1}, {"n": 2}]
        assert not client.exists(prefix + names["unacked_key"], prefix + names["unacked_index_key"])
        assert not client.exists(*(prefix + key for key in priority_lists(names["queue"])))
        client.lpush(prefix + names["queue"], "not json")  # the script pops it; kombu's loads raises as it did
        with conn.Consumer(queue, callbacks=[lambda body, message: got.append(message)]):
            with pytest.raises(ValueError):
                drain(conn)
        assert not client.exists(prefix + names["queue"], prefix + names["unacked_key"])


@pytest.mark.parametrize("prefix", ["", "pfx-{tag}:"])
def test_basic_get_writes_an_entry_only_where_it_acks(names, prefix):
    prefix = prefix.format(tag=names["queue"])
    client = redis.Redis.from_url(REDIS_URL)
    unacked, index = prefix + names["unacked_key"], prefix + names["unacked_index_key"]
    queue = publish(names, {"n": 1}, prefix=prefix)
    publish(names, {"n": 2}, prefix=prefix)
    with Connection(REDIS_URL, transport_options=options(names, global_keyprefix=prefix)) as conn:
        channel = conn.default_channel
        queue(channel).declare()
        acked = channel.basic_get(names["queue"])
        assert acked.payload == {"n": 1} and client.hexists(unacked, acked.delivery_tag)
        assert client.zscore(index, acked.delivery_tag) is not None
        free = channel.basic_get(names["queue"], no_ack=True)
        assert free.payload == {"n": 2} and not client.hexists(unacked, free.delivery_tag)
        assert channel.basic_get(names["queue"]) is None
        channel.basic_ack(acked.delivery_tag)
    assert not client.exists(unacked, index)


def test_the_doorbell_is_bounded_and_expires():
    client = redis.Redis.from_url(REDIS_URL)
    queue = f"claim-bell-{uuid.uuid4().hex[:8]}"
    try:
        for _ in range(claim.DOORBELL_TOKENS + 5):
            with client.pipeline(transaction=False) as pipe:
                claim.ring(pipe, queue)
                pipe.execute()
        assert client.llen(doorbell_key(queue)) == claim.DOORBELL_TOKENS
        assert 0 < client.ttl(doorbell_key(queue)) <= claim.DOORBELL_TTL_S
    finally:
        client.delete(doorbell_key(queue))


def test_a_doorbell_wait_that_fails_still_delivers_the_claimed_message(names):
    """An error reply to the doorbell's BLPOP (here a doorbell key of another type) is read whole: the claim's reply
    after it is delivered, not dropped (its message popped and recorded, handed back by every sweep, never run)."""
    client = redis.Redis.from_url(REDIS_URL)
    client.set(doorbell_key(names["queue"]), "not a list")
    queue = publish(names, {"n": 1})
    got = []
    with Connection(REDIS_URL, transport_options=options(names)) as conn:
        conn.default_channel._claim_found = False  # as after an empty claim: the doorbell wait goes first
        with conn.Consumer(queue, callbacks=[lambda body, message: got.append(message)]):
            drain(conn)
        assert [m.payload for m in got] == [{"n": 1}]
        got[0].ack()
    assert not client.exists(names["unacked_key"], *priority_lists(names["queue"]))


def test_a_channel_consuming_only_without_acks_reads_by_kombus_brpop(names):
    """Reply queues (`celery inspect`) ack nothing and nobody rings their doorbells: such a channel waits in kombu's
    BRPOP (a reply arrives at once), not a doorbell wait that could hold a reply past inspect's 1 s timeout and
    then pop it unseen. Redis says which command the idle consumer is blocked in."""
    client = redis.Redis.from_url(REDIS_URL)
    queue = Queue(names["queue"], Exchange(names["queue"], "direct"), names["queue"])
    got = []
    with Connection(REDIS_URL, transport_options=options(names)) as conn:
        channel = conn.default_channel
        channel.client.connection = channel.client.connection_pool.get_connection()  # the poll's, as kombu's
        channel.client.connection.send_command("CLIENT", "ID")
        consumer_id = channel.client.connection.read_response()
        with conn.Consumer(queue, callbacks=[lambda body, message: got.append(body)], no_ack=True):
            for _ in range(3):  # an empty claim would be followed by a doorbell wait
                drain(conn, timeout=0.3)
            (info,) = client.client_list(client_id=[consumer_id])
            assert info["cmd"] == "brpop" and "b" in info["flags"], info
            publish(names, {"reply": 1})
            drain(conn, timeout=1.0)
    assert got == [{"reply": 1}]


def test_a_poll_error_drops_the_connection_of_a_claim_in_flight(names):
    queue = Queue(names["queue"], Exchange(names["queue"], "direct"), names["queue"])
    with Connection(REDIS_URL, transport_options=options(names)) as conn:
        channel = conn.default_channel
        with conn.Consumer(queue, callbacks=[lambda body, message: None]):
            channel._claim_found = False
            channel.client.connection = channel.client.connection_pool.get_connection()  # as the poller does
            channel._brpop_start()  # doorbell wait + claim: two replies in flight
            assert channel._in_poll
            channel._poll_error("BRPOP")
            assert not channel._in_poll and not channel._claim_waits
            assert channel.client.connection._sock is None  # dropped, never read one reply of two
