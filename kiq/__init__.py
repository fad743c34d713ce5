"""kiq's shared contract: the job and status models, settings, names and errors.

Both the producer and the worker import this package; it imports no model framework (MindSpore, torch…).
"""

from kiq.contract import Job, JobInput, parse_job
from kiq.errors import (
    FetchError,
    ImageTooLarge,
    InputError,
    JobError,
    JobInvalid,
    KiqError,
    NotAnImage,
    ObjectNotFound,
    PipelineError,
    ReferenceNotAllowed,
    SettingsError,
    StorageError,
    UnknownJob,
    WaitTimeout,
)
from kiq.settings import Settings
from kiq.status import ErrorInfo, ImageRef, JobResult, JobStatus, Progress

__all__ = [
    "ErrorInfo",
    "FetchError",
    "ImageRef",
    "ImageTooLarge",
    "InputError",
    "Job",
    "JobError",
    "JobInput",
    "JobInvalid",
    "JobResult",
    "JobStatus",
    "KiqError",
    "NotAnImage",
    "ObjectNotFound",
    "PipelineError",
    "Progress",
    "ReferenceNotAllowed",
    "Settings",
    "SettingsError",
    "StorageError",
    "UnknownJob",
    "WaitTimeout",
    "parse_job",
]
