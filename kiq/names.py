"""Names both sides agree on: task names, Redis keys, custom states. No imports beyond the stdlib."""

import re

GENERATE_TASK = "kiq.generate"
WEBHOOK_TASK = "kiq.webhook"
WEBHOOK_QUEUE = "kiq.webhooks"
DEFAULT_QUEUE = "kiq"
QUEUE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

PROGRESS = "PROGRESS"
# Celery's final states. kiq's own EXPIRED is stored as REVOKED with a JobExpired (plain Celery clients, Flower
# and `celery inspect` see a revoked task), so these stay Celery's; KIQ_FINAL_STATES is what kiq reports.
TERMINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
EXPIRED = "EXPIRED"
KIQ_FINAL_STATES = frozenset({*TERMINAL_STATES, EXPIRED})
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


FLEET_INDEX = "kiq:fleet"  # sorted set of live heartbeat keys (score: last beat); readers prune expired ones


def fleet_key(worker: str) -> str:
    """A live worker process's heartbeat hash (device, current job, counters); expires when it stops."""
    return f"kiq:fleet:{worker}"


def idempotency_key(owner: str, key: str) -> str:
    return f"kiq:idem:{owner}:{key}"


def frames_key(job_id: str) -> str:
    """A sweep's frames uploaded so far (JSON list of ImageRef), so a cancelled or failed sweep still lists them."""
    return f"kiq:frames:{job_id}"


def fence_key(job_id: str) -> str:
    """The job's fencing token: each delivery INCRs it as it begins, and its writes need the count not past its own."""
    return f"kiq:fence:{job_id}"


# The visibility timeouts workers use (a sorted set: the repr of a float, in seconds, scored by when last seen).
VISIBILITY_TIMEOUTS_KEY = "kiq:visibility_timeouts"


def unacked_keys(visibility_timeout_s: float) -> dict[str, str]:
    """kombu's unacked hash, its index and the sweep's mutex (transport options), one set per visibility timeout.

    Each consumer hands back every message in the index older than its own timeout, so a worker with a 6 s
    timeout sharing the index would take the live jobs of 60 s workers, whose leases are renewed every 10 s."""
    tag = f"{visibility_timeout_s:g}s"
    return {
        "unacked_key": f"kiq:unacked:{tag}",
        "unacked_index_key": f"kiq:unacked_index:{tag}",
        "unacked_mutex_key": f"kiq:unacked_mutex:{tag}",
    }


def deliveries_key(job_id: str) -> str:
    """Deliveries of the job that started and never finished (a hash: solo, batched); cleared at every finish."""
    return f"kiq:deliveries:{job_id}"


def webhook_queued_key(job_id: str) -> str:
    """Set once the job's one webhook is queued, so a redelivered job does not queue it again."""
    return f"kiq:webhook:{job_id}"


def events_key(job_id: str) -> str:
    """The job's event stream (one entry per state write)."""
    return f"kiq:events:{job_id}"


def events_channel(job_id: str) -> str:
    """Where each event is published as "<stream id> <meta JSON>"."""
    return f"kiq:events:{job_id}:live"


# Fair share (kiq/fairshare.py): each tenant's jobs wait in a queue of their own beside the routed one.
TENANT_QUEUE_MARK = ".t."


def tenant_queue(base: str, owner: str) -> str:
    """The queue a tenant's jobs of the routed queue `base` wait in: `<base>.t.<owner>`."""
    return f"{base}{TENANT_QUEUE_MARK}{owner}"


def tenant_queues_key(base: str) -> str:
    """The tenant queues of `base` (a hash: queue -> weight), written at submit, read by the workers of `base`."""
    return f"kiq:tenant_queues:{base}"


def tenant_queues_version_key(base: str) -> str:
    """Changed (INCR) with every new entry or weight in `tenant_queues_key(base)`: workers re-read the hash then."""
    return f"kiq:tenant_queues:{base}:version"


def drain_key(hostname: str) -> str:
    """Set by `kiq fleet drain`: the workers named `hostname` stop taking jobs, finish the current one and exit."""
    return f"kiq:drain:{hostname}"


def expires_key(job_id: str) -> str:
    """A foreign client's job's deadline to start (Redis-clock seconds), stamped when a worker first sees it."""
    return f"kiq:expires:{job_id}"


def deleted_key(job_id: str) -> str:
    """The tombstone of a job whose outputs were deleted: its status and outputs then answer 410 Gone."""
    return f"kiq:deleted:{job_id}"


def doorbell_key(queue: str) -> str:
    """A queue's doorbell (a short list): the producer pushes a token after each publish to `queue`, and an idle
    worker of the queue waits on it (kiq/claim.py) instead of polling."""
    return f"kiq:doorbell:{queue}"


def quota_keys(owner: str) -> tuple[str, str, str]:
    """A tenant's jobs queued and running (sorted sets scored by when the entry lapses, Redis clock) and its
    submits in the current minute (a hash: window, count)."""
    return f"kiq:quota:{owner}:queued", f"kiq:quota:{owner}:running", f"kiq:quota:{owner}:submits"
