"""Nothing lost, nothing run twice: worker SIGKILL, poison jobs, a Redis restart and an S3 outage, each with
real processes on loopback."""

import json
import os
import signal
import time

import pytest

from kiq.names import deliveries_key
from kiq.webhooks import verify
from producer import devstack
from tests.helpers import FAST_REDELIVERY, client_for, count_in_logs, objects_of, own_queue, wait_for_step
from tests.integration.jobs import tiny_job
from tests.proxy import Proxy


def test_sigkill_mid_denoising_then_restart_completes_exactly_once(env, spawn_worker, s3, settings, redis_client):
    overrides = own_queue(**FAST_REDELIVERY)
    client = client_for(env, overrides)
    first, first_log = spawn_worker("killed", **overrides)
    job_id = client.submit(tiny_job(decoder_steps=10, num_images=2))
    wait_for_step(client, job_id)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    _, second_log = spawn_worker("restarted", **overrides)
    final = client.wait(job_id, timeout=90)
    assert final.state == "SUCCESS", final.error
    assert sorted(objects_of(s3, settings, job_id)) == [f"jobs/{job_id}/0.png", f"jobs/{job_id}/1.png"]
    assert count_in_logs([first_log, second_log], f"[{job_id}] succeeded") == 1
    assert not redis_client.exists(deliveries_key(job_id))


def test_job_that_keeps_killing_its_worker_fails_as_poison_and_says_so_once(env, spawn_worker, s3, settings,
                                                                            webhooks):  # fmt: skip
    receiver, secret = webhooks
    overrides = own_queue(KIQ_MAX_DELIVERIES="1", **FAST_REDELIVERY)
    client = client_for(env, overrides)
    worker, _ = spawn_worker("poisoned", **overrides)
    job_id = client.submit(tiny_job(decoder_steps=10, webhook_url=receiver.url))
    wait_for_step(client, job_id)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    survivor, _ = spawn_worker("after-poison", **overrides)
    final = client.wait(job_id, timeout=90)
    assert (final.state, final.error.type) == ("FAILURE", "PoisonJob")
    assert "delivered 2 times" in final.error.message and "KIQ_MAX_DELIVERIES=1" in final.error.message
    assert objects_of(s3, settings, job_id) == []
    assert client.wait(client.submit(tiny_job()), timeout=60).state == "SUCCESS" and survivor.poll() is None
    devstack.wait_until(lambda: receiver.calls, 30, "the PoisonJob webhook")
    time.sleep(2)  # room for a second webhook, which must not come
    ((headers, body),) = receiver.calls
    verify(secret, headers, body)
    assert json.loads(body)["error"]["type"] == "PoisonJob"


def test_redis_restart_with_jobs_queued_and_running(env, spawn_worker, own_redis, s3, settings):
    url, procs, start_redis = own_redis
    overrides = own_queue(
        KIQ_BROKER_URL=url,
        KIQ_VISIBILITY_TIMEOUT_S="10",
    )
    client = client_for(env, overrides)
    _, log = spawn_worker("redis-restart", **overrides)
    before = [client.submit(tiny_job(decoder_steps=8, seed=n)) for n in range(3)]
    wait_for_step(client, before[0])
    procs[-1].terminate()  # Redis goes away with one job running and two queued
    procs[-1].wait()
    time.sleep(2)
    start_redis()
    after = [client.submit(tiny_job(seed=10 + n)) for n in range(2)]
    for job_id in before + after:
        final = client.wait(job_id, timeout=120)
        assert final.state == "SUCCESS", (job_id, final.error)
        assert objects_of(s3, settings, job_id) == [f"jobs/{job_id}/0.png"]
        assert count_in_logs([log], f"[{job_id}] succeeded") == 1


@pytest.fixture
def s3_proxy(env):
    proxy = Proxy(int(env["KIQ_S3_ENDPOINT_URL"].rsplit(":", 1)[1]))
    proxy.start()
    yield proxy
    proxy.stop()


def test_s3_outage_during_upload_waits_then_completes_or_fails_clearly_past_the_bound(
    env, spawn_worker, s3_proxy, s3, settings
):
    overrides = own_queue(KIQ_S3_ENDPOINT_URL=s3_proxy.url, KIQ_S3_RETRY_S="8")
    client = client_for(env, overrides)
    spawn_worker("s3-outage", **overrides)
    short = client.submit(tiny_job(decoder_steps=6))
    wait_for_step(client, short, step=1)
    s3_proxy.stop()
    time.sleep(4)  # the upload starts and retries meanwhile
    s3_proxy.start()
    final = client.wait(short, timeout=60)
    assert final.state == "SUCCESS", final.error
    assert objects_of(s3, settings, short) == [f"jobs/{short}/0.png"]

    long = client.submit(tiny_job(decoder_steps=6))
    wait_for_step(client, long, step=1)
    s3_proxy.stop()
    failed = client.wait(long, timeout=60)
    s3_proxy.start()
    assert (failed.state, failed.error.type, failed.error.retryable) == ("FAILURE", "StorageUnavailable", True)
    assert "still failing after 8 s of retries" in failed.error.message
    assert client.wait(client.submit(tiny_job()), timeout=60).state == "SUCCESS"


def test_job_past_its_soft_time_limit_fails_with_job_timeout(env, spawn_worker, s3, settings):
    # Limits come from the worker's own measured speed: a factor far below 1 makes the limit (the 10 s floor) shorter
    # than the job, which it expects to take a minute or more (so submit accepts it, within the 3 h cap).
    overrides = own_queue(KIQ_TIME_LIMIT_FACTOR="0.01", KIQ_TIME_LIMIT_MIN_S="10", KIQ_TIME_LIMIT_GRACE_S="30")
    client = client_for(env, overrides)
    worker, _ = spawn_worker("time-limit", **overrides)
    job_id = client.submit(tiny_job(decoder_steps=300))  # minutes on any CPU here
    final = client.wait(job_id, timeout=60)
    assert (final.state, final.error.type) == ("FAILURE", "JobTimeout")
    assert "ran past its 10 s time limit" in final.error.message
    assert objects_of(s3, settings, job_id) == []
    assert client.wait(client.submit(tiny_job(prior_steps=2, decoder_steps=1)), timeout=60).state == "SUCCESS"
    assert worker.poll() is None
