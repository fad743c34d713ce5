"""Per-submitter quotas: submits per minute, jobs queued, jobs running, and the largest job.

Admission is one Lua script on the results Redis, atomic under any number of API replicas: it reads Redis's clock,
drops lapsed entries (kiq/quota_counts.py), checks each quota and, only if all pass, counts the submit and adds the
job to the tenant's queued set with a short pending score; `confirm` re-scores it to the job's deadline to start
once its message is sent, `release` removes it (and refunds the submit) when the submit fails half way. At a
queued or running cap the script first drops entries whose job has a final state, so a missed end cannot refuse
submits. Keys are per owner: a tenant's refusal names only its own counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kiq import quota_counts
from kiq.contract import Job
from kiq.errors import QuotaExceeded, SettingsError
from kiq.names import quota_keys
from kiq.settings import Settings

WINDOW_S = 60
BUSY_RETRY_S = 10  # Retry-After at a queued or running cap: a hint, as no one knows when a job will end
PENDING_S = 300  # an admitted submit's entry lapses after this unless confirmed (its process died half way)
FIELDS = ("submits_per_minute", "queued", "running", "job_mpx_steps")


@dataclass(frozen=True)
class Quotas:
    submits_per_minute: int = 0  # 0: no quota
    queued: int = 0
    running: int = 0
    job_mpx_steps: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Quotas:
        return cls(settings.quota_submits_per_minute, settings.quota_queued, settings.quota_running,
                   settings.quota_job_mpx_steps)  # fmt: skip

    @classmethod
    def from_entry(cls, entry: dict[str, Any], settings: Settings, name: str) -> Quotas:
        """A tenants-file entry's "quotas" object over the settings' defaults."""
        raw = entry.get("quotas", {})
        if not isinstance(raw, dict) or set(raw) - set(FIELDS):
            raise SettingsError(f"KIQ_API_TENANTS: {name}: 'quotas' must be an object with {', '.join(FIELDS)}")
        for key, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or not math.isfinite(value):
                raise SettingsError(f"KIQ_API_TENANTS: {name}: quotas.{key} must be a number >= 0 (0: none)")
            if key != "job_mpx_steps" and not isinstance(value, int):
                raise SettingsError(f"KIQ_API_TENANTS: {name}: quotas.{key} must be an integer")
        base = cls.from_settings(settings)
        return cls(**{f: raw.get(f, getattr(base, f)) for f in FIELDS})

    @property
    def counted(self) -> bool:
        return bool(self.submits_per_minute or self.queued or self.running)


NO_QUOTAS = Quotas()


def job_mpx_steps(job: Job) -> float:
    """The job's size as the quota counts it: megapixels x decoder steps x images x frames."""
    return job.height * job.width / 1e6 * job.decoder_steps * job.num_images * job.frames


def check_size(job: Job, quotas: Quotas) -> None:
    size = job_mpx_steps(job)
    if quotas.job_mpx_steps and size > quotas.job_mpx_steps:
        raise QuotaExceeded(
            f"job is {size:g} megapixel-steps (width x height / 1e6 x decoder_steps x num_images x frames), over "
            f"this submitter's largest-job quota of {quotas.job_mpx_steps:g}: use fewer steps, images or frames, or "
            "a smaller size",
            quota="job_size", limit=quotas.job_mpx_steps,
        )  # fmt: skip


# KEYS: queued, running, submits. ARGV: job id, per minute, max queued, max running, pending s, keys' ttl, the
# result key prefix, window s. Returns {0, window} admitted, or {1, quota, limit, retry after s}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local per_min, max_q, max_r = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local final = {SUCCESS = true, FAILURE = true, REVOKED = true}
local function count(key, cap)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local n = redis.call('ZCARD', key)
  if cap > 0 and n >= cap then
    for _, id in ipairs(redis.call('ZRANGE', key, 0, -1)) do
      local raw = redis.call('GET', ARGV[7] .. id)
      if raw then
        local ok, meta = pcall(cjson.decode, raw)
        if ok and type(meta) == 'table' and final[meta['status']] then redis.call('ZREM', key, id) end
      end
    end
    n = redis.call('ZCARD', key)
  end
  return n
end
-- lapsed entries go whichever quotas are set, so a set no cap reads cannot grow
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local window = tostring(math.floor(now / tonumber(ARGV[8])))
if redis.call('HGET', KEYS[3], 'w') ~= window then redis.call('HSET', KEYS[3], 'w', window, 'n', 0) end
local submits = tonumber(redis.call('HGET', KEYS[3], 'n'))
if per_min > 0 and submits >= per_min then
  return {1, 'submits_per_minute', per_min, math.ceil((tonumber(window) + 1) * tonumber(ARGV[8]) - now)}
end
if max_q > 0 and count(KEYS[1], max_q) >= max_q then return {1, 'queued', max_q, -1} end
if max_r > 0 and count(KEYS[2], max_r) >= max_r then return {1, 'running', max_r, -1} end
redis.call('HINCRBY', KEYS[3], 'n', 1)
redis.call('EXPIRE', KEYS[3], 2 * tonumber(ARGV[8]))
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return {0, window}
"""
# KEYS: queued, submits. ARGV: job id, the admitting window.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[2], 'w') == ARGV[2] and tonumber(redis.call('HGET', KEYS[2], 'n') or '0') > 0 then
  redis.call('HINCRBY', KEYS[2], 'n', -1)
end
return 1
"""
_WHAT = {"submits_per_minute": "submits per minute", "queued": "jobs queued", "running": "jobs running"}


class Admission:
    """One counted submit: its queued entry until the worker starts it (or `release`)."""

    def __init__(self, redis: Any, owner: str, job_id: str, window: str, ttl_s: int) -> None:
        self.redis, self.owner, self.job_id, self.window, self.ttl_s = redis, owner, job_id, window, ttl_s

    def confirm(self, deadline: float) -> None:
        """The message is sent: the entry lasts until the job's deadline to start (unless a worker took it)."""
        queued, _, _ = quota_keys(self.owner)
        self.redis.zadd(queued, {self.job_id: deadline}, xx=True)

    def release(self) -> None:
        queued, _, submits = quota_keys(self.owner)
        self.redis.eval(_RELEASE, 2, queued, submits, self.job_id, self.window)


def admit(redis: Any, settings: Settings, job: Job, owner: str, job_id: str, quotas: Quotas,
          result_prefix: str) -> Admission | None:  # fmt: skip
    """Raise QuotaExceeded, or count the submit: None where no quota counts (nothing to keep)."""
    check_size(job, quotas)
    if not quotas.counted:
        return None
    queued, running, submits = quota_keys(owner)
    ttl = settings.result_ttl_s
    args = (job_id, quotas.submits_per_minute, quotas.queued, quotas.running, PENDING_S, ttl, result_prefix, WINDOW_S)
    answer = redis.eval(_ADMIT, 3, queued, running, submits, *args)
    if int(answer[0]) == 0:
        return Admission(redis, owner, job_id, _text(answer[1]), ttl)
    quota, limit, retry = _text(answer[1]), int(answer[2]), int(answer[3])
    retry_after = retry if retry > 0 else BUSY_RETRY_S
    raise QuotaExceeded(
        f"over this submitter's quota of {limit} {_WHAT[quota]}: nothing was enqueued; retry in {retry_after} s",
        quota=quota, limit=limit, retry_after_s=retry_after, window_s=WINDOW_S if quota == "submits_per_minute" else 0,
    )  # fmt: skip


def rate_limit_headers(exc: QuotaExceeded) -> dict[str, str]:
    """Retry-After and the IETF RateLimit-Policy / RateLimit fields (draft-ietf-httpapi-ratelimit-headers:
    Structured Field Lists of Items, the policy's name a String; q quota, w window, qu unit; r remaining, t reset)."""
    if exc.retry_after_s is None:  # the size quota is no rate and no wait makes the job pass: none of them
        return {}
    name = f'"{exc.quota}"'
    window = f";w={exc.window_s}" if exc.window_s else ';qu="concurrent-requests"'
    return {
        "Retry-After": str(exc.retry_after_s),
        "RateLimit-Policy": f"{name};q={int(exc.limit)}{window}",
        "RateLimit": f"{name};r=0;t={exc.retry_after_s}",
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def forget(redis: Any, owner: str, job_id: str) -> None:
    """A queued job cancelled (or gone): it no longer counts."""
    quota_counts.ended(redis, owner, job_id)
