"""The boto3 S3 client both the worker and the HTTP API use (boto3 is imported only when called)."""

from __future__ import annotations

from typing import Any

from kiq.settings import Settings


def s3_client(settings: Settings) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4", retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3, read_timeout=30
    )
    return boto3.client(
        "s3", endpoint_url=settings.s3_endpoint_url or None, region_name=settings.s3_region, config=config
    )


def presign(client: Any, bucket: str, key: str, ttl_s: int) -> str:
    return client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=ttl_s)
