"""Progress coalescing: a bounded write rate per job that never drops a stage's last step or a change."""

import itertools

from hypothesis import given
from hypothesis import strategies as st

from kiq.status import ImageRef, Progress
from worker.throttle import ProgressThrottle


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run(points, interval_s=0.5, step_s=0.15):
    clock = Clock()
    throttle = ProgressThrottle(interval_s, clock)
    written = []
    for point in points:
        if throttle.due(point):
            written.append(point)
        clock.now += step_s
    return written


def seed_job():
    return [Progress(stage="fetch", step=n, total=2) for n in (1, 2)] + [
        Progress(stage="prior", step=n, total=25) for n in range(1, 26)
    ] + [Progress(stage="decoder", step=n, total=100) for n in range(1, 101)]  # fmt: skip


def test_the_seed_job_writes_a_fraction_of_its_steps_and_every_stage_end():
    written = run(seed_job())
    assert len(written) < 45  # of 127 points
    for stage, total in (("fetch", 2), ("prior", 25), ("decoder", 100)):
        steps = [p.step for p in written if p.stage == stage]
        assert steps[0] == 1 and steps[-1] == total  # each stage's first and last point
    decoder = [p.step for p in written if p.stage == "decoder"]
    assert all(b - a <= 4 for a, b in itertools.pairwise(decoder))  # ≥ one write per 0.5 s


def test_zero_interval_writes_every_step():
    assert len(run(seed_job(), interval_s=0)) == 127


def test_a_new_sweep_frame_is_always_written():
    frame = ImageRef(uri="s3://b/k", url="u", width=64, height=64, format="png")
    points = [Progress(stage="decoder", step=n, total=9, frames=[frame] * (n // 3) or None) for n in range(1, 10)]
    written = run(points, interval_s=60)
    assert [p.step for p in written] == [1, 3, 6, 9]


@given(st.lists(st.tuples(st.sampled_from(["prior", "decoder"]), st.integers(1, 30)), min_size=1, max_size=60),
       st.floats(0, 2), st.floats(0, 1))  # fmt: skip
def test_never_drops_a_final_step_or_a_stage_change(raw, interval_s, step_s):
    points = [Progress(stage=stage, step=min(step, 20), total=20) for stage, step in raw]
    written = run(points, interval_s, step_s)
    assert written[0] == points[0]
    for before, point in itertools.pairwise(points):
        if point.step >= point.total or point.stage != before.stage:
            assert any(w is point for w in written), point
