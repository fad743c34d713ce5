"""At-least-once delivery made safe: count deliveries that never finished, and a hard-limit watchdog."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kiq.errors import PoisonJob

log = logging.getLogger(__name__)
WATCHDOG_EXIT_CODE = 75


def deliveries_key(job_id: str) -> str:
    return f"kiq:deliveries:{job_id}"


class DeliveryGuard:
    """A job that has killed its worker `max_deliveries` times is failed as poison instead of looping.

    `begin` counts a start; `end` (any finish the process survives) clears the count, so only deliveries
    that died mid-job accumulate.
    """

    def __init__(self, redis: Any, max_deliveries: int, ttl_s: int) -> None:
        self.redis, self.max_deliveries, self.ttl_s = redis, max_deliveries, ttl_s

    def begin(self, job_id: str) -> int:
        key = deliveries_key(job_id)
        count = int(self.redis.incr(key))
        self.redis.expire(key, self.ttl_s)
        if count > self.max_deliveries:
            raise PoisonJob(
                f"job {job_id} was delivered {count} times and its worker died each time before finishing "
                f"(limit KIQ_MAX_DELIVERIES={self.max_deliveries}); it will not run again"
            )
        return count

    def end(self, job_id: str) -> None:
        self.redis.delete(deliveries_key(job_id))


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
