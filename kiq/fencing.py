"""Fencing tokens: a run whose job was handed to another worker writes nothing more about that job.

Each delivery of a job takes a token as it begins (INCR of `kiq:fence:<id>`, worker/delivery.py) and holds it for
its run. Every write the run makes about its job — state and event (kiq/events.py), a sweep's frames record, the
webhook's queueing, the delivery count — runs in one Lua script with a check that no later delivery has begun:
the count must not be past the run's token. A missing count fences nothing (expired, or lost with a failover's
unreplicated writes: it cannot tell that a newer run exists), so such a loss falls back to at-least-once.

The tokens this process's runs hold are kept here by job id: Celery stores a task's result without its run's
context, so the result backend looks the token up. A refused write calls `on_refused` (the worker settles its
copy of the message locally then, so its acknowledgement cannot remove the newer delivery's lease), and so does a
write that failed after the worker's leases lapsed (`abandoned`: the job comes back and runs again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kiq.names import fence_key

log = logging.getLogger(__name__)

_held: dict[str, int] = {}  # job id -> the token this process's run of it holds
on_refused: Callable[[str], None] | None = None  # set by the worker: what to do once a run is found stale

# Prepended to a write script: its last KEYS entry is the job's fence key, its last ARGV the token ('' writes
# unfenced, as the API does for a queued job it cancels). A refused write returns nil and writes nothing.
GUARD = """
local fence_token = ARGV[#ARGV]
if fence_token ~= '' and tonumber(redis.call('GET', KEYS[#KEYS]) or '0') > tonumber(fence_token) then
  return false
end
"""

# KEYS: the key, the fence. ARGV: value, ttl in seconds, '1' for NX, token.
_SET = (
    GUARD
    + """
if ARGV[3] == '1' then return redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'NX') end
return redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
"""
)

# KEYS: the key, the fence. ARGV: token. Returns 1 when the guard passed, whether or not the key was there.
_DELETE = (
    GUARD
    + """
redis.call('DEL', KEYS[1])
return 1
"""
)


def hold(job_id: str, token: int) -> None:
    _held[job_id] = token


def release(job_id: str, token: int | None = None) -> None:
    """Forget the run's token once its last write is made (a later run's token is left alone)."""
    if token is None or _held.get(job_id) == token:
        _held.pop(job_id, None)


def held(job_id: str) -> int | None:
    return _held.get(job_id)


def guarded(script: str) -> str:
    return GUARD + script


def guard_args(job_id: str, token: int | None) -> tuple[str, str]:
    """The key and argument a guarded script takes last."""
    return fence_key(job_id), "" if token is None else str(token)


def is_stale(current: Any, token: int | None) -> bool:
    """Whether a count read from Redis says that a later delivery than `token`'s has begun."""
    return token is not None and current is not None and int(current) > token


def refused(job_id: str, token: int | None, what: str) -> None:
    log.warning("refused a stale write (%s) of job %s: delivery %s is no longer the current one", what, job_id, token)
    if on_refused is not None:
        on_refused(job_id)


def abandoned(job_id: str, token: int | None, what: str) -> None:
    """A write that failed once this worker's leases lapsed: not retried, and the run lets go of its job as a stale
    one does (no acknowledgement), so the job comes back through a sweep and runs again rather than being lost."""
    log.warning("gave up a write (%s) of job %s, delivery %s: this worker's leases lapsed and another worker may "
                "take the job; letting go of it", what, job_id, token)  # fmt: skip
    if on_refused is not None:
        on_refused(job_id)


def run(redis: Any, script: str, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA (the script is loaded on first use by each server): Redis keeps it compiled."""
    return redis.register_script(script)(keys=keys, args=args)


def set_if_current(redis: Any, job_id: str, token: int | None, key: str, value: str, ttl_s: int,
                   nx: bool = False) -> bool:  # fmt: skip
    """SET key (EX ttl, NX if asked) unless the run is stale; True if it was set. Without a token: a plain SET."""
    if token is None:
        return bool(redis.set(key, value, nx=nx, ex=int(ttl_s)))
    fence, arg = guard_args(job_id, token)
    done = run(redis, _SET, [key, fence], [value, int(ttl_s), "1" if nx else "0", arg])
    if done is None and is_stale(redis.get(fence), token):
        refused(job_id, token, f"SET {key}")
    return done is not None


def delete_if_current(redis: Any, job_id: str, token: int | None, key: str) -> bool:
    """DEL key unless the run is stale; True unless refused. Without a token: a plain DEL."""
    if token is None:
        redis.delete(key)
        return True
    fence, arg = guard_args(job_id, token)
    if run(redis, _DELETE, [key, fence], [arg]) is None:
        refused(job_id, token, f"DEL {key}")
        return False
    return True
