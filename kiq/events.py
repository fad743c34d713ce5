"""Job events: every state write also lands in a per-job Redis Stream and is published with its stream id.

Celery's Redis result backend writes each state with SET + PUBLISH on `celery-task-meta-<id>`, but that
message carries no sequence number, so a reader could not resume without loss or repeats. `EventsBackend`
does the same write in one Lua script that also XADDs the meta to `kiq:events:<id>` (the stream id is the
event id: strictly increasing per job, assigned by Redis) and PUBLISHes "<stream id> <meta>" on the same key.
A reader subscribes first, then reads the stream after its last id, then takes published events whose id is
greater than the last it delivered: nothing is lost between the read and the subscription, nothing repeats.

The stream is capped at about `STREAM_MAXLEN` entries (XADD MAXLEN ~: Redis trims whole nodes of the oldest, so a
stream holds between STREAM_MAXLEN and STREAM_MAXLEN + 100 entries once that many were written); readers that
fall behind the oldest entry kept start from a snapshot (kiq/event_reads.py). The stream lives as long as the
result (`result_expires`). No Celery import at module level beyond the
backend base class, which only the Celery side loads (by the `kiq.events:EventsBackend+redis://…` URL).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery.backends.redis import RedisBackend, SentinelBackend

from kiq import fencing, leases
from kiq.library_internals import BackendWrites
from kiq.names import TERMINAL_STATES, deleted_key, events_channel, events_key
from kiq.redisconn import REDIS_ERRORS

log = logging.getLogger(__name__)

# KEYS: meta key, stream key, event channel, outputs-deleted tombstone. ARGV: meta, ttl (0 = none), the stream's ttl
# (0 = none), its cap. Run behind fencing.GUARD, which takes the fence key and the token last.
# A final state is never replaced (the first final wins): a cancel's REVOKED written by the API while the job's
# run was starting stays REVOKED through the run's later progress or SUCCESS. Nor is a job whose outputs were
# deleted (the tombstone drops its status) written again. Returns 0 (final) or -1 (deleted) then, writing nothing.
_WRITE = """
if redis.call('EXISTS', KEYS[4]) == 1 then return -1 end
local old = redis.call('GET', KEYS[1])
if old then
  local ok, meta = pcall(cjson.decode, old)
  if ok and type(meta) == 'table' and FINAL[meta['status']] then return 0 end
end
local ttl, stream_ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
if ttl > 0 then redis.call('SETEX', KEYS[1], ttl, ARGV[1]) else redis.call('SET', KEYS[1], ARGV[1]) end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'meta', ARGV[1])
if stream_ttl > 0 then redis.call('EXPIRE', KEYS[2], stream_ttl) end
redis.call('PUBLISH', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[3], id .. ' ' .. ARGV[1])
return id
"""

_FINAL = ", ".join(f"{state} = true" for state in sorted(TERMINAL_STATES))
_WRITE = f"local FINAL = {{{_FINAL}}}\n" + _WRITE

_META_PREFIX = "celery-task-meta-"
# A finished job's stream is kept this long for late resumes, not the result's days: it is some twenty times
# the size of the status, and after it expires the events endpoint answers with the final status alone.
DONE_STREAM_TTL_S = 3600
# A stream's bound in entries: at most minutes of a job's history (progress is written at most twice a second, plus
# a write per sweep frame), and small since a progress event carries only the frames new since the last one.
STREAM_MAXLEN = 1000


def event_order(event_id: str) -> tuple[int, int]:
    """Stream ids ("<ms>-<seq>") in the order Redis assigned them."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


class _EventStreams(BackendWrites):
    """Each state write also appended to the job's event stream (mixed into Celery's Redis backends); a write for
    a job whose run holds a fencing token here is made only while no later delivery has begun (kiq/fencing.py)."""

    client: Any
    expires: Any

    def write_state(self, key: Any, value: Any) -> None:
        name = key.decode() if isinstance(key, bytes) else str(key)
        if not name.startswith(_META_PREFIX):  # group or chord keys: Celery's own write
            return self.celery_write(key, value)
        job_id = name.removeprefix(_META_PREFIX)
        ttl = int(self.expires or 0)
        final = json.loads(value).get("status") in TERMINAL_STATES
        stream_ttl = min(ttl or DONE_STREAM_TTL_S, DONE_STREAM_TTL_S) if final else ttl
        token = fencing.held(job_id)  # a run's writes are refused once a later delivery of its job has begun
        fence, fence_arg = fencing.guard_args(job_id, token)
        keys = (name, events_key(job_id), events_channel(job_id), deleted_key(job_id), fence)
        script = self.__dict__.get("_write_script")
        if script is None:  # EVALSHA: Redis keeps the compiled script; EVAL would send and hash it every write
            script = self.__dict__["_write_script"] = self.client.register_script(fencing.guarded(_WRITE))
        try:
            done = script(keys=keys, args=(value, ttl, stream_ttl, STREAM_MAXLEN, fence_arg), client=self.client)
        except REDIS_ERRORS:
            if token is not None and leases.lapsed() is not None:  # and no retries (exception_safe_to_retry)
                fencing.abandoned(job_id, token, json.loads(value).get("status"))
            raise
        if done is None:
            fencing.refused(job_id, token, json.loads(value).get("status"))
        elif done == 0:
            log.info("job %s is final already; its %s write was dropped", job_id, json.loads(value).get("status"))
        elif done == -1:
            log.info(
                "job %s: its outputs were deleted; its %s write was dropped", job_id, json.loads(value).get("status")
            )
        return None

    def exception_safe_to_retry(self, exc: Exception) -> bool:
        """Celery's store_result retries a connection error while this says so: not in a worker process whose
        leases lapsed, whose run must stop at its next step (self-fencing, kiq/leases.py) instead of waiting here
        for Redis while another worker may take its job."""
        return bool(super().exception_safe_to_retry(exc)) and leases.lapsed() is None  # type: ignore[misc]

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Celery subscribes the sender to each task's result channel, for `AsyncResult.get()`, which kiq never
        calls (clients read the status, or the event stream): a long-lived producer such as the API would hold a
        subscription per job it ever sent, and Redis would push it every progress write of every one of them."""


class EventsBackend(_EventStreams, RedisBackend):
    """Celery's Redis backend with event streams."""


class SentinelEventsBackend(_EventStreams, SentinelBackend):
    """Celery's Sentinel backend (it follows a failover) with event streams."""
