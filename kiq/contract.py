"""The job contract: one pydantic model, validated at submit time and again by the worker.

Seed mapping: `seed` seeds one `numpy.random.default_rng(seed)` shared by every prior run of the job
(in input order, then the negative), and a second, fresh `default_rng(seed)` for the decoder. With no
seed the worker derives one from the task id (stable across redeliveries) and reports it in the result.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from kiq.errors import JobInvalid
from kiq.names import QUEUE_NAME
from kiq.sweep import frame_weights

MAX_INPUTS = 16
MAX_PROMPT_CHARS = 1000
MAX_REF_CHARS = 2048
MAX_DATA_URI_BYTES = 4 * 1024 * 1024
MAX_WEIGHT = 100.0
MIN_SIDE, MAX_SIDE, SIDE_STEP = 64, 2048, 64
MAX_PRIOR_STEPS, MAX_DECODER_STEPS = 200, 500
MAX_GUIDANCE = 50.0
MAX_NUM_IMAGES = 8
MAX_SEED = 2**32 - 1
DEFAULT_PRIORITY, MAX_PRIORITY = 5, 9
MIN_FRAMES, MAX_FRAMES = 2, 120
MAX_KEYFRAMES = 16
MAX_FPS = 60
MAX_DNS_LABEL, MAX_DNS_NAME = 63, 253
MAX_EXPIRES_S = 30 * 24 * 3600

OutputFormat = Literal["png", "jpeg", "webp"]
_DNS_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", re.IGNORECASE)  # underscores do occur in real names
_DATA_URI = re.compile(r"data:image/[a-z0-9.+-]+;base64,(?P<payload>.*)", re.IGNORECASE | re.DOTALL)


class JobInput(BaseModel):
    """One conditioning input: exactly one of `text` or `image`, with its interpolation weight."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    text: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    image: str | None = None
    weight: float = Field(allow_inf_nan=False, ge=-MAX_WEIGHT, le=MAX_WEIGHT)

    @model_serializer(mode="wrap")
    def _drop_unset_kind(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        return {k: v for k, v in handler(self).items() if v is not None}

    @model_validator(mode="after")
    def _exactly_one(self) -> JobInput:
        if (self.text is None) == (self.image is None):
            raise ValueError("give exactly one of 'text' or 'image'")
        if self.text is not None and not self.text.strip():
            raise ValueError("'text' must not be empty")
        return self

    @field_validator("image")
    @classmethod
    def _image_reference(cls, ref: str | None) -> str | None:
        if ref is not None:
            check_image_reference(ref)
        return ref


def check_image_reference(ref: str) -> None:
    """Refuse references the worker could never read, with the reason."""
    if ref[:5].lower() == "data:":
        _check_data_uri(ref)
        return
    if len(ref) > MAX_REF_CHARS:
        raise ValueError(f"image reference is longer than {MAX_REF_CHARS} characters")
    parts = _split(ref, "image reference")
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError(f"image URL has no host: {ref!r}")
        check_url_host_port(ref, "image URL")
    elif parts.scheme == "s3":
        if not parts.netloc or not parts.path.strip("/"):
            raise ValueError(f"s3 reference must be s3://bucket/key, got {ref!r}")
    else:
        raise ValueError(f"unsupported image reference scheme {parts.scheme!r}: use https://, s3:// or data:image/…")


def check_url_host_port(url: str, what: str) -> None:
    """Refuse an http(s) URL whose port or host no socket call can take: without this the worker would fail
    late, with a bare ValueError from `.port` or a UnicodeError from IDNA in getaddrinfo."""
    parts = _split(url, what)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{what} has an invalid port ({exc}): {url!r}") from None
    if port == 0:  # `.port or default` would silently turn it into 80/443
        raise ValueError(f"{what} has an invalid port (0): {url!r}")
    problem = _host_problem(parts.hostname or "")
    if problem:
        raise ValueError(f"{what} host {problem}: {url!r}")


def _split(url: str, what: str) -> SplitResult:
    try:
        return urlsplit(url)
    except ValueError as exc:  # an unbalanced or invalid [IPv6] literal
        raise ValueError(f"{what} is not a valid URL ({exc}): {url!r}") from None


def _host_problem(host: str) -> str | None:
    """Why `host` is neither an IP literal nor a usable DNS name (RFC 1035 lengths, IDNA), or None."""
    if ":" in host:  # a bracketed IPv6 literal: urlsplit has already checked it
        return None
    name = host.removesuffix(".")  # a fully qualified name may end with the root's empty label
    if not name:
        return "is empty"
    labels = name.split(".")
    if "" in labels:
        return "has an empty label (two dots in a row, or a leading dot)"
    if any(len(label) > MAX_DNS_LABEL for label in labels):
        return f"has a label longer than {MAX_DNS_LABEL} characters"
    try:
        encoded = name.encode("idna").decode("ascii")  # what socket.getaddrinfo sends
    except UnicodeError as exc:
        return f"cannot be IDNA-encoded ({exc})"
    if len(encoded) > MAX_DNS_NAME:
        return f"is longer than {MAX_DNS_NAME} characters"
    if any(len(label) > MAX_DNS_LABEL for label in encoded.split(".")):
        return f"has a label longer than {MAX_DNS_LABEL} characters once IDNA-encoded"
    if not _DNS_NAME.fullmatch(encoded):
        return "has characters not allowed in a DNS name"
    return None


def _check_data_uri(ref: str) -> None:
    if len(ref) > MAX_DATA_URI_BYTES * 4 // 3 + 128:  # refuse before decoding megabytes of base64
        raise ValueError(f"data URI image is over {MAX_DATA_URI_BYTES} bytes: upload it to S3 and use s3://")
    match = _DATA_URI.fullmatch(ref)
    if match is None:
        raise ValueError("data URI must look like data:image/<type>;base64,<payload>")
    try:
        payload = base64.b64decode(match["payload"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"data URI payload is not valid base64: {exc}") from None
    if not payload:
        raise ValueError("data URI payload is empty")
    if len(payload) > MAX_DATA_URI_BYTES:
        raise ValueError(f"data URI image is over {MAX_DATA_URI_BYTES} bytes: upload it to S3 and use s3://")


Weight = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_WEIGHT, le=MAX_WEIGHT)]


class Sweep(BaseModel):
    """A morph: the inputs' weights are keyframe 0; `keyframes` (or `to`, one keyframe) follow, spread evenly
    over `frames` frames. `mix` is how a frame's embedding is made from the conditions' embeddings: `linear`,
    the weighted sum `interpolate` computes, or `slerp`, spherical between consecutive keyframes' embeddings."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    keyframes: list[list[Weight]] | None = Field(default=None, min_length=1, max_length=MAX_KEYFRAMES)
    to: list[Weight] | None = None
    frames: int = Field(ge=MIN_FRAMES, le=MAX_FRAMES)
    easing: Literal["linear", "ease-in-out"] = "linear"
    mix: Literal["linear", "slerp"] = "linear"

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        return {k: v for k, v in handler(self).items() if v is not None}

    @model_validator(mode="after")
    def _one_of(self) -> Sweep:
        if (self.keyframes is None) == (self.to is None):
            raise ValueError("give exactly one of 'keyframes' or 'to'")
        return self

    def further(self) -> list[list[float]]:
        """The keyframes after the inputs' weights."""
        return [list(k) for k in self.keyframes] if self.keyframes is not None else [list(self.to or [])]


class Animation(BaseModel):
    """The sweep's frames as one animation, encoded and uploaded once every frame is done."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    format: Literal["gif", "webp", "mp4"] = "gif"
    fps: int = Field(default=12, ge=1, le=MAX_FPS)
    loop: bool = True  # play forever (GIF, WebP); MP4 players decide for themselves
    boomerang: bool = False  # play forward then backward: frames 0..n-1, n-2..1


Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_STEP)]
Guidance = Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)]


class Job(BaseModel):
    """An interpolation job. Defaults follow the Kandinsky 2.2 pipelines' own defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    inputs: list[JobInput] = Field(min_length=1, max_length=MAX_INPUTS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    height: Side = 768
    width: Side = 768
    prior_steps: int = Field(default=25, ge=2, le=MAX_PRIOR_STEPS)  # UnCLIPScheduler divides by steps - 1
    decoder_steps: int = Field(default=100, ge=1, le=MAX_DECODER_STEPS)
    prior_guidance_scale: Guidance = 4.0
    guidance_scale: Guidance = 4.0
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_images: int = Field(default=1, ge=1, le=MAX_NUM_IMAGES)
    output_format: OutputFormat = "png"
    queue: str | None = Field(default=None, pattern=QUEUE_NAME.pattern)  # a dedicated queue (model variant…)
    priority: int = Field(default=DEFAULT_PRIORITY, ge=0, le=MAX_PRIORITY)  # 9 is served first
    webhook_url: str | None = Field(default=None, max_length=MAX_REF_CHARS)
    sweep: Sweep | None = None  # a morph: many frames from one job (see Sweep)
    animation: Animation | None = None  # the sweep's frames as a GIF, animated WebP or MP4
    expires_in_s: int | None = Field(default=None, ge=1, le=MAX_EXPIRES_S)  # deadline to start; None: KIQ_JOB_EXPIRES_S

    @model_serializer(mode="wrap")
    def _drop_unset_options(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        data = handler(self)
        for name in ("queue", "webhook_url", "sweep", "animation", "expires_in_s"):
            if data.get(name) is None:
                data.pop(name, None)
        return data

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = _split(url, "webhook_url")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"webhook_url must be an http(s) URL with a host, got {url!r}")
            check_url_host_port(url, "webhook_url")
        return url

    @model_validator(mode="after")
    def _weights_not_all_zero(self) -> Job:
        if all(i.weight == 0 for i in self.inputs):
            raise ValueError("at least one input weight must be non-zero")
        return self

    @field_validator("sweep")
    @classmethod
    def _sweep_fits(cls, sweep: Sweep | None, info: ValidationInfo) -> Sweep | None:
        inputs, num_images = info.data.get("inputs"), info.data.get("num_images")
        if sweep is None or inputs is None:  # a bad `inputs` has its own error already
            return sweep
        if num_images is not None and num_images != 1:
            raise ValueError("num_images must be 1 with a sweep (each frame is one image)")
        name = "keyframes" if sweep.keyframes is not None else "to"
        for n, keyframe in enumerate(sweep.further()):
            if len(keyframe) != len(inputs):
                raise ValueError(f"{name}: keyframe {n} has {len(keyframe)} weights; give one per input "
                                 f"({len(inputs)})")  # fmt: skip
        segments = len(sweep.further())
        if sweep.frames < segments + 1:
            raise ValueError(f"frames: {sweep.frames} frames cannot show {segments + 1} keyframes")
        keyframes = [[i.weight for i in inputs], *sweep.further()]
        for k, weights in enumerate(frame_weights(keyframes, sweep.frames, sweep.easing)):
            if all(w == 0 for w in weights):
                raise ValueError(f"every weight of frame {k} is zero")
        return sweep

    @field_validator("animation")
    @classmethod
    def _animation_needs_sweep(cls, animation: Animation | None, info: ValidationInfo) -> Animation | None:
        if animation is not None and info.data.get("sweep") is None and "sweep" not in _failed(info):
            raise ValueError("needs a sweep (an animation is made of the sweep's frames)")
        return animation

    def keyframes(self) -> list[list[float]]:
        """All keyframes, the inputs' weights first; just those weights without a sweep."""
        first = [i.weight for i in self.inputs]
        return [first, *(self.sweep.further() if self.sweep is not None else [])]

    def frame_weights(self) -> list[list[float]]:
        """Each frame's input weights (one frame, the inputs' weights, without a sweep)."""
        if self.sweep is None:
            return [[i.weight for i in self.inputs]]
        return frame_weights(self.keyframes(), self.sweep.frames, self.sweep.easing)

    @property
    def frames(self) -> int:
        return self.sweep.frames if self.sweep is not None else 1

    def settings_summary(self) -> dict[str, object]:
        """The generation settings without the inputs (which may be large data URIs)."""
        return self.model_dump(
            exclude={"inputs", "queue", "webhook_url", "priority", "sweep", "animation", "expires_in_s"}
        )


def _failed(info: ValidationInfo) -> set[str]:
    """Fields validated before this one that failed: absent from info.data (their own error is reported)."""
    return set(Job.model_fields) - set(info.data) - {info.field_name or ""}


def parse_job(data: object) -> Job:
    """Validate raw job data; raise `JobInvalid` with every problem, each prefixed by its field."""
    try:
        return Job.model_validate(data)
    except ValidationError as exc:
        raise JobInvalid(format_validation_error(exc)) from None


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Each problem as {"loc", "msg", "type"}, the message without pydantic's "Value error, " prefix."""
    return [
        {"loc": list(err["loc"]), "msg": err["msg"].removeprefix("Value error, "), "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]


def format_validation_error(exc: ValidationError) -> str:
    lines = [f"{'.'.join(str(p) for p in err['loc']) or 'job'}: {err['msg']}" for err in validation_errors(exc)]
    return "invalid job: " + "; ".join(lines)


def seed_for(job: Job, job_id: str) -> int:
    """The job's seed, or one derived from its id: random-looking, yet the same on redelivery."""
    if job.seed is not None:
        return job.seed
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:4], "big")
