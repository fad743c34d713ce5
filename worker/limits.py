"""Per-job time limits, derived from the job's size, step counts and (for a sweep) its frames."""

from __future__ import annotations

from dataclasses import dataclass

from kiq.contract import Job
from kiq.settings import Settings

REFERENCE_PIXELS = 768 * 768


@dataclass(frozen=True)
class TimeLimits:
    soft_s: float  # checked between denoising steps: the job fails with JobTimeout
    hard_s: float  # a step that hangs past this ends the process; the job is failed and not redelivered


def expected_seconds(job: Job, settings: Settings) -> float:
    texts = sum(1 for i in job.inputs if i.text is not None)
    prior = job.prior_steps * (texts + 1) * settings.prior_step_s
    scale = job.height * job.width / REFERENCE_PIXELS
    decoder = job.decoder_steps * job.num_images * job.frames * scale * settings.decoder_step_s
    return prior + decoder


def time_limits(job: Job, settings: Settings) -> TimeLimits:
    soft = max(settings.time_limit_min_s, settings.time_limit_factor * expected_seconds(job, settings))
    soft = min(soft, settings.time_limit_max_s)
    return TimeLimits(soft_s=soft, hard_s=soft + settings.time_limit_grace_s)
