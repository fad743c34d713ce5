"""A one-line progress bar on stderr for `--wait` (only when stderr is a terminal)."""

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
    return f"{p.stage:<8}[{'#' * filled}{'.' * (_WIDTH - filled)}] {p.step}/{p.total}"


class ProgressBar:
    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.enabled = stream.isatty()

    def __call__(self, status: JobStatus) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[2K" + render(status))
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
