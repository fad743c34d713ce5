"""S3-compatible object storage (boto3), plus an in-memory fake with the same surface for unit tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from kiq.errors import FetchError, ImageTooLarge, ObjectNotFound, StorageError
from kiq.settings import Settings


class Storage(Protocol):
    bucket: str

    def put(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> str: ...

    def presign(self, key: str) -> str: ...

    def read(self, bucket: str, key: str, max_bytes: int) -> bytes: ...


def s3_client(settings: Settings) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4", retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30
    )
    return boto3.client(
        "s3", endpoint_url=settings.s3_endpoint_url or None, region_name=settings.s3_region, config=config
    )


class S3Storage:
    def __init__(self, client: Any, bucket: str, presign_ttl_s: int) -> None:
        self.client, self.bucket, self.presign_ttl_s = client, bucket, presign_ttl_s

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        return cls(s3_client(settings), settings.s3_bucket, settings.presign_ttl_s)

    def put(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, Metadata=metadata)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not write s3://{self.bucket}/{key}: {exc}") from None
        return f"s3://{self.bucket}/{key}"

    def presign(self, key: str) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.presign_ttl_s
        )

    def read(self, bucket: str, key: str, max_bytes: int) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        uri = f"s3://{bucket}/{key}"
        try:
            obj = self.client.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NoSuchBucket"):
                raise ObjectNotFound(f"{uri} does not exist ({code})") from None
            raise FetchError(f"could not read {uri}: {code or exc}") from None
        except BotoCoreError as exc:
            raise FetchError(f"could not read {uri}: {exc}") from None
        if obj.get("ContentLength", 0) > max_bytes:
            raise ImageTooLarge(f"{uri} is {obj['ContentLength']} bytes, over the {max_bytes}-byte cap")
        return obj["Body"].read(max_bytes + 1)


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
