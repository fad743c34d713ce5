"""The time model, per-worker limits, the submit-time refusal and the speed meter, without models or Redis."""

import math
import time

import pytest

from kiq.contract import parse_job
from kiq.errors import JobInvalid, JobTooLong
from kiq.limits import LiveWorker, Speed, check_feasible, decoder_units, expected_seconds, live_worker, time_limits
from kiq.settings import Settings
from worker.fleet import Heartbeat
from worker.limits import EWMA_ALPHA, MAX_JUMP, PROBE_STEPS, SpeedMeter, measure, per_step, updated

SETTINGS = Settings()
TEXT = [{"text": "a cat", "weight": 1.0}]
# Issue 20, defect 5: 120 frames x 500 steps at 2048x2048, three texts.
SWEEP = parse_job({"inputs": [*TEXT, {"text": "a dog", "weight": 0.0}, {"text": "a fox", "weight": 0.0}],
                   "height": 2048, "width": 2048, "decoder_steps": 500,
                   "sweep": {"to": [0.0, 0.0, 1.0], "frames": 120}})  # fmt: skip
# Issue 20, defect 9: 256x256, 80 decoder steps, 304 s on a CPU worker.
CPU_JOB = parse_job({"inputs": TEXT, "height": 256, "width": 256, "decoder_steps": 80})


def worker(name, decoder_step_s, queues=("kiq",), cap=SETTINGS.time_limit_max_s):
    return LiveWorker(name, tuple(queues), Speed(0.05, decoder_step_s, "probe"), cap)


def test_the_issue_sweep_takes_about_64_000_s_by_the_reference_speed():
    assert decoder_units(SWEEP) == pytest.approx(500 * 120 * 2048 * 2048 / 768**2)
    assert expected_seconds(SWEEP, Speed.reference(SETTINGS)) == pytest.approx(64_005, abs=1)


def test_a_slow_worker_gets_limits_from_its_own_speed():
    reference = time_limits(CPU_JOB, SETTINGS)
    assert reference.soft_s == 300  # the floor: what ended the 304 s job JobTimeout
    cpu = Speed(prior_step_s=0.2, decoder_step_s=304 / decoder_units(CPU_JOB), source="jobs")
    own = time_limits(CPU_JOB, SETTINGS, cpu)
    assert own.soft_s == pytest.approx(4 * expected_seconds(CPU_JOB, cpu)) and own.soft_s > 1200
    assert own.hard_s == own.soft_s + SETTINGS.time_limit_grace_s
    assert time_limits(SWEEP, SETTINGS, cpu).soft_s == SETTINGS.time_limit_max_s  # still capped


def test_the_fastest_worker_of_the_queue_decides():
    job = parse_job({"inputs": TEXT, "height": 1024, "width": 1024, "decoder_steps": 500, "num_images": 8})
    slow, fast, elsewhere = worker("cpu", 30.0), worker("910b", 0.1), worker("h100", 0.01, queues=("other",))
    assert check_feasible(job, "kiq", [slow, fast, elsewhere], SETTINGS) == pytest.approx(
        expected_seconds(job, fast.speed)
    )
    with pytest.raises(JobTooLong, match=r"fastest of the 1 live worker\(s\) of queue 'kiq' \(cpu,") as refused:
        check_feasible(job, "kiq", [slow, elsewhere], SETTINGS)
    assert isinstance(refused.value, JobInvalid)  # the CLI's exit 2, a ValueError for callers
    assert (refused.value.workers, refused.value.queue, refused.value.limit_s) == (1, "kiq", 3 * 3600)
    assert refused.value.expected_s == pytest.approx(expected_seconds(job, slow.speed))


def test_each_worker_is_held_to_its_own_cap():
    job = parse_job({"inputs": TEXT, "decoder_steps": 500})  # 75 s at 0.15 s per step
    assert check_feasible(job, "kiq", [worker("a", 0.15, cap=60), worker("b", 0.15, cap=100)], SETTINGS) == 77.5
    with pytest.raises(JobTooLong, match="over its 60 s cap"):
        check_feasible(job, "kiq", [worker("a", 0.15, cap=60)], SETTINGS)


def test_with_no_live_worker_the_reference_speed_decides_and_says_so():
    with pytest.raises(
        JobTooLong,
        match=r"about 17.8 h at the reference speed \(KIQ_PRIOR_STEP_S=0.05, "
        r"KIQ_DECODER_STEP_S=0.15; no live worker of queue 'kiq'",
    ) as refused:
        check_feasible(SWEEP, "kiq", [worker("a", 0.01, queues=("other",))], SETTINGS)
    assert refused.value.workers == 0 and "fewer frames, decoder steps" in str(refused.value)
    assert check_feasible(CPU_JOB, "kiq", [], SETTINGS) == pytest.approx(expected_seconds(CPU_JOB, Speed.reference(
        SETTINGS)))  # fmt: skip


def test_a_heartbeat_without_a_usable_speed_reads_as_the_reference():
    good = live_worker("w", {"queues": "kiq,big", "prior_step_s": "0.2", "decoder_step_s": "31.5",
                             "speed_source": "jobs", "limit_max_s": "600"}, SETTINGS)  # fmt: skip
    assert good == LiveWorker("w", ("kiq", "big"), Speed(0.2, 31.5, "jobs"), 600.0)
    for bad in ("", "nan", "inf", "-1", "0", "fast"):
        read = live_worker("w", {"queues": "kiq", "prior_step_s": "0.2", "decoder_step_s": bad, "limit_max_s": bad},
                           SETTINGS)  # fmt: skip
        assert (read.speed, read.limit_max_s) == (Speed.reference(SETTINGS), SETTINGS.time_limit_max_s), bad


def test_the_first_job_replaces_the_reference_then_each_moves_it_a_bounded_step():
    assert updated(Speed(0.05, 0.15, "reference"), 30.0) == 30.0
    probed = Speed(0.05, 1.0, "probe")
    assert updated(probed, 2.0) == pytest.approx(1 + EWMA_ALPHA * 1.0)
    assert updated(probed, 1000.0) == pytest.approx(1 + EWMA_ALPHA * (MAX_JUMP - 1))  # a stalled job
    assert updated(probed, 0.0001) == pytest.approx(1 + EWMA_ALPHA * (1 / MAX_JUMP - 1))


def test_the_meter_learns_from_jobs_and_publishes_what_limits_use():
    meter = SpeedMeter(Settings(speed_probe_s=0))
    meter.probe(pipelines=None)  # off: nothing runs
    assert meter.speed == Speed.reference(meter.settings)
    meter.observe(CPU_JOB, {"decoder": 304.0})
    assert meter.speed == Speed(0.05, 304 / decoder_units(CPU_JOB), "jobs")
    meter.observe(CPU_JOB, {"prior": 1.0})  # no decoder time (a failed run): ignored
    assert meter.fields() == {"prior_step_s": 0.05, "decoder_step_s": meter.speed.decoder_step_s,
                              "speed_source": "jobs", "speed_jobs": 1, "limit_max_s": 3 * 3600}  # fmt: skip
    assert meter.limits(CPU_JOB) == time_limits(CPU_JOB, meter.settings, meter.speed)


class SleepyPipelines:
    """Steps that take a fixed time per pixel; the first decoder step of each size pays a compile cost."""

    def __init__(self, decoder_s_per_pixel, prior_step_s=0.01):
        self.per_pixel, self.prior_step_s, self.sides = decoder_s_per_pixel, prior_step_s, []

    def interpolate(self, conditions, weights, params, generator, on_step):
        for step in range(1, params.steps + 1):
            time.sleep(self.prior_step_s)
            on_step(step, params.steps)
        return "embeds", "negative"

    def decode(self, embeds, negative, params, generator, on_step):
        self.sides.append(params.width)
        time.sleep(0.05)  # first-step costs: not timed
        for step in range(1, params.steps + 1):
            time.sleep(self.per_pixel * params.width * params.height)
            on_step(step, params.steps)
        return []


def test_the_probe_measures_real_steps_and_grows_its_size_within_the_budget():
    pipes = SleepyPipelines(decoder_s_per_pixel=0.02 / 128**2)  # 0.02 s per step at 128x128
    speed = measure(pipes, budget_s=0.8)
    assert pipes.sides == [64, 128, 256]  # 512 would take 3 x 0.32 s more
    assert speed.source == "probe"
    assert speed.decoder_step_s == pytest.approx(0.02 * 36, rel=0.3)  # per 768x768 step
    assert speed.prior_step_s == pytest.approx(0.01 / 2, rel=0.5)  # one text and the negative


def test_a_failing_probe_leaves_the_reference_speed():
    class Broken:
        def interpolate(self, *args):
            raise RuntimeError("device lost")

    meter = SpeedMeter(Settings())
    meter.probe(Broken())
    assert meter.speed == Speed.reference(meter.settings)


def test_per_step_leaves_the_first_step_out_and_falls_back_to_the_average():
    assert per_step([10.0, 10.5, 11.0], total_s=99, steps=3) == 0.5
    assert per_step([], total_s=3.0, steps=PROBE_STEPS) == 1.0
    assert math.isfinite(per_step([1.0, 1.0], total_s=0.3, steps=3))


class Recording:
    def __init__(self):
        self.hashes, self.index = {}, {}

    def hset(self, key, mapping):
        self.hashes[key] = dict(mapping)

    def expire(self, key, ttl):
        pass

    def zadd(self, key, mapping):
        self.index.update(mapping)

    def zrem(self, key, member):
        self.index.pop(member, None)

    def delete(self, key):
        self.hashes.pop(key, None)


def test_the_heartbeat_publishes_the_current_speed_and_indexes_itself():
    redis, meter = Recording(), SpeedMeter(Settings())
    beat = Heartbeat(redis, "kiq@h-cpu0", "cpu:0", ["kiq"], meter.fields)
    beat._beat()
    assert redis.hashes[beat.key]["speed_source"] == "reference" and beat.key in redis.index
    meter.observe(CPU_JOB, {"decoder": 304.0})
    beat.job_finished(ok=True)
    assert redis.hashes[beat.key]["decoder_step_s"] == pytest.approx(304 / decoder_units(CPU_JOB))
    beat.stop()
    assert redis.hashes == {} and redis.index == {}
