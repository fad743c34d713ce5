"""Sweeps without models: frame weights and easing, slerp's coefficients, validation, limits, batching, animation
encoding and how the CLI shows frames."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from kiq.contract import parse_job
from kiq.limits import Speed, expected_seconds
from kiq.settings import Settings
from kiq.status import ImageRef, JobResult, JobStatus
from kiq.sweep import frame_weights
from producer.client import to_status
from producer.progress import ProgressBar, render
from worker.animation import encode_animation, sequence
from worker.batching import find_mates
from worker.sweep import effective_weights, slerp_coefficients

TWO = [{"text": "a cat", "weight": 1.0}, {"text": "a dog", "weight": 0.0}]


def sweep_job(**sweep):
    return parse_job({"inputs": TWO, "height": 64, "width": 64, "sweep": {"to": [0.0, 1.0], "frames": 5, **sweep}})


def test_linear_frames_are_evenly_spaced_and_hit_the_keyframes_exactly():
    assert frame_weights([[1.0, 0.0], [0.0, 1.0]], 5, "linear") == [
        [1.0, 0.0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.0, 1.0]]  # fmt: skip
    three = frame_weights([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], 5, "linear")
    assert three[0] == [1.0, 0.0] and three[2] == [0.0, 1.0] and three[4] == [0.5, 0.5]
    assert three[3] == [0.25, 0.75]


def test_ease_in_out_slows_into_and_out_of_each_keyframe():
    eased = [w[1] for w in frame_weights([[1.0, 0.0], [0.0, 1.0]], 9, "ease-in-out")]
    steps = np.diff(eased)
    assert eased[0] == 0.0 and eased[-1] == 1.0 and eased[4] == pytest.approx(0.5)
    assert steps[0] < steps[3] and steps[-1] < steps[4] and (steps > 0).all()


def test_slerp_keeps_equal_norms_and_moves_along_the_great_circle():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    c_a, c_b = slerp_coefficients(a, b, 0.5)
    mid = c_a * a + c_b * b
    assert np.linalg.norm(mid) == pytest.approx(1.0) and mid[0] == pytest.approx(mid[1])
    c_a, c_b = slerp_coefficients(a, b, 1 / 3)
    assert math.atan2(*(c_a * a + c_b * b)[::-1]) == pytest.approx(math.pi / 6)  # a third of the angle
    assert slerp_coefficients(a, b, 0) == (1.0, 0.0) and slerp_coefficients(a, b, 1) == (0.0, 1.0)
    assert slerp_coefficients(a, 3 * a, 0.25) == (0.75, 0.25)  # parallel: the line
    c_a, c_b = slerp_coefficients(a, 3 * b, 0.5)
    assert np.linalg.norm(c_a * a + c_b * 3 * b) == pytest.approx(2.0)  # norm: linear from 1 to 3


def test_slerp_weights_differ_from_the_linear_blend_only_between_keyframes():
    job = sweep_job(mix="slerp")
    parts = [np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])]
    weights = effective_weights(job, parts)
    assert weights[0] == [1.0, 0.0] and weights[-1] == [0.0, 1.0]
    assert weights[2] == pytest.approx([math.sqrt(0.5), math.sqrt(0.5)])  # the linear blend: [0.5, 0.5]
    assert effective_weights(sweep_job(), parts) == sweep_job().frame_weights()


def test_the_time_limit_grows_with_frames():
    settings = Settings()
    plain = parse_job({"inputs": TWO, "height": 64, "width": 64})
    prior = plain.prior_steps * 3 * settings.prior_step_s  # two texts and the negative
    decoder = expected_seconds(plain, Speed.reference(settings)) - prior
    assert expected_seconds(sweep_job(), Speed.reference(settings)) == pytest.approx(prior + 5 * decoder)


def test_a_sweep_never_joins_a_cross_job_decoder_batch():
    settings = Settings(decoder_batch=4, decoder_batch_wait_ms=0)
    assert find_mates(None, sweep_job(), settings, lambda _: True) == []  # returns before looking at the queue


@pytest.mark.parametrize("fmt", ["gif", "webp", "mp4"])
def test_animations_hold_every_played_frame(fmt):
    frames = [Image.new("RGB", (64, 64), (40 * k, 255 - 40 * k, 0)) for k in range(4)]
    spec = parse_job({"inputs": TWO, "sweep": {"to": [0.0, 1.0], "frames": 4},
                      "animation": {"format": fmt, "fps": 8, "boomerang": True, "loop": False}}).animation  # fmt: skip
    blob = encode_animation(frames, spec)
    if fmt == "mp4":
        av = pytest.importorskip("av")
        with av.open(io.BytesIO(blob)) as container:
            decoded = list(container.decode(video=0))
            assert container.streams.video[0].codec_context.name == "h264"
        assert len(decoded) == 6 and decoded[0].width == 64
        return
    played = Image.open(io.BytesIO(blob))
    assert played.format == fmt.upper() and played.n_frames == 6  # 0 1 2 3 2 1
    assert "loop" not in played.info if fmt == "gif" else played.info["loop"] == 1  # plays once


def test_boomerang_does_not_repeat_the_ends():
    assert sequence([0, 1, 2, 3], boomerang=True) == [0, 1, 2, 3, 2, 1]
    assert sequence([0, 1], boomerang=False) == [0, 1]


def ref(n):
    return ImageRef(uri=f"s3://kiq/jobs/a/{n}.png", url="u", width=64, height=64, format="png")


def test_progress_lists_frames_and_the_cli_prints_each_once(tmp_path):
    progress = to_status("a", "PROGRESS", {"stage": "decoder", "step": 2, "total": 6,
                                           "frames": [ref(0).model_dump()]})  # fmt: skip
    assert progress.progress.frames == [ref(0)]
    assert render(progress).endswith("2/6, 1 frames done")
    out = io.StringIO()
    bar = ProgressBar(out)
    bar(progress)
    bar(progress)
    done = JobStatus(id="a", state="SUCCESS", result=JobResult(images=[ref(0), ref(1)], seed=1, device="cpu:0",
                                                               timings={}, frame_weights=[[1.0], [0.5]]))  # fmt: skip
    bar(done)
    assert out.getvalue().splitlines() == ["frame 0 done: s3://kiq/jobs/a/0.png", "frame 1 done: s3://kiq/jobs/a/1.png"]
    revoked = JobStatus(id="a", state="REVOKED", frames=[ref(0)])
    assert revoked.model_dump(exclude_none=True)["frames"][0]["uri"].endswith("/0.png")


def test_a_plain_job_has_one_frame_and_no_sweep_fields_in_its_dump():
    plain = parse_job({"inputs": TWO})
    assert plain.frames == 1 and plain.frame_weights() == [[1.0, 0.0]]
    assert "sweep" not in plain.model_dump() and "animation" not in plain.model_dump()
    assert "sweep" not in plain.settings_summary()
    round_trip = parse_job(sweep_job().model_dump(mode="json"))
    assert round_trip == sweep_job()


@pytest.mark.parametrize("real_models", [False, True])
def test_the_demo_sweep_is_a_valid_job(real_models):
    from producer.demo import example_job, sweep_job

    job = parse_job(sweep_job(example_job("s3://kiq/inputs/cat.png", "s3://kiq/inputs/starry.png", real_models),
                              real_models))  # fmt: skip
    assert job.animation.format == "gif" and job.sweep.mix == "slerp"
    assert job.frame_weights()[0] == [1.0, 0.0, 0.0] and job.frame_weights()[-1] == [0.0, 0.0, 1.0]
