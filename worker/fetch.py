"""Resolve a job's image references (https, s3, data) into decoded RGB images, within limits."""

from __future__ import annotations

import base64
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from kiq import safe_http
from kiq.errors import FetchError, FetchUnavailable, ImageTooLarge, KiqError, NotAnImage
from kiq.settings import Settings
from worker.retry import with_retries

T = TypeVar("T")
log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from PIL.Image import Image

    from worker.storage import Storage


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    max_pixels: int
    timeout_s: float
    max_redirects: int = 3
    retries: int = 0
    policy: safe_http.AddressPolicy = field(default_factory=safe_http.AddressPolicy)

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchLimits:
        return cls(
            settings.fetch_max_bytes, settings.fetch_max_pixels, settings.fetch_timeout_s,
            settings.fetch_max_redirects, settings.fetch_retries, safe_http.AddressPolicy.parse(settings.fetch_allow),
        )  # fmt: skip

    @property
    def http(self) -> safe_http.HttpLimits:
        return safe_http.HttpLimits(self.max_bytes, self.timeout_s, self.max_redirects)


class Fetcher:
    def __init__(self, storage: Storage, limits: FetchLimits) -> None:
        self.storage, self.limits = storage, limits

    def image(self, ref: str, deadline: float | None = None) -> Image:
        """Read and decode one reference; transient failures are retried `limits.retries` times, and neither
        a fetch nor a wait between retries runs past `deadline` (time.monotonic()), when one is given."""
        within_s = None if deadline is None else _left(ref, deadline)
        data = with_retries(lambda: self.raw(ref, deadline), attempts=1 + self.limits.retries, within_s=within_s)
        return _as_kiq_error(ref, lambda: decode_image(data, ref, self.limits.max_pixels))

    def raw(self, ref: str, deadline: float | None = None) -> bytes:
        if deadline is not None:
            _left(ref, deadline)
        data = _as_kiq_error(ref, lambda: self._read(ref, deadline))
        if len(data) > self.limits.max_bytes:
            raise ImageTooLarge(f"{_short(ref)} is over the {self.limits.max_bytes}-byte cap")
        return data

    def _read(self, ref: str, deadline: float | None) -> bytes:
        if ref[:5].lower() == "data:":
            return base64.b64decode(ref.split(",", 1)[1])
        parts = urlsplit(ref)
        if parts.scheme == "s3":  # within the same time limit as an HTTP fetch
            limit_s = self.limits.timeout_s if deadline is None else min(self.limits.timeout_s, _left(ref, deadline))
            return self.storage.read(parts.netloc, parts.path.lstrip("/"), self.limits.max_bytes, limit_s)
        return safe_http.get(ref, self.limits.http, self.limits.policy, deadline)


def _left(ref: str, deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchUnavailable(f"no time left to read {_short(ref)}: the job's deadline has passed")
    return left


def _as_kiq_error(ref: str, read: Callable[[], T]) -> T:
    """The boundary of the fetch path: whatever escapes the specific handlers ends as a FetchError, not a crash."""
    try:
        return read()
    except KiqError:
        raise
    except Exception as exc:  # deliberately broad: a job must end with a kiq error type, never a crash
        log.exception("could not read %s", _short(ref))
        raise FetchError(f"could not read {_short(ref)}: {type(exc).__name__}: {exc}") from exc


def decode_image(data: bytes, ref: str, max_pixels: int) -> Image:
    """Decode and check the bytes themselves (never the Content-Type); the pixel cap applies before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL refuses > 2 x MAX_IMAGE_PIXELS from the header too
        raise ImageTooLarge(f"{_short(ref)}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise NotAnImage(f"{_short(ref)} is not an image ({_sniff(data)})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"{_short(ref)} is {width}x{height}, over the {max_pixels}-pixel cap")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # PIL's own words can count the object's bytes; say only what kind of failure it was.
        raise NotAnImage(f"{_short(ref)} could not be decoded ({type(exc).__name__}: truncated or corrupt)") from None
    return image.convert("RGB")


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "got an HTML page"
    return "not a format kiq can decode"  # never the bytes or their size: the submitter may not own the object


def _short(ref: str) -> str:
    return ref if len(ref) <= 80 or not ref.startswith("data:") else ref[:40] + "…"
