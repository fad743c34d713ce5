"""The Idempotency-Key's pending mark outlives a slow submit, and a submit whose mark lapsed gives up before it
publishes (issue 20, defect 8); the real slow submit is in tests/integration/test_deadlines.py."""

import time

import pytest

from kiq.errors import SubmitAbandoned
from kiq.settings import Settings
from producer.api import _DELETE_IF_EQUAL, _PEXPIRE_IF_EQUAL, _SET_IF_EQUAL, IdempotencyClaim, Rejected


class ExpiringRedis:
    """GET, SET NX PX and kiq's three compare-and-set scripts, with expiry on the monotonic clock."""

    def __init__(self):
        self.data: dict[str, tuple[str, float]] = {}

    def _live(self, key):
        value = self.data.get(key)
        if value is not None and value[1] <= time.monotonic():
            del self.data[key]
            value = None
        return value

    def get(self, key):
        value = self._live(key)
        return None if value is None else value[0]

    def set(self, key, value, nx=False, px=None):
        if nx and self._live(key) is not None:
            return None
        self.data[key] = (value, time.monotonic() + px / 1000)
        return True

    def eval(self, script, nkeys, key, expected, *rest):
        if self.get(key) != expected:
            return 0
        if script == _PEXPIRE_IF_EQUAL:
            self.data[key] = (expected, time.monotonic() + int(rest[0]) / 1000)
        elif script == _SET_IF_EQUAL:
            self.data[key] = (rest[0], time.monotonic() + int(rest[1]))
        else:
            assert script == _DELETE_IF_EQUAL
            del self.data[key]
        return 1


SETTINGS = Settings(idempotency_pending_s=0.2)


def claim(redis, digest="digest"):
    return IdempotencyClaim(redis, SETTINGS, "tenant", "order-1", digest)


def test_a_submit_outliving_the_marks_lifetime_keeps_it_and_its_retry_gets_409():
    redis, first = ExpiringRedis(), None
    first = claim(redis)
    assert first.acquire("job-1") is None
    with first.kept():
        time.sleep(0.6)  # three lifetimes of slow uploads
        with pytest.raises(Rejected) as retry:
            claim(redis).acquire("job-2")
        assert retry.value.status == 409
        first.confirm()
        first.commit()
    assert claim(redis).acquire("job-3") == "job-1"


def test_a_submit_whose_mark_lapsed_is_abandoned_before_it_publishes():
    redis = ExpiringRedis()
    first = claim(redis)
    assert first.acquire("job-1") is None  # not kept: as if Redis had been out of reach all along
    time.sleep(0.3)
    assert claim(redis).acquire("job-2") is None  # the retry holds the key now
    with pytest.raises(SubmitAbandoned, match="nothing was enqueued"):
        first.confirm()
