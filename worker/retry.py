"""Retry transient failures with exponential backoff and full jitter; permanent ones pass straight through."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from kiq.errors import TransientError

T = TypeVar("T")
log = logging.getLogger(__name__)


def with_retries(
    fn: Callable[[], T],
    *,
    attempts: int | None = None,
    within_s: float | None = None,
    base_s: float = 0.5,
    cap_s: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    jitter: Callable[[], float] = random.random,
) -> T:
    """Call `fn` until it succeeds, raises a permanent error, or the attempt count / time bound runs out."""
    start, attempt = clock(), 0
    while True:
        attempt += 1
        try:
            return fn()
        except TransientError as exc:
            delay = jitter() * min(cap_s, base_s * 2 ** (attempt - 1))
            out_of_attempts = attempts is not None and attempt >= attempts
            out_of_time = within_s is not None and clock() + delay - start > within_s
            if out_of_attempts or out_of_time:
                raise
            log.warning("transient failure (attempt %d), retrying in %.2f s: %s", attempt, delay, exc)
            sleep(delay)
