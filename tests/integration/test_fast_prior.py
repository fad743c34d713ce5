"""The batched prior gives mindone's `interpolate` output (same draws, fp tolerance) with fewer runs."""

import numpy as np
import pytest
from PIL import Image

CASES = [
    (["a cat", "img1", "img2"], [0.3, 0.3, 0.4], "", 1, 1),  # the seed's job: 1 prior run instead of 2
    (["a cat", "a dog", "img1"], [0.5, 0.2, 0.3], "", 2, 1),  # two texts, two images each: 1 run instead of 3
    (["a cat", "img2"], [0.6, 0.4], "blurry", 2, 1),  # a real negative prompt joins the batch
    (["img1", "img2"], [0.5, 0.5], "", 1, 0),  # image-only: no prior run at all
    (["img1"], [1.0], "ugly", 1, 1),
]


@pytest.fixture(scope="module")
def pipelines(tiny_models):
    from worker import device
    from worker.pipelines import base
    from worker.pipelines.mindspore_mindone import MindonePipelines

    config = device.DeviceConfig("CPU", 0)
    base.configure(config)
    return MindonePipelines.load(*map(str, tiny_models), config, fast_prior=True, cache_mb=0)


@pytest.fixture(scope="module")
def cached(pipelines):
    from worker.pipelines.mindspore_mindone import MindonePipelines

    return MindonePipelines(pipelines.prior, pipelines.decoder, fast_prior=True, cache_mb=16)


@pytest.mark.parametrize(("conditions", "weights", "negative", "num_images", "runs"), CASES)
def test_fast_prior_matches_mindone_interpolate(pipelines, conditions, weights, negative, num_images, runs):
    rng = np.random.default_rng(0)
    images = {
        "img1": Image.fromarray((rng.random((60, 50, 3)) * 255).astype(np.uint8)),
        "img2": Image.fromarray((rng.random((80, 70, 3)) * 255).astype(np.uint8)),
    }
    conds = [images.get(c, c) for c in conditions]
    expected = pipelines.prior.interpolate(
        conds, weights, num_images_per_prompt=num_images, num_inference_steps=5, generator=np.random.default_rng(7),
        negative_prompt=negative, guidance_scale=4.0,
    )  # fmt: skip
    before = dict(pipelines.fast_prior.counts)
    steps = []
    got = pipelines.fast_prior.interpolate(
        conds, weights, steps=5, guidance_scale=4.0, negative_prompt=negative, num_images=num_images,
        generator=np.random.default_rng(7), on_step=lambda s, n: steps.append((s, n)),
    )  # fmt: skip
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.shape == theirs.shape == (num_images, 32)
        np.testing.assert_allclose(ours.asnumpy(), theirs.asnumpy(), atol=1e-5)
    assert pipelines.fast_prior.counts["prior_runs"] - before["prior_runs"] == runs
    assert pipelines.fast_prior.counts["encoder_batches"] - before["encoder_batches"] == 1
    assert steps == ([(s, 5) for s in range(1, 6)] if runs else [])


def test_caches_skip_repeated_work_and_return_the_same_embeddings(cached):
    rng = np.random.default_rng(1)
    cat = Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8))
    fast = cached.fast_prior

    def run(seed, conds):
        return fast.interpolate(conds, [0.5, 0.5], steps=4, guidance_scale=4.0, negative_prompt="", num_images=1,
                                generator=np.random.default_rng(seed))  # fmt: skip

    first = run(3, ["a cat", cat])
    runs, batches = fast.counts["prior_runs"], fast.counts["encoder_batches"]
    again = run(3, ["a cat", cat.copy()])  # same text, same draws, same pixels: both caches hit
    assert (fast.counts["prior_runs"], fast.counts["encoder_batches"]) == (runs, batches)
    np.testing.assert_array_equal(first[0].asnumpy(), again[0].asnumpy())
    other_seed = run(4, ["a cat", cat])  # other draws: the text prior runs again; the image is still cached
    assert (fast.counts["prior_runs"], fast.counts["encoder_batches"]) == (runs + 1, batches)
    assert not np.array_equal(first[0].asnumpy(), other_seed[0].asnumpy())
    assert fast.text_cache.hits == 1 and fast.image_cache.hits == 2
