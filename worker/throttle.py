"""Progress writes at a bounded rate per job: a fleet's Redis pays for every step of every job otherwise.

A progress write is five Redis commands (Celery reads the current state before each write, then SETEX and
PUBLISH in a transaction); at one write per denoising step that is most of what a busy fleet sends Redis
(`bench/fleet_sim.py`). Clients need far fewer: a progress bar moves smoothly at a few updates a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kiq.status import Progress


class ProgressThrottle:
    """Says which progress points of one job to write: at most one per `interval_s`, but never one that a
    client must see — the first, a change of stage, the last step of a stage, and a new sweep frame."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self.clock = interval_s, clock
        self.last: Progress | None = None
        self.last_at = 0.0

    def due(self, progress: Progress) -> bool:
        now = self.clock()
        if not self._must_write(progress) and now - self.last_at < self.interval_s:
            return False
        self.last, self.last_at = progress, now
        return True

    def _must_write(self, progress: Progress) -> bool:
        last = self.last
        return (
            last is None
            or progress.stage != last.stage
            or progress.step >= progress.total
            or len(progress.frames or ()) != len(last.frames or ())
        )
