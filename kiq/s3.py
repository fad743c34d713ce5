"""The boto3 S3 client both the worker and the producer side use (boto3 is imported only when called), and the
input fence: which s3:// objects a job may name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kiq.errors import StorageError, StorageUnavailable
from kiq.settings import Settings

_ODD_SEGMENTS = ("", ".", "..")


def s3_client(settings: Settings, timeout_s: float = 30.0, attempts: int = 2) -> Any:
    """A client whose every socket wait (connect: at most 3 s) ends within `timeout_s`, trying a call `attempts`
    times. botocore bounds each wait, not their sum: a caller with a deadline bounds that itself."""
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4", retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=min(3.0, timeout_s), read_timeout=timeout_s,
    )  # fmt: skip
    return boto3.client(
        "s3", endpoint_url=settings.s3_endpoint_url or None, region_name=settings.s3_region, config=config
    )


def presign(client: Any, bucket: str, key: str, ttl_s: int) -> str:
    return client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=ttl_s)


def put(client: Any, bucket: str, key: str, body: bytes, content_type: str,
        metadata: dict[str, str] | None = None) -> str:  # fmt: skip
    """put_object with kiq's errors: StorageUnavailable (unreachable, 5xx: retry later) or StorageError."""
    from botocore.exceptions import BotoCoreError, ClientError

    uri = f"s3://{bucket}/{key}"
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type, Metadata=metadata or {})
    except ClientError as exc:
        error = StorageUnavailable if server_side(exc) else StorageError
        raise error(f"could not write {uri}: {error_code(exc)}") from None
    except BotoCoreError as exc:  # refused, reset, timed out: S3 is not there right now
        raise StorageUnavailable(f"could not write {uri}: {exc}") from None
    return uri


def error_code(exc: Any) -> str:
    return str(
        exc.response.get("Error", {}).get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    )


def server_side(exc: Any) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status >= 500 or error_code(exc) in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout")


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// URI; the scheme in any case, as URL parsing (and so the worker) reads it."""
    bucket, _, key = (uri[5:] if uri[:5].lower() == "s3://" else uri).partition("/")
    return bucket, key


def within(uri: str, allowed: Iterable[tuple[str, str]]) -> bool:
    """True if the s3:// URI names an object under one of the (bucket, key prefix) pairs.

    Keys with empty, `.` or `..` segments are never inside: S3 keys are literal, but some S3-compatible
    servers normalise paths, and `inputs/a/../b/x` must not reach tenant b's prefix there."""
    bucket, key = split_uri(uri)
    if not bucket or not key or any(segment in _ODD_SEGMENTS for segment in key.split("/")):
        return False
    return any(bucket == b and key.startswith(prefix) for b, prefix in allowed)


def input_prefix(settings: Settings, owner: str, job_id: str) -> str:
    """Where a job's uploaded and inline images are stored: per tenant, then per job."""
    return f"{settings.s3_input_prefix}{owner or 'local'}/{job_id}/"
