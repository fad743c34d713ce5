"""One delivery of one job message, end to end: the work behind the thin Celery task.

It skips a job whose final state is stored (a redelivery), counts the delivery (poison jobs), runs the job alone
or leading a decoder batch, and queues the job's webhook once its outcome is decided — for every final state.
A run found stale (a later delivery of its job began: kiq/fencing.py) stops and writes nothing, not even its end.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import Ignore

from kiq import expiry, fencing, leases, logs, quota_counts, redisconn, tracing
from kiq.contract import MAX_EXPIRES_S, Job, parse_job
from kiq.errors import KiqError, PipelineError
from kiq.names import fence_key
from kiq.settings import Settings
from worker import batching, metrics, sweep
from worker import fencing as stale_runs
from worker.delivery import DeliveryGuard, watchdog
from worker.fleet import Heartbeat
from worker.limits import SpeedMeter
from worker.records import JobRecords, checks_client, webhook_url
from worker.runner import JobCancelled, LeasesLapsed, Runner, StaleDelivery

log = logging.getLogger(__name__)


@dataclass
class Observers:
    """Who hears about each job: the fleet heartbeat (set once the worker starts), the metrics and the worker's
    speed (its time limits come from it)."""

    speed: SpeedMeter
    heartbeat: Heartbeat | None = None

    def started(self, job_id: str, submitted_at: Any) -> None:
        metrics.observe_queue_wait(submitted_at, time.time())
        if self.heartbeat is not None:
            self.heartbeat.job_started(job_id)

    def finished(self, outcome: str, seconds: float, timings: dict[str, float] | None = None,
                 error: BaseException | None = None) -> None:  # fmt: skip
        metrics.job_finished(outcome, seconds, timings, error)
        if self.heartbeat is not None:
            self.heartbeat.job_finished(ok=outcome == "success")


class JobDelivery:
    def __init__(self, task: Task, runner: Runner, settings: Settings, observers: Observers) -> None:
        self.task, self.runner, self.settings, self.observers = task, runner, settings, observers
        self.job_id: str = task.request.id
        self.records = JobRecords(task.backend, task.app, settings, checks_client(settings))
        self.guard = DeliveryGuard(
            task.backend.client, settings.max_deliveries, settings.result_ttl_s, settings.redis_retry_s
        )

    def run(self, raw: dict[str, Any]) -> dict[str, Any]:
        request = self.task.request
        owner, submitted_at = getattr(request, "kiq_owner", None), getattr(request, "kiq_submitted_at", None)
        with logs.context(job_id=self.job_id, tenant=owner, device=self.runner.device.name), \
                tracing.job(self.job_id, tracing.message_headers(request), submitted_at):  # fmt: skip
            return self._deliver(raw)

    def _deliver(self, raw: dict[str, Any]) -> dict[str, Any]:
        if stale_runs.was_let_go(self.job_id):  # a batch mate whose batch delivery went stale: not ours any more
            stale_runs.let_go(self.job_id)
            raise Ignore()
        lapsed_s = leases.lapsed()
        if lapsed_s is not None:  # its lease may be another worker's now: never start it; no ack, a sweep hands it back
            log.warning("job %s not started at %.3f: this worker's leases were last renewed %.1f s ago",
                        self.job_id, time.time(), lapsed_s)  # fmt: skip
            stale_runs.let_go(self.job_id)
            stale_runs.let_go_reserved()
            raise Ignore()
        self.records.began = leases.lapse_count()  # a lapse from here on stops this delivery, even once healed
        try:
            final = self._final()
        except Exception as exc:
            if not self._lapsed():
                raise
            self._let_go(exc)
        if final:  # redelivered after its final state was stored (or cancelled while queued)
            self._uncount()  # both idempotent: an earlier delivery may have stored the end and then let go
            self.records.notify(self.job_id, webhook_url(raw))
            raise Ignore()
        stale = False
        try:
            if self._expire_if_late(raw):
                raise Ignore()  # it never runs; its webhook is queued below, like every end's
            result = self._run(raw)
            self.records.check_fence(self.job_id)  # the last check before Celery stores the result
            return result
        except Ignore:
            raise
        except Exception as exc:
            stale = isinstance(exc, StaleDelivery) or self._lapsed()
            if not stale:
                if isinstance(exc, KiqError):
                    raise
                log.exception("job %s failed unexpectedly", self.job_id)
                raise PipelineError(f"unexpected {type(exc).__name__}: {exc}") from None
            self._let_go(exc)
        finally:
            if not stale:
                self._uncount()
                self.records.notify(self.job_id, webhook_url(raw))

    def _lapsed(self) -> bool:
        """The leases are lapsed now, or lapsed (and healed) since this delivery began."""
        return leases.lapsed_since(self.records.began)

    def _final(self) -> bool:
        """A blip must not fail the job: retried within KIQ_REDIS_RETRY_S, or until the leases lapse (then the
        delivery lets go of the job: no FAILURE, no ack, a sweep hands it back)."""
        return redisconn.retrying(lambda: self.records.final(self.job_id), self.settings.redis_retry_s,
                                  "final state check", give_up=lambda: leases.lapsed() is not None)  # fmt: skip

    def _let_go(self, exc: Exception) -> NoReturn:
        """Stale, or failed once this worker's leases lapsed (a Redis call that gave up at the lapse, before the run
        held a token, or a partition's error): the job may be another worker's by now. Neither FAILURE nor an ack:
        let go of its message, so its lease lapses and a sweep hands it back."""
        lapsed = not isinstance(exc, StaleDelivery) or isinstance(exc, LeasesLapsed)
        why = f"job {self.job_id}: {type(exc).__name__} after this worker's leases lapsed ({exc})"
        log.warning("%s; stopped without writing at %.3f", exc if isinstance(exc, StaleDelivery) else why, time.time())
        stale_runs.let_go(self.job_id)
        if lapsed:
            stale_runs.let_go_reserved()  # the batch mates and prefetched jobs' leases lapsed as well
        raise Ignore() from None

    def _expire_if_late(self, raw: dict[str, Any]) -> bool:
        """End the job EXPIRED, unrun, if this delivery begins past its deadline to start (Redis's clock): also a
        job prefetched before its deadline or redelivered after it."""
        request, client = self.task.request, self.task.backend.client
        own = raw.get("expires_in_s") if isinstance(raw, dict) else None
        valid = isinstance(own, int) and not isinstance(own, bool) and 1 <= own <= MAX_EXPIRES_S
        expires_in = expiry.expires_in(own if valid else None, self.settings.job_expires_s)
        late = redisconn.retrying(
            lambda: expiry.lateness(client, self.job_id, getattr(request, expiry.HEADER, None), expires_in,
                                    self.settings.result_ttl_s),
            self.settings.redis_retry_s, "expiry check", give_up=lambda: leases.lapsed() is not None,
        )  # fmt: skip
        if late is None:
            return False
        lapsed_s = leases.lapsed()
        if lapsed_s is not None:  # another worker may run the job now: a token here would fence it out
            raise LeasesLapsed(f"job {self.job_id}: not expired here, this worker's leases lapsed {lapsed_s:.1f} s ago")
        # A token of its own: a run of an earlier delivery still going somewhere is stale from now on.
        fence = fence_key(self.job_id)
        with client.pipeline() as pipe:
            token = pipe.incr(fence).expire(fence, self.settings.result_ttl_s).execute()[0]
        fencing.hold(self.job_id, int(token))
        self.records.expired(self.job_id, late)
        metrics.job_expired()
        log.warning("job %s expired: its deadline to start passed %.1f s ago; not run", self.job_id, late)
        return True

    def _uncount(self) -> None:
        """Every end of a counted job leaves its tenant's queued and running counts (kiq/quota_counts.py)."""
        if getattr(self.task.request, quota_counts.HEADER, None):
            try:
                quota_counts.ended(self.task.backend.client, getattr(self.task.request, "kiq_owner", "") or "",
                                   self.job_id)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - the entry lapses by itself
                log.warning("could not uncount job %s: %s", self.job_id, exc)

    def _count_started(self, job: Job) -> None:
        if getattr(self.task.request, quota_counts.HEADER, None):
            lasts = self.observers.speed.limits(job).hard_s + self.settings.visibility_timeout_s
            try:
                quota_counts.started(self.task.backend.client, getattr(self.task.request, "kiq_owner", "") or "",
                                     self.job_id, lasts, self.settings.result_ttl_s)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a blip: the count is off until the entry lapses
                log.warning("could not count job %s as running: %s", self.job_id, exc)

    def _run(self, raw: dict[str, Any]) -> dict[str, Any]:
        job = parse_job(raw)
        # A job whose earlier delivery died runs alone: in a batch its death could not be told from its mates'.
        alone = self.guard.crashed_before(self.job_id)
        mates = [] if alone else batching.find_mates(self.task, job, self.settings, self._may_join)
        delivery = self.guard.begin(self.job_id, batched=bool(mates))
        self._count_started(job)
        started, outcome, timings, error = time.monotonic(), "failure", None, None
        self.observers.started(self.job_id, getattr(self.task.request, "kiq_submitted_at", None))
        try:
            self.records.started(self.job_id, delivery.attempt, batched=bool(mates))
            result = self._lead(job, raw, mates) if mates else self._alone(job, raw)
            outcome, timings = "success", result["timings"]
            return result
        except StaleDelivery:
            outcome = "stale"
            raise
        except JobCancelled:
            outcome = "cancelled"
            self.records.revoked(self.job_id)
            raise Ignore() from None
        except BaseException as exc:
            error = exc
            raise
        finally:
            if outcome != "stale" and not self._lapsed():  # a paused or cut-off delivery counts as one that died:
                self.guard.end(self.job_id)  # a job that stalls its worker every time ends PoisonJob, never loops
            self.observers.finished(outcome, time.monotonic() - started, timings, error)

    def _alone(self, job: Job, raw: dict[str, Any]) -> dict[str, Any]:
        limits = self.observers.speed.limits(job)
        ctx = self.records.context(self.job_id, limits.soft_s)
        if ctx.cancelled():
            raise JobCancelled(self.job_id)
        with watchdog(limits.hard_s, lambda: self.records.fail_hung(self.job_id, webhook_url(raw), limits.hard_s)):
            result = sweep.run_job(self.runner, job, ctx)
        self.observers.speed.observe(job, result.timings)  # alone only: a batch's time is not one job's
        return result.model_dump(mode="json")

    def _lead(self, job: Job, raw: dict[str, Any], mates: list[batching.Mate]) -> dict[str, Any]:
        batch = batching.DecoderBatch(self.runner, self.settings, self.records, self.guard, self.observers)
        return batch.run(batching.Mate(self.job_id, job, raw), mates).model_dump(mode="json")

    def _may_join(self, job_id: str) -> bool:
        return not self.guard.crashed_before(job_id)
