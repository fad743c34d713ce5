"""kiq's image equals the seed's own direct mindone call: same tiny models, same inputs, same seed."""

import io

import numpy as np
from PIL import Image

from tests.helpers import data_uri, image_bytes
from tests.integration.jobs import read_object

SEED = 1234


def direct_call(prior_dir, decoder_dir, conditions, weights, job):
    """What the seed's code does: interpolate, then the decoder, in-process."""
    import mindspore as ms
    from mindone.diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline
    from transformers import CLIPImageProcessor

    from worker import device
    from worker.pipelines import base

    base.configure(device.DeviceConfig(target="CPU", device_id=0))  # CPU kernels only; no model code
    processor = CLIPImageProcessor.from_pretrained(prior_dir, subfolder="image_processor")
    prior = KandinskyV22PriorPipeline.from_pretrained(prior_dir, image_processor=processor, mindspore_dtype=ms.float32)
    prior.prior.set_default_attn_processor()
    decoder = KandinskyV22Pipeline.from_pretrained(decoder_dir, mindspore_dtype=ms.float32)
    embeds, negative = prior.interpolate(
        conditions, weights, num_inference_steps=job["prior_steps"], generator=np.random.default_rng(SEED),
        guidance_scale=job["prior_guidance_scale"],
    )  # fmt: skip
    return decoder(
        image_embeds=embeds, negative_image_embeds=negative, height=job["height"], width=job["width"],
        num_inference_steps=job["decoder_steps"], guidance_scale=job["guidance_scale"],
        generator=np.random.default_rng(SEED),
    )[0][0]  # fmt: skip


def test_system_image_matches_direct_call(worker, client, s3, settings, tiny_models):
    cat, starry = image_bytes(size=(60, 50), color=(230, 140, 50)), image_bytes("JPEG", (80, 60), (30, 60, 160))
    s3.put_object(Bucket=settings.s3_bucket, Key="inputs/cat.png", Body=cat)
    job = {
        "inputs": [
            {"text": "a cat", "weight": 0.3},
            {"image": f"s3://{settings.s3_bucket}/inputs/cat.png", "weight": 0.3},
            {"image": data_uri(starry, "image/jpeg"), "weight": 0.4},
        ],
        "height": 64, "width": 128, "prior_steps": 5, "decoder_steps": 5,
        "prior_guidance_scale": 4.0, "guidance_scale": 4.0, "seed": SEED,
    }  # fmt: skip
    final = client.wait(client.submit(job), timeout=180)
    assert final.state == "SUCCESS", final.error
    system, _ = read_object(s3, final.result.images[0].uri)
    conditions = ["a cat", Image.open(io.BytesIO(cat)).convert("RGB"), Image.open(io.BytesIO(starry)).convert("RGB")]
    direct = direct_call(*tiny_models, conditions, [0.3, 0.3, 0.4], job)
    a, b = np.asarray(system, dtype=np.int16), np.asarray(direct, dtype=np.int16)
    assert a.shape == b.shape == (64, 128, 3)
    assert a.std() > 1  # not a constant image
    diff = np.abs(a - b)
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
