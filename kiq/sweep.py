"""A sweep's frame weights: pure Python, shared by submit-time validation and the worker.

The inputs' weights are keyframe 0; the sweep's keyframes follow, evenly spaced over the frames. Frame k sits
at p = k / (frames - 1) × segments along the keyframes; within its segment the local position is eased, and
the frame's weights are the keyframes' linear blend at that eased position. Easing is per segment, so with
`ease-in-out` the morph slows down into and out of every keyframe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

EASINGS = ("linear", "ease-in-out")


def ease(s: float, easing: str) -> float:
    if easing == "ease-in-out":
        return (1 - math.cos(math.pi * s)) / 2
    return s


def frame_positions(frames: int, segments: int, easing: str) -> list[tuple[int, float]]:
    """(segment, eased local position in [0, 1]) of each frame; the first is (0, 0.0), the last (segments - 1, 1.0)."""
    positions = []
    for k in range(frames):
        p = k * segments / (frames - 1)
        segment = min(int(p), segments - 1)
        positions.append((segment, ease(p - segment, easing)))
    return positions


def blend(a: Sequence[float], b: Sequence[float], s: float) -> list[float]:
    """Keyframes a and b at s; exactly a at 0 and exactly b at 1, so a frame on a keyframe has its weights."""
    if s == 0:
        return list(a)
    if s == 1:
        return list(b)
    return [(1 - s) * x + s * y for x, y in zip(a, b, strict=True)]


def frame_weights(keyframes: Sequence[Sequence[float]], frames: int, easing: str) -> list[list[float]]:
    """Each frame's input weights (the linear mix's; slerp reweights in embedding space, see the worker)."""
    segments = len(keyframes) - 1
    return [blend(keyframes[j], keyframes[j + 1], s) for j, s in frame_positions(frames, segments, easing)]
