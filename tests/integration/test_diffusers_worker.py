"""The diffusers backend end to end: a `kiq worker` with KIQ_BACKEND=diffusers (torch on the CPU) takes jobs from
Redis and writes to S3 the pictures the session's mindone worker draws for the same jobs, alone and batched."""

import math
import uuid

import numpy as np

from tests.helpers import client_for, data_uri, image_bytes
from tests.integration.jobs import image_input, read_object, tiny_job


def jobs(settings, s3):
    cat = image_bytes(size=(60, 50), color=(230, 140, 50))
    s3.put_object(Bucket=settings.s3_bucket, Key="inputs/parity-cat.png", Body=cat)
    starry = data_uri(image_bytes("JPEG", (80, 60), (30, 60, 160)), "image/jpeg")
    seeds_mix = tiny_job(
        {"text": "a cat", "weight": 0.3},
        {"image": f"s3://{settings.s3_bucket}/inputs/parity-cat.png", "weight": 0.3},
        {"image": starry, "weight": 0.4},
        width=128, prior_steps=5, decoder_steps=5, seed=1234,
    )  # fmt: skip
    two_images = tiny_job({"text": "a dog", "weight": 0.5}, image_input(0.5), num_images=2,
                          negative_prompt="blurry", seed=8)  # fmt: skip
    batch_mates = [tiny_job(seed=21), tiny_job(image_input(1.0), seed=22)]  # one decoder shape: batched
    return [seeds_mix, two_images, *batch_mates]


def compare(s3, ours, theirs) -> tuple[int, float]:
    a, b = (np.asarray(read_object(s3, ref.uri)[0], dtype=np.float64) for ref in (ours, theirs))
    assert a.shape == b.shape and a.std() > 1
    mse = ((a - b) ** 2).mean()
    return int(np.abs(a - b).max()), math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def test_a_diffusers_worker_draws_the_mindone_workers_pictures(env, client, worker, spawn_worker, s3, settings):
    todo = jobs(settings, s3)
    mindone = [client.wait(client.submit(job), timeout=180) for job in todo]  # the session worker
    assert [s.state for s in mindone] == ["SUCCESS"] * len(todo)

    overrides = {"KIQ_QUEUE": f"kiq-torch-{uuid.uuid4().hex[:6]}", "KIQ_BACKEND": "diffusers",
                 "KIQ_DECODER_BATCH": "2", "KIQ_DECODER_BATCH_WAIT_MS": "2000"}  # fmt: skip
    torch_client = client_for(env, overrides)
    ids = [torch_client.submit(job) for job in todo]
    _, log = spawn_worker("diffusers", **overrides)  # starts with all four queued
    diffusers = [torch_client.wait(job_id, timeout=180) for job_id in ids]
    assert [s.state for s in diffusers] == ["SUCCESS"] * len(todo), [s.error for s in diffusers]

    (batch_line,) = [line for line in log.read_text().splitlines() if "decoder batch of" in line]
    assert "decoder batch of 2" in batch_line and ids[2] in batch_line and ids[3] in batch_line
    for n, (ours, theirs) in enumerate(zip(diffusers, mindone, strict=True)):
        assert ours.result.seed == theirs.result.seed and ours.result.device == "cpu:0"
        assert len(ours.result.images) == len(theirs.result.images) == todo[n].get("num_images", 1)
        for mine, reference in zip(ours.result.images, theirs.result.images, strict=True):
            worst, psnr = compare(s3, mine, reference)
            print(f"\nworker parity job {n} {mine.uri.rsplit('/', 1)[-1]}: max |Δ| {worst}/255, PSNR {psnr:.1f} dB")
            assert psnr >= 35 or worst <= 3, (n, worst, psnr)
