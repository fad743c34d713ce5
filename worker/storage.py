"""S3-compatible object storage (boto3), plus an in-memory fake with the same surface for unit tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from kiq.errors import (
    FetchError,
    FetchUnavailable,
    ImageTooLarge,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
)
from kiq.s3 import presign, s3_client
from kiq.settings import Settings


class Storage(Protocol):
    bucket: str

    def put(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> str: ...

    def presign(self, key: str) -> str: ...

    def read(self, bucket: str, key: str, max_bytes: int) -> bytes: ...


class S3Storage:
    def __init__(self, client: Any, bucket: str, presign_ttl_s: int) -> None:
        self.client, self.bucket, self.presign_ttl_s = client, bucket, presign_ttl_s

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        return cls(s3_client(settings), settings.s3_bucket, settings.presign_ttl_s)

    def put(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        uri = f"s3://{self.bucket}/{key}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, Metadata=metadata)
        except ClientError as exc:
            error = StorageUnavailable if _server_side(exc) else StorageError
            raise error(f"could not write {uri}: {_code(exc)}") from None
        except BotoCoreError as exc:  # refused, reset, timed out: S3 is not there right now
            raise StorageUnavailable(f"could not write {uri}: {exc}") from None
        return uri

    def presign(self, key: str) -> str:
        return presign(self.client, self.bucket, key, self.presign_ttl_s)

    def read(self, bucket: str, key: str, max_bytes: int) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        uri = f"s3://{bucket}/{key}"
        try:
            obj = self.client.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NoSuchBucket"):
                raise ObjectNotFound(f"{uri} does not exist ({_code(exc)})") from None
            error = FetchUnavailable if _server_side(exc) else FetchError
            raise error(f"could not read {uri}: {_code(exc)}") from None
        except BotoCoreError as exc:
            raise FetchUnavailable(f"could not read {uri}: {exc}") from None
        if obj.get("ContentLength", 0) > max_bytes:
            raise ImageTooLarge(f"{uri} is {obj['ContentLength']} bytes, over the {max_bytes}-byte cap")
        return obj["Body"].read(max_bytes + 1)


def _code(exc: Any) -> str:
    return str(
        exc.response.get("Error", {}).get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    )


def _server_side(exc: Any) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status >= 500 or _code(exc) in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout")


@dataclass
class MemoryStorage:
    """Dict-backed stand-in for unit tests: same errors, no network."""

    bucket: str = "kiq"
    objects: dict[tuple[str, str], tuple[bytes, str, dict[str, str]]] = field(default_factory=dict)

    def put(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> str:
        self.objects[(self.bucket, key)] = (body, content_type, dict(metadata))
        return f"s3://{self.bucket}/{key}"

    def presign(self, key: str) -> str:
        return f"memory://{self.bucket}/{key}"

    def read(self, bucket: str, key: str, max_bytes: int) -> bytes:
        if (bucket, key) not in self.objects:
            raise ObjectNotFound(f"s3://{bucket}/{key} does not exist (NoSuchKey)")
        body = self.objects[(bucket, key)][0]
        if len(body) > max_bytes:
            raise ImageTooLarge(f"s3://{bucket}/{key} is {len(body)} bytes, over the {max_bytes}-byte cap")
        return body
