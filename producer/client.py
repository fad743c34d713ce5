"""The Python client: submit, status, wait, cancel. Sends tasks by name; never imports the worker."""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from kiq import claim, expiry, fairshare, logs, quota_counts, redisconn, s3, tracing
from kiq.celeryconf import PRIORITY_STEPS, PRODUCER_AMQP, common_config, priority_lists
from kiq.contract import MAX_PRIORITY, Job, parse_job
from kiq.errors import JobExpired, OutputsDeleted, SubmitNotReplicated, TransientError, UnknownJob, WaitTimeout
from kiq.event_reads import PAGE_SCRIPT, page_args, parse_event_id, parse_page, parse_snapshot
from kiq.limits import check_feasible, live_worker
from kiq.names import (
    FLEET_INDEX,
    GENERATE_TASK,
    PROGRESS,
    SUBMITS_KEY,
    cancel_key,
    deleted_key,
    events_key,
    frames_key,
    job_record_key,
    jobs_index_key,
    tenant_queues_key,  # fmt: skip
)
from kiq.settings import Settings
from kiq.status import ErrorInfo, ImageRef, JobEvent, JobList, JobResult, JobStatus, JobSummary, Progress
from kiq.webhooks import queue_webhook
from producer.quotas import Admission, Quotas, admit

ProgressCallback = Callable[[JobStatus], None]
# kombu's priority step (sent priority 9 - p, floored to a step) -> the job priorities it holds
PRIORITY_CLASSES = {0: "7-9", 3: "4-6", 6: "1-3", 9: "0"}
log = logging.getLogger(__name__)


# KEYS: the record, the owner's index, the outputs-deleted tombstone. ARGV: record, ttl, job id, index score. A
# deleted job's record stays deleted from the index; an existing record is left as it is. 1 if written.
_KEEP_RECORD = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if not redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]), 'NX') then return 0 end
redis.call('ZADD', KEYS[2], 'NX', ARGV[4], ARGV[3])
return 1
"""


def _record(job: Job, owner: str) -> dict[str, str]:
    """A job's record: who submitted it and where its webhook goes."""
    return {"owner": owner, "webhook_url": job.webhook_url or ""}


class Client:
    def __init__(self, settings: Settings, app: Celery | None = None, s3_client: Any = None) -> None:
        self.settings = settings
        self.app = app or Celery("kiq-producer", set_as_current=False, amqp=PRODUCER_AMQP)
        if app is None:
            self.app.conf.update(common_config(settings))
        self._s3 = s3_client
        self._broker_redis: Any = None
        self._page: Any = None

    @property
    def s3(self) -> Any:
        """The S3 client inline images are stored with (created on first use: boto3 is imported only then)."""
        if self._s3 is None:
            self._s3 = s3.s3_client(self.settings)
        return self._s3

    @property
    def redis(self) -> Any:
        """The Redis connection of the result backend (job records, cancel flags, heartbeats)."""
        return self.app.backend.client

    def submit(self, job: Job | Mapping[str, Any], owner: str = "", job_id: str | None = None,
               before_publish: Callable[[], None] | None = None, feasible: bool = False,
               weight: int = 1, quotas: Quotas | None = None, admission: Admission | None = None,
               require_replicas: bool | None = False) -> str:  # fmt: skip
        """Validate, store inline images, record and enqueue the job; return its id.

        All or nothing: invalid jobs raise JobInvalid and touch nothing, as do jobs no live worker of the queue could
        finish within the time-limit cap (JobTooLong) and jobs over a quota (QuotaExceeded: `quotas`, else this
        process's KIQ_QUOTA_* settings); if S3 or Redis fails, the error (StorageError, a Redis or kombu error)
        propagates and no job record is left behind. `before_publish` is the last moment to give up with nothing
        enqueued: whatever it raises propagates the same way. `admission`: the API counted the submit already.

        With Sentinel, the submit then WAITs (KIQ_SUBMIT_REPLICA_TIMEOUT_MS) for KIQ_SUBMIT_REPLICAS replicas. If they
        do not acknowledge, the job is enqueued on the master only, and a failover before they catch up loses it:
        by default a warning is logged and the id returned; `require_replicas=True` raises SubmitNotReplicated
        (carrying the id) instead; None skips the WAIT (the caller confirms with `replicated`)."""
        parsed = job if isinstance(job, Job) else parse_job(job)
        if not feasible:  # the API checks before its uploads and says so: one fleet read per submit
            self.check_feasible(parsed)
        job_id = job_id or str(uuid.uuid4())
        own = admission is None
        if own:
            admission = self.admit(parsed, owner, job_id, quotas or Quotas.from_settings(self.settings))
        try:
            deadline = self._enqueue(parsed, owner, job_id, before_publish, weight, counted=admission is not None)
        except Exception:
            if own and admission is not None:
                admission.release()
            raise
        if admission is not None:
            try:
                admission.confirm(deadline)
            except Exception as exc:  # noqa: BLE001 - the job is enqueued; its pending entry lapses by itself
                log.warning("job %s: could not confirm its quota entry: %s", job_id, exc)
        with logs.context(job_id=job_id, tenant=owner):
            log.info("job queued on %s at priority %d", route(parsed, self.settings), parsed.priority)
        if require_replicas is not None:
            if not self.replicated(job_id) and require_replicas:
                raise SubmitNotReplicated(not_replicated(job_id, self.settings), job_id)
        return job_id

    def admit(self, job: Job, owner: str, job_id: str, quotas: Quotas) -> Admission | None:
        """Count the submit against `quotas` (QuotaExceeded if over one); None where no quota counts."""
        key = self.app.backend.get_key_for_task("-")
        prefix = (key.decode() if isinstance(key, bytes) else key)[:-1]  # the result keys' prefix
        return admit(self.redis, self.settings, job, owner, job_id, quotas, prefix)

    def _enqueue(self, parsed: Job, owner: str, job_id: str, before_publish: Callable[[], None] | None,
                 weight: int, counted: bool) -> float:  # fmt: skip
        """Store inline images, write the record, send the message; return the deadline to start (Redis clock)."""
        parsed = self.store_inline_images(parsed, owner, job_id)
        record = _record(parsed, owner)
        ttl, index = self.settings.result_ttl_s, jobs_index_key(owner)

        def write() -> float:  # the record and the tenant's index entry live as long as the result
            now = time.time()
            with self.redis.pipeline() as pipe:
                pipe.time()
                pipe.set(job_record_key(job_id), json.dumps(record), ex=ttl)
                pipe.zadd(index, {job_id: now})
                pipe.zremrangebyscore(index, "-inf", now - ttl)
                pipe.expire(index, ttl)
                seconds, micros = pipe.execute()[0]
            return int(seconds) + int(micros) / 1e6

        server_now = redisconn.retrying(write, self.settings.redis_retry_s, "submit")
        deadline = server_now + expiry.expires_in(parsed.expires_in_s, self.settings.job_expires_s)
        headers: dict[str, Any] = {"kiq_submitted_at": time.time(), "kiq_owner": owner, expiry.HEADER: deadline}
        if counted:
            headers[quota_counts.HEADER] = 1
        try:
            queue = self.fair_queue(route(parsed, self.settings), owner, weight)
            if before_publish is not None:
                before_publish()
            with tracing.span("submit", {"kiq.job_id": job_id}):
                self.app.send_task(
                    GENERATE_TASK, args=[parsed.model_dump(mode="json")], task_id=job_id,
                    queue=queue, priority=MAX_PRIORITY - parsed.priority, headers=tracing.inject(headers),
                )  # fmt: skip
        except Exception:
            self._forget(job_id, owner)
            raise
        claim.ring_after_publish(self.app, self.broker_redis, queue)
        return deadline

    def fair_queue(self, routed: str, owner: str, weight: int) -> str:
        """The queue the owner's job waits in: its own tenant queue of `routed`, recorded for the workers (fair
        share, kiq/fairshare.py); `routed` itself without an owner, with fair share off, or once `routed` has
        KIQ_FAIR_SHARE_MAX_TENANTS tenant queues."""
        if not (owner and self.settings.fair_share):
            return routed
        most = self.settings.fair_share_max_tenants

        def record() -> str:
            with self.redis.pipeline(transaction=False) as pipe:
                mine = fairshare.register(pipe, routed, owner, weight, most)
                return mine if pipe.execute()[0] == 1 else routed

        return redisconn.retrying(record, self.settings.redis_retry_s, "submit")

    def check_feasible(self, job: Job) -> float:
        """The job's expected seconds on the fastest live worker of its queue, by the speeds the workers publish
        (the reference speed if none is live); raises JobTooLong if no such worker could finish it within its cap."""
        beats = redisconn.retrying(self.fleet, self.settings.redis_retry_s, "submit")  # rides out a blip, as submit
        workers = [live_worker(w.get("hostname", "?"), w, self.settings) for w in beats]
        return check_feasible(job, route(job, self.settings), workers, self.settings)

    def replicated(self, job_id: str) -> bool:
        """With Sentinel, WAIT until everything written so far (the job's message and record) is on
        KIQ_SUBMIT_REPLICAS replicas, so that a failover cannot lose it; True once it is (or without Sentinel).
        Past KIQ_SUBMIT_REPLICA_TIMEOUT_MS the job stands on the master alone: a warning says so, and False."""
        wanted, timeout_ms = self.settings.submit_replicas, self.settings.submit_replica_timeout_ms
        ok = True
        servers = {self.settings.broker_server, self.settings.results_server}
        for server in (s for s in servers if s.sentinel and wanted > 0):
            client = self.redis if server == self.settings.results_server else self.broker_redis
            try:
                acked = redisconn.wait_for_replicas(client, lambda p: p.incr(SUBMITS_KEY), wanted, timeout_ms)
            except redisconn.REDIS_ERRORS as exc:
                acked = 0
                log.warning("job %s: could not confirm replication: %s", job_id, exc)
            if acked < wanted:
                log.warning("job %s is on the Redis master but on %d of %d replicas after %d ms: a failover "
                            "now could lose it", job_id, acked, wanted, timeout_ms)  # fmt: skip
                ok = False
        return ok

    @property
    def broker_redis(self) -> Any:
        """A client of the broker's Redis, where it is not the result backend's."""
        if self._broker_redis is None:
            self._broker_redis = redisconn.connect(self.settings.broker_server, self.settings)
        return self._broker_redis

    def store_inline_images(self, job: Job, owner: str, job_id: str) -> Job:
        """Put each `data:` image in S3 under the job's input prefix and refer to it by s3:// instead:
        only references travel through Redis, never image bytes."""
        inputs = []
        for n, item in enumerate(job.inputs):
            if item.image is not None and item.image[:5].lower() == "data:":
                mime, _, payload = item.image[5:].partition(";base64,")
                key = f"{s3.input_prefix(self.settings, owner, job_id)}{n}"
                uri = s3.put(self.s3, self.settings.s3_bucket, key, base64.b64decode(payload), mime)
                item = item.model_copy(update={"image": uri})
            inputs.append(item)
        return job.model_copy(update={"inputs": inputs})

    def keep_record(self, job_id: str, job: Job, owner: str) -> None:
        """Write the job's record unless it exists: an idempotent retry whose first try's publish landed but
        raised (its reply lost) finds the job committed to its key and its record removed as unsent."""
        record = json.dumps(_record(job, owner))
        keys = [job_record_key(job_id), jobs_index_key(owner), deleted_key(job_id)]
        if self.redis.eval(_KEEP_RECORD, 3, *keys, record, self.settings.result_ttl_s, job_id, time.time()):
            log.warning("job %s: its record was written again by an idempotent retry", job_id)

    def _forget(self, job_id: str, owner: str) -> None:
        try:
            self.redis.delete(job_record_key(job_id))
            self.redis.zrem(jobs_index_key(owner), job_id)
        except Exception as exc:  # noqa: BLE001 - Redis is what failed; the record expires by itself
            log.warning("could not remove the record of unsent job %s: %s", job_id, exc)

    def record(self, job_id: str) -> dict[str, str] | None:
        """What submit recorded (owner, webhook URL), or None for an unknown or expired id."""
        raw = self.redis.get(job_record_key(job_id))
        return None if raw is None else json.loads(raw)

    def status(self, job_id: str) -> JobStatus:
        """The job's status; UnknownJob for an id never submitted (or expired), OutputsDeleted once deleted."""
        self.check_not_deleted(job_id)
        meta = self.app.backend.get_task_meta(job_id)
        state = meta["status"]
        if state == "PENDING" and self.record(job_id) is None:
            raise UnknownJob(f"no job with id {job_id!r} (never submitted, or expired)")
        return self._with_frames(to_status(job_id, state, meta.get("result")))

    def check_not_deleted(self, job_id: str) -> None:
        if self.redis.exists(deleted_key(job_id)):
            raise OutputsDeleted(f"the outputs of job {job_id} were deleted")

    def _with_frames(self, status: JobStatus) -> JobStatus:
        """Every frame a sweep uploaded, from its frames record: in PROGRESS (whose write lists only new frames),
        and after a sweep ended early (FAILURE, REVOKED)."""
        p = status.progress
        if status.state in ("FAILURE", "REVOKED", "EXPIRED") or (p is not None and p.frames_done):
            raw = self.redis.get(frames_key(status.id))
            with_frames(status, raw)
        return status

    def events(self, job_id: str, last_event_id: str | None = None, timeout: float | None = None,
               block_s: float = 5.0) -> Iterator[JobEvent]:  # fmt: skip
        """The job's state writes in order, from after `last_event_id` (from the start if None), until its final
        status; blocks on the job's event stream (XREAD), so no polling, and reads it in pages. Raises
        InvalidEventId for an id Redis would refuse, UnknownJob, or WaitTimeout once `timeout` seconds pass
        without the final status. A job whose stream is gone (expired, or written before events existed, or
        expiring while we follow it) yields its current status once, with an empty id; a resume after the final
        event yields nothing. Where the stream cannot continue from `last_event_id` (trimmed past it, or the id
        is ahead of it) the first event is a snapshot: the current status with all of a sweep's frames."""
        after = parse_event_id(last_event_id) if last_event_id else None
        if after == "0-0":
            after = None
        if self.record(job_id) is None and self.app.backend.get_task_meta(job_id)["status"] == "PENDING":
            raise UnknownJob(f"no job with id {job_id!r} (never submitted, or expired)")
        deadline = None if timeout is None else time.monotonic() + timeout
        key, told_pending, resumed = events_key(job_id), False, after is not None
        while True:
            page = parse_page(self._page_script(keys=[key], args=page_args(after)), after)
            if page.gone:  # nothing written yet (queued), or a finished job's stream expired
                current = self.status(job_id)
                if current.done or (after is None and not told_pending):
                    yield JobEvent(id="", status=current)
                if current.done:
                    return
                told_pending, after = True, None  # no event exists yet that the caller could have seen
            elif page.snapshot:
                event = self._snapshot(job_id)
                if event is not None:
                    after = event.id
                    yield event
                    if event.status.done:
                        return
                continue
            for after, meta in page.entries:
                event = JobEvent(id=after, status=self.decode_event(job_id, meta))
                yield event
                if event.status.done:
                    return
            if page.full:
                continue
            if resumed and not page.entries and after == page.last_id and self.status(job_id).done:
                return  # resumed at the final event: nothing more will come
            resumed = False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WaitTimeout(f"job {job_id} did not end within {timeout} s")
            # Wait for an entry after ours; the next page reads it (with the check for a trimmed stream).
            block = block_s if left is None else min(block_s, left)
            self.redis.xread({key: after or "0-0"}, count=1, block=max(1, int(block * 1000)))

    @property
    def _page_script(self) -> Any:
        """The page read (kiq/event_reads.py), by EVALSHA."""
        if self._page is None:
            self._page = self.redis.register_script(PAGE_SCRIPT)
        return self._page

    def _snapshot(self, job_id: str) -> JobEvent | None:
        """The stream's newest entry with every frame so far, read in one MULTI."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xrevrange(events_key(job_id), count=1).get(frames_key(job_id))
            newest = parse_snapshot(pipe.execute())
        if newest is None:
            return None
        event_id, meta, frames = newest
        return JobEvent(id=event_id, status=self.decode_event(job_id, meta, frames=frames or b"[]"))

    def decode_event(self, job_id: str, raw: bytes, frames: bytes | None = None) -> JobStatus:
        """An event's status as written (a sweep's progress lists only its new frames). `frames`, the job's
        frames record, makes it a snapshot: all frames so far in `progress.frames`. A final FAILURE or REVOKED
        lists the frames uploaded either way."""
        meta = self.app.backend.decode_result(raw)
        status = to_status(job_id, meta["status"], meta.get("result"))
        if frames is not None:
            return with_frames(status, frames)
        return self._with_frames(status) if status.state in ("FAILURE", "REVOKED", "EXPIRED") else status

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> JobStatus:
        """Follow the job's events until it ends; `on_progress` sees every status that differs from the last
        one, as a status read gives it (a sweep's progress listing all frames so far, not only the new ones)."""
        last, frames = None, []
        for event in self.events(job_id, timeout=timeout):
            status = event.status
            if status.state == "STARTED":
                frames = []  # a (re)delivered sweep starts again from its first frame
            if status.progress is not None and (status.progress.frames_done or status.progress.frames):
                frames = status.progress.frames_after(frames)
                progress = status.progress.model_copy(update={"frames": frames, "new_frames": None})
                status = status.model_copy(update={"progress": progress})
            if on_progress is not None and status != last:
                on_progress(status)
            last = status
        assert last is not None and last.done
        return last

    def jobs(self, owner: str = "", limit: int = 20, state: str | None = None, cursor: str | None = None) -> JobList:
        """The owner's jobs, newest first, `limit` per page; `state` keeps only jobs in that state. The cursor is
        the submit time of the page's last job (exclusive). Reads pages of the index and their statuses in one
        MGET each; with a state filter it scans at most 20 index pages per call and hands back a cursor."""
        found: list[JobSummary] = []
        top = f"({cursor}" if cursor else "+inf"
        for _ in range(20 if state else 1):
            page = self.redis.zrevrangebyscore(jobs_index_key(owner), top, "-inf", start=0, num=limit,
                                               withscores=True)  # fmt: skip
            if not page:
                return JobList(jobs=found)
            metas = self.redis.mget([self.app.backend.get_key_for_task(raw.decode()) for raw, _ in page])
            for (raw, score), meta in zip(page, metas, strict=True):
                current = self._summary(raw.decode(), meta, score)
                if state is None or current.state == state:
                    found.append(current)
                if len(found) == limit:
                    return JobList(jobs=found, next_cursor=repr(score))
            if len(page) < limit:
                return JobList(jobs=found)
            top = f"({page[-1][1]!r}"
        return JobList(jobs=found, next_cursor=top[1:])

    def _summary(self, job_id: str, raw: bytes | None, submitted_at: float) -> JobSummary:
        meta = self.app.backend.decode_result(raw) if raw else {"status": "PENDING"}
        current = to_status(job_id, meta["status"], meta.get("result"))
        if current.progress is not None:  # a sweep's count of frames, not the last write's new ones
            current.progress = current.progress.model_copy(update={"new_frames": None})
        return JobSummary(**current.model_dump(), submitted_at=submitted_at)

    def queue_depths(self, queues: list[str]) -> dict[str, dict[str, int]]:
        """Jobs waiting per queue and priority class ("7-9", "4-6", "1-3", "0"), from kombu's lists in the broker
        (which may be another Redis than the results'); a queue's tenant queues (fair share) count as the queue."""
        with self.redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.hkeys(tenant_queues_key(queue))
            members = [[queue, *(k.decode() for k in keys)] for queue, keys in zip(queues, pipe.execute(), strict=True)]
        with self.app.connection_for_read() as conn, conn.default_channel.client.pipeline() as pipe:
            for names in members:
                for name in (name for member in names for name in priority_lists(member)):
                    pipe.llen(name)
            lengths = iter(pipe.execute())
        depths = {}
        for queue, names in zip(queues, members, strict=True):
            counts = [[next(lengths) for _ in PRIORITY_STEPS] for _ in names]
            depths[queue] = {PRIORITY_CLASSES[step]: sum(c[i] for c in counts) for i, step in enumerate(PRIORITY_STEPS)}
        return depths

    def download(self, job_id: str, directory: str | Path, timeout: float | None = None,
                 on_progress: ProgressCallback | None = None) -> tuple[JobStatus, list[Path]]:  # fmt: skip
        """Wait for the job, then save its outputs in `directory` under their object names (`0.png` …, a sweep's
        `animation.gif`); a sweep that was cancelled or failed leaves the frames it uploaded. Returns the final
        status and the files written."""
        final = self.wait(job_id, timeout=timeout, on_progress=on_progress)
        refs = list(final.result.images) if final.result is not None else list(final.frames or [])
        if final.result is not None and final.result.animation is not None:
            refs.append(final.result.animation)
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        paths = []
        for ref in refs:
            bucket, key = s3.split_uri(ref.uri)
            path = target / key.rsplit("/", 1)[-1]
            path.write_bytes(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
            paths.append(path)
        return final, paths

    def cancel(self, job_id: str) -> JobStatus:
        """A queued job never runs; a running one stops at its next denoising step."""
        current = self.status(job_id)
        if current.done:
            return current
        self.redis.set(cancel_key(job_id), "1", ex=self.settings.result_ttl_s)
        self.app.control.revoke(job_id)
        if current.state == "PENDING":
            AsyncResult(job_id, app=self.app).backend.mark_as_revoked(job_id, reason="cancelled")
            quota_counts.ended(self.redis, (self.record(job_id) or {}).get("owner", ""), job_id)
            self.notify(job_id)  # the job never reaches a worker, so its webhook is sent from here
        return self.status(job_id)

    def notify(self, job_id: str) -> None:
        """Queue the job's webhook, if it has one and nobody queued it yet (the webhook worker sends it)."""
        record = self.record(job_id) or {}
        queue_webhook(self.app, self.redis, job_id, record.get("webhook_url"), self.settings.result_ttl_s)

    def fleet(self) -> list[dict[str, Any]]:
        """Live workers, from their heartbeats (see worker/fleet.py). Read through the heartbeats' index in two
        round trips, never a SCAN (every submit reads it); expired entries are pruned."""
        keys = sorted(k.decode() for k in self.redis.zrange(FLEET_INDEX, 0, -1))
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            beats = pipe.execute()
        workers, gone = [], []
        for key, raw in zip(keys, beats, strict=True):
            if raw:
                workers.append({k.decode(): v.decode() for k, v in raw.items()})
            else:
                gone.append(key)
        if gone:  # only if still expired: a worker that was paused may have beaten again meanwhile
            self.redis.eval(_PRUNE_GONE, len(gone) + 1, FLEET_INDEX, *gone)
        return workers


_PRUNE_GONE = (  # KEYS[1]: the index; the rest: heartbeats found expired
    "for i = 2, #KEYS do if redis.call('exists', KEYS[i]) == 0 then redis.call('zrem', KEYS[1], KEYS[i]) end end "
    "return 0"
)


def not_replicated(job_id: str, settings: Settings) -> str:
    return (f"job {job_id} is on the Redis master but not confirmed on {settings.submit_replicas} replica(s) after "
            f"{settings.submit_replica_timeout_ms} ms: a failover could lose it, so it may or may not exist; retry "
            "with the same Idempotency-Key")  # fmt: skip


def route(job: Job, settings: Settings) -> str:
    """The job's own queue, else the large-image queue for big jobs (if configured), else the default."""
    if job.queue:
        return job.queue
    if settings.large_queue and job.height * job.width > settings.large_pixels:
        return settings.large_queue
    return settings.queue


def with_frames(status: JobStatus, raw: bytes | None) -> JobStatus:
    """`status` listing the frames of the job's frames record (JSON): a PROGRESS status those it has counted
    (`frames_done`: the record may already hold the next one), a FAILURE or REVOKED one all of them."""
    refs = [ImageRef.model_validate(f) for f in json.loads(raw)] if raw else []
    if status.progress is not None:
        done = status.progress.frames_done
        listed = refs[:done] if done is not None else refs
        status.progress = status.progress.model_copy(update={"frames": listed or None, "new_frames": None})
    elif status.state in ("FAILURE", "REVOKED", "EXPIRED") and refs:
        status.frames = refs
    return status


def to_status(job_id: str, state: str, info: Any) -> JobStatus:
    if state == PROGRESS and isinstance(info, dict):
        return JobStatus(id=job_id, state="PROGRESS", progress=Progress.model_validate(info))
    if state == "SUCCESS":
        return JobStatus(id=job_id, state="SUCCESS", result=JobResult.model_validate(info))
    if state == "FAILURE":
        return JobStatus(id=job_id, state="FAILURE", error=_error(info))
    if state == "REVOKED" and isinstance(info, JobExpired):  # kiq's EXPIRED, stored as Celery's REVOKED
        return JobStatus(id=job_id, state="EXPIRED", error=_error(info))
    if state == "REVOKED":
        return JobStatus(id=job_id, state="REVOKED", error=ErrorInfo(type="Cancelled", message="job was cancelled"))
    return JobStatus(id=job_id, state=state if state in ("PENDING", "STARTED") else "PENDING")


def _error(info: Any) -> ErrorInfo:
    if isinstance(info, BaseException):
        message = str(info.args[0]) if len(info.args) == 1 else str(info)
        return ErrorInfo(type=type(info).__name__, message=message, retryable=isinstance(info, TransientError))
    return ErrorInfo(type="Error", message=str(info))
