"""Expiry on real Redis, S3 and `kiq worker` processes: a job not started by its deadline (Redis's clock) ends
EXPIRED with its webhook and never runs, also when it sat in a worker's prefetch or was redelivered after it."""

import json
import os
import signal
import subprocess
import time
import uuid

import pytest
from celery.result import AsyncResult

from kiq.names import expires_key, unacked_keys
from kiq.settings import Settings
from producer import devstack
from producer.client import Client
from tests.helpers import Receiver
from tests.integration.jobs import tiny_job

LONG = {"decoder_steps": 40}  # seconds on the tiny models (minutes on a loaded 2-core machine)


@pytest.fixture
def hooks(env, logs):
    """A `kiq webhook-worker` process and a receiver."""
    log = logs / f"expiry-webhooks-{uuid.uuid4().hex[:6]}.log"
    with Receiver() as receiver, devstack.Stack() as stack:
        proc = stack.spawn([*devstack.kiq_command(), "webhook-worker"], log, {**env, "KIQ_WEBHOOK_SECRET": "s"})
        devstack.wait_until(lambda: log.exists() and " ready." in log.read_text(errors="replace"), 60, "webhooks",
                            proc)  # fmt: skip
        yield receiver


def own_queue(**overrides):
    return {"KIQ_QUEUE": f"kiq-expiry-{uuid.uuid4().hex[:8]}", **overrides}


def objects_of(s3, settings, job_id):
    return s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=f"{settings.s3_prefix}{job_id}/").get("Contents", [])


def hook_states(receiver, job_id, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [json.loads(body)["state"] for _, body in receiver.calls if json.loads(body)["id"] == job_id]
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no webhook for {job_id}")


def event_states(client, job_id):
    return [event.status.state for event in client.events(job_id, timeout=5)]


def wait_started(client, job_id, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.status(job_id)
        if status.progress is not None and status.progress.stage == "decoder":
            return
        assert not status.done, status
        time.sleep(0.05)
    raise AssertionError(f"{job_id} never reached its decoder")


def test_a_job_prefetched_past_its_deadline_ends_expired_unrun_with_its_webhook(env, spawn_worker, s3, settings,
                                                                                 redis_client, hooks):  # fmt: skip
    overrides = own_queue(KIQ_DECODER_BATCH="2")  # threads pool, prefetch 2: the consumer reserves while a job runs
    client = Client(Settings.from_env({**env, **overrides}))
    spawn_worker("expiry-prefetch", **overrides)
    busy = client.submit(tiny_job(**LONG))
    wait_started(client, busy)
    # Another shape, so it cannot join the running job's decoder batch: it waits in the worker's prefetch.
    late = client.submit(tiny_job(width=128, expires_in_s=1, webhook_url=hooks.url))
    unacked = unacked_keys(settings.visibility_timeout_s)["unacked_key"]
    devstack.wait_until(lambda: any(late in v.decode() for v in redis_client.hvals(unacked)), 120, "prefetch")
    assert client.status(busy).state == "PROGRESS"  # still running: the late job is reserved, not started
    time.sleep(1.5)  # its deadline passes while it is held
    final = client.wait(late, timeout=600)
    assert final.state == "EXPIRED" and final.error.type == "JobExpired", final
    assert "never ran" in final.error.message
    assert client.wait(busy, timeout=600).state == "SUCCESS"
    assert objects_of(s3, settings, late) == []
    assert event_states(client, late) == ["EXPIRED"]  # no STARTED, no progress: it never ran
    assert hook_states(hooks, late) == ["EXPIRED"]
    # Plain Celery clients and Flower see a revoked task (kiq stores EXPIRED as REVOKED with a JobExpired).
    assert AsyncResult(late, app=client.app).state == "REVOKED"
    shown = subprocess.run([*devstack.kiq_command(), "status", late], env={**env, **overrides}, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "EXPIRED"
    assert client.jobs(state="EXPIRED").jobs[0].id == late


def test_a_job_redelivered_after_its_deadline_is_not_run_again(env, spawn_worker, s3, settings, hooks):
    overrides = own_queue(KIQ_VISIBILITY_TIMEOUT_S="6")  # the killed worker's job comes back within seconds
    client = Client(Settings.from_env({**env, **overrides}))
    first, _ = spawn_worker("expiry-killed", **overrides)
    job_id = client.submit(tiny_job(expires_in_s=3, webhook_url=hooks.url, **LONG))
    wait_started(client, job_id)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(3)  # past its deadline before any worker could take it again
    _, second_log = spawn_worker("expiry-restarted", **overrides)
    final = client.wait(job_id, timeout=600)
    assert final.state == "EXPIRED", final
    assert objects_of(s3, settings, job_id) == []
    assert f"job {job_id} expired" in second_log.read_text(errors="replace")
    assert hook_states(hooks, job_id) == ["EXPIRED"]


def test_a_foreign_celery_job_gets_the_default_deadline_and_runs(env, worker, client, redis_client):
    """A job sent by name without kiq's headers is stamped with a deadline on first sight and runs normally."""
    job_id = str(uuid.uuid4())
    client.app.send_task("kiq.generate", args=[tiny_job()], task_id=job_id, queue=env["KIQ_QUEUE"])
    assert AsyncResult(job_id, app=client.app).get(timeout=600)["images"]
    stamped = float(redis_client.get(expires_key(job_id)))
    now = float(redis_client.time()[0])
    assert 0 < stamped - now <= Settings().job_expires_s
