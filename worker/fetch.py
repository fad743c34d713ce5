"""Resolve a job's image references (https, s3, data) into decoded RGB images, within limits."""

from __future__ import annotations

import base64
import io
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from kiq.errors import FetchError, ImageTooLarge, NotAnImage
from kiq.settings import Settings

if TYPE_CHECKING:
    from PIL.Image import Image

    from worker.storage import Storage


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    max_pixels: int
    timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchLimits:
        return cls(settings.fetch_max_bytes, settings.fetch_max_pixels, settings.fetch_timeout_s)


class Fetcher:
    def __init__(self, storage: Storage, limits: FetchLimits) -> None:
        self.storage, self.limits = storage, limits

    def image(self, ref: str) -> Image:
        return decode_image(self.raw(ref), ref, self.limits.max_pixels)

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
        return http_get(ref, self.limits)


def http_get(url: str, limits: FetchLimits) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "kiq-worker"})
    try:
        with urllib.request.urlopen(request, timeout=limits.timeout_s) as response:
            return response.read(limits.max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(f"could not fetch {url}: {reason}") from None


def decode_image(data: bytes, ref: str, max_pixels: int) -> Image:
    """Decode and check the bytes themselves (never the Content-Type); the pixel cap applies before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
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
