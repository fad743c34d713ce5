"""At-least-once delivery made safe: count deliveries that never finished, and a hard-limit watchdog."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from kiq import fencing, leases
from kiq.errors import PoisonJob
from kiq.names import deliveries_key, fence_key
from kiq.redisconn import REDIS_ERRORS, retrying

log = logging.getLogger(__name__)
WATCHDOG_EXIT_CODE = 75
T = TypeVar("T")


@dataclass(frozen=True)
class Delivery:
    solo: int  # unfinished deliveries run alone, this one included if it runs alone
    batched: int  # unfinished deliveries as part of a decoder batch, this one included if batched
    token: int = 0  # this delivery's fencing token: the job's deliveries so far, this one included

    @property
    def attempt(self) -> int:
        return self.solo + self.batched


class DeliveryGuard:
    """A job that has killed its worker `max_deliveries` times running alone fails as poison instead of looping.

    `begin` counts a start, `end` (any finish the process survives) clears the counts, so only deliveries that
    died mid-job accumulate. Deaths inside a decoder batch are counted apart: they cannot say which job was to
    blame, so they only make the job run alone next time (`crashed_before`), where its own deaths count.
    Redis blips are retried for `redis_retry_s`; `end` never raises, so bookkeeping cannot fail a finished job.
    `begin` also takes the delivery's fencing token and holds it for the process (kiq/fencing.py).
    """

    def __init__(self, redis: Any, max_deliveries: int, ttl_s: int, redis_retry_s: float = 30.0) -> None:
        self.redis, self.max_deliveries, self.ttl_s, self.redis_retry_s = redis, max_deliveries, ttl_s, redis_retry_s

    def crashed_before(self, job_id: str) -> bool:
        """True if an earlier delivery of the job started and never finished (its worker died)."""
        return bool(self._retrying(lambda: self.redis.exists(deliveries_key(job_id))))

    def begin(self, job_id: str, batched: bool = False) -> Delivery:
        key = deliveries_key(job_id)

        def count() -> list[Any]:
            pipe = self.redis.pipeline()
            pipe.hincrby(key, "batched" if batched else "solo", 1)
            pipe.hgetall(key)
            pipe.expire(key, self.ttl_s)
            pipe.incr(fence_key(job_id))
            pipe.expire(fence_key(job_id), self.ttl_s)
            return pipe.execute()

        done = self._retrying(count)
        counts = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in done[1].items()}
        delivery = Delivery(solo=counts.get("solo", 0), batched=counts.get("batched", 0), token=int(done[3]))
        fencing.hold(job_id, delivery.token)
        if not batched and delivery.solo > self.max_deliveries:
            raise PoisonJob(
                f"job {job_id} was delivered {delivery.attempt} times and its worker died each time before "
                f"finishing, {delivery.solo - 1} of them running alone "
                f"(limit KIQ_MAX_DELIVERIES={self.max_deliveries}); it will not run again"
            )
        return delivery

    def end(self, job_id: str) -> None:
        """Clear the count, unless a later delivery has begun (its count is its own)."""
        token = fencing.held(job_id)
        try:
            self._retrying(lambda: fencing.delete_if_current(self.redis, job_id, token, deliveries_key(job_id)))
        except REDIS_ERRORS as exc:  # the count expires by itself; the job's outcome stands
            log.warning("could not clear the delivery count of %s: %s", job_id, exc)

    def _retrying(self, call: Callable[[], T]) -> T:
        # Not past the leases' lapse: the run is stopping (self-fencing) and must not wait here for Redis while
        # another worker may take its job; the count expires by itself.
        return retrying(call, self.redis_retry_s, "delivery bookkeeping", give_up=lambda: leases.lapsed() is not None)


@contextmanager
def watchdog(limit_s: float, on_expire: Callable[[], None], exit_process: bool = True) -> Iterator[None]:
    """Past `limit_s` a step is hung: record why (`on_expire`), then end the process (its pool cannot
    interrupt MindSpore). The job's final state is already stored, so its redelivery is acknowledged unrun."""

    def expire() -> None:
        log.error("hard time limit of %.0f s exceeded; ending the worker process", limit_s)
        try:
            on_expire()
        finally:
            if exit_process:
                os._exit(WATCHDOG_EXIT_CODE)

    timer = threading.Timer(limit_s, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
