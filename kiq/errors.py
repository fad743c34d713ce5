"""kiq's exceptions. Every error a job can end with is a `JobError`; its class name is the
status JSON's `error.type`.

    KiqError
    ├── SettingsError          a KIQ_* variable is missing or malformed (raised at start)
    ├── JobInvalid             the job breaks the contract (raised at submit; in the worker for raw messages)
    │   └── JobTooLong         no live worker of its queue could finish it within KIQ_TIME_LIMIT_MAX_S (at submit)
    ├── UnknownJob             no job with that id was ever submitted (or its record expired)
    ├── WaitTimeout            `wait` gave up before the job ended
    ├── InvalidEventId         a resume id (Last-Event-ID) that is not a stream id Redis accepts
    ├── SubmitAbandoned        a submit gave up before enqueueing anything (its Idempotency-Key's claim lapsed)
    ├── SubmitNotReplicated    the job is on the Redis master but not yet on KIQ_SUBMIT_REPLICAS replicas (HTTP 503)
    ├── QuotaExceeded          a submit over one of its tenant's quotas (HTTP 429): nothing was enqueued
    ├── OutputsDeleted         the job's outputs were deleted (HTTP 410): its status and images are gone
    ├── JobNotFinished         outputs of a job still queued or running cannot be deleted (HTTP 409)
    └── JobError               a job ended in FAILURE
        ├── InputError         an image reference cannot be used
        │   ├── FetchError     the URL could not be read (4xx, DNS failure, too many redirects)
        │   │   └── FetchUnavailable   timeouts, refused connections, 5xx: retried, then this   [transient]
        │   ├── BlockedAddress the URL resolves to a loopback, private, link-local or metadata address
        │   ├── ReferenceNotAllowed   the s3:// object is outside what this worker may read (KIQ_S3_READ_ALLOW)
        │   ├── ObjectNotFound the s3:// key or bucket does not exist, or the worker may not read it
        │   ├── NotAnImage     the bytes do not decode as an image
        │   └── ImageTooLarge  over the byte or pixel cap
        ├── StorageError       the result could not be written to S3
        │   └── StorageUnavailable S3 unreachable or 5xx past the retry bound            [transient]
        ├── JobTimeout         the job ran past its time limit (derived from its size and steps)
        ├── PoisonJob          the job killed its worker KIQ_MAX_DELIVERIES times; not run again
        ├── JobExpired         no delivery began before the job's deadline to start: state EXPIRED, never ran
        └── PipelineError      the model itself failed

Errors marked [transient] are retried with exponential backoff and jitter before the job fails with them;
every other JobError is permanent and fails the job at once. `TransientError` marks the former.
"""

from __future__ import annotations


class KiqError(Exception):
    """Base of every kiq error."""


class SettingsError(KiqError):
    pass


class JobInvalid(KiqError, ValueError):
    pass


class JobTooLong(JobInvalid):
    """Refused at submit: the job's expected time on the fastest live worker of its queue (by the speeds the
    workers publish; the reference speed KIQ_PRIOR_STEP_S/KIQ_DECODER_STEP_S with none live) is over the cap."""

    def __init__(self, message: str, expected_s: float = 0.0, limit_s: float = 0.0, queue: str = "",
                 workers: int = 0) -> None:  # fmt: skip
        super().__init__(message)
        self.expected_s, self.limit_s, self.queue, self.workers = expected_s, limit_s, queue, workers


class UnknownJob(KiqError, LookupError):
    pass


class WaitTimeout(KiqError, TimeoutError):
    pass


class InvalidEventId(KiqError, ValueError):
    pass


class SubmitAbandoned(KiqError):
    """The submit outlived its Idempotency-Key's pending mark: nothing was enqueued; retry with the same key."""


class SubmitNotReplicated(KiqError):
    """The job `job_id` is on the Redis master but not confirmed on KIQ_SUBMIT_REPLICAS replicas: a failover now
    could lose it, so it may or may not exist. Retry with the same Idempotency-Key: one job results (the windows
    left are in docs/reliability.md, "Submit is all or nothing")."""

    def __init__(self, message: str, job_id: str = "") -> None:
        super().__init__(message)
        self.job_id = job_id


class AdminOnly(KiqError, PermissionError):
    """An admin action (purge, drain) asked for with a key without the admin scope."""


class NotConfirmed(KiqError, ValueError):
    """A purge whose typed confirmation does not repeat the queue's name."""


class UnknownTenant(KiqError, LookupError):
    """A purge naming a tenant that is neither in the tenants file nor an owner id."""


class UnknownWorker(KiqError, LookupError):
    """A drain naming no live worker."""


class QuotaExceeded(KiqError):
    """Refused at submit: `quota` (submits_per_minute, queued, running or job_size) is at its `limit`; nothing was
    enqueued. `retry_after_s` is when a retry may pass (None: never, for a job over the size quota)."""

    def __init__(self, message: str, quota: str = "", limit: float = 0, retry_after_s: int | None = None,
                 window_s: int = 0) -> None:  # fmt: skip
        super().__init__(message)
        self.quota, self.limit, self.retry_after_s, self.window_s = quota, limit, retry_after_s, window_s


class OutputsDeleted(KiqError, LookupError):
    """The job's outputs and inputs were deleted (`DELETE /v1/jobs/{id}/outputs`, `kiq delete`, `kiq gc`)."""


class JobNotFinished(KiqError):
    """Deleting the outputs of a job that is still queued or running: cancel it first."""


class JobError(KiqError):
    pass


class TransientError(Exception):
    """Mixin: the cause may go away by itself (network, 5xx); worth retrying."""


class InputError(JobError):
    pass


class FetchError(InputError):
    pass


class FetchUnavailable(FetchError, TransientError):
    pass


class BlockedAddress(InputError):
    pass


class ReferenceNotAllowed(InputError):
    pass


class ObjectNotFound(InputError):
    pass


class NotAnImage(InputError):
    pass


class ImageTooLarge(InputError):
    pass


class StorageError(JobError):
    pass


class StorageUnavailable(StorageError, TransientError):
    pass


class JobTimeout(JobError):
    pass


class PoisonJob(JobError):
    pass


class JobExpired(JobError):
    """Stored with Celery's REVOKED state (plain Celery clients see a revoked task); kiq reads it as EXPIRED."""


class PipelineError(JobError):
    pass
