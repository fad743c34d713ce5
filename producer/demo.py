"""`kiq demo`: the seed's example job end to end on this machine.

Brings up what is missing (Redis, a local S3 server, one CPU worker on tiny models unless KIQ_PRIOR_MODEL and
KIQ_DECODER_MODEL name real ones), submits one text and two images weighted 0.3/0.3/0.4, shows progress,
saves the image and prints its s3:// URI. With --sweep: the same three conditions as a morph, saved as a GIF.
Everything it started is stopped on the way out.
"""

from __future__ import annotations

import base64
import os
import sys
import time
from pathlib import Path
from typing import Any

from kiq import s3
from kiq.settings import Settings
from producer import devstack
from producer.client import Client
from producer.progress import ProgressBar

EXAMPLES = Path(__file__).parent / "examples"
STATE_DIR = Path(".kiq")


def example_job(cat_uri: str, starry_uri: str, real_models: bool) -> dict[str, Any]:
    """The seed's job; on tiny CPU models a smaller size and fewer decoder steps keep it to seconds."""
    size, decoder_steps = (768, 100) if real_models else (128, 20)
    return {
        "inputs": [
            {"text": "a cat", "weight": 0.3},
            {"image": cat_uri, "weight": 0.3},
            {"image": starry_uri, "weight": 0.4},
        ],
        "height": size,
        "width": size,
        "prior_steps": 25,
        "decoder_steps": decoder_steps,
        "seed": 42,
    }


def sweep_job(job: dict[str, Any], real_models: bool) -> dict[str, Any]:
    """The same three conditions as a morph: "a cat" → the cat image → the starry image, as a looping GIF."""
    size, decoder_steps, frames = (768, 50, 24) if real_models else (64, 8, 12)
    inputs = [{**item, "weight": w} for item, w in zip(job["inputs"], (1.0, 0.0, 0.0), strict=True)]
    return {**job, "inputs": inputs, "height": size, "width": size, "decoder_steps": decoder_steps,
            "sweep": {"keyframes": [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], "frames": frames, "easing": "ease-in-out",
                      "mix": "slerp"},
            "animation": {"format": "gif", "fps": 8, "boomerang": True}}  # fmt: skip


def run_demo(out: str | None = None, sweep: bool = False) -> int:
    out = out or ("kiq-demo.gif" if sweep else "kiq-demo.png")
    env = demo_env(dict(os.environ))
    stack = devstack.Stack()
    try:
        settings = bring_up(stack, env)
        client = Client(settings)
        cat_uri = upload_example(settings, "cat.png")
        starry_uri = "data:image/jpeg;base64," + base64.b64encode((EXAMPLES / "starry.jpeg").read_bytes()).decode()
        job = example_job(cat_uri, starry_uri, real_models=_real_models(os.environ))
        if sweep:
            job = sweep_job(job, real_models=_real_models(os.environ))
        start = time.perf_counter()
        job_id = client.submit(job)
        print(f"submitted {job_id}", file=sys.stderr)
        return finish(client, settings, job_id, Path(out), start)
    finally:
        stack.close()


def demo_env(env: dict[str, str]) -> dict[str, str]:
    env.setdefault("KIQ_DEVICE_TARGET", "CPU")
    env.setdefault("AWS_ACCESS_KEY_ID", "kiq-demo")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "kiq-demo")
    return env


def bring_up(stack: devstack.Stack, env: dict[str, str]) -> Settings:
    logs = STATE_DIR / "logs"
    settings = Settings.from_env(env)
    devstack.ensure_redis(stack, settings.broker_url, logs)
    if not settings.s3_endpoint_url:
        env["KIQ_S3_ENDPOINT_URL"] = devstack.start_s3_server(stack, logs)
    if not _real_models(env):
        prior, decoder = devstack.make_tiny_models(STATE_DIR / "tiny-models", env)
        env["KIQ_PRIOR_MODEL"], env["KIQ_DECODER_MODEL"] = str(prior), str(decoder)
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    settings = Settings.from_env(env)
    devstack.ensure_bucket(settings.s3_endpoint_url, settings.s3_bucket, settings.s3_region)
    print(f"starting a {settings.device_target} worker on {settings.prior_model} …", file=sys.stderr)
    devstack.start_worker(stack, env, logs / "worker.log")
    return settings


def upload_example(settings: Settings, name: str) -> str:
    """Under the input prefix: the only place workers read s3:// references from by default."""
    content_type = "image/png" if name.endswith(".png") else "image/jpeg"
    key = f"{settings.s3_input_prefix}examples/{name}"
    return s3.put(s3.s3_client(settings), settings.s3_bucket, key, (EXAMPLES / name).read_bytes(), content_type)


def finish(client: Client, settings: Settings, job_id: str, out: Path, start: float) -> int:
    bar = ProgressBar()
    try:
        final = client.wait(job_id, timeout=1800, on_progress=bar)
    finally:
        bar.close()
    if final.result is None:
        print(final.model_dump_json(indent=2, exclude_none=True))
        return 1
    image = final.result.animation or final.result.images[0]
    bucket, key = s3.split_uri(image.uri)
    out.write_bytes(s3.s3_client(settings).get_object(Bucket=bucket, Key=key)["Body"].read())
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in final.result.timings.items())
    print(
        f"saved {out} ({image.width}x{image.height} {image.format}) in {time.perf_counter() - start:.1f} s: {timings}",
        file=sys.stderr,
    )
    print(image.uri)
    return 0


def _real_models(env: dict[str, str] | os._Environ[str]) -> bool:
    return bool(env.get("KIQ_PRIOR_MODEL") and env.get("KIQ_DECODER_MODEL"))
