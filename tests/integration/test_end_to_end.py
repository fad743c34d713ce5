"""Producer -> Redis -> worker process (mindone, tiny weights, CPU) -> moto S3, through the CLI and the client."""

import json
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from kiq.errors import UnknownJob
from kiq.names import events_key
from tests.helpers import image_bytes, kiq_cli, wait_for_step
from tests.integration.jobs import image_input, read_object, tiny_job


def test_cli_submit_wait_success_with_all_reference_kinds(env, worker, s3, settings, tmp_path):
    s3.put_object(Bucket=settings.s3_bucket, Key="inputs/starry.png", Body=image_bytes(size=(50, 30)))
    job = tiny_job(
        {"text": "a cat", "weight": 0.3},
        image_input(0.3),
        {"image": f"s3://{settings.s3_bucket}/inputs/starry.png", "weight": 0.4},
        height=128,
        width=64,
    )
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    done = kiq_cli(env, "submit", str(path), "--wait")
    assert done.returncode == 0, done.stderr
    job_id, status_json = done.stdout.split("\n", 1)
    status = json.loads(status_json)
    assert (status["id"], status["state"]) == (job_id, "SUCCESS")
    image_ref = status["result"]["images"][0]
    assert image_ref["uri"] == f"s3://{settings.s3_bucket}/{settings.s3_prefix}{job_id}/0.png"
    image, metadata = read_object(s3, image_ref["uri"])
    assert (image.format, image.size) == ("PNG", (64, 128))
    assert metadata["kiq-seed"] == "7" and metadata["kiq-job-id"] == job_id
    assert status["result"]["device"] == "cpu:0"
    assert set(status["result"]["timings"]) == {"fetch", "prior", "decoder", "encode", "upload"}


def test_cli_reads_stdin_and_prints_only_the_id(env, worker, client):
    done = kiq_cli(env, "submit", "-", stdin=json.dumps(tiny_job()))
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert len(job_id) == 36 and "\n" not in job_id
    waited = kiq_cli(env, "wait", job_id, "--timeout", "120")
    assert waited.returncode == 0 and json.loads(waited.stdout)["state"] == "SUCCESS"
    status = kiq_cli(env, "status", job_id)
    assert json.loads(status.stdout)["state"] == "SUCCESS"


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_client_formats_multiple_images_and_presigned_urls(worker, client, s3, fmt, pil_format):
    job_id = client.submit(tiny_job(image_input(1.0), output_format=fmt, num_images=2, width=128))
    final = client.wait(job_id, timeout=120)
    assert final.state == "SUCCESS", final.error
    assert len(final.result.images) == 2
    for n, ref in enumerate(final.result.images):
        assert ref.uri.endswith(f"/{job_id}/{n}.{fmt}")
        image, _ = read_object(s3, ref.uri)
        assert (image.format, image.size, ref.format) == (pil_format, (128, 64), fmt)
        with urllib.request.urlopen(ref.url, timeout=10) as response:
            assert (
                response.read()[:4]
                == s3.get_object(Bucket=ref.uri.split("/")[2], Key=ref.uri.split("/", 3)[3])["Body"].read()[:4]
            )


def test_progress_per_decoder_step_then_success(worker, client):
    seen = []
    job_id = client.submit(tiny_job(decoder_steps=12))
    final = client.wait(job_id, timeout=120, on_progress=seen.append)
    assert final.state == "SUCCESS"
    decoder_steps = [s.progress.step for s in seen if s.progress and s.progress.stage == "decoder"]
    assert len(decoder_steps) >= 3 and decoder_steps == sorted(decoder_steps)
    assert all(s.progress.total == 12 for s in seen if s.progress and s.progress.stage == "decoder")


def test_a_producer_holds_no_subscription_per_job_it_sent(worker, client, redis_client):
    job_id = client.submit(tiny_job(decoder_steps=2))
    channel = client.app.backend.get_key_for_task(job_id)
    assert redis_client.pubsub_numsub(channel) == [(channel, 0)]  # Celery would subscribe the sender
    assert client.wait(job_id, timeout=120).state == "SUCCESS"


def test_same_seed_same_image_and_absent_seed_is_reported(worker, client, s3):
    first, second = (client.wait(client.submit(tiny_job()), timeout=120) for _ in range(2))
    a, _ = read_object(s3, first.result.images[0].uri)
    b, _ = read_object(s3, second.result.images[0].uri)
    assert a.tobytes() == b.tobytes()
    unseeded = client.wait(client.submit(tiny_job(seed=None)), timeout=120)
    assert unseeded.state == "SUCCESS" and 0 <= unseeded.result.seed < 2**32


def test_unknown_id(env, client):
    with pytest.raises(UnknownJob):
        client.status("00000000-0000-0000-0000-000000000000")
    assert kiq_cli(env, "status", "no-such-job").returncode == 4


def test_cancel_queued_and_running_jobs_and_wait_timeout(env, worker, client, s3, settings):
    running = client.submit(tiny_job(decoder_steps=60))
    queued = client.submit(tiny_job())
    deadline = time.monotonic() + 60
    while client.status(running).state not in ("PROGRESS",) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kiq_cli(env, "wait", running, "--timeout", "0.5").returncode == 3
    assert client.cancel(queued).state == "REVOKED"
    cancelled = kiq_cli(env, "cancel", running)
    assert cancelled.returncode == 0, cancelled.stderr
    assert client.wait(running, timeout=60).state == "REVOKED"
    assert kiq_cli(env, "wait", queued).returncode == 1
    listed = s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert not [k for k in keys if running in k or queued in k]
    assert client.wait(client.submit(tiny_job()), timeout=120).state == "SUCCESS"


def test_a_final_state_written_while_the_job_runs_is_the_one_that_stays(worker, client, logs):
    """The API's cancel of a job it read as PENDING writes REVOKED unfenced, and the job's run may just have
    started (the long campaign's run 3 polled REVOKED, then PROGRESS). Here that REVOKED lands mid-run without the
    cancel flag, the most the race allows (the flag stops a run at its next step): the run's later PROGRESS and
    SUCCESS writes are dropped, every poll reads REVOKED and the event stream ends with it, once."""
    job_id = client.submit(tiny_job(decoder_steps=40))
    wait_for_step(client, job_id, step=2)
    client.app.backend.mark_as_revoked(job_id, reason="cancelled")
    dropped, seen = f"job {job_id} is final already; its SUCCESS write was dropped", set()
    deadline = time.monotonic() + 120
    while dropped not in (logs / "worker.log").read_text(errors="replace"):
        assert time.monotonic() < deadline, seen
        seen.add(client.status(job_id).state)
        time.sleep(0.02)
    assert seen | {client.status(job_id).state} == {"REVOKED"}
    events = [json.loads(meta[b"meta"])["status"] for _, meta in client.redis.xrange(events_key(job_id))]
    assert events[-1] == "REVOKED" and events.count("REVOKED") == 1, events


def test_wait_draws_a_progress_bar_only_on_a_terminal(env, worker, tmp_path):
    import os
    import pty

    path = tmp_path / "job.json"
    path.write_text(json.dumps(tiny_job(decoder_steps=8)))
    master, slave = pty.openpty()
    chunks = []

    def drain():  # keep reading so the child never blocks on a full pty buffer
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with subprocess.Popen([sys.executable, "-m", "producer.cli", "submit", str(path), "--wait"], env=env,
                          stdout=subprocess.PIPE, stderr=slave) as proc:  # fmt: skip
        os.close(slave)
        out, _ = proc.communicate(timeout=120)
    reader.join(5)
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "\r" in terminal and "decoder [" in terminal and "/8" in terminal
    assert json.loads(out.decode().split("\n", 1)[1])["state"] == "SUCCESS"  # stdout: id, then the status only
    piped = kiq_cli(env, "submit", str(path), "--wait")
    assert piped.returncode == 0 and "decoder [" not in piped.stderr
