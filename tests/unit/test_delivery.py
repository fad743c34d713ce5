import threading

import pytest

from kiq.contract import parse_job
from kiq.errors import FetchUnavailable, NotAnImage, PoisonJob
from kiq.names import deliveries_key
from kiq.settings import Settings
from worker.delivery import DeliveryGuard, watchdog
from worker.limits import time_limits
from worker.retry import with_retries


class FakeRedis:
    """The few hash commands the guard uses, with a pipeline that runs them in order; `down` fails calls."""

    def __init__(self):
        self.data, self.down = {}, 0

    def pipeline(self):
        return FakePipeline(self)

    def _check(self):
        if self.down:
            self.down -= 1
            raise ConnectionError("Redis is restarting")

    def hincrby(self, key, field, n):
        self._check()
        self.data.setdefault(key, {})[field] = self.data.get(key, {}).get(field, 0) + n
        return self.data[key][field]

    def hgetall(self, key):
        return {k.encode(): str(v).encode() for k, v in self.data.get(key, {}).items()}

    def expire(self, key, ttl):
        pass

    def incr(self, key):
        self.data[key] = self.data.get(key, 0) + 1
        return self.data[key]

    def register_script(self, script):
        assert "DEL" in script  # the guard's one script: its count's DEL behind the fencing guard, never stale here

        def run(keys, args):
            self._check()
            self.data.pop(keys[0], None)
            return 1

        return run

    def exists(self, key):
        self._check()
        return int(key in self.data)

    def delete(self, key):
        self._check()
        self.data.pop(key, None)


class FakePipeline:
    def __init__(self, redis):
        self.redis, self.calls = redis, []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))

    def execute(self):
        self.redis._check()
        return [getattr(self.redis, name)(*args) for name, args in self.calls]


def test_guard_counts_only_unfinished_deliveries():
    guard = DeliveryGuard(FakeRedis(), max_deliveries=2, ttl_s=60)
    assert guard.begin("a").attempt == 1
    guard.end("a")
    assert not guard.crashed_before("a")
    assert guard.begin("a").attempt == 1  # a finished run resets the count
    assert guard.crashed_before("a")  # this one "died"
    assert guard.begin("a").attempt == 2
    with pytest.raises(PoisonJob, match=r"delivered 3 times .* KIQ_MAX_DELIVERIES=2"):
        guard.begin("a")


def test_deaths_in_a_batch_make_a_job_run_alone_but_do_not_count_towards_poison():
    guard = DeliveryGuard(FakeRedis(), max_deliveries=1, ttl_s=60)
    assert guard.begin("mate", batched=True).attempt == 1  # the batch died
    assert guard.crashed_before("mate")  # so it runs alone next
    assert guard.begin("mate").solo == 1  # alone: within the limit of 1
    with pytest.raises(PoisonJob, match=r"delivered 3 times .* 1 of them running alone"):
        guard.begin("mate")  # it died alone too: poison


def test_bookkeeping_rides_out_a_redis_blip_and_end_never_raises():
    redis = FakeRedis()
    guard = DeliveryGuard(redis, max_deliveries=3, ttl_s=60, redis_retry_s=5)
    redis.down = 2
    assert guard.begin("a").attempt == 1
    redis.down = 2
    guard.end("a")
    assert deliveries_key("a") not in redis.data
    guard.begin("b")
    redis.down = 10**6
    quick = DeliveryGuard(redis, max_deliveries=3, ttl_s=60, redis_retry_s=0.3)
    quick.end("b")  # logged, not raised: a finished job's outcome stands


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


def test_visibility_timeout_is_short_by_default_and_independent_of_job_length():
    assert Settings().visibility_timeout_s == 60  # leases are renewed, so it need not exceed any time limit
    Settings(visibility_timeout_s=60, time_limit_max_s=10_000)
    with pytest.raises(Exception, match="KIQ_VISIBILITY_TIMEOUT_S must be at least"):
        Settings(visibility_timeout_s=2)
