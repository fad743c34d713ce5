"""How long a job should take on a given device speed, its time limits there, and whether any live worker of its
queue could finish it within the cap. Pure: shared by the workers (their own limits) and the producers (the
submit-time refusal), so both use one model.

A speed is seconds per prior step (per text, the negative counting as one) and seconds per decoder step per
768x768 image; decoder time scales with pixels, images and frames. Workers measure their own speed and publish it
in their heartbeat; KIQ_PRIOR_STEP_S and KIQ_DECODER_STEP_S are the reference speed, used where no measurement is
known (no live worker of the queue, or a worker that publishes none).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kiq.contract import Job
from kiq.errors import JobTooLong
from kiq.settings import Settings

REFERENCE_PIXELS = 768 * 768


@dataclass(frozen=True)
class Speed:
    prior_step_s: float  # seconds per prior step, per text
    decoder_step_s: float  # seconds per decoder step, per 768x768 image
    source: str = "reference"  # reference (the KIQ_* settings), probe (measured at warm-up) or jobs (EWMA)

    @classmethod
    def reference(cls, settings: Settings) -> Speed:
        return cls(settings.prior_step_s, settings.decoder_step_s, "reference")


@dataclass(frozen=True)
class TimeLimits:
    soft_s: float  # checked between denoising steps: the job fails with JobTimeout
    hard_s: float  # a step that hangs past this ends the process; the job is failed and not redelivered


@dataclass(frozen=True)
class LiveWorker:
    """What a producer knows of one live worker from its heartbeat."""

    name: str
    queues: tuple[str, ...]
    speed: Speed
    limit_max_s: float  # the worker's own KIQ_TIME_LIMIT_MAX_S


def decoder_units(job: Job) -> float:
    """Decoder steps of the job, in 768x768-image steps: what one decoder_step_s pays for."""
    return job.decoder_steps * job.num_images * job.frames * job.height * job.width / REFERENCE_PIXELS


def expected_seconds(job: Job, speed: Speed) -> float:
    texts = sum(1 for i in job.inputs if i.text is not None)
    return job.prior_steps * (texts + 1) * speed.prior_step_s + decoder_units(job) * speed.decoder_step_s


def time_limits(job: Job, settings: Settings, speed: Speed | None = None) -> TimeLimits:
    """The job's limits on a device of `speed` (the reference speed if None): factor x expected, within bounds."""
    expected = expected_seconds(job, speed or Speed.reference(settings))
    soft = max(settings.time_limit_min_s, settings.time_limit_factor * expected)
    soft = min(soft, settings.time_limit_max_s)
    return TimeLimits(soft_s=soft, hard_s=soft + settings.time_limit_grace_s)


def live_worker(name: str, beat: Mapping[str, str], settings: Settings) -> LiveWorker:
    """A heartbeat's speed and cap; a field missing or malformed (an older worker) reads as the reference's."""
    reference = Speed.reference(settings)
    prior = _positive(beat.get("prior_step_s"))
    decoder = _positive(beat.get("decoder_step_s"))
    measured = prior is not None and decoder is not None
    speed = Speed(prior, decoder, beat.get("speed_source") or "probe") if measured else reference  # type: ignore[arg-type]
    cap = _positive(beat.get("limit_max_s")) or settings.time_limit_max_s
    queues = tuple(q for q in beat.get("queues", "").split(",") if q)
    return LiveWorker(name=name, queues=queues, speed=speed, limit_max_s=cap)


def check_feasible(job: Job, queue: str, workers: Sequence[LiveWorker], settings: Settings) -> float:
    """The job's expected seconds on the fastest live worker of `queue` that could finish it within its cap;
    JobTooLong if none could. With no live worker of the queue, the reference speed and this process's cap."""
    serving = [w for w in workers if queue in w.queues]
    if not serving:
        expected = expected_seconds(job, Speed.reference(settings))
        if expected <= settings.time_limit_max_s:
            return expected
        raise JobTooLong(
            f"job would take about {_duration(expected)} at the reference speed (KIQ_PRIOR_STEP_S="
            f"{settings.prior_step_s:g}, KIQ_DECODER_STEP_S={settings.decoder_step_s:g}; no live worker of queue "
            f"{queue!r} publishes its own), over the {_duration(settings.time_limit_max_s)} cap "
            f"(KIQ_TIME_LIMIT_MAX_S): {_advice(job)}",
            expected_s=expected, limit_s=settings.time_limit_max_s, queue=queue, workers=0,
        )  # fmt: skip
    fits = [expected_seconds(job, w.speed) for w in serving if expected_seconds(job, w.speed) <= w.limit_max_s]
    if fits:
        return min(fits)
    best = min(serving, key=lambda w: expected_seconds(job, w.speed) / w.limit_max_s)
    expected = expected_seconds(job, best.speed)
    raise JobTooLong(
        f"job would take about {_duration(expected)} on the fastest of the {len(serving)} live worker(s) of queue "
        f"{queue!r} ({best.name}, {best.speed.decoder_step_s:.3g} s per 768x768 decoder step, {best.speed.source}), "
        f"over its {_duration(best.limit_max_s)} cap (KIQ_TIME_LIMIT_MAX_S): {_advice(job)}",
        expected_s=expected, limit_s=best.limit_max_s, queue=queue, workers=len(serving),
    )  # fmt: skip


def _advice(job: Job) -> str:
    what = "frames, " if job.sweep is not None else "images, " if job.num_images > 1 else ""
    return f"use fewer {what}decoder steps or a smaller size, or split it into several jobs"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _positive(raw: str | None) -> float | None:
    try:
        value = float(raw or "")
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None
