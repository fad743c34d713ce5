"""Progress for `--wait` on stderr: a one-line bar (only when stderr is a terminal), and one line per sweep
frame as it lands (always: a log of the frames done is useful in CI and pipes too)."""

from __future__ import annotations

import sys
from typing import TextIO

from kiq.status import JobStatus

_WIDTH = 30


def render(status: JobStatus) -> str:
    p = status.progress
    if p is None or p.total == 0:
        return f"{status.state.lower():<10}"
    filled = round(_WIDTH * p.step / p.total)
    frames = f", {len(p.frames)} frames done" if p.frames else ""
    return f"{p.stage:<8}[{'#' * filled}{'.' * (_WIDTH - filled)}] {p.step}/{p.total}{frames}"


def frames_of(status: JobStatus) -> list[str]:
    """The URIs of the frames the status lists: while running, at the end, or left by a sweep that ended early."""
    if status.progress is not None and status.progress.frames:
        return [f.uri for f in status.progress.frames]
    if status.result is not None and status.result.frame_weights is not None:
        return [f.uri for f in status.result.images]
    return [f.uri for f in status.frames or []]


class ProgressBar:
    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.frames_shown = 0

    def __call__(self, status: JobStatus) -> None:
        frames = frames_of(status)
        for n in range(self.frames_shown, len(frames)):
            self.stream.write(("\r\x1b[2K" if self.enabled else "") + f"frame {n} done: {frames[n]}\n")
        self.frames_shown = max(self.frames_shown, len(frames))
        if self.enabled:
            self.stream.write("\r\x1b[2K" + render(status))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
