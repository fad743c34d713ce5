"""What the benchmarks share: bring up Redis (if none answers), a moto S3 server and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

from producer import devstack


def bring_up(stack: devstack.Stack, scratch: Path, redis_url: str, bucket: str) -> dict[str, str]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    devstack.ensure_redis(stack, redis_url, scratch)
    endpoint = devstack.start_s3_server(stack, scratch)
    prior, decoder = devstack.make_tiny_models(scratch / "models")
    devstack.ensure_bucket(endpoint, bucket, "us-east-1")
    return {
        **os.environ, "KIQ_BROKER_URL": redis_url, "KIQ_S3_ENDPOINT_URL": endpoint, "KIQ_S3_BUCKET": bucket,
        "KIQ_PRIOR_MODEL": str(prior), "KIQ_DECODER_MODEL": str(decoder), "KIQ_DEVICE_TARGET": "CPU",
    }  # fmt: skip
