"""A sweep's frames as one animation: GIF and animated WebP with Pillow, MP4 (H.264) with PyAV.

PyAV's wheels ship FFmpeg with libx264, so MP4 needs nothing outside pip. Frame sizes are multiples of 64,
so yuv420p (what players expect of H.264) needs no padding.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from kiq.contract import Animation

CONTENT_TYPES = {"gif": "image/gif", "webp": "image/webp", "mp4": "video/mp4"}


def sequence(frames: Sequence[Any], boomerang: bool) -> list[Any]:
    """The frames as played: forward, then (boomerang) back without repeating either end."""
    frames = list(frames)
    return frames + frames[-2:0:-1] if boomerang else frames


def encode_animation(frames: Sequence[Any], spec: Animation) -> bytes:
    played = [f.convert("RGB") for f in sequence(frames, spec.boomerang)]
    if spec.format == "mp4":
        return _mp4(played, spec.fps)
    buffer = io.BytesIO()
    duration = round(1000 / spec.fps)
    options: dict[str, Any] = {"save_all": True, "append_images": played[1:], "duration": duration}
    if spec.format == "webp":
        options.update(loop=0 if spec.loop else 1, lossless=False, quality=90)
    elif spec.loop:
        options["loop"] = 0  # GIF: the NETSCAPE loop extension, 0 = forever; without it, plays once
    played[0].save(buffer, format=spec.format.upper(), **options)
    return buffer.getvalue()


def _mp4(frames: list[Any], fps: int) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.options = {"crf": "18", "preset": "medium"}
        for n, image in enumerate(frames):
            frame = av.VideoFrame.from_image(image)
            frame.pts = n
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()
