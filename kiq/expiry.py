"""A job's deadline to start: past it, no delivery runs the job; it ends EXPIRED instead.

The deadline is Redis-clock seconds (TIME), like every lease score (kiq/leases.py), never a host's clock: the
submit reads TIME in the pipeline that writes the job's record and sends the deadline in the message header
`kiq_expires_at`; each delivery reads TIME again before it starts the job. A foreign Celery client's job has no
such header: its deadline is stamped the first time a worker sees it (now + the job's `expires_in_s`, else
KIQ_JOB_EXPIRES_S), so a redelivery after that deadline does not run it either.
"""

from __future__ import annotations

from typing import Any

from kiq.names import expires_key
from kiq.transport import server_time

HEADER = "kiq_expires_at"

# KEYS: the job's stamped deadline. ARGV: seconds to add to now, the key's ttl. Returns {now, deadline}.
_STAMP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('SET', KEYS[1], string.format('%.6f', now + tonumber(ARGV[1])), 'NX', 'EX', ARGV[2])
return {string.format('%.6f', now), redis.call('GET', KEYS[1])}
"""


def expires_in(job_expires_in_s: int | None, default_s: int) -> int:
    return job_expires_in_s if job_expires_in_s is not None else default_s


def deadline_header(value: Any) -> float | None:
    """The header's deadline, or None where it is missing or malformed (then the job is stamped as foreign)."""
    try:
        deadline = float(value)
    except (TypeError, ValueError):
        return None
    return deadline if deadline > 0 else None


def lateness(redis: Any, job_id: str, header: Any, expires_in_s: int, ttl_s: int) -> float | None:
    """Seconds past the job's deadline to start by Redis's clock, or None while it may still start."""
    deadline = deadline_header(header)
    if deadline is not None:
        now = server_time(redis)
    else:
        raw_now, raw_deadline = redis.eval(_STAMP, 1, expires_key(job_id), expires_in_s, ttl_s)
        now, deadline = float(raw_now), float(raw_deadline)
    return now - deadline if now > deadline else None
