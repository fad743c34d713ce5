"""One sweep job: the conditions embedded once, one cheap mix per frame, frames through the decoder in batches.

Every frame starts from the same decoder noise: each decoder row gets a fresh generator from the job's seed, as
the plain job's decoder does, so frame k is the plain job with frame k's weights
(tests/integration/test_sweep_exact.py). Each frame is uploaded as soon as its batch is decoded and listed in the
job's progress; the animation is encoded and uploaded at the end. A cancel stops the sweep at its next denoising
step; the frames uploaded stay listed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from kiq.contract import Job
from kiq.status import ImageRef, JobResult
from kiq.sweep import frame_positions
from worker import metrics
from worker.animation import CONTENT_TYPES, encode_animation
from worker.pipelines.base import DecoderRow
from worker.runner import JobContext, Prepared, Runner, decoder_params, encode, model_errors, prior_params, rng, timed


def slerp_coefficients(a: np.ndarray, b: np.ndarray, s: float) -> tuple[float, float]:
    """(c_a, c_b) with c_a·a + c_b·b the spherical blend of embeddings a and b at s: the direction moves along
    the great circle, the norm linearly from |a| to |b| (so equal norms are kept). Linear where the angle is 0."""
    if s == 0:
        return 1.0, 0.0
    if s == 1:
        return 0.0, 1.0
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 1 - s, s
    theta = math.acos(max(-1.0, min(1.0, float(np.dot(a, b)) / (na * nb))))
    if math.sin(theta) < 1e-6:  # (anti)parallel: the great circle is not defined, the line is
        return 1 - s, s
    norm = (1 - s) * na + s * nb
    c_a = norm * math.sin((1 - s) * theta) / (math.sin(theta) * na)
    c_b = norm * math.sin(s * theta) / (math.sin(theta) * nb)
    return c_a, c_b


def effective_weights(job: Job, parts: Sequence[np.ndarray]) -> list[list[float]]:
    """Each frame's input weights. Linear mix: the keyframes' blend. Slerp: the blend's coefficients come from
    the keyframes' embeddings, and since slerp of two weighted sums is again a weighted sum of the inputs, the
    frame is the plain job with these weights."""
    assert job.sweep is not None
    if job.sweep.mix == "linear":
        return job.frame_weights()
    keyframes = job.keyframes()
    embedded = [sum(w * p for w, p in zip(k, parts, strict=True)) for k in keyframes]
    weights = []
    for j, s in frame_positions(job.sweep.frames, len(keyframes) - 1, job.sweep.easing):
        c_a, c_b = slerp_coefficients(embedded[j], embedded[j + 1], s)
        weights.append(list(keyframes[j]) if c_b == 0 else list(keyframes[j + 1]) if c_a == 0 else
                       [c_a * x + c_b * y for x, y in zip(keyframes[j], keyframes[j + 1], strict=True)])  # fmt: skip
    return weights


def run_job(runner: Runner, job: Job, ctx: JobContext) -> JobResult:
    """A job of either kind: a sweep through SweepRun, a plain job through the runner."""
    return SweepRun(runner, job, ctx).run() if job.sweep is not None else runner.run(job, ctx)


class SweepRun:
    """A sweep job from fetch to animation, on the runner's pipelines and storage."""

    def __init__(self, runner: Runner, job: Job, ctx: JobContext) -> None:
        self.runner, self.job, self.ctx = runner, job, ctx
        self.batch = max(1, runner.settings.decoder_batch)

    def run(self) -> JobResult:
        prepared, conditions = self.runner.fetch(self.job, self.ctx)
        pipelines = self.runner.pipelines
        assert pipelines is not None
        job, ctx, timings = self.job, self.ctx, prepared.timings
        with timed(timings, "prior"), model_errors():
            ctx.progress("prior", 0, job.prior_steps)
            on_prior_step = lambda step, total: ctx.progress("prior", step, total)  # noqa: E731
            embedded = pipelines.conditions(conditions, prior_params(job), rng(prepared.seed), on_prior_step)
            ctx.progress("prior", job.prior_steps, job.prior_steps)
            parts = [pipelines.numpy(p).reshape(-1) for p in embedded.parts] if job.sweep.mix == "slerp" else []
            weights = effective_weights(job, parts)
            embeds = [pipelines.mix(embedded, w) for w in weights]
        images = self._frames(prepared, embeds, embedded.negative)
        animation = self._animation(prepared, images) if job.animation is not None else None
        metrics.observe_pipelines(pipelines.caches(), pipelines.memory_bytes())
        return JobResult(images=list(ctx.frames), seed=prepared.seed, device=self.runner.device.name,
                         timings=timings, animation=animation, frame_weights=weights)  # fmt: skip

    def _frames(self, prepared: Prepared, embeds: list[Any], negative: Any) -> list[Any]:
        """Decode in batches of KIQ_DECODER_BATCH frames; each batch's frames are uploaded before the next."""
        job, ctx, timings = self.job, self.ctx, prepared.timings
        steps, batches = job.decoder_steps, math.ceil(len(embeds) / self.batch)
        images: list[Any] = []
        for b in range(batches):
            chunk = list(range(b * self.batch, min(len(embeds), (b + 1) * self.batch)))

            def on_step(step: int, total: int, b: int = b, rows: int = len(chunk)) -> list[int]:
                ctx.progress("decoder", b * steps + step, batches * steps)  # raises on cancel and timeout
                return list(range(rows))

            with _adding(timings, "decoder"), model_errors():
                decoded = self._decode([embeds[k] for k in chunk], negative, prepared.seed, on_step)
            for row, k in enumerate(chunk):
                images.append(decoded[row])
                with _adding(timings, "encode"):
                    blob = encode(decoded[row], job.output_format)
                with _adding(timings, "upload"):
                    ctx.frame_done(self.runner.upload(ctx.job_id, k, blob, job, prepared.seed, fence=ctx.fence))
        return images

    def _decode(self, embeds: list[Any], negative: Any, seed: int, on_step: Any) -> dict[int, Any]:
        """One decoder call; each row draws from a fresh generator of the job's seed, so every frame starts from
        the same noise. A batch of one takes the plain job's own path."""
        pipelines, params = self.runner.pipelines, decoder_params(self.job)
        assert pipelines is not None
        if len(embeds) == 1:
            return dict(enumerate(pipelines.decode(embeds[0], negative, params, rng(seed), on_step)))
        rows = [DecoderRow(e, negative, rng(seed)) for e in embeds]
        return pipelines.decode_batch(rows, params, on_step)

    def _animation(self, prepared: Prepared, images: list[Any]) -> ImageRef:
        spec = self.job.animation
        assert spec is not None
        with timed(prepared.timings, "animation"):
            self.ctx.progress("upload", len(images), len(images) + 1)
            blob = encode_animation(images, spec)
            return self.runner.upload(self.ctx.job_id, "animation", blob, self.job, prepared.seed, fmt=spec.format,
                                      content_type=CONTENT_TYPES[spec.format], fence=self.ctx.fence)  # fmt: skip


@contextmanager
def _adding(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Like `timed`, summed over the sweep's batches."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 4)
