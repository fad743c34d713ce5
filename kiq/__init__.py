"""kiq's shared contract: the job and status models, settings, names and errors.

Both the producer and the worker import this package; it imports no model framework (MindSpore, torch…).
"""

from kiq.contract import Job, JobInput, parse_job
from kiq.errors import (
    BlockedAddress,
    FetchError,
    FetchUnavailable,
    ImageTooLarge,
    InputError,
    InvalidEventId,
    JobError,
    JobInvalid,
    JobTimeout,
    JobTooLong,
    KiqError,
    NotAnImage,
    ObjectNotFound,
    PipelineError,
    PoisonJob,
    ReferenceNotAllowed,
    SettingsError,
    StorageError,
    StorageUnavailable,
    SubmitAbandoned,
    TransientError,
    UnknownJob,
    WaitTimeout,
)
from kiq.settings import Settings
from kiq.status import ErrorInfo, ImageRef, JobResult, JobStatus, Progress
from kiq.version import __version__

__all__ = [
    "BlockedAddress",
    "ErrorInfo",
    "FetchError",
    "FetchUnavailable",
    "ImageRef",
    "ImageTooLarge",
    "InputError",
    "InvalidEventId",
    "Job",
    "JobError",
    "JobInput",
    "JobInvalid",
    "JobResult",
    "JobStatus",
    "JobTimeout",
    "JobTooLong",
    "KiqError",
    "NotAnImage",
    "ObjectNotFound",
    "PipelineError",
    "PoisonJob",
    "Progress",
    "ReferenceNotAllowed",
    "Settings",
    "SettingsError",
    "StorageError",
    "StorageUnavailable",
    "SubmitAbandoned",
    "TransientError",
    "UnknownJob",
    "WaitTimeout",
    "__version__",
    "parse_job",
]
