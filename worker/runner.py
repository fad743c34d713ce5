"""The model runtime, cog style: `setup()` once per process, `run()` once per job."""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kiq.contract import Job, seed_for
from kiq.errors import JobError, JobTimeout, PipelineError, StorageUnavailable
from kiq.settings import Settings
from kiq.status import ImageRef, JobResult, Progress, Stage
from worker import metrics
from worker.device import DeviceConfig
from worker.fetch import Fetcher, FetchLimits
from worker.pipelines.kandinsky import DecoderParams, KandinskyPipelines, PriorParams
from worker.retry import with_retries
from worker.storage import S3Storage, Storage

_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {"png": {}, "jpeg": {"quality": 95}, "webp": {"quality": 95}}


class JobCancelled(Exception):
    """Raised between denoising steps once the job's cancel flag is set; not a failure."""


@dataclass(frozen=True)
class JobContext:
    job_id: str
    report: Callable[[Progress], None]
    cancelled: Callable[[], bool]
    limit_s: float = math.inf  # the soft time limit, checked at every progress point

    def __post_init__(self) -> None:
        object.__setattr__(self, "_deadline", time.monotonic() + self.limit_s)

    def progress(self, stage: Stage, step: int, total: int) -> None:
        if self.cancelled():
            raise JobCancelled(self.job_id)
        if time.monotonic() > self._deadline:  # type: ignore[attr-defined]
            raise JobTimeout(f"job ran past its {self.limit_s:.0f} s time limit (derived from its size and steps)")
        self.report(Progress(stage=stage, step=step, total=total))


class Runner:
    def __init__(
        self, settings: Settings, storage: Storage | None = None, pipelines: KandinskyPipelines | None = None
    ) -> None:
        self.settings = settings
        self.device = DeviceConfig(settings.device_target, settings.device_id, settings.runtime_device_id)
        self.storage = storage or S3Storage.from_settings(settings)
        self.fetcher = Fetcher(self.storage, FetchLimits.from_settings(settings))
        self.pipelines = pipelines
        self.load_seconds = 0.0

    def setup(self) -> None:
        """Pin the device and load both pipelines; later calls do nothing."""
        if self.pipelines is not None:
            return
        from worker import device

        start = time.perf_counter()
        device.configure(self.device)
        self.pipelines = KandinskyPipelines.load(
            self.settings.prior_model, self.settings.decoder_model, self.device, self.settings.fast_prior,
            self.settings.embed_cache_mb,
        )  # fmt: skip
        self.load_seconds = time.perf_counter() - start

    def run(self, job: Job, ctx: JobContext) -> JobResult:
        self.setup()
        assert self.pipelines is not None
        seed, timings = seed_for(job, ctx.job_id), {}
        with _timed(timings, "fetch"):
            ctx.progress("fetch", 0, len(job.inputs))
            conditions = [i.text if i.text is not None else self.fetcher.image(i.image or "") for i in job.inputs]
        with _timed(timings, "prior"), _model_errors():
            ctx.progress("prior", 0, job.prior_steps)
            weights = [i.weight for i in job.inputs]
            on_prior_step = lambda step, total: ctx.progress("prior", step, total)  # noqa: E731
            embeds = self.pipelines.interpolate(conditions, weights, _prior(job), _rng(seed), on_prior_step)
            ctx.progress("prior", job.prior_steps, job.prior_steps)
        with _timed(timings, "decoder"), _model_errors():
            on_step = lambda step, total: ctx.progress("decoder", step, total)  # noqa: E731
            images = self.pipelines.decode(*embeds, _decoder(job), _rng(seed), on_step)
        with _timed(timings, "encode"):
            blobs = [encode(image, job.output_format) for image in images]
        with _timed(timings, "upload"):
            ctx.progress("upload", 0, len(blobs))
            refs = [self._upload(ctx.job_id, n, blob, job, seed) for n, blob in enumerate(blobs)]
        if self.pipelines.fast_prior is not None:
            metrics.observe_caches({"image": self.pipelines.fast_prior.image_cache,
                                    "text": self.pipelines.fast_prior.text_cache})  # fmt: skip
        return JobResult(images=refs, seed=seed, device=self.device.name, timings=timings)

    def _upload(self, job_id: str, n: int, blob: bytes, job: Job, seed: int) -> ImageRef:
        # Keyed by the task id: a redelivered job overwrites its own objects instead of adding more.
        key = f"{self.settings.s3_prefix}{job_id}/{n}.{job.output_format}"
        metadata = object_metadata(job, job_id, seed)
        bound = self.settings.s3_retry_s
        try:
            uri = with_retries(lambda: self.storage.put(key, blob, _CONTENT_TYPES[job.output_format], metadata),
                               within_s=bound)  # fmt: skip
        except StorageUnavailable as exc:
            raise StorageUnavailable(f"{exc} (still failing after {bound:g} s of retries)") from None
        return ImageRef(
            uri=uri, url=self.storage.presign(key), width=job.width, height=job.height, format=job.output_format
        )


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


def _rng(seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed)


def _prior(job: Job) -> PriorParams:
    return PriorParams(job.prior_steps, job.prior_guidance_scale, job.negative_prompt, job.num_images)


def _decoder(job: Job) -> DecoderParams:
    return DecoderParams(job.height, job.width, job.decoder_steps, job.guidance_scale)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - start, 4)


@contextmanager
def _model_errors() -> Iterator[None]:
    """Turn framework exceptions into a PipelineError that serialises cleanly through the result backend."""
    try:
        yield
    except (JobCancelled, JobError):
        raise
    except Exception as exc:  # noqa: BLE001 - MindSpore raises plain RuntimeError/ValueError
        raise PipelineError(f"{type(exc).__name__}: {exc}") from None
