"""The one Celery task: deserialize, call the runner, serialize — plus the delivery bookkeeping that makes
at-least-once delivery safe (skip finished jobs, count crashed deliveries, enforce the hard time limit)."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore

from kiq.contract import parse_job
from kiq.errors import JobTimeout
from kiq.names import GENERATE_TASK, PROGRESS, TERMINAL_STATES, WEBHOOK_QUEUE, WEBHOOK_TASK, cancel_key
from kiq.settings import Settings
from kiq.status import Progress
from worker import batching, metrics
from worker.delivery import DeliveryGuard, watchdog
from worker.fleet import Heartbeat
from worker.limits import time_limits
from worker.runner import JobCancelled, JobContext, Runner

log = logging.getLogger(__name__)
_BACKEND_ERRORS: tuple[type[BaseException], ...] = (OSError,)
try:  # redis-py's errors do not derive from OSError
    from redis.exceptions import RedisError

    _BACKEND_ERRORS = (OSError, RedisError)
except ImportError:  # pragma: no cover
    pass


@dataclass
class Observers:
    """Who hears about each job: the fleet heartbeat (set once the worker starts) and the metrics."""

    heartbeat: Heartbeat | None = None

    def started(self, job_id: str, submitted_at: Any) -> None:
        metrics.observe_queue_wait(submitted_at, time.time())
        if self.heartbeat is not None:
            self.heartbeat.job_started(job_id)

    def finished(self, outcome: str, seconds: float, timings: dict[str, float] | None = None) -> None:
        metrics.job_finished(outcome, seconds, timings)
        if self.heartbeat is not None:
            self.heartbeat.job_finished(ok=outcome == "success")


def register(app: Celery, runner: Runner, settings: Settings, observers: Observers) -> Task:
    @app.task(name=GENERATE_TASK, bind=True)
    def generate(self: Task, job: dict[str, Any]) -> dict[str, Any]:
        job_id: str = self.request.id
        if self.backend.get_task_meta(job_id)["status"] in TERMINAL_STATES:
            raise Ignore()  # redelivered after its final state was stored (or cancelled while queued)
        guard = DeliveryGuard(self.backend.client, settings.max_deliveries, settings.result_ttl_s)
        attempt = guard.begin(job_id)
        started = time.monotonic()
        observers.started(job_id, getattr(self.request, "kiq_submitted_at", None))
        try:
            result = run_job(self, runner, settings, job, attempt, observers)
        except Ignore:
            observers.finished("cancelled", time.monotonic() - started)
            raise
        except Exception:
            observers.finished("failure", time.monotonic() - started)
            raise
        finally:
            guard.end(job_id)
            notify(self, job)
        observers.finished("success", time.monotonic() - started, result["timings"])
        return result

    return generate


def run_job(task: Task, runner: Runner, settings: Settings, job: dict[str, Any], attempt: int,
            observers: Observers) -> dict[str, Any]:  # fmt: skip
    parsed = parse_job(job)
    limits = time_limits(parsed, settings)
    ctx = job_context(task, limits.soft_s)
    task.update_state(state="STARTED", meta={"hostname": socket.gethostname(), "attempt": attempt})
    try:
        if ctx.cancelled():
            raise JobCancelled(ctx.job_id)
        mates = batching.find_mates(task, parsed, settings)
        if mates:
            contexts = lambda job_id, soft_s: job_context(task, soft_s, job_id)  # noqa: E731
            batch = [(ctx.job_id, job), *((job_id, raw) for job_id, _, raw in mates)]
            hung = lambda limit_s: _fail_hung(task, limit_s, batch)  # noqa: E731
            result = batching.run_batch(task, runner, settings, (parsed, ctx), mates, contexts, observers, notify, hung)
            return result.model_dump(mode="json")
        with watchdog(limits.hard_s, lambda: _fail_hung(task, limits.hard_s, [(ctx.job_id, job)])):
            return runner.run(parsed, ctx).model_dump(mode="json")
    except JobCancelled:
        task.backend.mark_as_revoked(ctx.job_id, reason="cancelled", request=task.request)
        raise Ignore() from None


def _fail_hung(task: Task, limit_s: float, jobs: list[tuple[str, dict[str, Any]]]) -> None:
    """Record JobTimeout for every job the hung step belongs to (one, or a decoder batch) before the exit."""
    error = JobTimeout(f"a step hung past the hard time limit of {limit_s:.0f} s; the worker restarted")
    for job_id, job in jobs:
        task.backend.mark_as_failure(job_id, error)
        notify(task, job, job_id)


def notify(task: Task, job: Any, job_id: str | None = None) -> None:
    """Queue the job's webhook (the webhook worker waits for the final state before it posts)."""
    job_id = job_id or task.request.id
    url = job.get("webhook_url") if isinstance(job, dict) else None
    if isinstance(url, str) and url:
        try:
            task.app.send_task(WEBHOOK_TASK, args=[job_id, url], queue=WEBHOOK_QUEUE)
        except Exception as exc:  # noqa: BLE001 - a webhook must never fail its job
            log.error("could not queue the webhook of %s: %s", job_id, exc)


def job_context(task: Task, limit_s: float, job_id: str | None = None) -> JobContext:
    job_id = job_id or task.request.id

    def report(progress: Progress) -> None:
        try:
            task.update_state(task_id=job_id, state=PROGRESS, meta=progress.model_dump())
        except _BACKEND_ERRORS as exc:  # progress is best effort: a Redis blip must not fail the job
            log.warning("could not report progress of %s: %s", job_id, exc)

    def cancelled() -> bool:
        try:
            return bool(task.backend.client.exists(cancel_key(job_id)))
        except _BACKEND_ERRORS:
            return False

    return JobContext(job_id=job_id, report=report, cancelled=cancelled, limit_s=limit_s)
