"""What a worker writes about a job in Redis: its states, progress, cancel flag reads, webhook queueing.

Every write names its job id and carries only that job's data (results are not extended), so a decoder batch
can report for each of its jobs without one job's prompts or images landing in another's record. Every write is
fenced by the token the job's run holds (kiq/fencing.py), and every step checks it with the cancel flag.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

from kiq import fencing, leases, redisconn
from kiq.errors import JobExpired, JobTimeout
from kiq.leases import lease_sockets
from kiq.names import PROGRESS, TERMINAL_STATES, cancel_key, deleted_key, fence_key, frames_key
from kiq.redisconn import REDIS_ERRORS as _BACKEND_ERRORS
from kiq.settings import Settings
from kiq.status import ImageRef, JobResult, Progress
from kiq.webhooks import queue_webhook
from worker.runner import JobCancelled, JobContext, LeasesLapsed, StaleDelivery
from worker.throttle import ProgressThrottle

log = logging.getLogger(__name__)


_CHECKS: dict[str, Any] = {}  # this process's client for the per-step checks, by results server


def checks_client(settings: Settings) -> Any:
    """The per-step cancel and fence reads' client: one per process, with the leases' socket timeouts, so that a
    step on a worker cut off from Redis fails its check within a second or two instead of blocking in TCP
    retransmits (and then meets `leases.lapsed`), rather than waiting for the partition to heal."""
    server = settings.results_server
    if server.raw not in _CHECKS:
        options = {**lease_sockets(settings.visibility_timeout_s), "client_name": "kiq-checks"}
        _CHECKS[server.raw] = redisconn.connect(server, settings, **options)
    return _CHECKS[server.raw]


class JobRecords:
    def __init__(self, backend: Any, app: Any, settings: Settings, checks: Any = None) -> None:
        self.backend, self.app, self.settings = backend, app, settings
        self.checks = checks if checks is not None else backend.client  # per-step reads (see checks_client)
        self.began: int | None = None  # leases.lapse_count() when the delivery began; None: when a context is made

    def final(self, job_id: str) -> bool:
        """Ended, or its outputs deleted (the tombstone drops the result: a redelivery must not run it again)."""
        if self.backend.get_task_meta(job_id)["status"] in TERMINAL_STATES:
            return True
        return bool(self.backend.client.exists(deleted_key(job_id)))

    def started(self, job_id: str, attempt: int, batched: bool = False) -> None:
        meta = {"hostname": socket.gethostname(), "attempt": attempt, "batch": batched}
        self.backend.store_result(job_id, meta, "STARTED")

    def store(self, job_id: str, outcome: JobResult | BaseException) -> None:
        if isinstance(outcome, StaleDelivery):
            return  # another delivery owns the job now: its outcome is the one that counts
        if isinstance(outcome, JobResult):
            self.backend.mark_as_done(job_id, outcome.model_dump(mode="json"))
        elif isinstance(outcome, JobCancelled):
            self.revoked(job_id)
        else:
            self.backend.mark_as_failure(job_id, outcome)

    def expired(self, job_id: str, late_s: float) -> None:
        """kiq's EXPIRED: Celery's REVOKED state with a JobExpired, so plain Celery clients see a revoked task."""
        error = JobExpired(f"job {job_id} did not start before its deadline (expires_in_s); it was {late_s:.1f} s "
                           "late and never ran")  # fmt: skip
        self.backend.store_result(job_id, error, "REVOKED")

    def revoked(self, job_id: str) -> None:
        self.backend.mark_as_revoked(job_id, reason="cancelled")

    def fail_hung(self, job_id: str, webhook_url: str | None, limit_s: float) -> None:
        """Record JobTimeout before the watchdog ends the process (its redelivery is then acknowledged unrun)."""
        self.backend.mark_as_failure(
            job_id, JobTimeout(f"a step hung past the hard time limit of {limit_s:.0f} s; the worker restarted")
        )
        self.notify(job_id, webhook_url)

    def notify(self, job_id: str, webhook_url: str | None) -> None:
        """Queue the job's one webhook (the webhook worker waits for the final state before it posts)."""
        token = fencing.held(job_id)
        queue_webhook(self.app, self.backend.client, job_id, webhook_url, self.settings.result_ttl_s, token)

    def check_fence(self, job_id: str) -> None:
        """Raise StaleDelivery if a later delivery of the job began than the one this process runs."""
        try:
            current = self.checks.get(fence_key(job_id))
        except _BACKEND_ERRORS:
            _raise_if_lapsed(job_id)
            return  # a blip: the fenced writes still refuse a stale run's output
        _raise_if_stale(job_id, fencing.held(job_id), current)

    def context(self, job_id: str, limit_s: float) -> JobContext:
        throttle = ProgressThrottle(self.settings.progress_interval_ms / 1000)
        sent = [0]  # frames already in a written progress
        client, token = self.backend.client, fencing.held(job_id)
        checked: list[Progress] = []  # the last progress point found current, for the stale run's log
        began = leases.lapse_count() if self.began is None else self.began  # a later lapse stops the run

        def report(progress: Progress) -> None:  # called once the step's checks passed
            checked[:] = [progress]
            if not throttle.due(progress):  # cancel and time limits are still checked at every step
                return
            try:
                self.backend.store_result(job_id, wire_progress(progress, sent[0]), PROGRESS)
                sent[0] = len(progress.frames or ())
            except _BACKEND_ERRORS as exc:  # progress is best effort: a Redis blip must not fail the job
                log.warning("could not report progress of %s: %s", job_id, exc)
                _raise_if_lapsed(job_id, progress, began)  # the write gave up as the leases lapsed: stop now

        def cancelled() -> bool:  # at every step: the cancel flag and the fence, in one round trip
            _raise_if_lapsed(job_id, checked[0] if checked else None, began)
            try:
                pipe = self.checks.pipeline(transaction=False)
                flag, current = pipe.exists(cancel_key(job_id)).get(fence_key(job_id)).execute()
            except _BACKEND_ERRORS:
                _raise_if_lapsed(job_id, checked[0] if checked else None, began)
                return False  # a blip: the fenced writes still refuse a stale run's output
            _raise_if_stale(job_id, token, current, checked[0] if checked else None)
            return bool(flag)

        def record_frames(frames: list[ImageRef]) -> None:
            # Overwritten whole, so a redelivered sweep lists only its own run's frames.
            payload = json.dumps([f.model_dump(mode="json") for f in frames])
            try:
                fencing.set_if_current(client, job_id, token, frames_key(job_id), payload, self.settings.result_ttl_s)
            except _BACKEND_ERRORS as exc:  # like progress: best effort
                log.warning("could not record the frames of %s: %s", job_id, exc)

        return JobContext(job_id=job_id, report=report, cancelled=cancelled, limit_s=limit_s,
                          record_frames=record_frames, fence=lambda: self.check_fence(job_id))  # fmt: skip


def _raise_if_lapsed(job_id: str, last: Progress | None = None, began: int | None = None) -> None:
    """Self-fencing: a run whose worker has not renewed its leases for two thirds of the visibility timeout stops
    before another worker can take its job (its message stays unacked and comes back through a sweep), and so does
    a run that began before a lapse that has healed since (`began`: leases.lapse_count() at its start)."""
    age_s = leases.lapsed()
    if age_s is not None:
        why = f"were last renewed {age_s:.1f} s ago"
    elif leases.lapsed_since(began):
        why = "lapsed during this run (renewed again since: a pause)"
    else:
        return
    where = f", after {last.stage} step {last.step} of {last.total}" if last is not None else ""
    raise LeasesLapsed(f"the leases of {job_id} {why}: another worker may take it; stopping this run{where}")


def _raise_if_stale(job_id: str, token: int | None, current: Any, last: Progress | None = None) -> None:
    if fencing.is_stale(current, token):
        where = f", after {last.stage} step {last.step} of {last.total}" if last is not None else ""
        raise StaleDelivery(f"delivery {token} of {job_id} is stale: delivery {int(current)} began{where}")


def wire_progress(progress: Progress, sent: int) -> dict[str, Any]:
    """What a progress write stores (the status key and an event): a sweep's frame count and only the frames
    new since the last write, never all of them: every write is an entry of the job's event stream, and all
    frames in each made a sweep's stream grow with the square of its frames. The full list is the job's frames
    record, which status reads use."""
    frames = progress.frames or []
    wire = progress.model_copy(update={"frames": None, "frames_done": len(frames) if frames else None,
                                       "new_frames": frames[sent:] or None})  # fmt: skip
    return wire.model_dump(mode="json", exclude_none=True)


def webhook_url(raw: Any) -> str | None:
    url = raw.get("webhook_url") if isinstance(raw, dict) else None
    return url if isinstance(url, str) and url else None
