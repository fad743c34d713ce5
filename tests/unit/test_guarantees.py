"""Webhook signing and the one-webhook rule; lease renewal; the tenant and S3 read fences."""

import json
from types import SimpleNamespace

import pytest
from kombu.transport.redis import Channel as RedisChannel

from kiq import s3
from kiq.celeryconf import broker_transport_options
from kiq.contract import parse_job
from kiq.errors import SettingsError
from kiq.leases import LeaseKeeper, held_by_consumer, parse_timeout, renew_interval_s
from kiq.names import webhook_queued_key
from kiq.settings import Settings
from kiq.webhooks import InvalidSignature, delivery_id, queue_webhook, sign, verify
from producer.api import IdempotencyClaim, Rejected
from producer.tenants import Tenants


def headers(secret, body, delivery="d-1", timestamp=None):
    return {"X-Kiq-Signature": sign(secret, body, delivery, timestamp), "X-Kiq-Delivery": delivery}


def test_signature_covers_timestamp_delivery_and_body_within_a_replay_window():
    body = b'{"id": "j", "state": "SUCCESS"}'
    verify("s3cret", headers("s3cret", body, timestamp=1_000), body, now=1_100)
    with pytest.raises(InvalidSignature, match="tolerance"):
        verify("s3cret", headers("s3cret", body, timestamp=1_000), body, now=1_301)
    with pytest.raises(InvalidSignature, match="does not match"):
        verify("s3cret", headers("s3cret", body, timestamp=1_000), body + b" ", now=1_000)
    with pytest.raises(InvalidSignature, match="does not match"):
        forged = {**headers("s3cret", body, timestamp=1_000), "X-Kiq-Delivery": "d-2"}
        verify("s3cret", forged, body, now=1_000)
    with pytest.raises(InvalidSignature, match="malformed"):
        verify("s3cret", {"X-Kiq-Signature": "sha256=abc", "X-Kiq-Delivery": "d-1"}, body)
    assert delivery_id("job-1") == delivery_id("job-1") != delivery_id("job-2")


class FakeApp:
    def __init__(self, fail=False):
        self.sent, self.fail = [], fail

    def send_task(self, name, args, queue, task_id, headers=None):
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((name, args, queue, task_id))


class FakeRedis:
    def __init__(self):
        self.data = {}

    def set(self, key, value, nx=False, ex=None, px=None):
        if nx and key in self.data:
            return None
        self.data[key] = value
        return True

    def delete(self, key):
        self.data.pop(key, None)


def test_each_job_queues_at_most_one_webhook_whoever_ends_it():
    app, redis = FakeApp(), FakeRedis()
    assert queue_webhook(app, redis, "j", "https://example.com/hook", 60)  # the cancel, say
    assert not queue_webhook(app, redis, "j", "https://example.com/hook", 60)  # the worker, a moment later
    assert not queue_webhook(app, redis, "k", None, 60)
    assert [(args, task_id) for _, args, _, task_id in app.sent] == [(["j", "https://example.com/hook"],
                                                                       delivery_id("j"))]  # fmt: skip
    broken = FakeApp(fail=True)
    assert not queue_webhook(broken, redis, "m", "https://example.com/hook", 60)
    assert webhook_queued_key("m") not in redis.data  # a webhook that could not be queued may be queued again


class IndexRedis:
    """A sorted set with ZADD's XX semantics: only existing members are re-scored."""

    def __init__(self, members):
        self.scores = dict(members)

    def zadd(self, key, mapping, xx=False, ch=False):
        changed = [m for m in mapping if not xx or m in self.scores]
        self.scores.update({m: mapping[m] for m in changed})
        return len(changed)

    def time(self):
        return 1_700_000_000, 250_000  # Redis's clock, whatever this host's says


def test_leases_renew_held_messages_and_never_revive_acked_ones():
    redis = IndexRedis({"t1": 0.0, "t2": 0.0})
    keeper = LeaseKeeper(redis, lambda: [("unacked_index", "t1"), ("unacked_index", "gone")], interval_s=60)
    assert keeper.renew() == 1
    assert redis.scores["t1"] == 1_700_000_000.25 and redis.scores["t2"] == 0.0 and "gone" not in redis.scores
    assert renew_interval_s(60) == 10 and renew_interval_s(6) == 1


def test_held_messages_come_from_the_consumers_unacked_deliveries(monkeypatch):
    qos = SimpleNamespace(_delivered={"tag-a": object(), "tag-b": object()})
    channel = SimpleNamespace(unacked_index_key="unacked_index", global_keyprefix="", _qos=qos)
    consumer = SimpleNamespace(task_consumer=SimpleNamespace(channel=channel))
    monkeypatch.setattr("kiq.leases._requests", lambda: [])
    assert held_by_consumer(consumer, 60) == [("unacked_index", "tag-a"), ("unacked_index", "tag-b")]
    assert held_by_consumer(object(), 60) == []


def test_s3_fence_by_bucket_and_prefix_and_no_path_tricks():
    allowed = [("kiq", "inputs/t1/")]
    assert s3.within("s3://kiq/inputs/t1/job/0", allowed)
    for uri in ("s3://kiq/inputs/t2/job/0", "s3://other/inputs/t1/x", "s3://kiq/inputs/t1/../t2/x",
                "s3://kiq/inputs/t1//x", "s3://kiq/inputs/t1/./x", "s3://kiq/"):  # fmt: skip
        assert not s3.within(uri, allowed), uri
    assert Settings().s3_read_prefixes == [("kiq", "inputs/")]
    assert Settings(s3_read_allow="s3://a/x/, b/").s3_read_prefixes == [("a", "x/"), ("b", "")]


def job(**fields):
    return parse_job({"inputs": [{"text": "a", "weight": 1.0}], **fields})


def test_tenants_from_keys_get_defaults_and_configured_ones_get_more():
    tenants_json = {"tenants": [{"name": "studio", "key": "k-studio", "queues": ["big"], "max_priority": 9,
                                 "s3_read": ["s3://assets/refs/"]}]}  # fmt: skip
    settings = Settings(api_keys="k-plain", api_tenants=json.dumps(tenants_json))
    tenants = Tenants.from_settings(settings)
    plain, studio = tenants.find("k-plain"), tenants.find("k-studio")
    assert tenants.find("nope") is None and not tenants.open
    assert plain.problems(job(priority=5), settings) == []
    assert [p["loc"] for p in plain.problems(job(priority=6, queue="big"), settings)] == [
        ["body", "queue"], ["body", "priority"]]  # fmt: skip
    assert studio.problems(job(priority=9, queue="big"), settings) == []
    own = f"s3://kiq/inputs/{plain.owner}/j/0"
    image = lambda ref: job(inputs=[{"image": ref, "weight": 1.0}])  # noqa: E731
    assert plain.problems(image(own), settings) == []
    assert plain.problems(image(f"s3://kiq/inputs/{studio.owner}/j/0"), settings)[0]["type"] == "forbidden"
    assert studio.problems(image("s3://assets/refs/cat.png"), settings) == []
    assert plain.problems(image("s3://assets/refs/cat.png"), settings) != []


@pytest.mark.parametrize(
    ("raw", "message"),
    [('{"tenants": [{"name": "x"}]}', "needs a non-empty 'key'"),
     ('{"tenants": [{"key": "k", "max_priority": 10}]}', "max_priority"),
     ('{"tenants": [{"key": "k", "queues": ["Bad Queue"]}]}', "queues"),
     ('{"tenants": [{"key": "k", "s3_read": ["assets/"]}]}', "s3_read"),
     ("/no/such/tenants.json", "cannot read"), ('{"tenants": 3}', "must be a list")],
)  # fmt: skip
def test_bad_tenant_configuration_is_refused_at_start(raw, message):
    with pytest.raises(SettingsError, match=message):
        Tenants.from_settings(Settings(api_tenants=raw))


class ClaimRedis(FakeRedis):
    def get(self, key):
        return self.data.get(key)

    def eval(self, script, nkeys, key, expected, *rest):
        """The two compare-and-swap scripts: delete, or set to rest[0], if the key still holds `expected`."""
        if self.data.get(key) != expected:
            return 0
        if rest:
            self.data[key] = rest[0]
        else:
            del self.data[key]
        return 1


def test_an_idempotency_key_points_at_a_job_only_once_it_is_enqueued():
    redis, settings = ClaimRedis(), Settings()
    first = IdempotencyClaim(redis, settings, "t1", "order-1", "digest-a")
    assert first.acquire("job-1") is None
    with pytest.raises(Rejected) as in_flight:  # the same request again while the first is still submitting
        IdempotencyClaim(redis, settings, "t1", "order-1", "digest-a").acquire("job-2")
    assert in_flight.value.status == 409 and "in progress" in in_flight.value.detail
    first.release()  # the submit failed: the key is free for the retry
    retry = IdempotencyClaim(redis, settings, "t1", "order-1", "digest-a")
    assert retry.acquire("job-3") is None
    retry.commit()
    assert IdempotencyClaim(redis, settings, "t1", "order-1", "digest-a").acquire("job-4") == "job-3"
    with pytest.raises(Rejected, match="") as other_body:
        IdempotencyClaim(redis, settings, "t1", "order-1", "digest-b").acquire("job-5")
    assert other_body.value.status == 409 and "different request body" in other_body.value.detail
    assert IdempotencyClaim(redis, settings, "t2", "order-1", "digest-b").acquire("job-6") is None  # per tenant


def test_running_requests_keep_their_leases_after_a_reconnect_gave_the_consumer_a_fresh_channel(monkeypatch):
    fresh = SimpleNamespace(unacked_index_key="unacked_index", global_keyprefix="", _qos=None)
    running = SimpleNamespace(message=SimpleNamespace(delivery_tag="tag-running"))
    monkeypatch.setattr("kiq.leases._requests", lambda: [running])
    consumer = SimpleNamespace(task_consumer=SimpleNamespace(channel=fresh))
    assert held_by_consumer(consumer, 60) == [("unacked_index", "tag-running")]
    consumer = SimpleNamespace(task_consumer=None)  # mid-reconnect: no channel at all
    assert held_by_consumer(consumer, 60) == [("kiq:unacked_index:60s", "tag-running")]


def test_each_visibility_timeout_has_its_own_unacked_index_so_short_sweeps_skip_long_leases():
    default, short = (broker_transport_options(Settings(visibility_timeout_s=t)) for t in (60, 6))
    keys = ("unacked_key", "unacked_index_key", "unacked_mutex_key")
    assert [default[k] for k in keys] == ["kiq:unacked:60s", "kiq:unacked_index:60s", "kiq:unacked_mutex:60s"]
    assert all(short[k] != default[k] for k in keys)
    assert set(keys) <= set(RedisChannel.from_transport_options)  # names kombu reads, not silently ignored


def test_the_s3_scheme_in_any_case_meets_the_tenant_fence():
    settings = Settings(api_keys="k-a,k-b")
    tenants = Tenants.from_settings(settings)
    a, b = tenants.find("k-a"), tenants.find("k-b")
    theirs = f"S3://kiq/inputs/{b.owner}/j/0"
    assert a.problems(job(inputs=[{"image": theirs, "weight": 1.0}]), settings)[0]["type"] == "forbidden"
    assert s3.within(f"S3://kiq/inputs/{a.owner}/j/0", [("kiq", f"inputs/{a.owner}/")])


def test_timeouts_are_read_back_from_their_repr_and_garbage_is_refused():
    assert [parse_timeout(m) for m in (b"60.0", b"6.0", "6", repr(1234567.5).encode())] == [60, 6, 6, 1234567.5]
    assert [parse_timeout(m) for m in (b"nan", b"inf", b"-1", b"0", b"soon", None)] == [None] * 6
