"""Cross-job decoder micro-batching (KIQ_DECODER_BATCH > 1).

The worker then runs the threads pool with one thread and prefetches KIQ_DECODER_BATCH jobs, so the consumer
keeps receiving while a job runs (the solo pool cannot: it runs jobs inside the consumer's loop). The running
job, after its own fetch and prior, claims reserved jobs with the same decoder shape, runs them through one
decoder batch, and stores each claimed job's own outcome. A claimed job's message is acknowledged only when its
own turn comes and finds that outcome stored, so acks stay per job: a crash redelivers every job of the batch.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from celery import Task

from kiq.contract import Job, parse_job
from kiq.errors import JobInvalid
from kiq.names import GENERATE_TASK, TERMINAL_STATES
from kiq.settings import Settings
from kiq.status import JobResult
from worker.delivery import watchdog
from worker.limits import time_limits
from worker.runner import JobCancelled, JobContext, Runner

log = logging.getLogger(__name__)
Mate = tuple[str, Job, dict[str, Any]]


def shape(job: Job) -> tuple[int, int, int, float, int]:
    return job.height, job.width, job.decoder_steps, job.guidance_scale, job.num_images


def find_mates(task: Task, leader: Job, settings: Settings) -> list[Mate]:
    """Reserved jobs that can share the leader's decoder call, waiting up to KIQ_DECODER_BATCH_WAIT_MS for them."""
    if settings.decoder_batch < 2 or leader.num_images != 1:
        return []
    deadline = time.monotonic() + settings.decoder_batch_wait_ms / 1000
    while True:
        mates = _reserved_mates(task, leader, settings.decoder_batch - 1)
        if len(mates) == settings.decoder_batch - 1 or time.monotonic() >= deadline:
            return mates
        time.sleep(0.01)


def _reserved_mates(task: Task, leader: Job, limit: int) -> list[Mate]:
    from celery.worker import state

    mates: list[Mate] = []
    for request in list(state.reserved_requests):
        if request.id == task.request.id or request.name != GENERATE_TASK or not request.args:
            continue
        try:
            job = parse_job(request.args[0])
        except JobInvalid:
            continue  # it fails on its own turn, with its own error
        if shape(job) == shape(leader) and task.backend.get_task_meta(request.id)["status"] not in TERMINAL_STATES:
            mates.append((request.id, job, request.args[0]))
        if len(mates) == limit:
            break
    return mates


def run_batch(task: Task, runner: Runner, settings: Settings, leader: tuple[Job, JobContext], mates: list[Mate],
              contexts: Any, observers: Any, notify: Any, on_hung: Any) -> JobResult:  # fmt: skip
    """Run the leader and its mates in one decoder batch; store each mate's outcome; return or raise the leader's."""
    items = [leader]
    for job_id, job, _ in mates:
        task.update_state(task_id=job_id, state="STARTED", meta={"hostname": socket.gethostname(), "batch": True})
        observers.started(job_id, None)
        items.append((job, contexts(job_id, time_limits(job, settings).soft_s)))
    log.info("decoder batch of %d: %s", len(items), [ctx.job_id for _, ctx in items])
    hard = max(time_limits(job, settings).hard_s for job, _ in items)
    started = time.monotonic()
    with watchdog(hard, lambda: on_hung(hard)):
        outcomes = runner.run_batch(items)
    for (job_id, _, raw), outcome in zip(mates, outcomes[1:], strict=True):
        _store(task, job_id, outcome)
        observers.finished(_outcome_name(outcome), time.monotonic() - started,
                           outcome.timings if isinstance(outcome, JobResult) else None)  # fmt: skip
        notify(task, raw, job_id)
    if isinstance(outcomes[0], BaseException):
        raise outcomes[0]
    return outcomes[0]


def _store(task: Task, job_id: str, outcome: JobResult | BaseException) -> None:
    if isinstance(outcome, JobResult):
        task.backend.mark_as_done(job_id, outcome.model_dump(mode="json"))
    elif isinstance(outcome, JobCancelled):
        task.backend.mark_as_revoked(job_id, reason="cancelled")
    else:
        task.backend.mark_as_failure(job_id, outcome)


def _outcome_name(outcome: JobResult | BaseException) -> str:
    if isinstance(outcome, JobResult):
        return "success"
    return "cancelled" if isinstance(outcome, JobCancelled) else "failure"
