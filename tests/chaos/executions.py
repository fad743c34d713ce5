"""Each execution of a job on a worker, from the worker logs the campaign stamped with host wall time.

kiq records no per-execution start and end, so they come from Celery's own lines: `Task kiq.generate[<id>]
received` opens an execution (with the solo pool the job starts at once; with decoder batching it may wait
reserved, which still means the job is handed to this worker), and `succeeded`, `raised`, `ignored`,
`rejected` or `retry` closes it; so do Celery's "Discarding revoked task" (a cancelled job, never run), kiq's "let
go of reserved job <id>" and "let go of job <id> kept across a reconnect" (a held job given up unrun once the
worker's leases lapsed: Celery may drop it on a reconnect without a line), the process's exit (SIGKILL) or the end
of the log.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.chaos.services import EXIT_MARK

TASK_LINE = re.compile(
    r"^(\d+\.\d+) .*Task kiq\.generate\[([0-9a-f-]{36})\] (received|succeeded|raised|ignored|rejected|retry)"
)

LET_GO_LINE = re.compile(
    r"^(\d+\.\d+) .*(let go of (?:reserved )?job |Discarding revoked task: kiq\.generate\[)([0-9a-f-]{36})"
)


def executions(worker: str, log: Path) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    running: dict[str, float] = {}
    incarnation, last = 0, 0.0
    for line in log.read_text(errors="replace").splitlines():
        stamp, _, rest = line.partition(" ")
        try:
            last = float(stamp)
        except ValueError:
            continue
        if rest.startswith(EXIT_MARK):
            found += [_run(worker, incarnation, j, s, last, "died") for j, s in running.items()]
            running.clear()
            incarnation += 1
            continue
        match = TASK_LINE.match(line)
        if match is None:
            let_go = LET_GO_LINE.match(line)
            if let_go is not None and let_go.group(3) in running:
                how = "discarded" if let_go.group(2).startswith("Discarding") else "let-go"
                found.append(_run(worker, incarnation, let_go.group(3), running.pop(let_go.group(3)), last, how))
            continue
        job_id, what = match.group(2), match.group(3)
        if what == "received":
            if job_id in running:  # received again without an end: the earlier hold ends here
                found.append(_run(worker, incarnation, job_id, running.pop(job_id), last, "received-again"))
            running[job_id] = last
        elif job_id in running:
            found.append(_run(worker, incarnation, job_id, running.pop(job_id), last, what))
    found += [_run(worker, incarnation, j, s, last, "open") for j, s in running.items()]
    return found


def _run(worker: str, incarnation: int, job_id: str, start: float, end: float, outcome: str) -> dict[str, Any]:
    return {"job": job_id, "worker": worker, "incarnation": incarnation, "start": start, "end": end,
            "outcome": outcome}  # fmt: skip
