"""Leases on the messages a worker holds, so that a short visibility timeout is safe for long jobs.

With the Redis broker an unacknowledged message sits in kombu's unacked index, a sorted set scored by the time
it was handed out; any consumer's periodic sweep puts it back on its queue once that score is older than the
sweeper's visibility timeout, which is why each timeout gets an index of its own (`kiq.names.unacked_keys`).
kiq keeps the timeout short (`KIQ_VISIBILITY_TIMEOUT_S`, 60 s) and a thread in each worker process re-scores
every message that process holds — running, reserved (prefetched, batch mates), waiting for an ETA, or kept
across a broker reconnect (kiq/transport.py) — every sixth of the timeout, for as long as the process lives.
This is the lease pattern of SQS's ChangeMessageVisibility: a live job is never handed out twice however long
it runs, and the job of a worker that died comes back within one timeout plus one sweep.

kombu sweeps only its own index, so each worker also sweeps the indexes of the other timeouts in use
(`OtherIndexes`), each by its own timeout: a dead worker's jobs come back whatever timeout the live ones have.
Every score and every sweep's cutoff is read from Redis's clock (`TIME`), never a host's: a worker whose clock is
minutes off neither takes live jobs nor keeps dead ones.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from kiq import library_internals as internals
from kiq import redisconn
from kiq.celeryconf import renew_interval_s, restore_interval_s, unacked_mutex_expire_s, worker_socket_timeout_s
from kiq.intake import Intake
from kiq.names import VISIBILITY_TIMEOUTS_KEY, unacked_keys
from kiq.settings import Settings
from kiq.transport import QoS as KiqQoS
from kiq.transport import hold_while, kept_leases, server_time

log = logging.getLogger(__name__)
renewal_failures = [0]  # failed renewal rounds in this process since start: worker/metrics.py exports it
# Set by the worker (worker/fencing.py): let go of every held message not running, once this process's leases lapsed.
on_lapse: Callable[[], None] | None = None


class LeaseKeeper:
    """Re-scores held delivery tags in the unacked index; `ZADD XX` never revives a message acked meanwhile."""

    def __init__(self, redis: Any, held: Callable[[], Iterable[tuple[str, str]]], interval_s: float,
                 unsafe_after_s: float = float("inf"), on_unsafe: Callable[[float, Exception], None] | None = None,
                 on_safe: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.redis, self.held, self.interval_s = redis, held, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.renewals = 0
        # Failure accounting: past `unsafe_after_s` without a successful renewal `on_unsafe` is called (once), and
        # `on_safe` at the next success.
        self.unsafe_after_s, self.on_unsafe, self.on_safe = unsafe_after_s, on_unsafe, on_safe
        self.last_renewed, self.unsafe = time.monotonic(), False
        # Past `lapse_after_s` (the self-fencing point) `on_lapse` is called, once until the next success: another
        # worker may take any message held here, so none that is not running may start here from its stale copy.
        self.lapse_after_s, self.on_lapse, self.let_go = float("inf"), on_lapse_of_process, False
        self.lapses = 0  # how many times the leases lapsed: a run that began before one stops (see lapse_count)

    def start(self) -> None:
        self._stop.clear()
        self.last_renewed = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="kiq-leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def renew(self) -> int:
        """Renew every held lease now; returns how many were renewed."""
        by_index: dict[str, list[str]] = {}
        for index_key, tag in self.held():
            by_index.setdefault(index_key, []).append(tag)
        renewed = 0
        if by_index:
            now = server_time(self.redis)
            for index_key, tags in by_index.items():
                renewed += int(self.redis.zadd(index_key, dict.fromkeys(tags, now), xx=True, ch=True) or 0)
        else:
            self.redis.ping()  # nothing held: still prove the leases' connection works, before taking a job
        self.renewals += 1
        return renewed

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._let_go_if_lapsed()  # before renewing: a round that comes late (a starved thread) is no renewal
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - a Redis blip: keep trying, the lease has slack for it
                log.warning("could not renew message leases: %s", exc)
                renewal_failures[0] += 1
                self._failed(exc)
            else:
                self._renewed()

    def _failed(self, exc: Exception) -> None:
        late_s = time.monotonic() - self.last_renewed
        if not self.unsafe and late_s > self.unsafe_after_s:
            self.unsafe = True
            if self.on_unsafe is not None:
                self.on_unsafe(late_s, exc)
        self._let_go_if_lapsed()

    def _let_go_if_lapsed(self) -> None:
        if self.let_go or time.monotonic() - self.last_renewed <= self.lapse_after_s:
            return
        self.let_go = True
        self.lapses += 1
        try:
            self.on_lapse()
        except Exception:  # the keeper must keep renewing; each start checks the lapse again
            log.exception("could not let go of the messages held past the leases' lapse")

    def _renewed(self) -> None:
        self.last_renewed, self.let_go = time.monotonic(), False
        if self.unsafe:
            self.unsafe = False
            if self.on_safe is not None:
                self.on_safe()


def on_lapse_of_process() -> None:
    if on_lapse is not None:
        on_lapse()


def lapse_after_s(visibility_timeout_s: float) -> float:
    """How long without a successful renewal before this process treats its leases as lost and stops its jobs: two
    thirds of the timeout, so that it has stopped before another worker can take them (at the timeout plus a sweep;
    the third left over covers the renewal's own round trip, bounded by the leases' socket timeouts)."""
    return visibility_timeout_s * 2 / 3


_process_keeper: list[LeaseKeeper] = []  # this worker process's keeper (its `lapse_after_s` is the bound)


def lapsed() -> float | None:
    """Seconds since this worker process last renewed its leases, once past `lapse_after_s`; else None (also in a
    process without a keeper). Read at every denoising step: a run whose lease may be taken stops (self-fencing)."""
    if not _process_keeper:
        return None
    keeper = _process_keeper[0]
    age_s = time.monotonic() - keeper.last_renewed
    return age_s if age_s > keeper.lapse_after_s else None


def lapse_count() -> int:
    """How many times this process's leases lapsed (0 without a keeper). A run compares it with the count when it
    began: after a pause (SIGSTOP, a frozen VM) the keeper's first round notes the lapse and then renews within
    milliseconds, so `lapsed()` alone could miss that another worker may have taken the job meanwhile."""
    return _process_keeper[0].lapses if _process_keeper else 0


def lapsed_since(count: int | None) -> bool:
    """Whether the leases are lapsed now or lapsed (and healed) since `lapse_count()` was `count`."""
    return lapsed() is not None or (count is not None and lapse_count() != count)


class OtherIndexes:
    """Hands back the jobs of dead workers whose visibility timeout is not ours, as a worker of theirs would.

    Every worker notes its timeout in a sorted set in the broker's Redis (scored by when it was last seen) and
    sweeps each other timeout's index by that timeout, through kombu's own restore (its mutex, its transaction,
    its priority lists). Live workers renew their leases every sixth of their timeout, so their jobs are never
    taken: the sweep is exactly theirs. A timeout unseen for a day whose index is gone is dropped from the set."""

    def __init__(self, connect: Callable[[], Any], visibility_timeout_s: float, interval_s: float) -> None:
        self.connect, self.own, self.interval_s = connect, float(visibility_timeout_s), interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connection: Any = None
        self._sweeps: dict[str, _IndexQoS] = {}  # by index key, dropped with the connection
        self._forget: Any = None  # the _FORGET script, registered on the connection's client

    def start(self) -> None:
        """Sweeps at once (a fresh worker hands back what is waiting), then every `interval_s`."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kiq-other-indexes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is None:
            self._drop()
            return
        self._thread.join(timeout=5)
        if self._thread.is_alive():  # a sweep stuck on Redis: its socket timeout ends it; a daemon thread anyway
            log.warning("the sweep of other visibility timeouts' indexes did not stop within 5 s")

    def note(self, client: Any, now: float | None = None) -> None:
        """Put our timeout on record (scored now, by Redis's clock): from then on other workers sweep our index."""
        client.zadd(VISIBILITY_TIMEOUTS_KEY, {repr(self.own): server_time(client) if now is None else now})

    def sweep(self) -> int:
        """Note our timeout, then sweep every other one's index once; returns how many jobs it handed back."""
        channel = self._channel()
        client = channel.client
        now = server_time(client)
        self.note(client, now)
        swept, restored = {unacked_keys(self.own)["unacked_index_key"]}, 0
        for member, _ in client.zrange(VISIBILITY_TIMEOUTS_KEY, 0, -1, withscores=True):
            timeout_s = parse_timeout(member)
            if timeout_s is None:
                client.zrem(VISIBILITY_TIMEOUTS_KEY, member)
                continue
            index = unacked_keys(timeout_s)["unacked_index_key"]
            if index in swept:  # ours, or a near-equal timeout sharing its keys
                continue
            swept.add(index)
            cutoff = now - FORGET_TIMEOUT_AFTER_S
            if self._forget(keys=[VISIBILITY_TIMEOUTS_KEY, index], args=[member, cutoff]):
                continue
            restored += self._sweep_of(channel, index, timeout_s).sweep()
        if restored:
            log.warning("handed back %d job(s) of dead workers with another visibility timeout", restored)
        return restored

    def _channel(self) -> Any:
        if self._connection is None:
            self._connection = self.connect()
            self._forget = self._connection.default_channel.client.register_script(_FORGET)
        return self._connection.default_channel

    def _sweep_of(self, channel: Any, index: str, timeout_s: float) -> _IndexQoS:
        if index not in self._sweeps:
            self._sweeps[index] = _IndexQoS(channel, timeout_s)
        return self._sweeps[index]

    def _drop(self) -> None:
        connection, self._connection, self._sweeps, self._forget = self._connection, None, {}, None
        if connection is not None:
            try:
                connection.release()
            except Exception:  # noqa: BLE001 - already broken: nothing to give back
                pass

    def _loop(self) -> None:
        try:
            while True:
                wait_s = self.interval_s
                try:
                    self.sweep()
                except Exception as exc:  # noqa: BLE001 - a Redis blip: reconnect and retry soon
                    log.warning("could not sweep the other visibility timeouts' indexes: %s", exc)
                    self._drop()
                    wait_s = min(1.0, self.interval_s)
                if self._stop.wait(wait_s):
                    return
        finally:
            self._drop()  # this thread owns the connection


FORGET_TIMEOUT_AFTER_S = 86400
# KEYS: the timeouts' set, one timeout's index. ARGV: its member, the cutoff. Atomic, so that a worker noting that
# timeout meanwhile is never forgotten: a timeout goes only when unseen since the cutoff and its index is gone.
_FORGET = """
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if seen and tonumber(seen) < tonumber(ARGV[2]) and redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""


def parse_timeout(member: Any) -> float | None:
    """A timeout from the set (`repr` of a float, so it maps back to the keys its workers built), or None."""
    try:
        timeout_s = float(member)
    except (TypeError, ValueError):
        return None
    return timeout_s if 0 < timeout_s < float("inf") else None  # NaN compares false: refused too


class _IndexQoS(KiqQoS):
    """kombu's sweep of an unacked index (`restore_visible`, by Redis's clock), pointed at another timeout's keys."""

    def __init__(self, channel: Any, visibility_timeout_s: float) -> None:
        super().__init__(channel)
        internals.cancel_restore_at_exit(self)  # nothing is delivered through it: nothing of its own to restore at exit
        for name, key in unacked_keys(visibility_timeout_s).items():
            setattr(self, name, key)
        self.visibility_timeout = visibility_timeout_s
        self.unacked_mutex_expire = unacked_mutex_expire_s(visibility_timeout_s)  # as that timeout's workers
        self.handed_back = 0

    def sweep(self) -> int:
        self.handed_back = 0
        self.restore_visible(num=self.channel.unacked_restore_limit, interval=1)
        return self.handed_back

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        """kombu 5.7's, counting only the tags it finds in the unacked hash (an acked one is merely unindexed)."""
        self.handed_back += internals.restore_by_tag(self, tag, client, leftmost)


SWEEP_SOCKETS = {"socket_timeout": 10, "socket_connect_timeout": 5}


def held_by_consumer(consumer: Any, visibility_timeout_s: float) -> list[tuple[str, str]]:
    """(unacked index key, delivery tag) of every message this worker holds: the task channel's unacknowledged
    deliveries (ETA messages included), the requests it runs or has reserved, and the messages an old channel kept
    on a broker reconnect (kiq/transport.py) — the consumer's fresh channel no longer lists those, and Celery
    forgets its reserved requests, which the threads pool still runs."""
    task_consumer = getattr(consumer, "task_consumer", None)
    channel = getattr(task_consumer, "channel", None)
    index_key = unacked_keys(visibility_timeout_s)["unacked_index_key"]  # what our transport options name
    tags: set[str] = set()
    if channel is not None:
        index_key = getattr(channel, "global_keyprefix", "") + channel.unacked_index_key
        qos = internals.channel_qos(channel)  # kombu creates it on first delivery
        if qos is not None:
            tags.update(internals.copy_live(internals.delivered(qos)))
    tags.update(_tags(_requests()))
    kept = kept_leases()
    tags.difference_update(tag for _, tag in kept)
    return sorted([*((index_key, tag) for tag in tags), *kept])


def held_tags(consumer: Any) -> set[str]:
    """Delivery tags of the requests this worker runs, has reserved or schedules for an ETA: what a channel that
    closes on a reconnect must not hand back (kiq/transport.py)."""
    timer = getattr(consumer, "timer", None)
    queue = internals.copy_live(getattr(timer, "queue", ()))
    entries = [getattr(item, "entry", item) for item in queue]  # (eta, priority, entry)
    return _tags([*_requests(), *(arg for entry in entries for arg in getattr(entry, "args", None) or ())])


def _tags(requests: Iterable[Any]) -> set[str]:
    tags = set()
    for request in requests:
        if getattr(request, "acknowledged", False):  # settled (or let go of): its lease is not ours to renew
            continue
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag is not None:
            tags.add(tag)
    return tags


def _requests() -> list[Any]:
    return [*internals.active_requests(), *internals.reserved_requests()]


def broker_redis(settings: Settings) -> Any:
    """Leases live in the broker's Redis, which need not be the result backend's (with Sentinel: its master)."""
    return redisconn.connect(settings.broker_server, settings, **lease_sockets(settings.visibility_timeout_s))


def lease_sockets(visibility_timeout_s: float) -> dict[str, Any]:
    """The leases' client options: a renewal on a half-open connection (host loss, partition) fails within a
    renewal interval instead of blocking in TCP retransmits (~15 min; redis-py < 8 has no socket timeout), and
    is not retried inside redis-py (the loop's next round is the retry). Named, to be found in CLIENT LIST."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    timeout_s = worker_socket_timeout_s(visibility_timeout_s)
    return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "socket_keepalive": True,
            "socket_keepalive_options": _keepalive(timeout_s), "retry": Retry(NoBackoff(), 0),
            "client_name": LEASE_CLIENT_NAME}  # fmt: skip


LEASE_CLIENT_NAME = "kiq-leases"


def _keepalive(timeout_s: float) -> dict[int, int]:
    """Probe an idle connection after a few seconds (Linux's options; others keep the system's)."""
    names = ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")
    if not all(hasattr(socket, name) for name in names):
        return {}
    seconds = max(1, int(timeout_s))
    return {socket.TCP_KEEPIDLE: seconds, socket.TCP_KEEPINTVL: seconds, socket.TCP_KEEPCNT: 3}


def install(app: Any, redis_factory: Callable[[], Any], visibility_timeout_s: float) -> None:
    """Add a consumer bootstep that keeps the leases of this worker's messages while it runs."""
    from celery import bootsteps

    class Leases(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, c: Any, **kwargs: Any) -> None:
            super().__init__(c, **kwargs)
            self.keeper: LeaseKeeper | None = None
            self.others: OtherIndexes | None = None

        def start(self, c: Any) -> None:
            hold_while(lambda: held_tags(c))  # before the first job: a reconnect keeps what this consumer runs
            if self.keeper is None:
                interval = renew_interval_s(visibility_timeout_s)
                held = lambda: held_by_consumer(c, visibility_timeout_s)  # noqa: E731
                self.keeper = LeaseKeeper(redis_factory(), held, interval, visibility_timeout_s / 2,
                                          *_stop_taking_jobs(Intake.of(c), visibility_timeout_s))  # fmt: skip
                self.keeper.lapse_after_s = lapse_after_s(visibility_timeout_s)
                self.keeper.start()
                _process_keeper[:] = [self.keeper]
                log.info("renewing message leases every %.1f s", interval)
            if self.others is None:
                # Its own connection, used by its thread alone; a socket timeout so a half-open Redis ends a sweep.
                connect = lambda: app.connection_for_write(transport_options=SWEEP_SOCKETS)  # noqa: E731
                self.others = OtherIndexes(connect, visibility_timeout_s, restore_interval_s(visibility_timeout_s))
                try:
                    self.others.note(self.keeper.redis)  # on record before the first job; the sweeps renew it
                except Exception as exc:  # noqa: BLE001 - Redis down at start: the sweep thread retries every second
                    log.warning("could not note this worker's visibility timeout yet: %s", exc)
                self.others.start()

        def shutdown(self, c: Any) -> None:
            for part in (self.keeper, self.others):
                if part is not None:
                    part.stop()

    app.steps["consumer"].add(Leases)


def _stop_taking_jobs(intake: Intake, visibility_timeout_s: float) -> tuple[Callable[..., None], Callable[[], None]]:
    """Past half the visibility timeout without a renewal (before the leases could lapse) the worker stops
    taking jobs, loudly: each job it took could be handed to another worker while it runs. It resumes once a
    renewal succeeds (a Redis outage, a partition), rather than exiting: a supervisor's restarts would fail the
    same way and cost the running job."""

    def unsafe(late_s: float, exc: Exception) -> None:
        log.error("message leases not renewed for %.1f s (%s: %s): this worker stops taking jobs until a renewal "
                  "succeeds; past the %g s visibility timeout the jobs it holds are handed to other workers",
                  late_s, type(exc).__name__, exc, visibility_timeout_s)  # fmt: skip
        intake.pause()

    def safe() -> None:
        log.warning("message leases renewed again: this worker is taking jobs again")
        intake.resume()

    return unsafe, safe
