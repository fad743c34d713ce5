"""Each worker's own speed: measured at warm-up, published in its heartbeat, kept current from its jobs; its
time limits come from it, and a job no live worker of its queue could finish within the cap is refused at
submit (client, CLI and HTTP API), before anything is uploaded or enqueued (issue 20, defects 5 and 9)."""

import hashlib
import json
import subprocess
import sys

from fastapi.testclient import TestClient

from kiq.celeryconf import priority_lists
from kiq.contract import parse_job
from kiq.errors import JobTooLong
from kiq.limits import Speed, decoder_units, expected_seconds, time_limits
from kiq.names import idempotency_key, job_record_key
from kiq.s3 import input_prefix
from kiq.settings import Settings
from producer.api import create_api
from tests.helpers import client_for, own_queue
from tests.integration.jobs import image_input, tiny_job

# 120 frames x 500 steps at 2048x2048: 64,000 s by kiq's own model at the reference speed, over the 3 h cap.
IMPOSSIBLE_SWEEP = tiny_job(
    {"text": "a cat", "weight": 1.0}, image_input(0.0), height=2048, width=2048, decoder_steps=500,
    sweep={"to": [0.0, 1.0], "frames": 120},
)  # fmt: skip
# Fits the cap at the reference speed (about 71 min), not on a CPU worker with the tiny models (days).
TOO_LONG_FOR_CPU = tiny_job(height=2048, width=2048, decoder_steps=500, num_images=8)


def beats_of(client, queue):
    return [w for w in client.fleet() if w["queues"] == queue]


def test_a_worker_slower_than_the_reference_speed_runs_a_legitimate_job_to_success(env, spawn_worker):
    # Issue 20: on defaults a CPU worker ran a 256x256 80-step job 304 s against the reference speed's 300 s floor,
    # and it failed JobTimeout. Scaled down: the reference speed says milliseconds, so its limit is the 0.5 s floor.
    # A factor of 10 (not 4): headroom for a CI machine whose load changes between the warm-up probe and the job.
    overrides = own_queue(KIQ_PRIOR_STEP_S="0.00001", KIQ_DECODER_STEP_S="0.00001", KIQ_TIME_LIMIT_MIN_S="0.5",
                          KIQ_TIME_LIMIT_FACTOR="10")  # fmt: skip
    client = client_for(env, overrides)
    spawn_worker("own-speed", **overrides)
    job = tiny_job(decoder_steps=8)
    assert time_limits(parse_job(job), client.settings).soft_s == 0.5
    [probed] = beats_of(client, overrides["KIQ_QUEUE"])  # before any job
    final = client.wait(client.submit(job), timeout=120)
    assert final.state == "SUCCESS", final.error
    assert (probed["speed_source"], probed["speed_jobs"]) == ("probe", "0")  # measured at warm-up
    assert float(probed["decoder_step_s"]) > 10 * Settings().decoder_step_s  # a CPU: far slower than the default
    timings = final.result.timings
    assert timings["prior"] + timings["decoder"] > 0.5  # longer than the reference speed's limit allowed

    [beat] = beats_of(client, overrides["KIQ_QUEUE"])
    measured = float(beat["decoder_step_s"])
    observed = timings["decoder"] / decoder_units(parse_job(job))  # this job's own seconds per 768x768 step
    assert observed / 10 < measured < observed * 10, (measured, observed)  # the probe's value moved toward the job's
    assert float(beat["prior_step_s"]) > 0
    assert (beat["speed_source"], beat["speed_jobs"]) == ("jobs", "1")  # the probe's value, then this job's
    assert float(beat["limit_max_s"]) == client.settings.time_limit_max_s


def test_an_impossible_sweep_is_refused_by_the_client_before_any_upload_or_enqueue(
    worker, client, redis_client, s3, settings
):
    depths = [redis_client.llen(name) for name in priority_lists(settings.queue)]
    job_id = "never-enqueued-sweep"
    try:
        client.submit(IMPOSSIBLE_SWEEP, job_id=job_id)
        raise AssertionError("the impossible sweep was accepted")
    except JobTooLong as exc:
        refused = exc
    assert "live worker(s) of queue" in str(refused) and "over its 3.0 h cap (KIQ_TIME_LIMIT_MAX_S)" in str(refused)
    assert refused.expected_s > refused.limit_s == settings.time_limit_max_s
    assert_nothing_stored(redis_client, s3, settings, job_id, depths)


def test_a_job_the_reference_speed_allows_is_refused_by_the_live_workers_speed(worker, client):
    reference = Speed.reference(client.settings)
    assert expected_seconds(parse_job(TOO_LONG_FOR_CPU), reference) < 3 * 3600
    try:
        client.submit(TOO_LONG_FOR_CPU)
        raise AssertionError("accepted a job this CPU worker cannot finish")
    except JobTooLong as exc:
        assert exc.workers >= 1 and exc.expected_s > 3 * 3600, str(exc)


def test_with_no_live_worker_the_reference_speed_decides_and_the_error_says_so(env):
    client = client_for(env, own_queue())
    try:
        client.submit(IMPOSSIBLE_SWEEP)
        raise AssertionError("the impossible sweep was accepted")
    except JobTooLong as exc:
        assert "at the reference speed (KIQ_PRIOR_STEP_S=0.05, KIQ_DECODER_STEP_S=0.15; no live worker" in str(exc)
        assert 60_000 < exc.expected_s < 70_000 and exc.workers == 0


def test_the_cli_reports_a_refused_sweep_and_exits_2(env, worker, tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(IMPOSSIBLE_SWEEP))
    done = subprocess.run([sys.executable, "-m", "producer.cli", "submit", str(path)], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("kiq: job would take about") and "cap (KIQ_TIME_LIMIT_MAX_S)" in done.stderr


def test_the_api_refuses_an_impossible_sweep_with_422_and_stores_nothing(worker, settings, redis_client, s3):
    depths = [redis_client.llen(name) for name in priority_lists(settings.queue)]
    before = objects(s3, settings, settings.s3_input_prefix)
    records = set(redis_client.scan_iter(job_record_key("*")))
    job = {**IMPOSSIBLE_SWEEP, "inputs": [IMPOSSIBLE_SWEEP["inputs"][0], {"image": "upload:cat", "weight": 0.0}]}
    with TestClient(create_api(settings)) as api:
        response = api.post("/v1/jobs", data={"job": json.dumps(job)}, headers={"Idempotency-Key": "too-long-1"},
                            files={"cat": ("cat.png", b"\x89PNG-not-read", "image/png")})  # fmt: skip
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["type"] == "JobTooLong" and problem["expected_s"] > problem["limit_s"] == 3 * 3600
    assert "live worker(s) of queue" in problem["msg"]
    assert objects(s3, settings, settings.s3_input_prefix) == before
    assert set(redis_client.scan_iter(job_record_key("*"))) == records
    assert redis_client.exists(idempotency_key("public", hashlib.sha256(b"too-long-1").hexdigest())) == 0
    assert [redis_client.llen(name) for name in priority_lists(settings.queue)] == depths


def assert_nothing_stored(redis_client, s3, settings, job_id, depths):
    assert redis_client.exists(job_record_key(job_id), f"celery-task-meta-{job_id}") == 0
    assert objects(s3, settings, input_prefix(settings, "", job_id)) == []
    assert [redis_client.llen(name) for name in priority_lists(settings.queue)] == depths


def objects(s3, settings, prefix):
    listed = s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))
