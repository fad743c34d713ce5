"""The checker: reads a whole campaign history and proves (or refutes) kiq's guarantees.

- every acknowledged job reaches exactly one final state (none: lost; two: a violation);
- a state an observer saw final never changes for that observer afterwards;
- a SUCCESS job has all its objects in S3, under its own prefix and tagged with its own id, and no other job's;
- each job with a webhook gets it at least once, always with the same delivery id (kiq.webhooks.delivery_id),
  a valid signature and the job's final state;
- overlapping executions of one job on different workers (or incarnations) are counted with their duration; one
  longer than `overlap_max_s` is a violation;
- recovery per fault: from the fault's end until the next job is seen SUCCESS.

`python -m tests.chaos.checker RUN_DIR/history.jsonl` checks a saved history again.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiq.webhooks import delivery_id
from tests.chaos.history import read

FINAL = ("SUCCESS", "FAILURE", "REVOKED", "EXPIRED")
BUCKET_PREFIX = "jobs/"
Paused = dict[str, list[tuple[float, float]]]  # worker -> the intervals it was SIGSTOPped


@dataclass
class JobView:
    id: str
    submit: dict[str, Any]
    states: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    hooks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def start(self) -> float:
        return float(self.submit["t"])

    def finals(self) -> list[dict[str, Any]]:
        return [s for s in self.states if s["state"] in FINAL]

    @property
    def end(self) -> float:
        finals = self.finals()
        return min(float(s["t"]) for s in finals) if finals else float("inf")


@dataclass
class Verdict:
    violations: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)


def load(path: Path) -> tuple[dict[str, Any], dict[str, JobView], list[dict[str, Any]], list[dict[str, Any]]]:
    """(campaign record, acknowledged jobs, faults, S3 objects); refused submits go in campaign["refused"]."""
    campaign: dict[str, Any] = {"refused": []}
    jobs: dict[str, JobView] = {}
    faults: list[dict[str, Any]] = []
    objects: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    for record in read(path):
        kind = record["kind"]
        if kind == "campaign":
            campaign = {**record, "refused": campaign["refused"]}
        elif kind == "submit_error" and refused(record):
            campaign["refused"].append(record)
        elif kind == "submit":
            jobs[record["job"]] = JobView(record["job"], record)
        elif kind == "nemesis":
            faults.append(record)
        elif kind == "object":
            objects.append(record)
        elif kind in ("state", "exec", "webhook"):
            pending.append(record)
    for record in pending:
        view = jobs.get(record.get("job", ""))
        if view is not None:
            {"state": view.states, "exec": view.runs, "webhook": view.hooks}[record["kind"]].append(record)
    return campaign, jobs, faults, objects


def refused(error: dict[str, Any]) -> bool:
    """A submit of the campaign's valid jobs answered with an error no retry can fix."""
    status = error.get("status", 0)
    return (400 <= status < 500 and status not in (409, 429)) or "JobInvalid" in error.get("error", "")


def check(path: Path) -> Verdict:
    campaign, jobs, faults, objects = load(path)
    overlap_max_s = float(campaign.get("overlap_max_s", 2.0))
    by_key = {o["key"]: o for o in objects}
    verdict = Verdict()
    problems: dict[str, dict[str, int]] = {}
    overlaps: dict[str, list[float]] = {}
    paused: Paused = defaultdict(list)
    for fault in faults:
        if fault["nemesis"] == "pause-worker":
            paused[fault["target"]].append((fault["started"], fault["stopped"]))
    for view in jobs.values():
        found, spans = job_problems(view, by_key, overlap_max_s, paused)
        problems[view.id], overlaps[view.id] = {k: len(v) for k, v in found.items()}, spans
        verdict.violations += [f"{view.id}: {what}" for items in found.values() for what in items]
    verdict.violations += foreign_objects(objects, jobs)
    if not jobs:
        verdict.violations.append("no job was acknowledged: the campaign proved nothing")
    verdict.violations += [f"submit {r['n']} refused: {r.get('status', '')} {r.get('detail') or r.get('error')}"
                           for r in campaign["refused"]]  # fmt: skip
    successes = sorted(s["t"] for v in jobs.values() for s in v.states if s["state"] == "SUCCESS")
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for fault in faults:
        groups[fault["nemesis"]].append(fault)
    for kind, instances in sorted(groups.items()):
        hit = [v for v in jobs.values() if any(_overlaps(v, f) for f in instances)]
        verdict.rows.append(_row(kind, instances, hit, problems, overlaps, successes))
    calm = [v for v in jobs.values() if not any(_overlaps(v, f) for f in faults)]
    verdict.rows.append(_row("(no fault)", [], calm, problems, overlaps, successes))
    verdict.totals = _row("all", faults, list(jobs.values()), problems, overlaps, successes)
    return verdict


def job_problems(view: JobView, objects: dict[str, dict[str, Any]], overlap_max_s: float,
                 paused: Paused | None = None,
                 ) -> tuple[dict[str, list[str]], list[float]]:  # fmt: skip
    found: dict[str, list[str]] = {k: [] for k in ("lost", "changed", "two_finals", "s3", "webhook", "overlap")}
    finals = {s["state"] for s in view.finals()}
    if not finals:
        last = view.states[-1]["state"] if view.states else "never seen"
        found["lost"].append(f"acknowledged ({view.submit['via']}) but never seen final (last seen: {last})")
    if len(finals) > 1:
        found["two_finals"].append(f"two final states seen: {sorted(finals)}")
    found["changed"] += changed_after_final(view)
    success = [s for s in view.finals() if s["state"] == "SUCCESS"]
    if success:
        found["s3"] += missing_objects(view.id, success[-1].get("uris", []), objects)
    if view.submit.get("webhook") and finals:
        found["webhook"] += webhook_problems(view, finals)
    spans = overlap_spans(view.runs, paused)
    found["overlap"] += [f"executions overlapped for {s:.1f} s (over {overlap_max_s:g} s)"
                         for s in spans if s > overlap_max_s]  # fmt: skip
    return found, spans


def changed_after_final(view: JobView) -> list[str]:
    """Per observer (polls; each SSE stream), in the order it saw them: anything after a final state."""
    out = []
    by_observer: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for state in view.states:
        by_observer[state["via"]].append(state)
    for via, seen in by_observer.items():
        first = next((s for s in sorted(seen, key=lambda s: s["t"]) if s["state"] in FINAL), None)
        if first is None:
            continue
        later = [s for s in seen if s["t"] > first["t"] and s["state"] != first["state"]]
        if later:
            out.append(f"{via} saw {first['state']} at {first['t']:.1f}, then {later[0]['state']} at "
                       f"{later[0]['t']:.1f}")  # fmt: skip
    return out


def missing_objects(job_id: str, uris: list[str], objects: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    if not uris:
        out.append("SUCCESS without any object")
    for uri in uris:
        key = uri.split("/", 3)[-1] if uri.startswith("s3://") else uri
        if not key.startswith(f"{BUCKET_PREFIX}{job_id}/"):
            out.append(f"result names another job's object {uri}")
        elif key not in objects:
            out.append(f"object {uri} of its result is not in S3")
        elif objects[key].get("meta_job") != job_id:
            out.append(f"object {uri} is tagged with job {objects[key].get('meta_job')}")
    return out


def foreign_objects(objects: list[dict[str, Any]], jobs: dict[str, JobView]) -> list[str]:
    out = []
    for obj in objects:
        owner = obj["key"].removeprefix(BUCKET_PREFIX).split("/", 1)[0]
        if obj.get("meta_job") and obj["meta_job"] != owner:
            out.append(f"{owner}: object {obj['key']} holds job {obj['meta_job']}'s output")
    return out


def webhook_problems(view: JobView, finals: set[str]) -> list[str]:
    out = []
    if not view.hooks:
        return [f"webhook never delivered (final {sorted(finals)})"]
    ids = {h["delivery"] for h in view.hooks}
    if ids != {delivery_id(view.id)}:
        out.append(f"webhook delivery ids {sorted(ids)}, expected only {delivery_id(view.id)}")
    if any(not h["valid"] for h in view.hooks):
        out.append("a webhook delivery's signature did not verify")
    states = {h["state"] for h in view.hooks}
    if not states <= finals:
        out.append(f"webhook carried {sorted(states)}, the job ended {sorted(finals)}")
    if not any(h["answered"] == 200 for h in view.hooks):
        out.append("webhook never delivered successfully (only failed tries)")
    return out


def overlap_spans(runs: list[dict[str, Any]], paused: Paused | None = None) -> list[float]:
    """Seconds each pair of executions of one job on different workers or incarnations ran at the same time; a
    worker SIGSTOPped by the pause nemesis (`paused`: worker -> intervals) runs nothing while it is stopped."""
    spans = []
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            if (a["worker"], a["incarnation"]) == (b["worker"], b["incarnation"]):
                continue
            both = sum(
                max(0.0, min(x_end, y_end) - max(x_start, y_start))
                for x_start, x_end in _running(a, paused or {})
                for y_start, y_end in _running(b, paused or {})
            )
            if both > 0:
                spans.append(both)
    return spans


def _running(run: dict[str, Any], paused: Paused) -> list[tuple[float, float]]:
    """The run's interval less the times its worker was stopped."""
    pieces = [(run["start"], run["end"])]
    for stop, cont in paused.get(run["worker"], []):
        pieces = [p for start, end in pieces for p in ((start, min(end, stop)), (max(start, cont), end)) if p[1] > p[0]]
    return pieces


def _overlaps(view: JobView, fault: dict[str, Any]) -> bool:
    return view.start <= fault["stopped"] and view.end >= fault["started"]


def _row(kind: str, faults: list[dict[str, Any]], hit: list[JobView], problems: dict[str, dict[str, int]],
         overlaps: dict[str, list[float]], successes: list[float]) -> dict[str, Any]:  # fmt: skip
    spans = [s for v in hit for s in overlaps[v.id]]
    recovery = [r for f in faults if (r := _recovery(f, successes)) is not None]
    count = {k: sum(1 for v in hit if problems[v.id][k]) for k in ("lost", "changed", "two_finals", "s3", "webhook")}
    return {"nemesis": kind, "faults": len(faults), "jobs": len(hit), **count,
            "overlaps": len(spans), "overlap_s": round(sum(spans), 1),
            "recovery_p50": _pct(recovery, 50), "recovery_p99": _pct(recovery, 99)}  # fmt: skip


def _recovery(fault: dict[str, Any], successes: list[float]) -> float | None:
    after = [t for t in successes if t >= fault["stopped"]]
    return after[0] - fault["stopped"] if after else None


def _pct(values: list[float], pct: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[pct - 1], 1)


COLUMNS = (("nemesis", "nemesis"), ("faults", "faults"), ("jobs", "jobs"), ("lost", "lost"),
           ("changed", "final changed"), ("two_finals", "two finals"), ("s3", "s3 wrong"),
           ("webhook", "webhook wrong"), ("overlaps", "overlaps"), ("overlap_s", "overlap s"),
           ("recovery_p50", "recovery p50 s"), ("recovery_p99", "recovery p99 s"))  # fmt: skip


def table(verdict: Verdict) -> str:
    rows = [*verdict.rows, verdict.totals]
    cells = [[title for _, title in COLUMNS]]
    cells += [["-" if r[k] is None else str(r[k]) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    path = Path(argv[0])
    verdict = check(path)
    print(table(verdict))
    campaign = next((r for r in read(path) if r["kind"] == "campaign"), {})
    return report_violations(verdict, campaign)


def report_violations(verdict: Verdict, campaign: dict[str, Any]) -> int:
    if not verdict.violations:
        print(f"checker: no violation (seed {campaign.get('seed')})")
        return 0
    print(f"\nchecker: {len(verdict.violations)} violation(s), seed {campaign.get('seed')}:", file=sys.stderr)
    for line in verdict.violations:
        print(f"  {line}", file=sys.stderr)
    print(f"replay: {campaign.get('replay')}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
