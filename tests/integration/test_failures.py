"""Each bad reference ends its job with a specific error; the same worker process then serves the next job."""

import json
import subprocess
import sys

import pytest

from kiq.names import GENERATE_TASK, job_record_key
from tests.helpers import http_server, image_bytes
from tests.integration.jobs import tiny_job

HTML = b"<!DOCTYPE html><html><head><title>Cat</title></head><body>a cat</body></html>"


@pytest.fixture(scope="module")
def web():
    routes = {"/cat.html": (200, "image/png", HTML), "/cat.png": (200, "image/png", image_bytes())}
    with http_server(routes) as base:
        yield base


def image_job(ref):
    return tiny_job({"text": "a cat", "weight": 0.5}, {"image": ref, "weight": 0.5})


CASES = [
    ("unreachable URL", "http://127.0.0.2:9/cat.png", "FetchUnavailable", "could not connect to 127.0.0.2:9"),
    ("URL serving HTML", "{web}/cat.html", "NotAnImage", "is not an image (got an HTML page)"),
    ("URL answering 404", "{web}/missing.png", "FetchError", "answered HTTP 404"),
    ("missing s3 key", "s3://kiq-test/inputs/no/such/key.png", "ObjectNotFound", "does not exist or is not readable"),
    ("other bucket", "s3://no-such-bucket/cat.png", "ReferenceNotAllowed", "outside what this worker may read"),
]


@pytest.mark.parametrize(("case", "ref", "error_type", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_reference_fails_specifically_and_worker_serves_next(worker, client, web, case, ref, error_type, message):
    pid = worker.pid
    failed = client.wait(client.submit(image_job(ref.format(web=web))), timeout=120)
    assert failed.state == "FAILURE"
    assert (failed.error.type, message in failed.error.message) == (error_type, True), failed.error
    ok = client.wait(client.submit(image_job(f"{web}/cat.png")), timeout=120)
    assert ok.state == "SUCCESS" and worker.poll() is None and worker.pid == pid


def test_invalid_job_is_refused_at_submit_and_nothing_is_enqueued(
    env, worker, client, redis_client, settings, tmp_path
):
    before = sorted(redis_client.scan_iter(job_record_key("*")))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(tiny_job(height=100, inputs=[{"text": "a", "weight": float("nan")}])))
    done = subprocess.run([sys.executable, "-m", "producer.cli", "submit", str(path)], env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert "inputs.0.weight: Input should be a finite number" in done.stderr
    assert "height: Input should be a multiple of 64" in done.stderr
    assert sorted(redis_client.scan_iter(job_record_key("*"))) == before
    assert redis_client.llen(settings.queue) == 0


def test_invalid_raw_message_fails_in_the_worker_with_job_invalid(worker, client):
    # A producer that skips validation (or an older client) must not crash the worker.
    result = client.app.send_task(GENERATE_TASK, args=[{"inputs": [], "height": 7}], queue=client.settings.queue)
    client.redis.set(job_record_key(result.id), json.dumps({"owner": "", "webhook_url": ""}))
    failed = client.wait(result.id, timeout=60)
    assert failed.state == "FAILURE" and failed.error.type == "JobInvalid"
    assert "inputs: List should have at least 1 item" in failed.error.message
    assert client.wait(client.submit(tiny_job()), timeout=120).state == "SUCCESS" and worker.poll() is None


def test_worker_with_missing_model_fails_at_start_instead_of_consuming(env, tmp_path):
    bad = {**env, "KIQ_DECODER_MODEL": str(tmp_path / "no-decoder"), "KIQ_QUEUE": "kiq-test-never-used"}
    done = subprocess.run([sys.executable, "-m", "producer.cli", "worker"], env=bad, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert done.returncode == 2
    assert f"KIQ_DECODER_MODEL='{tmp_path / 'no-decoder'}' could not be loaded" in done.stderr
    assert " ready." not in done.stdout + done.stderr
