"""kiq's broker transport (kiq/transport.py) leans on kombu and Celery internals: each one it uses must still be
there, and the kombu methods it rewrites must still be the ones it was written against. A failure here means a
kombu or Celery upgrade changed them: read the new code and port kiq/transport.py before moving the pin."""

import hashlib
import inspect
import time
from types import SimpleNamespace

import celery.app.amqp
import kombu
from celery import Celery
from kombu.asynchronous.timer import Timer
from kombu.transport import redis
from kombu.transport.virtual import base

from kiq import transport
from kiq.celeryconf import WORKER_AMQP
from kiq.leases import held_tags

# sha256 (first 16 hex digits) of the kombu methods kiq.transport.QoS replaces, as of kombu 5.7.0.
REWRITTEN = {"append": "35c655f6ecc62fe6", "restore_visible": "d4a4a40a3eaf9f23", "restore_unacked": "8954efef014d546e"}

# ... and of the kombu Channel methods kiq.claim.Claiming replaces (through kiq.library_internals.ConsumeHooks).
REPLACED = {
    "_brpop_start": "06723d707ddf2240",
    "_brpop_read": "c42518699709f2df",
    "_get": "be26a9f1eb4cf8da",
    "_poll_error": "2c941c0124b99fab",
}


def digest(function):
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def test_the_kombu_methods_kiq_rewrites_are_the_ones_it_was_written_against():
    assert kombu.__version__.startswith("5.7."), kombu.__version__  # pyproject.toml pins the minor
    assert {name: digest(getattr(redis.QoS, name)) for name in REWRITTEN} == REWRITTEN
    assert {name: digest(getattr(redis.Channel, name)) for name in REPLACED} == REPLACED


def test_both_channels_consume_by_claim_and_nothing_between_overrides_it():
    from kiq.claim import Claiming

    for ours, kombus in ((transport.Channel, redis.Channel), (transport.SentinelChannel, redis.SentinelChannel)):
        assert ours.__mro__[1] is Claiming and issubclass(ours, kombus)
        for name in (*REPLACED, "basic_consume", "basic_get"):
            owner = next(cls for cls in ours.__mro__ if name in vars(cls))
            assert owner.__module__.startswith("kiq."), (ours, name, owner)
    for name in (*REPLACED, "basic_get", "basic_consume"):
        assert name not in vars(redis.SentinelChannel), name  # Sentinel's channel consumes as the plain one


def test_every_kombu_internal_kiq_uses_is_there():
    for name in ("Mutex", "MutexHeld", "QoS", "Channel", "Transport", "SentinelChannel", "SentinelTransport"):
        assert hasattr(redis, name), name
    for name in ("_remove_from_indices", "restore_by_tag", "pipe_or_acquire", "unacked_key", "unacked_index_key",
                 "unacked_mutex_key", "unacked_mutex_expire", "visibility_timeout"):  # fmt: skip
        assert hasattr(redis.QoS, name), name
    qos = redis.QoS(SimpleNamespace(do_restore=True))
    assert isinstance(qos._delivered, dict) and qos._vrestore_count == 0 and hasattr(qos, "_on_collect")
    qos._on_collect.cancel()
    for name in ("conn_or_acquire", "pool", "_pool", "global_keyprefix", "_do_restore_message",
                 "unacked_restore_limit"):  # fmt: skip
        assert hasattr(redis.Channel, name), name
    # A closing channel hands its unacknowledged messages to QoS.restore_unacked, once.
    assert "restore_unacked_once" in inspect.getsource(base.Channel.close)
    assert "self.restore_unacked()" in inspect.getsource(base.QoS.restore_unacked_once)
    assert "self._pool" in inspect.getsource(redis.Channel.pool.fget)  # a closed channel keeps the pool it made
    assert hasattr(kombu.Connection, "get_transport_cls") and "get_transport_cls()" in inspect.getsource(
        kombu.Connection.create_transport
    )
    assert hasattr(kombu.Message, "acknowledged") and "delivery_info" in kombu.Message.__slots__
    assert "self._raw = payload" in inspect.getsource(base.Message.__init__)  # what the unacked hash stores
    assert issubclass(transport.AMQP, celery.app.amqp.AMQP) and celery.app.amqp.AMQP.Connection is kombu.Connection


def test_workers_get_kiqs_transport_for_their_broker_url_and_producers_kombus():
    app = Celery("t", amqp=WORKER_AMQP, set_as_current=False)
    sentinels = "sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380/0"
    for url, ours in (("redis://127.0.0.1:6379/0", transport.Transport),
                      ("rediss://127.0.0.1:6380/0", transport.Transport),
                      (sentinels, transport.SentinelTransport)):  # fmt: skip
        connection = app.connection_for_write(url)
        assert connection.get_transport_cls() is ours
        assert connection.clone().get_transport_cls() is ours  # Celery's pools clone it
        assert connection.transport_cls == url.split(":", 1)[0]  # the scheme still names it (TLS, failover)
    assert app.connection_for_write("rediss://127.0.0.1:6380/0").ssl  # kombu's default for rediss is kept
    producer = Celery("p", set_as_current=False).connection_for_write("redis://127.0.0.1:6379/0")
    assert producer.get_transport_cls() is redis.Transport
    assert transport.Channel.QoS is transport.QoS and transport.SentinelChannel.QoS is transport.QoS


def test_a_closing_channel_keeps_what_the_consumer_runs_reserves_or_schedules(monkeypatch):
    def request(tag):
        return SimpleNamespace(message=SimpleNamespace(delivery_tag=tag))

    monkeypatch.setattr("kiq.leases._requests", lambda: [request("running"), request("reserved")])
    timer = Timer()  # Celery schedules an ETA request as call_at(eta, apply_eta_task, (request,))
    timer.call_at(time.time() + 60, print, (request("eta"),), priority=6)
    timer.call_after(5, print)  # something else on the timer
    assert held_tags(SimpleNamespace(timer=timer)) == {"running", "reserved", "eta"}
    assert held_tags(SimpleNamespace()) == {"running", "reserved"}


def test_a_kept_message_whose_run_let_go_of_it_is_no_longer_renewed(monkeypatch):
    """A run that stops as stale (or self-fenced) after a reconnect kept its message: the lease must lapse, or the
    sweep never hands the job back (found by review: the job stayed STARTED until the worker restarted)."""
    from worker import fencing as stale_runs

    monkeypatch.setattr(transport, "_kept", {})
    message = SimpleNamespace(delivery_tag="tag-1", acknowledged=False,
                              channel=SimpleNamespace(qos=SimpleNamespace(_delivered={})))  # fmt: skip
    transport._kept["tag-1"] = ("kiq:unacked_index:60s", message)
    assert transport.kept_leases() == [("kiq:unacked_index:60s", "tag-1")]
    stale_runs._settle_locally(message)
    assert transport.kept_leases() == []


def test_an_ack_that_fails_with_redis_unreachable_stops_renewing_the_lease(monkeypatch):
    """Review of issue 20: a failed ack (a partition) left the tag in the delivered map, so the lease keeper renewed
    it forever and the job never came back, final state or not. Dropped, the lease lapses and the sweep hands the
    message back; a stored final state settles the redelivery."""
    import pytest
    import redis as redis_py

    monkeypatch.setattr(transport, "_kept", {})
    qos = transport.QoS(SimpleNamespace(do_restore=True))
    cut_off = SimpleNamespace(execute=lambda: (_ for _ in ()).throw(redis_py.ConnectionError("partitioned")))
    monkeypatch.setattr(qos, "_remove_from_indices", lambda tag: cut_off)
    for tag, settle in (("tag-ack", qos.ack), ("tag-reject", qos.reject)):
        message = SimpleNamespace(delivery_tag=tag, acknowledged=False)
        qos._delivered[tag] = message
        transport._kept[tag] = ("kiq:unacked_index:60s", message)  # or kept across a reconnect
        with pytest.raises(redis_py.ConnectionError):
            settle(tag)
        assert tag not in qos._delivered and transport.kept_leases() == []
