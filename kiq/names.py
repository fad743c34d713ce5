"""Names both sides agree on: task names, Redis keys, custom states. No imports beyond the stdlib."""

import re

GENERATE_TASK = "kiq.generate"
WEBHOOK_TASK = "kiq.webhook"
WEBHOOK_QUEUE = "kiq.webhooks"
DEFAULT_QUEUE = "kiq"
QUEUE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

PROGRESS = "PROGRESS"
TERMINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
SUBMITS_KEY = "kiq:submits"  # a count of submits; with Sentinel its INCR is the write a submit's WAIT follows


def job_record_key(job_id: str) -> str:
    """Written at submit time so that `status` can tell an unknown id from a queued job."""
    return f"kiq:job:{job_id}"


def jobs_index_key(owner: str) -> str:
    """A tenant's jobs by submit time (a sorted set, scores in seconds), for `GET /v1/jobs`."""
    return f"kiq:jobs:{owner}"


def cancel_key(job_id: str) -> str:
    """Set by `cancel`; the worker checks it before the job and at every denoising step."""
    return f"kiq:cancel:{job_id}"


def fleet_key(worker: str) -> str:
    """A live worker process's heartbeat hash (device, current job, counters); expires when it stops."""
    return f"kiq:fleet:{worker}"


def idempotency_key(owner: str, key: str) -> str:
    return f"kiq:idem:{owner}:{key}"


def frames_key(job_id: str) -> str:
    """A sweep's frames uploaded so far (JSON list of ImageRef), so a cancelled or failed sweep still lists them."""
    return f"kiq:frames:{job_id}"
