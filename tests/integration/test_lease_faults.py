"""The lease renewer against faults that end in silence (issue 20, defects 3 and 4): a half-open connection
must fail a renewal within its interval, and a worker whose renewals keep failing must stop taking jobs, say
why, and take them again once renewals succeed — with a real worker, its lease connection silenced by a proxy
while its broker connection works."""

import re
import threading
import time
import uuid
from urllib.parse import urlsplit

from kiq import leases, redisconn
from kiq.settings import Settings
from producer import devstack
from producer.client import Client
from tests.blackhole import SilencingProxy
from tests.helpers import wait_for_step
from tests.integration.conftest import REDIS_URL
from tests.integration.jobs import tiny_job

# How the proxy tells the lease connection from the broker's: its client name, or (a worker without one) the
# renewal itself, the only ZADD ... XX anyone sends.
LEASE_MARKERS = (b"kiq-leases", b"\r\nXX\r\n")
REDIS = urlsplit(REDIS_URL)


def proxied_url(proxy: SilencingProxy) -> str:
    return f"redis://127.0.0.1:{proxy.port}{REDIS.path}"


def timed_renew(keeper: leases.LeaseKeeper, give_up_s: float = 60) -> tuple[object, float]:
    """(what renew() returned or raised, seconds it took); renew() runs in a thread so a hang cannot hang the test."""
    outcome: list = []

    def renew():
        start = time.monotonic()
        try:
            result = keeper.renew()
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            result = exc
        outcome.append((result, time.monotonic() - start))

    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    thread.join(give_up_s)
    assert outcome, f"renew() still blocked after {give_up_s} s on a half-open connection"
    return outcome[0]


def test_a_renewal_on_a_half_open_connection_fails_within_the_renewal_interval(env):
    proxy = SilencingProxy(REDIS.port or 6379)
    proxy.start()
    try:
        settings = Settings.from_env({**env, "KIQ_BROKER_URL": proxied_url(proxy), "KIQ_VISIBILITY_TIMEOUT_S": "6"})
        interval = leases.renew_interval_s(settings.visibility_timeout_s)
        held = [(f"kiq:test-index:{uuid.uuid4().hex}", "tag")]
        keeper = leases.LeaseKeeper(leases.broker_redis(settings), lambda: held, interval)
        assert timed_renew(keeper)[0] == 0  # connected; nothing to renew under that tag
        proxy.silence()  # the peer goes quiet: no reset, no FIN, as after a host loss or a partition
        for attempt in ("on the open connection", "on a new one"):
            result, took = timed_renew(keeper)
            assert isinstance(result, redisconn.REDIS_ERRORS), (attempt, result)
            assert took < interval, f"{attempt}: renew() took {took:.1f} s to fail, past the {interval:g} s interval"
        proxy.unsilence()
        assert timed_renew(keeper)[0] == 0  # and it recovers by itself
    finally:
        proxy.stop()


def test_a_worker_whose_leases_cannot_be_renewed_stops_taking_jobs_says_why_and_resumes(env, spawn_worker):
    proxy = SilencingProxy(REDIS.port or 6379, markers=LEASE_MARKERS)
    proxy.start()
    try:
        queue = f"kiq-lease-fault-{uuid.uuid4().hex[:8]}"
        overrides = {"KIQ_QUEUE": queue, "KIQ_BROKER_URL": proxied_url(proxy), "KIQ_VISIBILITY_TIMEOUT_S": "6"}
        client = Client(Settings.from_env({**env, "KIQ_QUEUE": queue}))  # straight to Redis
        worker, log = spawn_worker("lease-fault", **overrides)
        proxy.silence()
        held = client.submit(tiny_job(decoder_steps=60))  # starts while its lease cannot be renewed

        def text():
            return log.read_text(errors="replace")

        try:
            devstack.wait_until(lambda: "stops taking jobs" in text(), 30, "the worker to stop taking jobs")
        except devstack.StackError:
            failed = text().count("could not renew message leases")
            raise AssertionError(f"{failed} failed renewals logged, yet the worker never stopped taking jobs") from None
        assert "ERROR" in next(line for line in text().splitlines() if "stops taking jobs" in line)
        waiting = client.submit(tiny_job(seed=2))
        # Its lease can be taken by any other worker now: the run stops at its next step (self-fencing, two thirds of
        # the timeout after the last renewal) instead of running on, and writes nothing.
        devstack.wait_until(lambda: "last renewed" in text(), 60, "the held run to stop as its leases lapsed")
        time.sleep(4)
        assert client.status(held).state != "SUCCESS"
        assert client.status(waiting).state == "PENDING" and waiting not in text()  # not even received
        proxy.unsilence()
        devstack.wait_until(lambda: "taking jobs again" in text(), 30, "the worker to take jobs again")
        # The held job's lease lapsed: the sweep hands it back, and it runs again, once.
        assert client.wait(held, timeout=180).state == "SUCCESS"
        assert client.wait(waiting, timeout=60).state == "SUCCESS"
        # Celery logs "succeeded" after the state is stored and the task's own on_success has run (Redis round trips
        # through the proxy): under load the client sees SUCCESS first.
        devstack.wait_until(lambda: f"{held}] succeeded" in text(), 30, "the worker to log the held job's success")
        assert text().count(f"{held}] succeeded") == 1
        assert worker.poll() is None
    finally:
        proxy.stop()


def test_a_run_cut_off_from_redis_mid_write_stops_before_its_job_can_be_taken(env, spawn_worker):
    """A worker partitioned from Redis while its run writes progress (every connection silenced: broker, leases,
    per-step checks, result backend). The write must fail within its socket timeout and stop retrying once the leases
    lapse, so the run stops (self-fencing) before another worker's sweep could hand the job out, not when the
    partition heals (the chaos campaign, seed 4: runs blocked 3.6-12.4 s in a result write); then it runs again."""
    proxy = SilencingProxy(REDIS.port or 6379)
    proxy.start()
    try:
        queue = f"kiq-cut-off-{uuid.uuid4().hex[:8]}"
        timeout_s = 6.0
        overrides = {"KIQ_QUEUE": queue, "KIQ_BROKER_URL": proxied_url(proxy), "KIQ_VISIBILITY_TIMEOUT_S": "6",
                     "KIQ_PROGRESS_INTERVAL_MS": "50"}  # fmt: skip
        client = Client(Settings.from_env({**env, "KIQ_QUEUE": queue}))  # straight to Redis
        worker, log = spawn_worker("cut-off", **overrides)
        job_id = client.submit(tiny_job(decoder_steps=60))
        wait_for_step(client, job_id, step=3, timeout=180)
        proxy.silence()  # no reset, no FIN: as a partition or a host loss looks to the worker
        silenced_at = time.time()
        stopped = re.compile(rf"the leases of {job_id} were last renewed .* stopped without writing at ([0-9.]+)")

        def stop_line():
            return stopped.search(log.read_text(errors="replace"))

        try:
            devstack.wait_until(stop_line, 40, "the cut-off run to stop")
        except devstack.StackError:
            raise AssertionError("the run cut off from Redis did not stop within 40 s (blocked in a write?)") from None
        took = float(stop_line()[1]) - silenced_at
        print(f"cut-off run stopped {took:.1f} s after its worker lost Redis (visibility timeout {timeout_s:g} s)")
        # Its leases lapse two thirds of the timeout after their last renewal (at most an interval before the silence),
        # and it stops at its next step, before its lease could have expired for another worker's sweep.
        assert took < timeout_s, f"stopped {took:.1f} s after the partition"
        assert client.status(job_id).state != "SUCCESS"
        proxy.unsilence()
        # It let go of the message unacknowledged: the sweep hands it back, and it runs to the end once.
        assert client.wait(job_id, timeout=300).state == "SUCCESS"
        succeeded = f"{job_id}] succeeded"  # logged after the state is stored: under load the client sees it first
        devstack.wait_until(lambda: succeeded in log.read_text(errors="replace"), 30, "the worker's succeeded line")
        assert log.read_text(errors="replace").count(succeeded) == 1
        assert worker.poll() is None
    finally:
        proxy.stop()
