"""S3-compatible object storage (boto3), plus an in-memory fake with the same surface for unit tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from kiq import s3
from kiq.errors import FetchError, FetchUnavailable, ImageTooLarge, ObjectNotFound, ReferenceNotAllowed
from kiq.settings import Settings

T = TypeVar("T")
# S3 answers for objects a worker may not read: told apart from a missing key, they would answer whether it exists.
_NOT_READABLE = ("NoSuchKey", "404", "NoSuchBucket", "AccessDenied", "403", "AllAccessDisabled")


class Storage(Protocol):
    bucket: str

    def put(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> str: ...

    def presign(self, key: str) -> str: ...

    def read(self, bucket: str, key: str, max_bytes: int, timeout_s: float | None = None) -> bytes: ...


class S3Storage:
    def __init__(self, client: Any, bucket: str, presign_ttl_s: int,
                 readable: tuple[tuple[str, str], ...] | None = None, reader: Any = None) -> None:  # fmt: skip
        self.client, self.bucket, self.presign_ttl_s = client, bucket, presign_ttl_s
        self.readable = readable if readable is not None else ((bucket, "inputs/"),)
        self.reader = reader or client  # input reads: socket waits within the fetch timeout, retried by the Fetcher

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        reader = s3.s3_client(settings, timeout_s=settings.fetch_timeout_s, attempts=1)
        return cls(s3.s3_client(settings), settings.s3_bucket, settings.presign_ttl_s,
                   tuple(settings.s3_read_prefixes), reader)  # fmt: skip

    def put(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> str:
        return s3.put(self.client, self.bucket, key, body, content_type, metadata)

    def presign(self, key: str) -> str:
        return s3.presign(self.client, self.bucket, key, self.presign_ttl_s)

    def read(self, bucket: str, key: str, max_bytes: int, timeout_s: float | None = None) -> bytes:
        """The object's bytes; with `timeout_s`, given up (FetchUnavailable) once that has passed, as an HTTP
        fetch is: botocore bounds each socket wait, this bounds the whole read."""
        uri = f"s3://{bucket}/{key}"
        check_readable(uri, self.readable)
        if timeout_s is None:
            return self._read(uri, bucket, key, max_bytes)
        return _within(timeout_s, lambda: self._read(uri, bucket, key, max_bytes), f"reading {uri}")

    def _read(self, uri: str, bucket: str, key: str, max_bytes: int) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            obj = self.reader.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if s3.error_code(exc) in _NOT_READABLE:
                raise ObjectNotFound(f"{uri} does not exist or is not readable") from None
            error = FetchUnavailable if s3.server_side(exc) else FetchError
            raise error(f"could not read {uri}: {s3.error_code(exc)}") from None
        except BotoCoreError as exc:
            raise FetchUnavailable(f"could not read {uri}: {exc}") from None
        if obj.get("ContentLength", 0) > max_bytes:
            raise ImageTooLarge(f"{uri} is over the {max_bytes}-byte cap")
        try:
            return obj["Body"].read(max_bytes + 1)
        except BotoCoreError as exc:  # a read timeout mid-body
            raise FetchUnavailable(f"could not read {uri}: {exc}") from None


def _within(limit_s: float, call: Callable[[], T], what: str) -> T:
    """`call()`'s outcome if it ends within `limit_s`, else FetchUnavailable. The call goes on in its daemon
    thread until its own socket timeout ends it (the reader's, at most the fetch timeout per wait)."""
    done, outcome = threading.Event(), []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=run, name="kiq-s3-read", daemon=True).start()
    if not done.wait(max(0.0, limit_s)):
        raise FetchUnavailable(f"{what} took longer than the {round(limit_s, 2):g} s time limit")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def check_readable(uri: str, readable: tuple[tuple[str, str], ...]) -> None:
    """The input fence, before any S3 call: the answer is the same whether or not the object exists."""
    if not s3.within(uri, readable):
        allowed = ", ".join(f"s3://{b}/{p}" for b, p in readable)
        raise ReferenceNotAllowed(f"{uri} is outside what this worker may read ({allowed}; KIQ_S3_READ_ALLOW)")


@dataclass
class MemoryStorage:
    """Dict-backed stand-in for unit tests: same errors, no network."""

    bucket: str = "kiq"
    objects: dict[tuple[str, str], tuple[bytes, str, dict[str, str]]] = field(default_factory=dict)
    readable: tuple[tuple[str, str], ...] = (("kiq", "inputs/"),)

    def put(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> str:
        self.objects[(self.bucket, key)] = (body, content_type, dict(metadata))
        return f"s3://{self.bucket}/{key}"

    def presign(self, key: str) -> str:
        return f"memory://{self.bucket}/{key}"

    def read(self, bucket: str, key: str, max_bytes: int, timeout_s: float | None = None) -> bytes:
        check_readable(f"s3://{bucket}/{key}", self.readable)
        if (bucket, key) not in self.objects:
            raise ObjectNotFound(f"s3://{bucket}/{key} does not exist or is not readable")
        body = self.objects[(bucket, key)][0]
        if len(body) > max_bytes:
            raise ImageTooLarge(f"s3://{bucket}/{key} is over the {max_bytes}-byte cap")
        return body
