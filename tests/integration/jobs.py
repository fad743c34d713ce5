"""Job builders for the integration tests: tiny sizes and few steps keep each job to about a second."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from tests.helpers import data_uri, image_bytes


def tiny_job(*inputs: dict[str, Any], **settings: Any) -> dict[str, Any]:
    job = {
        "inputs": list(inputs) or [{"text": "a cat", "weight": 1.0}],
        "height": 64,
        "width": 64,
        "prior_steps": 3,
        "decoder_steps": 4,
        "seed": 7,
    }
    return {**job, **settings}


def image_input(weight: float = 0.5, color=(200, 120, 40)) -> dict[str, Any]:
    return {"image": data_uri(image_bytes(size=(48, 40), color=color)), "weight": weight}


def read_object(s3, uri: str) -> tuple[Image.Image, dict[str, str]]:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    obj = s3.get_object(Bucket=bucket, Key=key)
    image = Image.open(io.BytesIO(obj["Body"].read()))
    image.load()
    return image, obj["Metadata"]


def steps_lasting(client, seconds):
    """Decoder steps that take about `seconds` here: CPU speed varies several-fold between machines and days."""
    probe = client.wait(client.submit(tiny_job(decoder_steps=10, seed=5)), timeout=300)
    return min(500, max(20, int(seconds / (probe.result.timings["decoder"] / 10))))
