"""The broker transport of kiq's workers: kombu's Redis transport, with leases that trust one clock and outlive a
reconnect. The broker URL stays `redis://`, `rediss://` or `sentinel://`, so plain Celery clients share it.

- One clock. kombu scores a delivery in the unacked index with the host's clock, and each sweep hands back what
  is older than its own host's clock minus the visibility timeout: a worker minutes ahead took live jobs, one
  behind kept dead ones. Here both read Redis's `TIME` (kiq's lease renewals and sweeps do too, kiq/leases.py).
- Connection churn. When a worker's broker connection drops while Redis stays up (CLIENT KILL, a Sentinel
  failover, a proxy or NAT reset), Celery reconnects and kombu's old channel puts every unacknowledged message
  back on its queue — jobs the threads pool is still running, and batch mates it has claimed. Here the old channel
  hands back only what this process no longer holds (`hold_while`); the rest stays unacknowledged, its lease
  renewed (`kept_leases`), until the job's own ack, which still goes through the old channel's Redis pool.

- No lost pops. kombu's BRPOP removes a message before its unacked entry is written: a reply lost on the way
  loses the job. Here a Lua script claims it and writes the entry in one step (kiq/claim.py).

Overrides kombu's Redis QoS (`append`, `restore_visible`, `restore_unacked`, `ack`, `reject`), whose private names
it reaches through kiq/library_internals.py; tests/unit/test_transport.py fails if the overridden methods change.
Also relies on `restore_by_tag`, `Mutex`/`MutexHeld`, `Channel.pool` after close, `Connection.get_transport_cls`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from celery.app.amqp import AMQP as CeleryAMQP
from kombu import Connection as KombuConnection
from kombu.transport import redis
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.json import dumps

from kiq import library_internals as internals
from kiq.claim import Claiming

log = logging.getLogger(__name__)


def server_time(client: Any) -> float:
    """Redis's clock, in seconds: the one clock every lease score and sweep is compared against."""
    seconds, microseconds = client.time()
    return int(seconds) + int(microseconds) / 1e6


_holding: list[Callable[[], Iterable[str]]] = []
_kept: dict[str, tuple[str, Any]] = {}  # delivery tag -> (unacked index key, message), kept across a reconnect
_kept_lock = threading.Lock()


def hold_while(held_tags: Callable[[], Iterable[str]]) -> None:
    """Name the delivery tags this process still runs or waits for; a closing channel keeps their messages."""
    _holding[:] = [held_tags]


def kept_leases() -> list[tuple[str, str]]:
    """(unacked index key, delivery tag) of messages held across a reconnect and not yet acknowledged."""
    return [(index, tag) for tag, index, _ in _unsettled_kept()]


def kept_messages() -> list[Any]:
    """The messages held across a reconnect and not yet settled (Celery forgot their reserved requests)."""
    return [message for _, _, message in _unsettled_kept()]


def _unsettled_kept() -> list[tuple[str, str, Any]]:
    """(delivery tag, unacked index key, message) of each kept message, the acknowledged ones dropped first."""
    with _kept_lock:
        for tag in [tag for tag, (_, message) in _kept.items() if message.acknowledged]:
            del _kept[tag]
        return [(tag, index, message) for tag, (index, message) in _kept.items()]


def _held_now() -> set[str]:
    return {str(tag) for held in _holding for tag in held()}


class QoS(redis.QoS):
    """kombu's Redis ack emulation, scored by Redis's clock, keeping what the process holds when it closes."""

    def append(self, message: Any, delivery_tag: str) -> None:
        info = message.delivery_info
        with self.channel.conn_or_acquire() as client:
            now = server_time(client)
            payload = dumps([internals.raw_payload(message), info["exchange"], info["routing_key"]])
            client.pipeline().zadd(self.unacked_index_key, {delivery_tag: now}).hset(
                self.unacked_key, delivery_tag, payload
            ).execute()
        VirtualQoS.append(self, message, delivery_tag)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        """kombu 5.7's, with the cutoff taken from Redis's clock."""
        if not internals.restore_round_due(self, interval):
            return
        with self.channel.conn_or_acquire() as client:
            ceil = server_time(client) - self.visibility_timeout
            try:
                with redis.Mutex(client, self.unacked_mutex_key, self.unacked_mutex_expire):
                    visible = client.zrange(self.unacked_index_key, ceil, 0, desc=True, byscore=True,
                                            offset=num and start, num=num, withscores=True)  # fmt: skip
                    for tag, _ in visible or []:
                        self.restore_by_tag(tag, client)
            except redis.MutexHeld:
                pass

    def restore_unacked(self, client: Any = None) -> None:
        """On close (a reconnect, or the process ending): hand back only what nothing here still runs or awaits."""
        delivered_map = internals.delivered(self)
        held = _held_now() if delivered_map else set()
        index = self.channel.global_keyprefix + self.unacked_index_key
        kept = 0
        delivered = list(delivered_map.items())
        with _kept_lock:  # every held tag is kept before any Redis call, so a failing hand-back cannot drop one
            for tag, message in delivered:
                if tag in held:
                    _kept[tag] = (index, message)
                    kept += 1
        try:
            with self.channel.conn_or_acquire(client) as client:  # also gives the closed channel a pool for late acks
                for tag, _ in delivered:
                    if tag not in held:
                        self._hand_back(tag, client)
        finally:
            delivered_map.clear()
        if kept:
            log.info("kept %d message(s) this worker still runs or holds; their leases are renewed until acked", kept)

    def _hand_back(self, tag: str, client: Any) -> None:
        try:
            self.restore_by_tag(tag, client=client)
        except Exception as exc:  # noqa: BLE001 - Redis is usually why we reconnect: the sweep hands it back later
            log.warning("could not hand back message %s on close (the sweep will, after the timeout): %s", tag, exc)

    def ack(self, delivery_tag: str) -> None:
        try:
            super().ack(delivery_tag)
        except Exception:
            self._unheld(delivery_tag)
            raise
        forget(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        except Exception:
            self._unheld(delivery_tag)
            raise
        forget(delivery_tag)

    def _unheld(self, delivery_tag: str) -> None:
        """An ack or reject whose Redis call failed (a partition) would leave the message in the delivered map, its
        lease renewed forever and the job never handed back, with or without a final state stored. Dropped here,
        its lease lapses and the sweep hands it back: a stored final state settles the redelivery, else it runs."""
        internals.delivered(self).pop(delivery_tag, None)
        forget(delivery_tag)
        log.warning("could not settle message %s with Redis; its lease lapses and the sweep hands it back",
                    delivery_tag)  # fmt: skip


def forget(delivery_tag: str) -> None:
    """Stop renewing a kept message's lease: it was acked or rejected, or its run let go of it (a stale or
    self-fenced run, worker/fencing.py), so its lease must lapse for the sweep to hand it back."""
    with _kept_lock:
        _kept.pop(delivery_tag, None)


class Channel(Claiming, redis.Channel):
    QoS = QoS


class Transport(redis.Transport):
    Channel = Channel


class SentinelChannel(Claiming, redis.SentinelChannel):
    QoS = QoS


class SentinelTransport(redis.SentinelTransport):
    Channel = SentinelChannel


_OURS: dict[type, type] = {redis.Transport: Transport, redis.SentinelTransport: SentinelTransport}


class Connection(KombuConnection):
    """A kombu Connection that swaps in kiq's Redis transports. The URL's scheme still picks the transport (also
    after a failover switches hosts) and still sets TLS for `rediss://`."""

    def get_transport_cls(self) -> type:
        cls = super().get_transport_cls()
        return _OURS.get(cls, cls)


class AMQP(CeleryAMQP):
    """Celery's broker glue with kiq's Connection: `Celery(..., amqp="kiq.transport:AMQP")`."""

    Connection = Connection
    BrokerConnection = Connection
