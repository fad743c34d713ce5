"""The status JSON that clients poll, and the result a worker returns (dataclass-like pydantic models)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

State = Literal["PENDING", "STARTED", "PROGRESS", "SUCCESS", "FAILURE", "REVOKED", "EXPIRED"]
FINAL: tuple[str, ...] = ("SUCCESS", "FAILURE", "REVOKED", "EXPIRED")
Stage = Literal["fetch", "prior", "decoder", "upload"]


class ImageRef(BaseModel):
    uri: str
    url: str
    width: int
    height: int
    format: str


class Progress(BaseModel):
    """A sweep's frames travel two ways. A status read (`GET /v1/jobs/{id}`, `Client.status`) lists them all in
    `frames`, from the job's frames record. An event carries only what changed: `new_frames`, the frames uploaded
    since the previous event, which are frames `frames_done - len(new_frames)` … `frames_done - 1`; an event that
    starts a reader from the current state (a snapshot) carries them all in `frames` instead."""

    stage: Stage
    step: int = Field(ge=0)
    total: int = Field(ge=0)
    frames: list[ImageRef] | None = None  # a sweep's frames uploaded so far, in order (status reads, snapshots)
    frames_done: int | None = Field(default=None, ge=0)  # how many frames a sweep has uploaded so far
    new_frames: list[ImageRef] | None = None  # events: the frames uploaded since the previous event, in order

    def frames_after(self, known: list[ImageRef]) -> list[ImageRef]:
        """The frames so far, given those a reader knew before this progress: all of `frames` where listed,
        else `known` extended (or, after a redelivered sweep restarted, cut back) by `new_frames`."""
        if self.frames is not None:
            return list(self.frames)
        new = self.new_frames or []
        start = len(known) if self.frames_done is None else self.frames_done - len(new)
        return known[:start] + list(new)


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
        return self.state in FINAL


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
