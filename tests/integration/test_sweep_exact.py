"""A sweep's frames are the plain jobs with the frames' weights: the real tiny pipelines of both backends in
process (no services), the Runner with in-memory storage. Texts and images mixed; first, middle and last frames.

Linear mix: frame k is compared with the plain job whose weights are the frame's keyframe blend. Slerp: a slerp of
two weighted sums of the inputs' embeddings is again a weighted sum, so the worker reports each frame's effective
weights (`result.frame_weights`) and frame k is compared with the plain job with those weights; the middle frame's
weights must differ from the linear blend (slerp is not a no-op) while the first and last are the keyframes."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from kiq.contract import parse_job
from kiq.settings import Settings
from tests.helpers import data_uri
from worker.device import DeviceConfig
from worker.pipelines import base
from worker.runner import JobCancelled, JobContext, Runner
from worker.storage import MemoryStorage
from worker.sweep import run_job

pytest.importorskip("torch")

FRAMES = 5  # keyframes at frames 0, 2 and 4; frames 0, 1 (between two keyframes) and 4 are checked


def noise_png(seed: int, size=(48, 40)) -> bytes:
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


SWEEP = {
    "inputs": [{"text": "a cat", "weight": 1.0}, {"image": data_uri(noise_png(1)), "weight": 0.0},
               {"image": data_uri(noise_png(2)), "weight": 0.0}],
    "height": 64, "width": 64, "prior_steps": 2, "decoder_steps": 2, "seed": 7,
    "sweep": {"keyframes": [[0.2, 0.8, 0.0], [0.0, 0.3, 0.7]], "frames": FRAMES},
}  # fmt: skip


@pytest.fixture(scope="module", params=["mindone", "diffusers"])
def runner(request, tiny_models):
    prior, decoder = map(str, tiny_models)
    settings = Settings(device_target="CPU", backend=request.param, prior_model=prior, decoder_model=decoder,
                        decoder_batch=2, s3_bucket="out", s3_prefix="jobs/")  # fmt: skip
    pipelines = base.load(settings, DeviceConfig.from_settings(settings))
    return Runner(settings, storage=MemoryStorage(bucket="out"), pipelines=pipelines)


def context(job_id, events, cancel_at=None):
    def cancelled():
        return cancel_at is not None and sum(e.stage == "decoder" for e in events) >= cancel_at

    return JobContext(job_id=job_id, report=events.append, cancelled=cancelled)


def picture(runner, uri) -> np.ndarray:
    body = runner.storage.objects[("out", uri.removeprefix("s3://out/"))][0]
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.float64)


def assert_same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.std() > 1, f"{what}: a constant image"
    worst = np.abs(a - b).max()
    mse = ((a - b) ** 2).mean()
    psnr = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
    print(f"\n{what}: max |Δ| {worst:.0f}/255, PSNR {psnr:.1f} dB")
    assert worst <= 2, f"{what}: max |Δ| {worst}/255"


def plain_frame(runner, weights, job_id) -> np.ndarray:
    job = {k: v for k, v in SWEEP.items() if k != "sweep"}
    job["inputs"] = [{**item, "weight": w} for item, w in zip(SWEEP["inputs"], weights, strict=True)]
    result = runner.run(parse_job(job), context(job_id, []))
    return picture(runner, result.images[0].uri)


@pytest.mark.parametrize("mix", ["linear", "slerp"])
def test_each_frame_is_the_plain_job_with_its_weights(runner, mix):
    if mix == "slerp" and runner.settings.backend == "diffusers":
        pytest.skip("slerp's weights are computed above the backend; mindone's run covers them (time budget)")
    """Linear: frames 0, 1 and 4 (and the animation); slerp: frame 1, the in-between one (frames 0 and 4 are
    keyframes, where slerp's weights are the keyframes' exactly, as asserted)."""
    animation = {"format": "gif", "fps": 10, "boomerang": True}
    job = parse_job({**SWEEP, "sweep": {**SWEEP["sweep"], "mix": mix}, "animation": animation})
    events = []
    result = run_job(runner, job, context(f"sweep-{mix}", events))
    assert [i.uri for i in result.images] == [f"s3://out/jobs/sweep-{mix}/{k}.png" for k in range(FRAMES)]
    weights = result.frame_weights
    assert [weights[k] for k in (0, 2, 4)] == [[1.0, 0.0, 0.0], [0.2, 0.8, 0.0], [0.0, 0.3, 0.7]]  # keyframes exactly
    linear = job.frame_weights()
    if mix == "linear":
        assert weights == linear
    else:
        assert not np.allclose(weights[1], linear[1], atol=1e-4), "slerp gave the linear blend"
    for k in (0, 1, FRAMES - 1) if mix == "linear" else (1,):
        assert_same(picture(runner, result.images[k].uri), plain_frame(runner, weights[k], f"plain-{mix}-{k}"),
                    f"{runner.settings.backend} {mix} frame {k}")  # fmt: skip
    frames = [picture(runner, ref.uri) for ref in result.images]
    assert np.abs(frames[0] - frames[-1]).max() > 10, "the sweep does not morph"
    # Progress: decoder steps counted across the 3 batches (2, 2 and 1 frames), the frames listed as they land.
    decoder = [e for e in events if e.stage == "decoder"]
    assert [(e.step, e.total) for e in decoder] == [(s, 6) for s in range(1, 7)]
    assert [len(e.frames or []) for e in decoder] == [0, 0, 2, 2, 4, 4]
    assert len(events[-1].frames) == FRAMES  # the animation's upload step
    metadata = runner.storage.objects[("out", f"jobs/sweep-{mix}/3.png")][2]
    assert metadata["kiq-frame"] == "3" and json.loads(metadata["kiq-settings"])["seed"] == 7
    assert_animation(runner, result, mix)


def assert_animation(runner, result, mix):
    assert result.animation is not None and result.animation.uri == f"s3://out/jobs/sweep-{mix}/animation.gif"
    body, content_type, _ = runner.storage.objects[("out", f"jobs/sweep-{mix}/animation.gif")]
    gif = Image.open(io.BytesIO(body))
    assert content_type == "image/gif" and gif.n_frames == 2 * FRAMES - 2 and gif.info["loop"] == 0  # boomerang
    assert gif.info["duration"] == 100
    assert "animation" in result.timings


def test_a_cancelled_sweep_stops_and_keeps_its_uploaded_frames(runner):
    """Cancel at the first step of the second batch: the first batch's 2 frames are uploaded and listed."""
    events, recorded = [], []
    ctx = context("sweep-cancel", events, cancel_at=2)
    ctx = JobContext(job_id=ctx.job_id, report=ctx.report, cancelled=ctx.cancelled, record_frames=recorded.append)
    with pytest.raises(JobCancelled):
        run_job(runner, parse_job({**SWEEP, "animation": {"format": "gif"}}), ctx)
    keys = sorted(k for b, k in runner.storage.objects if k.startswith("jobs/sweep-cancel/"))
    assert keys == ["jobs/sweep-cancel/0.png", "jobs/sweep-cancel/1.png"]
    assert [len(r) for r in recorded] == [1, 2] and [f.uri for f in ctx.frames] == [
        "s3://out/jobs/sweep-cancel/0.png", "s3://out/jobs/sweep-cancel/1.png"]  # fmt: skip
