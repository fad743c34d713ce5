import threading

import pytest

from kiq.contract import parse_job
from kiq.errors import FetchUnavailable, NotAnImage, PoisonJob
from kiq.settings import Settings
from worker.delivery import DeliveryGuard, watchdog
from worker.limits import time_limits
from worker.retry import with_retries


class FakeRedis:
    def __init__(self):
        self.data = {}

    def incr(self, key):
        self.data[key] = self.data.get(key, 0) + 1
        return self.data[key]

    def expire(self, key, ttl):
        pass

    def delete(self, key):
        self.data.pop(key, None)


def test_guard_counts_only_unfinished_deliveries():
    guard = DeliveryGuard(FakeRedis(), max_deliveries=2, ttl_s=60)
    assert guard.begin("a") == 1
    guard.end("a")
    assert guard.begin("a") == 1  # a finished run resets the count
    assert guard.begin("a") == 2  # the first of these "died"
    with pytest.raises(PoisonJob, match=r"delivered 3 times .* KIQ_MAX_DELIVERIES=2"):
        guard.begin("a")


def test_watchdog_fires_only_past_the_limit():
    fired = threading.Event()
    with watchdog(0.05, fired.set, exit_process=False):
        assert fired.wait(1)
    quiet = threading.Event()
    with watchdog(0.5, quiet.set, exit_process=False):
        pass
    assert not quiet.wait(0.7)


def test_retries_transient_with_growing_jittered_backoff():
    sleeps, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise FetchUnavailable("503")
        return "ok"

    assert with_retries(flaky, attempts=5, sleep=sleeps.append, jitter=lambda: 1.0) == "ok"
    assert sleeps == [0.5, 1.0, 2.0]


def test_retry_bounds_and_permanent_errors():
    def down():
        raise FetchUnavailable("refused")

    with pytest.raises(FetchUnavailable):
        with_retries(down, attempts=3, sleep=lambda s: None)
    now = [0.0]
    with pytest.raises(FetchUnavailable):
        with_retries(down, within_s=5, sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0],
                     jitter=lambda: 1.0)  # fmt: skip
    assert now[0] <= 5
    calls = []

    def permanent():
        calls.append(1)
        raise NotAnImage("html")

    with pytest.raises(NotAnImage):
        with_retries(permanent, attempts=5, sleep=lambda s: None)
    assert len(calls) == 1


def test_time_limits_grow_with_size_and_steps_within_bounds():
    settings = Settings(time_limit_min_s=20, time_limit_max_s=1000, time_limit_grace_s=5)
    small = time_limits(parse_job({"inputs": [{"text": "a", "weight": 1}], "height": 64, "width": 64}), settings)
    big = time_limits(parse_job({"inputs": [{"text": "a", "weight": 1}], "num_images": 4}), settings)
    huge = time_limits(
        parse_job({"inputs": [{"text": "a", "weight": 1}], "height": 2048, "width": 2048, "decoder_steps": 500,
                   "num_images": 8}), settings)  # fmt: skip
    assert small.soft_s == 20 and small.hard_s == 25
    assert 20 < big.soft_s < 1000 and big.hard_s == big.soft_s + 5
    assert huge.soft_s == 1000


def test_visibility_timeout_must_exceed_the_largest_hard_limit():
    with pytest.raises(Exception, match="KIQ_VISIBILITY_TIMEOUT_S"):
        Settings(visibility_timeout_s=100, time_limit_max_s=100)
