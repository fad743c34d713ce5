"""The model runtime, cog style: `setup()` once per process, `run()` once per job."""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kiq import tracing
from kiq.contract import Job, JobInput, seed_for
from kiq.errors import JobError, JobTimeout, PipelineError, StorageUnavailable
from kiq.settings import Settings
from kiq.status import ImageRef, JobResult, Progress, Stage
from worker import metrics
from worker.device import DeviceConfig
from worker.fetch import Fetcher, FetchLimits
from worker.pipelines.base import DecoderParams, DecoderRow, Pipelines, PriorParams
from worker.retry import with_retries
from worker.storage import S3Storage, Storage

log = logging.getLogger(__name__)
_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {"png": {}, "jpeg": {"quality": 95}, "webp": {"quality": 95}}


class JobCancelled(Exception):
    """Raised between denoising steps once the job's cancel flag is set; not a failure."""


class StaleDelivery(JobCancelled):
    """Raised at a step or before an upload once a later delivery of the job has begun (kiq/fencing.py): this run
    stops like a cancelled one, but writes nothing, not even its end."""


class LeasesLapsed(StaleDelivery):
    """A stale run whose worker has not renewed its leases for too long (self-fencing): every message the worker
    holds may be taken by another worker, not only the running one."""


def _unfenced() -> None:
    pass


@dataclass(frozen=True)
class JobContext:
    job_id: str
    report: Callable[[Progress], None]
    cancelled: Callable[[], bool]
    limit_s: float = math.inf  # the soft time limit, checked at every progress point
    record_frames: Callable[[list[ImageRef]], None] | None = None  # keeps a sweep's frames past cancel/failure
    fence: Callable[[], None] = _unfenced  # raises StaleDelivery once a later delivery of the job has begun

    deadline: float = field(init=False)  # time.monotonic() at which the soft limit runs out
    frames: list[ImageRef] = field(init=False, default_factory=list)  # a sweep's frames uploaded so far

    def __post_init__(self) -> None:
        object.__setattr__(self, "deadline", time.monotonic() + self.limit_s)

    def progress(self, stage: Stage, step: int, total: int) -> None:
        if self.cancelled():
            raise JobCancelled(self.job_id)
        self.check_time()
        self.report(Progress(stage=stage, step=step, total=total, frames=list(self.frames) or None))

    def frame_done(self, ref: ImageRef) -> None:
        self.frames.append(ref)
        if self.record_frames is not None:
            self.record_frames(list(self.frames))

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise JobTimeout(f"job ran past its {self.limit_s:.0f} s time limit (derived from its size and steps)")


@dataclass
class Prepared:
    """A job between its prior and its decoder."""

    job: Job
    ctx: JobContext
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    embeds: tuple[Any, Any] = (None, None)


class Runner:
    def __init__(self, settings: Settings, storage: Storage | None = None, pipelines: Pipelines | None = None) -> None:
        self.settings = settings
        self.device = DeviceConfig.from_settings(settings)
        self.storage = storage or S3Storage.from_settings(settings)
        self.fetcher = Fetcher(self.storage, FetchLimits.from_settings(settings))
        self.pipelines = pipelines
        self.load_seconds = 0.0

    def setup(self) -> None:
        """Pin the device and load both pipelines with the settings' backend; later calls do nothing."""
        if self.pipelines is not None:
            return
        from worker.pipelines import base

        start = time.perf_counter()
        self.pipelines = base.load(self.settings, self.device)
        self.load_seconds = time.perf_counter() - start

    def run(self, job: Job, ctx: JobContext) -> JobResult:
        """A plain job; a sweep runs through `worker.sweep.run_job` (which calls this for plain jobs)."""
        if job.sweep is not None:
            raise TypeError(f"{ctx.job_id} is a sweep: run it through worker.sweep.run_job")
        prepared = self.prepare(job, ctx)
        with timed(prepared.timings, "decoder"), model_errors():
            on_step = lambda step, total: ctx.progress("decoder", step, total)  # noqa: E731
            images = self.pipelines.decode(*prepared.embeds, decoder_params(job), rng(prepared.seed), on_step)
        return self.finish(prepared, images)

    def run_batch(self, items: list[tuple[Job, JobContext]],
                  settled: Callable[[int, JobResult | BaseException], None] | None = None,
                  ) -> list[JobResult | BaseException]:  # fmt: skip
        """Jobs with one decoder shape (num_images 1): fetch and prior each, one decoder batch, then encode and
        upload each. Every job keeps its own seed, progress and outcome: one job's failure is only its own, and
        a job cancelled or past its time limit leaves the batch at the next step. `settled(i, outcome)` hears
        each job's outcome as soon as it is known, so a cancelled job is reported while the others still run."""
        batch = _BatchOutcomes(len(items), settled)
        prepared: dict[int, Prepared] = {}
        for i, (job, ctx) in enumerate(items):
            with tracing.within(ctx.job_id):  # each job's stages in its own trace
                outcome = _own_outcome(lambda job=job, ctx=ctx: self.prepare(job, ctx))
            if isinstance(outcome, Prepared):
                prepared[i] = outcome
            else:
                batch.settle(i, outcome)
        if prepared:
            self._decode_batch(items, prepared, batch)
        for i in batch.open():
            batch.settle(i, PipelineError("job was not run"))
        return batch.outcomes  # type: ignore[return-value]

    def _decode_batch(self, items: list[tuple[Job, JobContext]], prepared: dict[int, Prepared],
                      batch: _BatchOutcomes) -> None:  # fmt: skip
        live = list(prepared)  # row r of the decoder batch is job live[r]
        assert self.pipelines is not None

        def on_step(step: int, total: int) -> list[int]:
            for i in batch.open(live):
                try:
                    items[i][1].progress("decoder", step, total)
                except (JobCancelled, JobTimeout) as exc:
                    batch.settle(i, exc)
            return [row for row, i in enumerate(live) if batch.outcomes[i] is None]

        rows = [DecoderRow(prepared[i].embeds[0], prepared[i].embeds[1], rng(prepared[i].seed)) for i in live]
        start = time.perf_counter()
        try:
            with model_errors(), tracing.decoder_batch([items[i][1].job_id for i in live]):
                images = self.pipelines.decode_batch(rows, decoder_params(items[live[0]][0]), on_step)
        except JobError as exc:
            for i in batch.open(live):
                batch.settle(i, exc)
            return
        seconds = round(time.perf_counter() - start, 4)
        for row, image in images.items():
            i = live[row]
            if batch.outcomes[i] is None:
                prepared[i].timings["decoder"] = seconds
                with tracing.within(items[i][1].job_id):
                    batch.settle(i, _own_outcome(lambda i=i, image=image: self.finish(prepared[i], [image])))

    def prepare(self, job: Job, ctx: JobContext) -> Prepared:
        """Fetch the references and run the prior: everything up to the decoder."""
        prepared, conditions = self.fetch(job, ctx)
        assert self.pipelines is not None
        with timed(prepared.timings, "prior"), model_errors():
            ctx.progress("prior", 0, job.prior_steps)
            weights = [i.weight for i in job.inputs]
            on_prior_step = lambda step, total: ctx.progress("prior", step, total)  # noqa: E731
            prepared.embeds = self.pipelines.interpolate(
                conditions, weights, prior_params(job), rng(prepared.seed), on_prior_step
            )
            ctx.progress("prior", job.prior_steps, job.prior_steps)
        return prepared

    def fetch(self, job: Job, ctx: JobContext) -> tuple[Prepared, list[Any]]:
        """The job's conditions: texts as they are, images fetched and decoded."""
        self.setup()
        prepared = Prepared(job=job, ctx=ctx, seed=seed_for(job, ctx.job_id))
        with timed(prepared.timings, "fetch"):
            conditions = [self._condition(ctx, item, n, len(job.inputs)) for n, item in enumerate(job.inputs)]
        return prepared, conditions

    def _condition(self, ctx: JobContext, item: JobInput, n: int, total: int) -> Any:
        """A text as is, an image fetched and decoded within the job's soft time limit."""
        ctx.progress("fetch", n, total)
        if item.text is not None:
            return item.text
        try:
            with tracing.span("fetch input", {"kiq.input": n}):
                return self.fetcher.image(item.image or "", deadline=ctx.deadline)
        except JobError:
            ctx.check_time()  # a fetch cut short by the job's own limit is a JobTimeout, not a fetch failure
            raise

    def finish(self, prepared: Prepared, images: list[Any]) -> JobResult:
        """Encode and upload the decoded images."""
        job, ctx, timings = prepared.job, prepared.ctx, prepared.timings
        with timed(timings, "encode"):
            blobs = [encode(image, job.output_format) for image in images]
        with timed(timings, "upload"):
            ctx.progress("upload", 0, len(blobs))
            seed, fence = prepared.seed, ctx.fence
            refs = [self.upload(ctx.job_id, n, blob, job, seed, fence=fence) for n, blob in enumerate(blobs)]
        if self.pipelines is not None:
            metrics.observe_pipelines(self.pipelines.caches(), self.pipelines.memory_bytes())
        return JobResult(images=refs, seed=prepared.seed, device=self.device.name, timings=timings)

    def upload(self, job_id: str, n: int | str, blob: bytes, job: Job, seed: int, fmt: str | None = None,
               content_type: str | None = None, fence: Callable[[], None] = _unfenced) -> ImageRef:  # fmt: skip
        """Put one output at <prefix><job id>/<n>.<format>: keyed by the task id, so a redelivered job overwrites
        its own objects instead of adding more. `fence` is checked before every attempt: a stale run puts nothing
        (but a put already under way when a newer run begins may still land)."""
        fmt = fmt or job.output_format
        key = f"{self.settings.s3_prefix}{job_id}/{n}.{fmt}"
        metadata = object_metadata(job, job_id, seed)
        if isinstance(n, int) and job.sweep is not None:
            metadata["kiq-frame"] = str(n)
        bound = self.settings.s3_retry_s
        body_type = content_type or _CONTENT_TYPES[fmt]

        def put() -> str:
            fence()
            return self.storage.put(key, blob, body_type, metadata)

        try:
            uri = with_retries(put, within_s=bound)
        except StorageUnavailable as exc:
            raise StorageUnavailable(f"{exc} (still failing after {bound:g} s of retries)") from None
        return ImageRef(uri=uri, url=self.storage.presign(key), width=job.width, height=job.height, format=fmt)


def object_metadata(job: Job, job_id: str, seed: int) -> dict[str, str]:
    """S3 user metadata: ASCII only and about 2 KB at most, so the prompts are left out."""
    settings = job.settings_summary()
    settings.pop("negative_prompt")
    settings["seed"] = seed
    return {"kiq-job-id": job_id, "kiq-seed": str(seed), "kiq-settings": json.dumps(settings, sort_keys=True)}


def encode(image: Any, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt.upper(), **_SAVE_OPTIONS[fmt])
    return buffer.getvalue()


def rng(seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed)


def prior_params(job: Job) -> PriorParams:
    return PriorParams(job.prior_steps, job.prior_guidance_scale, job.negative_prompt, job.num_images)


def decoder_params(job: Job) -> DecoderParams:
    return DecoderParams(job.height, job.width, job.decoder_steps, job.guidance_scale)


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        with tracing.stage(stage):
            yield
    finally:
        timings[stage] = round(time.perf_counter() - start, 4)


class _BatchOutcomes:
    """Each batch job's outcome, settled once and announced at once."""

    def __init__(self, n: int, settled: Callable[[int, JobResult | BaseException], None] | None) -> None:
        self.outcomes: list[JobResult | BaseException | None] = [None] * n
        self.settled = settled

    def open(self, among: list[int] | None = None) -> list[int]:
        return [i for i in (range(len(self.outcomes)) if among is None else among) if self.outcomes[i] is None]

    def settle(self, i: int, outcome: JobResult | BaseException) -> None:
        self.outcomes[i] = outcome
        if self.settled is not None:
            self.settled(i, outcome)


def _own_outcome(step: Callable[[], Any]) -> Any:
    """One batch job's step: its result, or the exception that is its own outcome (any exception, typed)."""
    try:
        return step()
    except (JobCancelled, JobError) as exc:
        return exc
    except Exception as exc:
        log.exception("job step failed unexpectedly")
        return PipelineError(f"unexpected {type(exc).__name__}: {exc}")


@contextmanager
def model_errors() -> Iterator[None]:
    """Turn framework exceptions into a PipelineError that serialises cleanly through the result backend."""
    try:
        yield
    except (JobCancelled, JobError):
        raise
    except Exception as exc:  # noqa: BLE001 - the frameworks raise plain RuntimeError/ValueError
        raise PipelineError(f"{type(exc).__name__}: {exc}") from None
