"""Deletion and retention against real Redis, the moto S3 server, a `kiq api` process and the session's worker:
deleted outputs (a sweep's frames and animation too) and uploaded inputs are gone from S3 and the job answers 410
to its tenant (404 to others); lifecycle rules and `kiq gc` age objects out."""

import hashlib
import json
import subprocess
import time

import httpx
import pytest

from kiq.errors import OutputsDeleted
from kiq.names import job_record_key
from kiq.settings import Settings
from producer import devstack, retention
from tests.helpers import image_bytes, wait_state
from tests.integration.jobs import tiny_job

KEY_A, KEY_B = "retention-key-a-0123456789", "retention-key-b-0123456789"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
OWNER_A = hashlib.sha256(KEY_A.encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def api(env, logs, worker):
    api_env = {**env, "KIQ_API_KEYS": f"{KEY_A},{KEY_B}", "KIQ_API_PORT": str(devstack.free_port())}
    base = f"http://127.0.0.1:{api_env['KIQ_API_PORT']}"
    with devstack.Stack() as stack:
        proc = stack.spawn([*devstack.kiq_command(), "api"], logs / "retention-api.log", api_env)
        devstack.wait_until(
            lambda: devstack.http_up(base + "/healthz"), 60, "kiq api", proc, logs / "retention-api.log"
        )
        with httpx.Client(base_url=base, timeout=60) as http:
            yield http


def keys_under(s3, settings, prefix):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=prefix).get("Contents", []))


def test_delete_a_jobs_outputs_and_uploaded_inputs_then_410(api, s3, settings):
    job = tiny_job({"text": "a cat", "weight": 0.5}, {"image": "upload:cat", "weight": 0.5}, num_images=2)
    files = {"cat": ("cat.png", image_bytes(), "image/png")}
    job_id = api.post("/v1/jobs", data={"job": json.dumps(job)}, files=files, headers=A).json()["id"]
    assert wait_state(api, job_id, A, timeout=600)["state"] == "SUCCESS"
    outputs, inputs = f"{settings.s3_prefix}{job_id}/", f"{settings.s3_input_prefix}{OWNER_A}/{job_id}/"
    assert len(keys_under(s3, settings, outputs)) == 2 and len(keys_under(s3, settings, inputs)) == 1

    assert api.delete(f"/v1/jobs/{job_id}/outputs", headers=B).status_code == 404  # another tenant: as today
    deleted = api.delete(f"/v1/jobs/{job_id}/outputs", headers=A)
    assert deleted.status_code == 200 and deleted.json() == {"id": job_id, "objects": 3}
    assert keys_under(s3, settings, outputs) == keys_under(s3, settings, inputs) == []
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/images/0", f"/v1/jobs/{job_id}/outputs"):
        answer = api.delete(path, headers=A) if path.endswith("outputs") else api.get(path, headers=A)
        assert answer.status_code == 410 and answer.json()["detail"]["type"] == "OutputsDeleted", (path, answer.text)
        assert api.get(f"/v1/jobs/{job_id}", headers=B).status_code == 404
    assert job_id not in [j["id"] for j in api.get("/v1/jobs", headers=A).json()["jobs"]]


def test_delete_a_sweeps_frames_and_animation(api, s3, settings):
    sweep = tiny_job({"text": "a cat", "weight": 1.0}, {"text": "a dog", "weight": 0.0},
                     sweep={"to": [0.0, 1.0], "frames": 3}, animation={"format": "gif"})  # fmt: skip
    job_id = api.post("/v1/jobs", json=sweep, headers=A).json()["id"]
    assert wait_state(api, job_id, A, timeout=600)["state"] == "SUCCESS"
    prefix = f"{settings.s3_prefix}{job_id}/"
    assert keys_under(s3, settings, prefix) == [f"{prefix}{n}" for n in ("0.png", "1.png", "2.png", "animation.gif")]
    assert api.delete(f"/v1/jobs/{job_id}/outputs", headers=A).json()["objects"] == 4
    assert keys_under(s3, settings, prefix) == []
    assert api.get(f"/v1/jobs/{job_id}/animation", headers=A).status_code == 410


def test_a_running_job_is_refused_409_until_it_ends(api):
    job_id = api.post("/v1/jobs", json=tiny_job(decoder_steps=60), headers=A).json()["id"]
    wait_state(api, job_id, A, states=("PROGRESS",), timeout=600)
    busy = api.delete(f"/v1/jobs/{job_id}/outputs", headers=A)
    assert busy.status_code == 409 and busy.json()["detail"]["type"] == "JobNotFinished"
    assert "cancel it first" in busy.json()["detail"]["msg"]
    assert api.delete(f"/v1/jobs/{job_id}", headers=A).status_code == 202
    assert wait_state(api, job_id, A, timeout=600)["state"] == "REVOKED"
    assert api.delete(f"/v1/jobs/{job_id}/outputs", headers=A).status_code == 200


def test_kiq_delete_then_status_exits_6(env, client, s3, settings):
    job_id = client.submit(tiny_job())
    assert client.wait(job_id, timeout=600).state == "SUCCESS"
    run = [*devstack.kiq_command()]
    deleted = subprocess.run([*run, "delete", job_id], env=env, capture_output=True, text=True, timeout=60)
    assert deleted.returncode == 0 and json.loads(deleted.stdout) == {"id": job_id, "objects": 1}, deleted.stderr
    assert keys_under(s3, settings, f"{settings.s3_prefix}{job_id}/") == []
    status = subprocess.run([*run, "status", job_id], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 6 and "were deleted" in status.stderr
    with pytest.raises(OutputsDeleted):
        client.status(job_id)


def test_lifecycle_rules_on_the_s3_server_keep_other_rules(env, s3):
    bucket = "kiq-lifecycle-test"
    devstack.ensure_bucket(env["KIQ_S3_ENDPOINT_URL"], bucket, "us-east-1")
    other = {"ID": "theirs", "Filter": {"Prefix": "logs/"}, "Status": "Enabled", "Expiration": {"Days": 3}}
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [other]})
    settings = Settings.from_env({**env, "KIQ_S3_BUCKET": bucket, "KIQ_RETENTION_DAYS": "2"})
    assert retention.apply_lifecycle(s3, settings)
    assert retention.apply_lifecycle(s3, settings)  # again at the next start: replaced, not added
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    assert sorted(rules) == ["kiq-inputs", "kiq-outputs", "theirs"]
    assert rules["kiq-outputs"]["Filter"]["Prefix"] == "jobs/" and rules["kiq-outputs"]["Expiration"]["Days"] == 2
    assert rules["kiq-inputs"]["Filter"]["Prefix"] == "inputs/"


def test_gc_deletes_what_is_older_than_the_retention_with_a_dry_run_first(env, client, s3, redis_client):
    bucket = "kiq-gc-test"
    devstack.ensure_bucket(env["KIQ_S3_ENDPOINT_URL"], bucket, "us-east-1")
    gc_env = {**env, "KIQ_S3_BUCKET": bucket}
    redis_client.set(job_record_key("job-old"), json.dumps({"owner": "tenant", "webhook_url": ""}), ex=600)
    old = ["jobs/job-old/0.png", "jobs/job-old/animation.gif", "inputs/tenant/job-old/upload-1"]
    for key in old:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    cutoff_soon = time.time() + 2 * 86400  # as if two days passed: every object is older than one day
    gc_settings = Settings.from_env(gc_env)
    dry = retention.gc(client, s3, gc_settings, days=1, dry_run=True, now=cutoff_soon)
    assert sorted(dry.keys) == sorted(old) and dry.jobs == {"job-old"}
    assert len(keys_under(s3, gc_settings, "")) == 3  # a dry run deletes nothing
    assert retention.gc(client, s3, gc_settings, days=1, now=time.time()).keys == []  # nothing a day old yet
    cli = subprocess.run([*devstack.kiq_command(), "gc", "--days", "1", "--dry-run"], env=gc_env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert cli.returncode == 0 and "would delete 0 object(s)" in cli.stderr, cli.stderr
    assert sorted(retention.gc(client, s3, gc_settings, days=1, now=cutoff_soon).keys) == sorted(old)
    assert keys_under(s3, gc_settings, "") == []
    with pytest.raises(OutputsDeleted):  # the job whose outputs aged out has its tombstone
        client.status("job-old")
