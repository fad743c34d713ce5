"""The status JSON that clients poll, and the result a worker returns (dataclass-like pydantic models)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

State = Literal["PENDING", "STARTED", "PROGRESS", "SUCCESS", "FAILURE", "REVOKED"]
Stage = Literal["fetch", "prior", "decoder", "upload"]


class ImageRef(BaseModel):
    uri: str
    url: str
    width: int
    height: int
    format: str


class Progress(BaseModel):
    stage: Stage
    step: int = Field(ge=0)
    total: int = Field(ge=0)
    frames: list[ImageRef] | None = None  # a sweep's frames uploaded so far, in order


class JobResult(BaseModel):
    images: list[ImageRef]  # a sweep's frames, in order
    seed: int
    device: str
    timings: dict[str, float]
    animation: ImageRef | None = None  # a sweep's animation, when the job asked for one
    frame_weights: list[list[float]] | None = None  # a sweep's effective input weights per frame (docs/guide/sweeps.md)


class ErrorInfo(BaseModel):
    type: str
    message: str
    retryable: bool = False  # a transient cause (network, 5xx): submitting again later may succeed


class JobStatus(BaseModel):
    id: str
    state: State
    progress: Progress | None = None
    result: JobResult | None = None
    error: ErrorInfo | None = None
    frames: list[ImageRef] | None = None  # a cancelled or failed sweep's frames that were uploaded

    @property
    def done(self) -> bool:
        return self.state in ("SUCCESS", "FAILURE", "REVOKED")


class JobEvent(BaseModel):
    """One state write of a job, as `GET /v1/jobs/{id}/events` and `Client.events` deliver it. `id` is the
    Redis Stream id of the write ("<ms>-<seq>", increasing per job): resume after it with Last-Event-ID."""

    id: str
    status: JobStatus


class JobSummary(JobStatus):
    submitted_at: float  # Unix time


class JobList(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = None  # pass as `cursor` for the next (older) page; None on the last one
