"""Same job, same image on either backend: mindone (MindSpore) and diffusers (torch), both on CPU in fp32, load one
tiny model directory and run the same jobs through the backend interface (no services needed). Run with -s to see
the figures."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from kiq.settings import Settings
from worker.device import DeviceConfig
from worker.pipelines import base
from worker.pipelines.base import DecoderParams, DecoderRow, PriorParams

torch = pytest.importorskip("torch")

SMALL, WIDE = DecoderParams(64, 64, 5, 4.0), DecoderParams(64, 128, 5, 4.0)
CASES = {
    "text only": (["a cat"], [1.0], PriorParams(5, 4.0, "", 1), SMALL),
    "image only": (["img1"], [1.0], PriorParams(5, 4.0, "", 1), SMALL),
    "seed's mix": (["a cat", "img1", "img2"], [0.3, 0.3, 0.4], PriorParams(5, 4.0, "", 1), WIDE),
    "2 images, negative prompt": (["a cat", "img2"], [0.6, 0.4], PriorParams(5, 4.0, "blurry", 2), SMALL),
    "two texts, no guidance": (["a cat", "a dog"], [0.5, 0.5], PriorParams(4, 1.0, "", 1),
                               DecoderParams(64, 64, 4, 1.0)),
}  # fmt: skip
FIGURES: dict[str, str] = {}


def images():
    rng = np.random.default_rng(0)
    return {
        "img1": Image.fromarray((rng.random((60, 50, 3)) * 255).astype(np.uint8)),
        "img2": Image.fromarray((rng.random((80, 70, 3)) * 255).astype(np.uint8)),
    }


def settings_for(tiny_models, backend: str) -> Settings:
    prior, decoder = map(str, tiny_models)
    return Settings(device_target="CPU", backend=backend, prior_model=prior, decoder_model=decoder, embed_cache_mb=0)


@pytest.fixture(scope="module")
def backends(tiny_models):
    loaded = {}
    for name in ("mindone", "diffusers"):
        settings = settings_for(tiny_models, name)
        loaded[name] = base.load(settings, DeviceConfig.from_settings(settings))
    return loaded


def as_array(tensor) -> np.ndarray:
    return tensor.asnumpy() if hasattr(tensor, "asnumpy") else tensor.cpu().numpy()


def difference(a: Image.Image, b: Image.Image) -> tuple[int, float]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert x.shape == y.shape and x.std() > 1  # not a constant image
    mse = ((x - y) ** 2).mean()
    return int(np.abs(x - y).max()), math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def assert_same_picture(case: str, a: Image.Image, b: Image.Image) -> None:
    worst, psnr = difference(a, b)
    FIGURES[case] = f"max |Δ| {worst}/255, PSNR {psnr:.1f} dB"
    print(f"\nparity {case}: {FIGURES[case]}")
    assert psnr >= 35 or worst <= 3, FIGURES[case]


def run_job(pipelines, conditions, weights, prior: PriorParams, decoder: DecoderParams, seed: int):
    embeds = pipelines.interpolate(conditions, weights, prior, np.random.default_rng(seed))
    steps = []
    out = pipelines.decode(*embeds, decoder, np.random.default_rng(seed), lambda s, n: steps.append((s, n)))
    assert steps == [(s, decoder.steps) for s in range(1, decoder.steps + 1)]
    return embeds, out


@pytest.mark.parametrize("case", list(CASES))
def test_both_backends_draw_the_same_picture(backends, case):
    names, weights, prior, decoder = CASES[case]
    conditions = [images().get(c, c) for c in names]
    (ms_embeds, ms_images), (pt_embeds, pt_images) = (
        run_job(backends[b], conditions, weights, prior, decoder, seed=42) for b in ("mindone", "diffusers")
    )
    for ours, theirs in zip(pt_embeds, ms_embeds, strict=True):
        np.testing.assert_allclose(as_array(ours), as_array(theirs), atol=1e-4)
    assert len(ms_images) == len(pt_images) == prior.num_images
    for n, (a, b) in enumerate(zip(ms_images, pt_images, strict=True)):
        assert_same_picture(f"{case} #{n}" if prior.num_images > 1 else case, a, b)


def batch_with_a_dropout(pipelines, drop_after: int):
    """Two jobs share a decoder call; job 1 is cancelled after `drop_after` steps, job 0 runs on."""
    rows = []
    for seed, (names, weights) in ((1, (["a cat"], [1.0])), (2, (["a cat", "img1", "img2"], [0.3, 0.3, 0.4]))):
        conditions = [images().get(c, c) for c in names]
        embeds = pipelines.interpolate(conditions, weights, PriorParams(5, 4.0, "", 1), np.random.default_rng(seed))
        rows.append(DecoderRow(*embeds, np.random.default_rng(seed)))
    return pipelines.decode_batch(rows, SMALL, lambda step, total: [0] if step >= drop_after else [0, 1])


def test_a_decoder_batch_with_a_row_that_leaves_gives_the_same_picture(backends):
    ms_out, pt_out = (batch_with_a_dropout(backends[b], drop_after=2) for b in ("mindone", "diffusers"))
    assert set(ms_out) == set(pt_out) == {0}
    assert_same_picture("decoder batch of 2, row 1 leaves at step 2", ms_out[0], pt_out[0])
    alone = run_job(backends["diffusers"], ["a cat"], [1.0], PriorParams(5, 4.0, "", 1), SMALL, seed=1)[1][0]
    assert difference(alone, pt_out[0])[0] <= 2  # batched or alone, the job's own picture


def test_compiled_unet_is_warm_at_start_and_pads_batches_to_buckets(backends, tiny_models):
    """torch.compile (dynamo with its eager backend: inductor needs minutes on this CPU) at the warm-up size does
    not compile again on the first job there; a batch of 3 runs padded to 4 and gives the uncompiled images."""
    from torch._dynamo.utils import counters

    settings = settings_for(tiny_models, "diffusers")
    compiled = base.load(settings, DeviceConfig.from_settings(settings))
    compiled.compile_unet([1, 2, 4], size=64, backend="eager")
    assert compiled.buckets == (1, 2, 4, 8, 16)
    frames = counters["frames"]["ok"]
    prior, decoder = PriorParams(5, 4.0, "", 1), SMALL
    single = run_job(compiled, ["a cat"], [1.0], prior, decoder, seed=3)[1][0]
    assert counters["frames"]["ok"] == frames, "the first job at the warm size compiled again"
    assert difference(single, run_job(backends["diffusers"], ["a cat"], [1.0], prior, decoder, seed=3)[1][0])[0] <= 1
    embeds = [compiled.interpolate(["a cat"], [1.0], prior, np.random.default_rng(s)) for s in (4, 5, 6)]
    rows = [DecoderRow(*e, np.random.default_rng(s)) for e, s in zip(embeds, (4, 5, 6), strict=True)]
    padded = compiled.decode_batch(rows, decoder, lambda step, total: [0, 1, 2])
    plain = backends["diffusers"].decode_batch(
        [replace(r, generator=np.random.default_rng(s)) for r, s in zip(rows, (4, 5, 6), strict=True)],
        decoder, lambda step, total: [0, 1, 2],
    )  # fmt: skip
    assert all(difference(padded[r], plain[r])[0] <= 1 for r in range(3))
