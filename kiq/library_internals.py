"""Every private (or unpublished) kombu and Celery name kiq touches, behind one small adapter.

kiq pins kombu and Celery to the minor releases tested here (pyproject.toml); tests/unit/test_library_internals.py
checks each name used below on those versions, so a release that renames or changes one fails there, loudly,
instead of a lease renewal failing in production. No other module of kiq, the worker or the producer reads or
writes an underscore name of kombu or Celery, or `celery.worker.state` (tests/unit/test_library_internals.py
checks that too).

kombu (its Redis transport's ack emulation): `Channel._qos`, `QoS._delivered`, `QoS._vrestore_count`,
`QoS._on_collect`, `QoS._remove_from_indices`, `Channel._do_restore_message`, `Message._raw`.
kombu (its Redis transport's consume, replaced by kiq/claim.py): `Channel._brpop_start`, `_brpop_read`, `_get`,
`_poll_error` (overridden), `_in_poll`, `_brpop_sent_at`, `_queue_cycle`, `_q_for_pri`, `_flush_brpop_reauth`,
`_maybe_update_queues_expire`, `Connection._deliver`.
kombu (its Redis transport's publish, for kiq/publish.py): `Channel._put` (overridden), `_expires`,
`_get_message_priority`, `_q_for_pri`; `Connection._info` (ConnectionPool.new's arguments).
Celery: `celery.worker.state.active_requests` / `reserved_requests` / `should_stop` (a drained worker's warm
shutdown), and `RedisBackend._set` (overridden).
"""

from __future__ import annotations

from time import monotonic
from typing import Any

from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

# kombu


def channel_qos(channel: Any) -> Any:
    """A channel's QoS, or None before its first delivery (kombu creates it then)."""
    return getattr(channel, "_qos", None)


def delivered(qos: Any) -> dict[str, Any]:
    """A QoS's unacknowledged deliveries (delivery tag -> message), the live map itself."""
    return qos._delivered


def settle_locally(message: Any) -> None:
    """What kombu's acknowledgement does in this process, without its Redis calls: the tag leaves the channel's
    delivered map. Raises when the channel has no QoS (closed by a reconnect)."""
    message.channel.qos._delivered.pop(message.delivery_tag, None)


def raw_payload(message: Any) -> Any:
    """The message as received, what kombu's unacked hash stores."""
    return message._raw


def restore_round_due(qos: Any, interval: int) -> bool:
    """kombu's count of `restore_visible` calls: True on every `interval`-th (the first included)."""
    qos._vrestore_count += 1
    return not (qos._vrestore_count - 1) % (interval or 1)


def cancel_restore_at_exit(qos: Any) -> None:
    """Unregister the QoS's restore of its deliveries at interpreter exit."""
    qos._on_collect.cancel()


def restore_by_tag(qos: Any, tag: Any, client: Any = None, leftmost: bool = False) -> bool:
    """kombu 5.7's `QoS.restore_by_tag`, returning whether the tag was in the unacked hash (an acked one is merely
    unindexed)."""

    def restore(pipe: Any) -> bool:
        payload = pipe.hget(qos.unacked_key, tag)
        pipe.multi()
        qos._remove_from_indices(tag, pipe)
        if payload:
            message, exchange, routing_key = loads(bytes_to_str(payload))
            qos.channel._do_restore_message(message, exchange, routing_key, pipe, leftmost)
        return bool(payload)

    with qos.channel.conn_or_acquire(client) as client:
        return bool(client.transaction(restore, qos.unacked_key, value_from_callable=True))


class ConsumeHooks:
    """Mixed in before kombu's Redis Channel: its BRPOP consume (`_brpop_start`, `_brpop_read`, the poller's
    'BRPOP' handler) and its synchronous get (`_get`) go to `start_claim`, `read_claim` and `get_claimed`."""

    def _brpop_start(self, timeout: Any = None) -> None:
        return self.start_claim(timeout)

    def _brpop_read(self, **options: Any) -> bool:
        return self.read_claim(**options)

    def _get(self, queue: str) -> Any:
        return self.get_claimed(queue)

    def _poll_error(self, type: str, **options: Any) -> Any:
        return self.poll_error(type, **options)

    def start_claim(self, timeout: Any) -> None:
        return super()._brpop_start(timeout)  # type: ignore[misc]

    def read_claim(self, **options: Any) -> bool:
        return super()._brpop_read(**options)  # type: ignore[misc]

    def get_claimed(self, queue: str) -> Any:
        return super()._get(queue)  # type: ignore[misc]

    def poll_error(self, type: str, **options: Any) -> Any:
        return super()._poll_error(type, **options)  # type: ignore[misc]


class PutHook:
    """Mixed in before kombu's Redis Channel: its publish of one message to one queue (`_put`) goes to `put`."""

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        return self.put(queue, message, **kwargs)

    def put(self, queue: str, message: Any, **kwargs: Any) -> None:
        return super()._put(queue, message, **kwargs)  # type: ignore[misc]


def single_push_list(channel: Any, queue: str, message: Any, kwargs: dict[str, Any]) -> str | None:
    """The (prefixed) list kombu's `_put` would LPUSH the message to, or None where it would do more than that one
    LPUSH (a batched publish; a queue with `x-expires`, whose lists it renews too)."""
    if kwargs.get("_publish_batch") is not None or (channel._expires and queue in channel._expires):
        return None
    step = channel._get_message_priority(message, reverse=False)
    return channel.global_keyprefix + channel._q_for_pri(queue, step)


def connection_args(pool: Any) -> dict[str, Any]:
    """What kombu's ConnectionPool.new passes its PooledConnection: the pool's connection's settings."""
    return dict(pool.connection._info(resolve=False))


def consume_order(channel: Any) -> list[str]:
    """The queues a BRPOP of the channel would name now, in its queue cycle's order (kombu's `_brpop_start`)."""
    return channel._queue_cycle.consume(len(channel.active_queues))


def priority_list(channel: Any, queue: str, priority: int) -> str:
    """kombu's Redis list of `queue` for a priority step."""
    return channel._q_for_pri(queue, priority)


def poll_sent(channel: Any, connection: Any) -> None:
    """What kombu's `_brpop_start` records before it sends: the poller's pause logic and its health check read it."""
    channel._in_poll = connection
    channel._brpop_sent_at = monotonic()


def poll_done(channel: Any) -> None:
    """What kombu's `_brpop_read` does once the reply is read (or failed): no read pending, a re-auth may go."""
    channel._in_poll = None
    channel._flush_brpop_reauth()


def deliver(channel: Any, payload: Any, queue: str) -> None:
    """kombu's `_brpop_read` after a pop: the queue moves in the cycle, the message goes to its consumer."""
    channel._queue_cycle.rotate(queue)
    channel.connection._deliver(payload, queue)


def refresh_queue_expiry(channel: Any, client: Any, queue: str) -> None:
    """What kombu's `_get` does after each read: renew the `x-expires` of the queue's lists, if it has one."""
    channel._maybe_update_queues_expire(client, queue)


# Celery


def active_requests() -> list[Any]:
    """The requests this worker process runs now (a copy)."""
    from celery.worker import state

    return copy_live(state.active_requests)


def reserved_requests() -> list[Any]:
    """The requests this worker process has received and not finished, the running ones included (a copy)."""
    from celery.worker import state

    return copy_live(state.reserved_requests)


def is_reserved(request: Any) -> bool:
    from celery.worker import state

    return request in state.reserved_requests


def any_active() -> bool:
    from celery.worker import state

    return bool(state.active_requests)


class BackendWrites:
    """Mixed in before Celery's Redis backend: its state write (`RedisBackend._set`) goes to `write_state`, and
    `celery_write` is Celery's own."""

    def _set(self, key: Any, value: Any) -> None:
        return self.write_state(key, value)

    def write_state(self, key: Any, value: Any) -> None:
        return self.celery_write(key, value)

    def celery_write(self, key: Any, value: Any) -> None:
        return super()._set(key, value)  # type: ignore[misc]


def copy_live(items: Any) -> list[Any]:
    """A copy of a set another thread changes (Celery's consumer adds or acks while we copy)."""
    for _ in range(3):
        try:
            return list(items)
        except RuntimeError:
            continue
    return []


def stop_worker_warm(exitcode: int) -> None:
    """What Celery's SIGTERM handler does: the consumer's loop raises WorkerShutdown(exitcode) at its next turn,
    after the job it runs (the solo pool) and before it fetches another."""
    from celery.worker import state

    state.should_stop = exitcode
