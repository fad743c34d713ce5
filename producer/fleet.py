"""`kiq fleet` as a table."""

from __future__ import annotations

import time
from typing import Any

COLUMNS = ("HOSTNAME", "DEVICE", "CURRENT JOB", "DONE", "FAILED", "UPTIME", "STEP S @768²", "QUEUES")


def render_fleet(workers: list[dict[str, Any]], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = [COLUMNS] + [
        (w["hostname"], w["device"], w.get("current_job") or "idle", w["done"], w["failed"],
         _uptime(now - float(w["started_at"])), _speed(w), w.get("queues", ""))
        for w in workers
    ]  # fmt: skip
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(str(v).ljust(widths[i]) for i, v in enumerate(row)).rstrip() for row in rows]
    return "\n".join([*lines, f"{len(workers)} worker(s)"])


def _speed(worker: dict[str, Any]) -> str:
    """The worker's measured seconds per 768x768 decoder step and where it comes from (probe, jobs)."""
    try:
        return f"{float(worker['decoder_step_s']):.3g} ({worker.get('speed_source', '?')})"
    except (KeyError, ValueError):
        return "-"


def _uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
