"""Resolve a job's image references (https, s3, data) into decoded RGB images, within limits."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from kiq import safe_http
from kiq.errors import ImageTooLarge, NotAnImage
from kiq.settings import Settings
from worker.retry import with_retries

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

    def image(self, ref: str) -> Image:
        """Read and decode one reference; transient failures are retried `limits.retries` times."""
        data = with_retries(lambda: self.raw(ref), attempts=1 + self.limits.retries)
        return decode_image(data, ref, self.limits.max_pixels)

    def raw(self, ref: str) -> bytes:
        data = self._read(ref)
        if len(data) > self.limits.max_bytes:
            raise ImageTooLarge(f"{_short(ref)} is over the {self.limits.max_bytes}-byte cap")
        return data

    def _read(self, ref: str) -> bytes:
        if ref[:5].lower() == "data:":
            return base64.b64decode(ref.split(",", 1)[1])
        parts = urlsplit(ref)
        if parts.scheme == "s3":
            return self.storage.read(parts.netloc, parts.path.lstrip("/"), self.limits.max_bytes)
        return safe_http.get(ref, self.limits.http, self.limits.policy)


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
        raise NotAnImage(f"{_short(ref)} could not be decoded: {exc}") from None
    return image.convert("RGB")


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "got an HTML page"
    return f"{len(data)} bytes starting {data[:8]!r}"


def _short(ref: str) -> str:
    return ref if len(ref) <= 80 or not ref.startswith("data:") else ref[:40] + "…"
