"""Cross-job decoder micro-batching (KIQ_DECODER_BATCH > 1).

The worker then runs the threads pool with one thread and prefetches KIQ_DECODER_BATCH jobs, so the consumer
keeps receiving while a job runs (the solo pool cannot: it runs jobs inside the consumer's loop). A job, as soon
as it starts, claims reserved jobs with the same decoder shape (waiting up to KIQ_DECODER_BATCH_WAIT_MS for
them); each job then runs its own fetch and prior, and they share one decoder call. Each claimed job's outcome
is stored under its own id; its message is acknowledged only when its own turn comes and finds that outcome
stored, so acks stay per job and a crash redelivers every job of the batch. Each job counts its own delivery;
a job whose earlier delivery died runs alone from then on, so a job that crashes its worker is found out alone
(and becomes a PoisonJob) while its former mates succeed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from celery import Task

from kiq import expiry, fencing, leases, quota_counts, redisconn, tracing
from kiq import library_internals as internals
from kiq.contract import Job, parse_job
from kiq.errors import JobInvalid
from kiq.names import GENERATE_TASK, TERMINAL_STATES
from kiq.settings import Settings
from kiq.status import JobResult
from kiq.transport import server_time
from worker import fencing as stale_runs
from worker.delivery import DeliveryGuard, watchdog
from worker.records import JobRecords, webhook_url
from worker.runner import JobCancelled, Runner, StaleDelivery

log = logging.getLogger(__name__)


class Mate(NamedTuple):
    job_id: str
    job: Job
    raw: dict[str, Any]
    request: Any = None  # the mate's reserved Celery request (its trace headers, its submit time)


def shape(job: Job) -> tuple[int, int, int, float, int]:
    return job.height, job.width, job.decoder_steps, job.guidance_scale, job.num_images


def find_mates(task: Task, leader: Job, settings: Settings, may_join: Callable[[str], bool]) -> list[Mate]:
    """Reserved jobs that can share the leader's decoder call, waiting up to KIQ_DECODER_BATCH_WAIT_MS for them."""
    if settings.decoder_batch < 2 or leader.num_images != 1 or leader.sweep is not None:
        return []  # a sweep batches its own frames (KIQ_DECODER_BATCH at a time) and shares no call
    deadline = time.monotonic() + settings.decoder_batch_wait_ms / 1000
    refused: set[str] = set()
    # A mate must start well before its deadline to start; others run (or expire) on their own turn.
    # Retried as every pre-run Redis call is: a blip must not fail the leader (it has no fencing token yet).
    now = redisconn.retrying(lambda: server_time(task.backend.client), settings.redis_retry_s, "Redis time",
                             give_up=lambda: leases.lapsed() is not None)  # fmt: skip
    start_by = now + settings.decoder_batch_wait_ms / 1000 + 1.0
    while True:
        mates = _reserved_mates(task, leader, settings.decoder_batch - 1, may_join, refused, start_by)
        if len(mates) == settings.decoder_batch - 1 or time.monotonic() >= deadline:
            return mates
        time.sleep(0.01)


def _reserved_mates(task: Task, leader: Job, limit: int, may_join: Callable[[str], bool],
                    refused: set[str], start_by: float) -> list[Mate]:  # fmt: skip
    mates: list[Mate] = []
    for request in internals.reserved_requests():
        if request.id == task.request.id or request.id in refused or request.name != GENERATE_TASK:
            continue
        expires_at = expiry.deadline_header(_header(request, expiry.HEADER))
        if expires_at is None or expires_at <= start_by:  # foreign (stamped on its own turn) or about to expire
            refused.add(request.id)
            continue
        try:
            job = parse_job(request.args[0] if request.args else None)
        except JobInvalid:
            refused.add(request.id)
            continue  # it fails on its own turn, with its own error
        if shape(job) != shape(leader) or job.sweep is not None:
            continue
        if task.backend.get_task_meta(request.id)["status"] in TERMINAL_STATES or not may_join(request.id):
            refused.add(request.id)
            continue
        mates.append(Mate(request.id, job, request.args[0], request))
        if len(mates) == limit:
            break
    return mates


class DecoderBatch:
    """A leader job and its mates through one decoder call; each mate's outcome stored and announced as its own."""

    def __init__(self, runner: Runner, settings: Settings, records: JobRecords, guard: DeliveryGuard,
                 observers: Any) -> None:  # fmt: skip
        self.runner, self.settings, self.records = runner, settings, records
        self.guard, self.observers = guard, observers

    def run(self, leader: Mate, mates: list[Mate]) -> JobResult:
        """Return the leader's result or raise its error; the mates' outcomes are stored here."""
        for mate in mates:
            delivery = self.guard.begin(mate.job_id, batched=True)
            self.records.started(mate.job_id, delivery.attempt, batched=True)
            lasts_s = self.observers.speed.limits(mate.job).hard_s + self.settings.visibility_timeout_s
            _count(mate, self.records.backend.client, "started", lasts_s, self.settings.result_ttl_s)
            self.observers.started(mate.job_id, None)
            tracing.begin(mate.job_id, tracing.message_headers(mate.request), _submitted_at(mate.request))
        members = [leader, *mates]
        log.info("decoder batch of %d: %s", len(members), [m.job_id for m in members])
        limits = [self.observers.speed.limits(m.job) for m in members]
        items = [(m.job, self.records.context(m.job_id, lim.soft_s)) for m, lim in zip(members, limits, strict=True)]
        hard = max(lim.hard_s for lim in limits)
        started = time.monotonic()

        def settled(i: int, outcome: JobResult | BaseException) -> None:
            if i > 0:
                self._settle(mates[i - 1], outcome, time.monotonic() - started)
            elif isinstance(outcome, JobCancelled) and not isinstance(outcome, StaleDelivery):
                self.records.revoked(leader.job_id)  # now, not when the batch ends; the task ends it as usual

        # A hung batch ends the process without recording anything: every job comes back and runs alone,
        # where only the one that hangs meets the limit.
        with watchdog(hard, lambda: log.error("decoder batch %s hung", [m.job_id for m in members])):
            outcomes = self.runner.run_batch(items, settled)
        if isinstance(outcomes[0], BaseException):
            raise outcomes[0]
        return outcomes[0]

    def _settle(self, mate: Mate, outcome: JobResult | BaseException, seconds: float) -> None:
        if isinstance(outcome, StaleDelivery):  # another delivery owns the mate now: write nothing about it
            log.warning("%s; it left the decoder batch without writing", outcome)
            stale_runs.let_go(mate.job_id)
            fencing.release(mate.job_id)
            self.observers.finished("stale", seconds)
            return
        try:
            self.records.store(mate.job_id, outcome)
        except Exception as exc:  # noqa: BLE001 - one job's bookkeeping must not fail its mates
            # Its own turn finds no final state and runs it again (outputs are idempotent by job id).
            log.error("could not store the outcome of %s: %s", mate.job_id, exc)
        finally:
            tracing.end(mate.job_id)
            self.guard.end(mate.job_id)
            name = "success" if isinstance(outcome, JobResult) else "cancelled" if isinstance(outcome, JobCancelled) \
                else "failure"  # fmt: skip
            timings = outcome.timings if isinstance(outcome, JobResult) else None
            self.observers.finished(name, seconds, timings, outcome if isinstance(outcome, BaseException) else None)
            _count(mate, self.records.backend.client, "ended")
            self.records.notify(mate.job_id, webhook_url(mate.raw))
            fencing.release(mate.job_id)  # its last write is made


def _submitted_at(request: Any) -> Any:
    return _header(request, "kiq_submitted_at")


def _header(request: Any, name: str) -> Any:
    raw = getattr(request, "request_dict", None)
    return raw.get(name) if isinstance(raw, dict) else None


def _count(mate: Mate, redis: Any, what: str, *args: Any) -> None:
    """A counted mate's quota bookkeeping (kiq/quota_counts.py); a failure only leaves an entry to lapse."""
    if not _header(mate.request, quota_counts.HEADER):
        return
    try:
        getattr(quota_counts, what)(redis, _header(mate.request, "kiq_owner") or "", mate.job_id, *args)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not count batch mate %s: %s", mate.job_id, exc)
