"""The lease keeper's failure accounting and its client's timeouts (issue 20, defects 3 and 4); the real faults
are in tests/integration/test_lease_faults.py."""

import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from kiq import leases


class FlakyRedis:
    def __init__(self):
        self.up, self.pings = True, 0

    def _answer(self, value):
        if not self.up:
            raise RedisConnectionError("no route to host")
        return value

    def zadd(self, *args, **kwargs):
        return self._answer(1)

    def time(self):  # leases are scored by Redis's clock
        return self._answer((int(time.time()), 0))

    def ping(self):
        self.pings += 1
        return self._answer(True)


def wait_for(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_renewals_failing_past_the_safe_time_report_once_then_recover_at_the_next_success():
    redis, events = FlakyRedis(), []
    keeper = leases.LeaseKeeper(redis, lambda: [("index", "tag")], 0.02, unsafe_after_s=0.2,
                                on_unsafe=lambda late_s, exc: events.append(("unsafe", late_s, type(exc))),
                                on_safe=lambda: events.append(("safe",)))  # fmt: skip
    keeper.start()
    try:
        time.sleep(0.3)
        assert events == []  # renewals succeed: nothing to say
        redis.up = False
        wait_for(lambda: events)
        time.sleep(0.3)  # failures go on: said once
        ((kind, late_s, error),) = events
        assert (kind, error) == ("unsafe", RedisConnectionError) and late_s > 0.2
        redis.up = True
        wait_for(lambda: len(events) == 2)
        assert events[1] == ("safe",) and not keeper.unsafe
    finally:
        keeper.stop()


def test_a_keeper_holding_nothing_still_proves_its_connection():
    redis = FlakyRedis()
    keeper = leases.LeaseKeeper(redis, lambda: [], 1.0)
    assert keeper.renew() == 0 and redis.pings == 1
    redis.up = False
    with pytest.raises(RedisConnectionError):
        keeper.renew()


@pytest.mark.parametrize("visibility_timeout_s", [6, 60, 600, 3600])
def test_the_leases_client_gives_up_well_within_a_renewal_interval(visibility_timeout_s):
    options = leases.lease_sockets(visibility_timeout_s)
    interval = leases.renew_interval_s(visibility_timeout_s)
    # a new connection's connect plus one reply, with no retries inside redis-py
    assert options["socket_connect_timeout"] + options["socket_timeout"] <= interval
    assert options["retry"].get_retries() == 0 and options["socket_keepalive"]
