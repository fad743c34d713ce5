"""Every private (or unpublished) kombu and Celery name kiq touches, behind one small adapter.

kiq pins kombu and Celery to the minor releases tested here (pyproject.toml); tests/unit/test_library_internals.py
checks each name used below on those versions, so a release that renames or changes one fails there, loudly,
instead of a lease renewal failing in production. No other module of kiq, the worker or the producer reads or
writes an underscore name of kombu or Celery, or `celery.worker.state` (tests/unit/test_library_internals.py
checks that too).

kombu (its Redis transport's ack emulation): `Channel._qos`, `QoS._delivered`, `QoS._vrestore_count`,
`QoS._on_collect`, `QoS._remove_from_indices`, `Channel._do_restore_message`, `Message._raw`.
Celery: `celery.worker.state.active_requests` / `reserved_requests` / `should_stop` (a drained worker's warm
shutdown), and `RedisBackend._set` (overridden).
"""

from __future__ import annotations

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
