"""The torch backend's draws are mindone's: the same numpy calls in the same order, served block by block."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from diffusers import DDPMScheduler  # noqa: E402

from worker.pipelines import torch_noise  # noqa: E402
from worker.pipelines.fast_prior import replay_rows  # noqa: E402
from worker.pipelines.torch_diffusers import bucket, warm_batches  # noqa: E402
from worker.pipelines.torch_noise import HostNoise, route_scheduler_noise  # noqa: E402

CPU = torch.device("cpu")


def served(noise, n):
    return [noise.next(noise.shape).numpy() for _ in range(n)]


@pytest.mark.parametrize("chunk_bytes", [1, 200, 64 * 1024 * 1024])
def test_one_generator_draws_the_whole_batch_in_order_whatever_the_chunk(monkeypatch, chunk_bytes):
    monkeypatch.setattr(torch_noise, "CHUNK_BYTES", chunk_bytes)
    reference = np.random.default_rng(5)
    expected = [reference.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(4)]
    noise = HostNoise(np.random.default_rng(5), 2, (3, 4), 4, CPU, torch.float32)
    for got, want in zip(served(noise, 4), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_never_draws_past_what_the_loop_uses_so_a_shared_generator_stays_in_step():
    shared, reference = np.random.default_rng(1), np.random.default_rng(1)
    served(HostNoise(shared, 1, (8,), 3, CPU, torch.float32), 3)
    for _ in range(3):
        reference.standard_normal((1, 8))
    np.testing.assert_array_equal(shared.standard_normal(4), reference.standard_normal(4))


def test_per_row_generators_and_rows_that_leave():
    rows = [np.random.default_rng(s) for s in (10, 11, 12)]
    references = [np.random.default_rng(s) for s in (10, 11, 12)]
    noise = HostNoise(rows, 3, (2,), 5, CPU, torch.float64)
    first = served(noise, 2)
    for r, ref in enumerate(references):
        np.testing.assert_array_equal(first[0][r : r + 1], ref.standard_normal((1, 2)))
        np.testing.assert_array_equal(first[1][r : r + 1], ref.standard_normal((1, 2)))
    noise.keep([0, 2])  # row 1 is cancelled: rows 0 and 2 go on with their own sequences
    third = served(noise, 1)[0]
    np.testing.assert_array_equal(third, np.concatenate([references[0].standard_normal((1, 2)),
                                                         references[2].standard_normal((1, 2))]))  # fmt: skip


def test_replayed_prior_rows_are_served_like_numpy_generators():
    rows = replay_rows(np.random.default_rng(3), prompts=2, per_prompt=1, dim=4, noisy_steps=2)
    reference = np.random.default_rng(3)
    per_prompt = [[reference.standard_normal((1, 4)) for _ in range(3)] for _ in range(2)]
    got = served(HostNoise(rows, 2, (4,), 3, CPU, torch.float64), 3)
    for k in range(3):
        np.testing.assert_array_equal(got[k], np.concatenate([per_prompt[0][k], per_prompt[1][k]]))


def test_casts_each_float64_draw_once_as_mindone_does():
    noise = HostNoise(np.random.default_rng(9), 1, (1000,), 1, CPU, torch.float16)
    want = torch.from_numpy(np.random.default_rng(9).standard_normal((1, 1000))).to(torch.float16)
    assert torch.equal(noise.next((1, 1000)), want)


def test_a_routed_scheduler_takes_its_step_noise_from_the_host_noise():
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, steps_offset=1)  # fmt: skip
    route_scheduler_noise(scheduler)
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[0]
    sample, model_out = torch.ones(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)

    def step(seed):
        return scheduler.step(model_out, t, sample, generator=HostNoise(np.random.default_rng(seed), 1, (2, 3, 3), 1,
                                                                        CPU, torch.float32))[0]  # fmt: skip

    assert torch.equal(step(1), step(1)) and not torch.equal(step(1), step(2))
    # The noise enters as sigma_t * z: the difference of two steps is proportional to the difference of draws.
    z1, z2 = (torch.from_numpy(np.random.default_rng(s).standard_normal((1, 2, 3, 3))).float() for s in (1, 2))
    ratio = (step(1) - step(2)) / (z1 - z2)
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), atol=1e-5)
    # Other generators still draw as diffusers does.
    assert scheduler.step(model_out, t, sample, generator=torch.Generator().manual_seed(0))[0].shape == sample.shape


def test_a_draw_of_another_shape_is_an_error():
    with pytest.raises(RuntimeError, match="noise of shape"):
        HostNoise(np.random.default_rng(0), 2, (4,), 1, CPU, torch.float32).next((1, 4))


def test_buckets_and_warm_batches():
    assert warm_batches(1) == [1] and warm_batches(6) == [1, 2, 4] and warm_batches(8) == [1, 2, 4, 8]
    assert [bucket(n, (1, 2, 4, 8)) for n in (1, 3, 5, 8, 12)] == [1, 4, 8, 8, 12]
    assert bucket(3, ()) == 3
