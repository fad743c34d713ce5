"""This worker's own speed and the time limits it gives each job (the model is kiq/limits.py).

Measured at warm-up by a short real prior and decoder run on the loaded pipelines (64x64 first, doubling the side
while the next size fits KIQ_SPEED_PROBE_S: small sizes do not fill an accelerator, so a fast device is measured at
a size that does), then kept current from the decoder time of the jobs it runs (an EWMA, each job moving it by a
bounded factor). Published in the fleet heartbeat, where submit reads it to refuse jobs no worker could finish.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from kiq.contract import Job
from kiq.limits import REFERENCE_PIXELS, Speed, TimeLimits, decoder_units, expected_seconds, time_limits
from kiq.settings import Settings
from worker.pipelines.base import DecoderParams, Pipelines, PriorParams

__all__ = ["SpeedMeter", "TimeLimits", "expected_seconds", "measure", "time_limits"]
log = logging.getLogger(__name__)

PROBE_SIDES = (64, 128, 256, 512, 768)
PROBE_STEPS = 3  # the first step is not timed: it holds one-off costs (kernel compilation, allocation)
EWMA_ALPHA = 0.3
MAX_JUMP = 4.0  # one job moves the estimate at most this factor: a stalled or contended run is not the device


class SpeedMeter:
    """The worker's current speed, shared by the job threads (readers, `observe`) and the heartbeat thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._speed = Speed.reference(settings)
        self._jobs = 0
        self._lock = threading.Lock()

    @property
    def speed(self) -> Speed:
        with self._lock:
            return self._speed

    def limits(self, job: Job) -> TimeLimits:
        return time_limits(job, self.settings, self.speed)

    def probe(self, pipelines: Pipelines) -> None:
        """Measure at warm-up; on failure (or KIQ_SPEED_PROBE_S=0) the reference speed stands until a job runs."""
        if self.settings.speed_probe_s <= 0:
            return
        try:
            measured = measure(pipelines, self.settings.speed_probe_s)
        except Exception as exc:  # noqa: BLE001 - a failed probe must not keep a worker from serving
            log.warning("speed probe failed (%s: %s): the reference speed stands until a job has run",
                        type(exc).__name__, exc)  # fmt: skip
            return
        with self._lock:
            self._speed = measured
        log.info("speed probe: %.4g s per prior step, %.4g s per 768x768 decoder step",
                 measured.prior_step_s, measured.decoder_step_s)  # fmt: skip

    def observe(self, job: Job, timings: Mapping[str, float]) -> None:
        """Fold a successful job's decoder seconds per 768x768 step into the estimate."""
        seconds, units = timings.get("decoder", 0.0), decoder_units(job)
        if seconds <= 0 or units <= 0:
            return
        with self._lock:
            self._speed = Speed(self._speed.prior_step_s, updated(self._speed, seconds / units), "jobs")
            self._jobs += 1

    def fields(self) -> dict[str, str | float | int]:
        """What the heartbeat publishes (producer side: kiq.limits.live_worker)."""
        with self._lock:
            speed, jobs = self._speed, self._jobs
        return {"prior_step_s": speed.prior_step_s, "decoder_step_s": speed.decoder_step_s,
                "speed_source": speed.source, "speed_jobs": jobs,
                "limit_max_s": self.settings.time_limit_max_s}  # fmt: skip


def updated(current: Speed, seen: float) -> float:
    """The EWMA's next decoder seconds per unit; the reference is no measurement, so the first job replaces it."""
    if current.source == "reference":
        return seen
    old = current.decoder_step_s
    bounded = min(max(seen, old / MAX_JUMP), old * MAX_JUMP)
    return old + EWMA_ALPHA * (bounded - old)


def measure(pipelines: Pipelines, budget_s: float) -> Speed:
    """A real prior run and decoder runs of PROBE_STEPS steps, the decoder at growing sizes within `budget_s`."""
    import numpy as np

    started = time.perf_counter()
    # A text no cache holds: a cached prior would time nothing.
    text = f"kiq speed probe {uuid.uuid4().hex}"
    params = PriorParams(PROBE_STEPS, 4.0, "", 1)
    stamps: list[float] = []
    begun = time.perf_counter()
    embeds, negative = pipelines.interpolate([text], [1.0], params, np.random.default_rng(0), _stamp(stamps))
    prior = per_step(stamps, time.perf_counter() - begun, PROBE_STEPS) / 2  # one text and the negative
    decoder = 0.0
    for side, following in zip(PROBE_SIDES, (*PROBE_SIDES[1:], 0), strict=True):
        stamps, begun = [], time.perf_counter()
        decoder_params = DecoderParams(side, side, PROBE_STEPS, 4.0)
        pipelines.decode(embeds, negative, decoder_params, np.random.default_rng(0), _stamp(stamps))
        step = per_step(stamps, time.perf_counter() - begun, PROBE_STEPS)
        decoder = step * REFERENCE_PIXELS / (side * side)
        predicted = PROBE_STEPS * step * (following / side) ** 2
        if not following or time.perf_counter() - started + predicted > budget_s:
            break
    return Speed(prior_step_s=prior, decoder_step_s=decoder, source="probe")


def per_step(stamps: list[float], total_s: float, steps: int) -> float:
    """Seconds per step from the step callbacks' times, the first step left out; the whole run's average where
    the backend reports fewer than two steps."""
    if len(stamps) >= 2 and stamps[-1] > stamps[0]:
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return total_s / steps


def _stamp(stamps: list[float]) -> Callable[[int, int], Any]:
    return lambda step, total: stamps.append(time.perf_counter())
