"""Every private (or unpublished) kombu and Celery name kiq relies on, with the signature kiq calls it with.

kiq pins kombu and Celery to the minor releases tested here (pyproject.toml). A release that renames or changes
one of these fails this test, loudly, instead of a lease renewal failing in production (issue 20, defect 4).
Where kiq copies kombu's code (kiq.library_internals.restore_by_tag) the test also checks what it copied. Every
such name is used in kiq/library_internals.py alone: the tests at the end check that too."""

import ast
import hashlib
import inspect
import tomllib
from pathlib import Path
from types import SimpleNamespace
from weakref import WeakSet

import celery
import kombu
import pytest
from celery.backends.redis import RedisBackend
from celery.utils.imports import symbol_by_name
from celery.worker import state
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from kombu.messaging import Consumer as KombuConsumer
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from packaging.requirements import Requirement

from kiq import leases
from kiq import library_internals as internals
from kiq.events import EventsBackend


def params(func) -> list[str]:
    return list(inspect.signature(func).parameters)


PINNED = {"kombu": "5.7", "celery": "5.6"}  # the minors this file checks


def test_the_package_pins_kombu_and_celery_to_the_tested_minors_and_they_are_installed():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    requirements = {r.name: r for r in map(Requirement, pyproject["project"]["dependencies"])}
    for name, minor in PINNED.items():
        assert name in requirements, f"{name} is not pinned in pyproject.toml"
        major, low = map(int, minor.split("."))
        allowed = requirements[name].specifier
        assert f"{minor}.0" in allowed and f"{major}.{low + 1}.0" not in allowed and f"{minor}.99" in allowed, (
            f"{name}: {allowed} is not the tested minor {minor}"
        )
    assert kombu.__version__.startswith("5.7."), kombu.__version__
    assert celery.__version__.startswith("5.6."), celery.__version__


@pytest.mark.parametrize(
    ("owner", "name", "expected"),
    [
        (kombu_redis.QoS, "restore_visible", ["self", "start", "num", "interval"]),
        (kombu_redis.QoS, "restore_by_tag", ["self", "tag", "client", "leftmost"]),
        (kombu_redis.QoS, "_remove_from_indices", ["self", "delivery_tag", "pipe"]),
        (
            kombu_redis.Channel,
            "_do_restore_message",
            ["self", "payload", "exchange", "routing_key", "pipe", "leftmost"],
        ),
        (kombu_redis.Channel, "conn_or_acquire", ["self", "client"]),
        (virtual.QoS, "__init__", ["self", "channel", "prefetch_count"]),
        (Consumer, "call_soon", ["self", "p", "args", "kwargs"]),
        (KombuConsumer, "cancel_by_queue", ["self", "queue"]),
        (KombuConsumer, "add_queue", ["self", "queue"]),
        (KombuConsumer, "consuming_from", ["self", "queue"]),
        (RedisBackend, "_set", ["self", "key", "value"]),
        # kiq/claim.py: kombu's consume it replaces, and what it calls as kombu's _brpop_read and _get do
        (kombu_redis.Channel, "_brpop_start", ["self", "timeout"]),
        (kombu_redis.Channel, "_brpop_read", ["self", "options"]),
        (kombu_redis.Channel, "_get", ["self", "queue"]),
        (kombu_redis.Channel, "_q_for_pri", ["self", "queue", "pri"]),
        (kombu_redis.Channel, "_maybe_update_queues_expire", ["self", "client", "queue"]),
        (kombu_redis.Channel, "_flush_brpop_reauth", ["self"]),
        (kombu_redis.Channel, "basic_consume", ["self", "queue", "args", "kwargs"]),
        (virtual.Channel, "basic_consume", ["self", "queue", "no_ack", "callback", "consumer_tag", "kwargs"]),
        (virtual.Channel, "basic_get", ["self", "queue", "no_ack", "kwargs"]),
        (virtual.Transport, "_deliver", ["self", "message", "queue"]),
        (RedisBackend, "on_task_call", ["self", "producer", "task_id"]),
    ],
)
def test_methods_kiq_calls_or_overrides_keep_their_signature(owner, name, expected):
    assert params(getattr(owner, name)) == expected


def test_kombu_redis_channel_and_qos_attributes():
    for name in ("unacked_key", "unacked_index_key", "unacked_mutex_key", "unacked_mutex_expire",
                 "unacked_restore_limit", "global_keyprefix", "visibility_timeout", "client"):  # fmt: skip
        assert hasattr(kombu_redis.Channel, name), name
    assert kombu_redis.Channel.QoS is kombu_redis.QoS
    assert "self._qos = None" in inspect.getsource(virtual.Channel.__init__)  # held_by_consumer reads channel._qos
    for name in ("unacked_key", "unacked_index_key", "unacked_mutex_key", "unacked_mutex_expire",
                 "visibility_timeout"):  # fmt: skip
        assert hasattr(kombu_redis.QoS, name), name  # _IndexQoS overrides each on its instance
    qos = kombu_redis.QoS(SimpleNamespace())
    qos._on_collect.cancel()  # _IndexQoS cancels kombu's restore-at-exit this way
    assert isinstance(qos._delivered, dict)  # the delivery tags held_by_consumer renews


def test_kombu_sweep_goes_through_restore_by_tag_as_index_qos_overrides_it():
    """_IndexQoS counts what it hands back in its own restore_by_tag, a copy of kombu's: restore_visible must
    still call it per tag, and kombu's own must still do what the copy does."""
    assert "self.restore_by_tag(tag, client)" in inspect.getsource(kombu_redis.QoS.restore_visible)
    kombu_own = inspect.getsource(kombu_redis.QoS.restore_by_tag)
    for step in ("pipe.hget(self.unacked_key, tag)", "pipe.multi()", "self._remove_from_indices(tag, pipe)",
                 "self.channel._do_restore_message(M, EX, RK, pipe, leftmost)",
                 "client.transaction(restore_transaction, self.unacked_key)"):  # fmt: skip
        assert step in kombu_own, step
    assert "internals.restore_by_tag(self, tag, client, leftmost)" in inspect.getsource(leases._IndexQoS)
    assert issubclass(leases._IndexQoS, kombu_redis.QoS)


def test_celery_worker_state_and_requests():
    assert isinstance(state.active_requests, WeakSet) and isinstance(state.reserved_requests, WeakSet)
    for name in ("id", "name", "args", "message"):  # held_by_consumer, batching's find_mates
        assert hasattr(Request, name), name
    assert symbol_by_name("celery.worker.consumer.tasks:Tasks")  # the Leases bootstep requires it


def test_the_warm_shutdown_a_drain_asks_for_and_the_queue_cycle_fair_share_replaces():
    """kiq.library_internals.stop_worker_warm sets what Celery's SIGTERM handler sets; kiq.fairshare.FairCycle is
    kombu's queue cycle (the `queue_order_strategy` transport option): the BRPOP names queues in its order and
    rotates the delivering one, and every consume or cancel updates it."""
    assert "should_stop" in inspect.getsource(state.maybe_shutdown)
    assert "queue_order_strategy" in kombu_redis.Channel.from_transport_options
    assert "self._queue_cycle = cycle_by_name(self.queue_order_strategy)()" in inspect.getsource(
        kombu_redis.Channel.__init__
    )
    assert "self._queue_cycle.consume(len(self.active_queues))" in inspect.getsource(kombu_redis.Channel._brpop_start)
    assert "for pri in self.priority_steps" in inspect.getsource(kombu_redis.Channel._brpop_start)
    assert "self._queue_cycle.rotate(dest)" in inspect.getsource(kombu_redis.Channel._brpop_read)
    assert "self._queue_cycle.update(self.active_queues)" in inspect.getsource(kombu_redis.Channel._update_queue_cycle)


def test_celery_queue_selection_kiq_pauses_intake_with():
    app = celery.Celery(set_as_current=False)
    app.conf.task_queues = [kombu.Queue("a"), kombu.Queue("b")]
    queues = app.amqp.queues
    assert set(queues.consume_from) == {"a", "b"}
    paused = queues["a"]
    queues.deselect("a")
    assert set(queues.consume_from) == {"b"}  # what a reconnecting Tasks step consumes
    assert [q.name for q in app.amqp.TaskConsumer(None, auto_declare=False).queues] == ["b"]
    queues.select_add(paused)
    assert set(queues.consume_from) == {"a", "b"}


def test_kombu_redis_names_kiq_builds_itself():
    """kiq.celeryconf.priority_lists and kiq.brokerformat name kombu's priority lists and binding tables."""
    from kiq.brokerformat import BINDING_PATTERNS
    from kiq.celeryconf import KOMBU_SEP, priority_lists

    assert kombu_redis.Channel.sep == KOMBU_SEP
    assert kombu_redis.Channel.keyprefix_queue == "_kombu.binding.%s"
    assert BINDING_PATTERNS[0] == kombu_redis.Channel.keyprefix_queue % "*"
    assert 'f"{queue}{self.sep}{pri}"' in inspect.getsource(kombu_redis.Channel._q_for_pri)
    assert priority_lists("kiq") == ["kiq", f"kiq{KOMBU_SEP}3", f"kiq{KOMBU_SEP}6", f"kiq{KOMBU_SEP}9"]


# Every private kombu or Celery name kiq.library_internals uses (each checked on the pinned versions below), and the
# only module that may use them: kiq, the worker and the producer reach them through the adapter alone.
ADAPTER = Path(__file__).parents[2] / "kiq" / "library_internals.py"
PRIVATE = {
    "_qos": "kombu Channel: its QoS, None before the first delivery",
    "_delivered": "kombu QoS: the unacknowledged deliveries",
    "_vrestore_count": "kombu QoS: restore_visible's call count",
    "_on_collect": "kombu QoS: the restore at interpreter exit",
    "_remove_from_indices": "kombu Redis QoS",
    "_do_restore_message": "kombu Redis Channel",
    "_raw": "kombu Message: the payload as received",
    "_set": "Celery RedisBackend: the state write",
    "_brpop_start": "kombu Redis Channel: sends the consume (BRPOP), overridden by ConsumeHooks",
    "_brpop_read": "kombu Redis Channel: reads it and delivers, overridden by ConsumeHooks",
    "_get": "kombu Redis Channel: basic_get's read, overridden by ConsumeHooks",
    "_poll_error": "kombu Redis Channel: reads the reply on a poll error, overridden by ConsumeHooks",
    "_in_poll": "kombu Redis Channel: the connection a consume reply is pending on",
    "_brpop_sent_at": "kombu Redis Channel: when the consume was sent (its health check)",
    "_queue_cycle": "kombu Redis Channel: the queue order of the consume",
    "_q_for_pri": "kombu Redis Channel: a priority step's list",
    "_flush_brpop_reauth": "kombu Redis Channel: a re-auth sent once no reply is pending",
    "_maybe_update_queues_expire": "kombu Redis Channel: renews a queue's x-expires after a read",
    "_deliver": "kombu virtual Transport: hands a message to its queue's consumer (requeues it without one)",
    "_put": "kombu Redis Channel: the LPUSH of one published message, overridden by PutHook",
    "_expires": "kombu Redis Channel: queues with x-expires",
    "_get_message_priority": "kombu Channel: a message's priority step",
    "_info": "kombu Connection: its settings, as ConnectionPool.new passes them",
    "_publish_batch": "kombu Redis Channel: `_put`'s keyword for a batched publish",
}
# Names in PRIVATE that kiq's own modules also give their own functions: elsewhere only this use is refused.
SHARED = {"_deliver": "connection._deliver"}
STATE_NAMES = {"active_requests", "reserved_requests"}  # celery.worker.state, an unpublished module


def private_attributes(tree: ast.AST) -> set[str]:
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    names |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def test_the_adapter_uses_exactly_the_private_names_listed_here():
    """A new private name in the adapter must be added to PRIVATE (and checked below) before it is used."""
    assert private_attributes(ast.parse(ADAPTER.read_text())) == set(PRIVATE)


def test_no_module_but_the_adapter_touches_a_private_kombu_or_celery_name():
    root = ADAPTER.parents[1]
    offenders = []
    for package in ("kiq", "worker", "producer"):
        for path in sorted((root / package).rglob("*.py")):
            if path == ADAPTER:
                continue
            text = path.read_text()
            used = private_attributes(ast.parse(text)) & (set(PRIVATE) - set(SHARED))
            used |= {name for name, use in SHARED.items() if use in text}
            used |= {f"state.{name}" for name in STATE_NAMES if f"state.{name}" in text}
            if "celery.worker import state" in text or "celery.worker.state" in text:
                used.add("celery.worker.state")
            offenders += [f"{path.relative_to(root)}: {name}" for name in sorted(used)]
    assert offenders == [], "use kiq/library_internals.py for these"


def test_each_kombu_private_name_the_adapter_uses_is_there_and_does_what_it_expects():
    qos = kombu_redis.QoS(SimpleNamespace())
    try:
        assert internals.delivered(qos) is qos._delivered and isinstance(qos._delivered, dict)
        assert qos._vrestore_count == 0
        assert [internals.restore_round_due(qos, 3) for _ in range(4)] == [True, False, False, True]
    finally:
        internals.cancel_restore_at_exit(qos)  # qos._on_collect.cancel()
    assert "self._qos = None" in inspect.getsource(virtual.Channel.__init__)  # channel_qos: None before a delivery
    assert "self._qos = self.QoS(" in inspect.getsource(virtual.Channel.qos.fget)
    assert internals.channel_qos(SimpleNamespace()) is None
    assert "self._vrestore_count += 1" in inspect.getsource(kombu_redis.QoS.restore_visible)
    assert "self._raw = payload" in inspect.getsource(virtual.base.Message.__init__)
    assert internals.raw_payload(SimpleNamespace(_raw={"body": "x"})) == {"body": "x"}
    tags = {"tag": 1, "other": 2}
    internals.settle_locally(SimpleNamespace(channel=SimpleNamespace(qos=SimpleNamespace(_delivered=tags)),
                                             delivery_tag="tag"))  # fmt: skip
    assert tags == {"other": 2}
    assert "delivered.pop(dirty_tag, None)" in inspect.getsource(virtual.QoS)  # an ack does this: settle_locally too


def test_the_adapters_restore_by_tag_is_a_copy_of_kombus_own():
    """kiq.library_internals.restore_by_tag copies kombu 5.7.0's QoS.restore_by_tag (sha256 prefix below), adding
    only its return value: a changed kombu method must be read and the copy ported before the pin moves."""
    own = inspect.getsource(kombu_redis.QoS.restore_by_tag)
    assert hashlib.sha256(own.encode()).hexdigest()[:16] == "58e161d81b6fe18d"
    copy = inspect.getsource(internals.restore_by_tag)
    for step in ("pipe.hget(qos.unacked_key, tag)", "pipe.multi()", "qos._remove_from_indices(tag, pipe)",
                 "qos.channel._do_restore_message(message, exchange, routing_key, pipe, leftmost)",
                 "client.transaction(restore, qos.unacked_key, value_from_callable=True)"):  # fmt: skip
        assert step in copy, step


class FakeRequest:  # Celery's request sets are WeakSets
    def __init__(self, id):
        self.id = id


def test_each_celery_private_name_the_adapter_uses_is_there(monkeypatch):
    running, waiting = FakeRequest("a"), FakeRequest("b")
    monkeypatch.setattr(state, "active_requests", WeakSet([running]))
    monkeypatch.setattr(state, "reserved_requests", WeakSet([running, waiting]))
    assert internals.active_requests() == [running] and internals.any_active()
    assert {r.id for r in internals.reserved_requests()} == {"a", "b"}
    assert internals.is_reserved(waiting) and not internals.is_reserved(FakeRequest("c"))
    # BackendWrites: Celery's set() still writes through _set, which the mixin routes to write_state.
    assert "self.ensure(self._set, (key, value)" in inspect.getsource(RedisBackend.set)
    assert issubclass(EventsBackend, internals.BackendWrites) and "write_state" in vars(EventsBackend.__mro__[1])
    writes = []

    class Backend(internals.BackendWrites, RedisBackend):
        def write_state(self, key, value):
            writes.append(("kiq", key))
            self.celery_write(key, value)

    monkeypatch.setattr(RedisBackend, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(RedisBackend, "_set", lambda self, key, value: writes.append(("celery", key)))
    Backend()._set("k", "v")
    assert writes == [("kiq", "k"), ("celery", "k")]


def test_the_consume_kiq_claim_replaces_and_what_the_adapter_does_in_its_place():
    """kiq/claim.py replaces kombu's BRPOP consume (`_brpop_start`, `_brpop_read`) and `_get` through
    internals.ConsumeHooks; the adapter's helpers do what kombu's own methods did around the pop."""
    source = {name: inspect.getsource(getattr(kombu_redis.Channel, name)) for name in ("_brpop_start", "_brpop_read",
                                                                                       "_get", "__init__")}  # fmt: skip
    assert "self.handlers = {'BRPOP': self._brpop_read" in source["__init__"]  # bound at init: the hook's
    assert "channel._brpop_start()" in inspect.getsource(kombu_redis.MultiChannelPoller._register_BRPOP)
    assert "chan.handlers[type]()" in inspect.getsource(kombu_redis.MultiChannelPoller.on_readable)
    for step in ("self._queue_cycle.consume(len(self.active_queues))", "for pri in self.priority_steps",
                 "for queue in queues]", "self._in_poll = self.client.connection",
                 "self._brpop_sent_at = monotonic()"):  # fmt: skip
        assert step in source["_brpop_start"], step  # internals.consume_order, priority_list, poll_sent
    for step in ("bytes_to_str(dest).rsplit(self.sep, 1)[0]", "self._queue_cycle.rotate(dest)",
                 "self.connection._deliver(loads(bytes_to_str(item)), dest)", "raise Empty()",
                 "self.client.connection.disconnect()", "self._in_poll = None",
                 "self._flush_brpop_reauth()"):  # fmt: skip
        assert step in source["_brpop_read"], step  # internals.deliver, poll_done
    for step in ("for pri in self.priority_steps:", "client.rpop(self._q_for_pri(queue, pri))",
                 "self._maybe_update_queues_expire(client, queue)"):  # fmt: skip
        assert step in source["_get"], step  # internals.refresh_queue_expiry
    health = inspect.getsource(kombu_redis.MultiChannelPoller.maybe_check_brpop_health)
    assert "channel._in_poll" in health and "channel._brpop_sent_at" in health and "channel.brpop_timeout" in health
    # basic_get and the consume callback write the unacked entry only for a consumer that acks
    assert "message = self.Message(self._get(queue), channel=self)" in inspect.getsource(virtual.Channel.basic_get)
    consume = inspect.getsource(virtual.Channel.basic_consume)
    assert "if not no_ack:\n                self.qos.append(message, message.delivery_tag)" in consume
    assert "super().basic_consume(queue, *args, **kwargs)" in inspect.getsource(kombu_redis.Channel.basic_consume)
    assert "self._reject_inbound_message(message)" in inspect.getsource(virtual.Transport._deliver)

    calls = []
    cycle = SimpleNamespace(consume=lambda n: ["a", "b"][:n], rotate=lambda q: calls.append(("rotate", q)))
    connection = SimpleNamespace(_deliver=lambda payload, queue: calls.append(("deliver", payload, queue)))
    channel = SimpleNamespace(_queue_cycle=cycle, active_queues=["a", "b"], connection=connection, sep="\x06\x16",
                              _flush_brpop_reauth=lambda: calls.append("reauth"), priority_steps=[0, 3])  # fmt: skip
    channel._maybe_update_queues_expire = lambda client, queue: calls.append(("expire", queue))
    channel._q_for_pri = lambda queue, pri: kombu_redis.Channel._q_for_pri(channel, queue, pri)
    channel.priority = lambda n: kombu_redis.Channel.priority(channel, n)
    assert internals.consume_order(channel) == ["a", "b"]
    assert internals.priority_list(channel, "a", 3) == "a\x06\x163" and internals.priority_list(channel, "a", 0) == "a"
    internals.poll_sent(channel, "conn")
    assert channel._in_poll == "conn" and isinstance(channel._brpop_sent_at, float)
    internals.poll_done(channel)
    internals.deliver(channel, {"m": 1}, "b")
    internals.refresh_queue_expiry(channel, None, "a")
    assert channel._in_poll is None
    assert calls == ["reauth", ("rotate", "b"), ("deliver", {"m": 1}, "b"), ("expire", "a")]

    class Hooked(internals.ConsumeHooks):
        def start_claim(self, timeout):
            return ("start", timeout)

        def read_claim(self, **options):
            return ("read", options)

        def get_claimed(self, queue):
            return ("get", queue)

    hooked = Hooked()
    assert hooked._brpop_start(3) == ("start", 3) and hooked._brpop_read(x=1) == ("read", {"x": 1})
    assert hooked._get("q") == ("get", "q")
