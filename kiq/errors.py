"""kiq's exceptions. Every error a job can end with is a `JobError`; its class name is the
status JSON's `error.type`.

    KiqError
    ├── SettingsError          a KIQ_* variable is missing or malformed (raised at start)
    ├── JobInvalid             the job breaks the contract (raised at submit; in the worker for raw messages)
    ├── UnknownJob             no job with that id was ever submitted (or its record expired)
    ├── WaitTimeout            `wait` gave up before the job ended
    └── JobError               a job ended in FAILURE
        ├── InputError         an image reference cannot be used (permanent: retrying will not help)
        │   ├── FetchError     the URL or object could not be read (refused, timeout, HTTP status)
        │   ├── ObjectNotFound the s3:// key does not exist
        │   ├── NotAnImage     the bytes do not decode as an image
        │   └── ImageTooLarge  over the byte or pixel cap
        ├── StorageError       the result could not be written to S3
        └── PipelineError      the model itself failed
"""

from __future__ import annotations


class KiqError(Exception):
    """Base of every kiq error."""


class SettingsError(KiqError):
    pass


class JobInvalid(KiqError, ValueError):
    pass


class UnknownJob(KiqError, LookupError):
    pass


class WaitTimeout(KiqError, TimeoutError):
    pass


class JobError(KiqError):
    pass


class InputError(JobError):
    pass


class FetchError(InputError):
    pass


class ObjectNotFound(InputError):
    pass


class NotAnImage(InputError):
    pass


class ImageTooLarge(InputError):
    pass


class StorageError(JobError):
    pass


class PipelineError(JobError):
    pass
