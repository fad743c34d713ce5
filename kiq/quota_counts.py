"""A tenant's jobs queued and running, as the quotas count them (producer/quotas.py refuses submits by them).

Each count is a sorted set of job ids scored by when the entry lapses (Redis clock), so that no way a job can end
leaks a count for long: a queued entry lapses at the job's deadline to start (an expired job never runs), a
running one at its hard time limit plus the visibility timeout (a killed worker's job comes back and is counted
again as it restarts). Every end a worker survives removes the job from both (`ended`); `cancel` of a queued job
does the same; a submit that failed half way removes its own entry. Only jobs whose submit was counted (the
`kiq_counted` header) are touched by workers.
"""

from __future__ import annotations

from typing import Any

from kiq.names import quota_keys

HEADER = "kiq_counted"

# KEYS: queued, running. ARGV: job id, seconds the running entry lasts, the keys' ttl.
_STARTED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""


def started(redis: Any, owner: str, job_id: str, lasts_s: float, ttl_s: int) -> None:
    queued, running, _ = quota_keys(owner)
    redis.eval(_STARTED, 2, queued, running, job_id, lasts_s, ttl_s)


def ended(redis: Any, owner: str, job_id: str) -> None:
    queued, running, _ = quota_keys(owner)
    with redis.pipeline() as pipe:  # MULTI: both or neither
        pipe.zrem(queued, job_id).zrem(running, job_id).execute()
