"""The HTTP API against the real Redis, the moto S3 server, a `kiq api` process, the session's worker and a
`kiq webhook-worker` process; schemathesis runs in-process against the app's own OpenAPI schema."""

import base64
import hashlib
import io
import json
import re
import time
import uuid
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from PIL import Image

from kiq.settings import Settings
from kiq.webhooks import InvalidSignature, verify
from producer import devstack
from producer.api import create_api
from tests.helpers import Receiver, image_bytes, wait_state
from tests.integration.jobs import image_input, tiny_job
from tests.proxy import Proxy

KEY_A, KEY_B, SECRET = "key-a-0123456789", "key-b-9876543210", "webhook-secret-for-tests"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
OWNER_A = hashlib.sha256(KEY_A.encode()).hexdigest()[:16]
# Tenant A may use priority 9 and one extra queue; B (from KIQ_API_KEYS) has the defaults.
TENANTS = {"tenants": [{"name": "a", "key": KEY_A, "max_priority": 9, "queues": ["kiq-a-only"]}]}


@pytest.fixture(scope="module")
def api_env(env):
    return {**env, "KIQ_API_KEYS": KEY_B, "KIQ_API_TENANTS": json.dumps(TENANTS),
            "KIQ_API_PORT": str(devstack.free_port()), "KIQ_WEBHOOK_SECRET": SECRET,
            "KIQ_API_MAX_BODY_BYTES": str(8 * 1024 * 1024)}  # fmt: skip


def start_api(stack, api_env, log):
    base = f"http://127.0.0.1:{api_env['KIQ_API_PORT']}"
    proc = stack.spawn([*devstack.kiq_command(), "api"], log, api_env)
    devstack.wait_until(lambda: devstack.http_up(base + "/healthz"), 60, "kiq api", proc, log)
    return httpx.Client(base_url=base, timeout=60)


@pytest.fixture(scope="module")
def api(api_env, logs, worker):
    with devstack.Stack() as stack, start_api(stack, api_env, logs / "api.log") as http:
        stack.spawn([*devstack.kiq_command(), "webhook-worker"], logs / "webhooks.log", api_env)
        yield http


def test_submit_json_poll_and_follow_the_image_redirect(api):
    response = api.post("/v1/jobs", json=tiny_job(width=128), headers=A)
    assert response.status_code == 202
    job_id = response.json()["id"]
    assert response.json()["status_url"] == f"/v1/jobs/{job_id}"
    assert wait_state(api, job_id, A)["state"] == "SUCCESS"
    redirect = api.get(f"/v1/jobs/{job_id}/images/0", headers=A)
    assert redirect.status_code == 307
    image = Image.open(io.BytesIO(httpx.get(redirect.headers["location"]).content))
    assert (image.format, image.size) == ("PNG", (128, 64))
    assert api.get(f"/v1/jobs/{job_id}/images/1", headers=A).status_code == 404


def test_idempotency_key(api, redis_client):
    key = {"Idempotency-Key": str(uuid.uuid4()), **A}
    first = api.post("/v1/jobs", json=tiny_job(seed=101), headers=key)
    again = api.post("/v1/jobs", json=tiny_job(seed=101), headers=key)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = api.post("/v1/jobs", json=tiny_job(seed=102), headers=key)
    assert other.status_code == 409 and "different request body" in other.json()["detail"]
    assert api.post("/v1/jobs", json=tiny_job(seed=101), headers={**key, **B}).json()["id"] != first.json()["id"]


def test_cancel_before_start_and_during_denoising(api):
    running = api.post("/v1/jobs", json=tiny_job(decoder_steps=60), headers=A).json()["id"]
    queued = api.post("/v1/jobs", json=tiny_job(), headers=A).json()["id"]
    wait_state(api, running, A, states=("PROGRESS",))
    cancelled = api.delete(f"/v1/jobs/{queued}", headers=A)
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "REVOKED"
    assert api.delete(f"/v1/jobs/{running}", headers=A).status_code == 202
    assert wait_state(api, running, A)["state"] == "REVOKED"
    assert api.get(f"/v1/jobs/{running}/images/0", headers=A).status_code == 409


def test_webhook_is_signed_retried_after_a_500_and_sent_for_cancels(api):
    with Receiver(failures=1) as receiver:
        job_id = api.post("/v1/jobs", json=tiny_job(webhook_url=receiver.url), headers=A).json()["id"]
        assert wait_state(api, job_id, A)["state"] == "SUCCESS"
        devstack.wait_until(lambda: len(receiver.calls) >= 2, 60, "webhook retry")
        (first_headers, _), (headers, body) = receiver.calls[:2]
        verify(SECRET, headers, body)  # HMAC over timestamp, delivery id and body, within the replay window
        with pytest.raises(InvalidSignature, match="outside the 300 s tolerance"):
            verify(SECRET, headers, body, now=time.time() + 400)  # a replay later is refused
        with pytest.raises(InvalidSignature, match="does not match"):
            verify(SECRET, {**headers, "X-Kiq-Delivery": str(uuid.uuid4())}, body)  # ...and as another delivery
        assert headers["X-Kiq-Job-Id"] == job_id and headers["X-Kiq-Delivery"] == first_headers["X-Kiq-Delivery"]
        payload = json.loads(body)
        assert (payload["id"], payload["state"]) == (job_id, "SUCCESS") and payload["result"]["images"]

        blocker = api.post("/v1/jobs", json=tiny_job(decoder_steps=30), headers=A).json()["id"]
        queued = api.post("/v1/jobs", json=tiny_job(webhook_url=receiver.url), headers=A).json()["id"]
        api.delete(f"/v1/jobs/{queued}", headers=A)
        devstack.wait_until(lambda: any(json.loads(b)["id"] == queued for _, b in receiver.calls), 60, "cancel webhook")
        assert [json.loads(b)["state"] for _, b in receiver.calls if json.loads(b)["id"] == queued] == ["REVOKED"]
        api.delete(f"/v1/jobs/{blocker}", headers=A)


def test_a_sweep_through_the_api_redirects_to_its_animation_and_its_webhook_lists_every_frame(api):
    with Receiver() as receiver:
        sweep = tiny_job({"text": "a cat", "weight": 1.0}, image_input(0.0), prior_steps=2,
                         decoder_steps=2, sweep={"to": [0.0, 1.0], "frames": 3}, animation={"format": "gif", "fps": 4},
                         webhook_url=receiver.url)  # fmt: skip
        job_id = api.post("/v1/jobs", json=sweep, headers=A).json()["id"]
        assert api.get(f"/v1/jobs/{job_id}/animation", headers=A).status_code == 409  # not done: no redirect yet
        done = wait_state(api, job_id, A)
        assert done["state"] == "SUCCESS" and len(done["result"]["images"]) == 3
        redirect = api.get(f"/v1/jobs/{job_id}/animation", headers=A)
        assert redirect.status_code == 307
        gif = Image.open(io.BytesIO(httpx.get(redirect.headers["location"]).content))
        assert (gif.format, gif.n_frames, gif.size) == ("GIF", 3, (64, 64))
        assert api.get(f"/v1/jobs/{job_id}/animation", headers={"Authorization": f"Bearer {KEY_B}"}).status_code == 404
        plain = api.post("/v1/jobs", json=tiny_job(), headers=A).json()["id"]
        wait_state(api, plain, A)
        assert "has no animation" in api.get(f"/v1/jobs/{plain}/animation", headers=A).json()["detail"]
        devstack.wait_until(lambda: receiver.calls, 60, "the sweep's webhook")
        verify(SECRET, *receiver.calls[0])
        result = json.loads(receiver.calls[0][1])["result"]
        assert [f["uri"] for f in result["images"]] == [f["uri"] for f in done["result"]["images"]]
        assert result["animation"]["format"] == "gif"
        assert result["frame_weights"] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]


def test_auth_and_tenancy(api):
    job_id = api.post("/v1/jobs", json=tiny_job(), headers=A).json()["id"]
    assert api.post("/v1/jobs", json=tiny_job()).status_code == 401
    assert api.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert api.get(f"/v1/jobs/{job_id}", headers={"Authorization": KEY_A}).status_code == 401
    assert api.get(f"/v1/jobs/{job_id}", headers=B).status_code == 404
    assert api.delete(f"/v1/jobs/{job_id}", headers=B).status_code == 404
    assert api.get(f"/v1/jobs/{job_id}/images/0", headers=B).status_code == 404
    assert api.get(f"/v1/jobs/{uuid.uuid4()}", headers=A).status_code == 404
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ok", "redis": "ok", "s3": "ok"}
    wait_state(api, job_id, A)


def test_multipart_upload_is_stored_and_used(api, s3, settings):
    job = tiny_job({"text": "a cat", "weight": 0.5}, {"image": "upload:cat", "weight": 0.5})
    files = {"cat": ("cat.png", image_bytes(size=(40, 30)), "image/png")}
    response = api.post("/v1/jobs", data={"job": json.dumps(job)}, files=files, headers=A)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert wait_state(api, job_id, A)["state"] == "SUCCESS"
    stored = s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=f"inputs/{OWNER_A}/{job_id}/")["Contents"]
    assert len(stored) == 1 and stored[0]["Size"] == len(files["cat"][1])
    missing = api.post("/v1/jobs", data={"job": json.dumps(job)}, files={"dog": files["cat"]}, headers=A)
    assert missing.status_code == 422 and "no file part named 'cat'" in missing.text

    # A tenant may name its own uploads again; another tenant may not, and cannot tell them from missing keys.
    upload = f"s3://{settings.s3_bucket}/{stored[0]['Key']}"
    again = api.post("/v1/jobs", json=tiny_job({"image": upload, "weight": 1.0}), headers=A)
    assert again.status_code == 202 and wait_state(api, again.json()["id"], A)["state"] == "SUCCESS"
    theirs = api.post("/v1/jobs", json=tiny_job({"image": upload, "weight": 1.0}), headers=B)
    nothing = api.post("/v1/jobs", json=tiny_job({"image": upload + "-nope", "weight": 1.0}), headers=B)
    elsewhere = api.post("/v1/jobs", json=tiny_job({"image": "s3://other-bucket/cat.png", "weight": 1.0}), headers=A)
    assert theirs.status_code == nothing.status_code == elsewhere.status_code == 403
    assert theirs.json() == nothing.json() == elsewhere.json()
    assert theirs.json()["detail"][0]["loc"] == ["body", "inputs", 0, "image"]


def test_inline_images_go_to_s3_at_submit_and_never_through_redis(api, s3, settings, redis_client):
    pixels = image_bytes(size=(300, 200), color=(9, 99, 199))
    job = tiny_job({"image": "data:image/png;base64," + base64.b64encode(pixels).decode(), "weight": 1.0})
    job_id = api.post("/v1/jobs", json=job, headers=A).json()["id"]
    assert wait_state(api, job_id, A)["state"] == "SUCCESS"
    (stored,) = s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=f"inputs/{OWNER_A}/{job_id}/")["Contents"]
    assert s3.get_object(Bucket=settings.s3_bucket, Key=stored["Key"])["Body"].read() == pixels
    needle = base64.b64encode(pixels).decode()[100:160].encode()
    assert not [key for key in redis_client.scan_iter() if redis_client.type(key) == b"string"
                and needle in redis_client.get(key)]  # fmt: skip


def test_tenants_get_their_own_queues_and_priorities(api):
    assert api.post("/v1/jobs", json=tiny_job(priority=9), headers=A).status_code == 202
    refused = api.post("/v1/jobs", json=tiny_job(priority=9, queue="kiq-a-only"), headers=B)
    assert refused.status_code == 403
    assert {tuple(d["loc"]) for d in refused.json()["detail"]} == {("body", "priority"), ("body", "queue")}
    assert api.post("/v1/jobs", json=tiny_job(priority=5), headers=B).status_code == 202
    assert api.post("/v1/jobs", json=tiny_job(queue="somewhere-else"), headers=A).status_code == 403


def test_invalid_requests(api):
    bad = api.post("/v1/jobs", json={"inputs": [], "height": 100}, headers=A)
    assert bad.status_code == 422
    assert {tuple(d["loc"]) for d in bad.json()["detail"]} == {("body", "inputs"), ("body", "height")}
    assert api.post("/v1/jobs", content=b"{nope", headers={**A, "Content-Type": "application/json"}).status_code == 422
    assert api.post("/v1/jobs", content=b"a cat", headers={**A, "Content-Type": "text/plain"}).status_code == 415
    huge = api.post("/v1/jobs", content=b"x" * (9 * 1024 * 1024), headers={**A, "Content-Type": "application/json"})
    assert huge.status_code == 413


def test_priority_is_honoured_by_the_broker(api):
    blocker = api.post("/v1/jobs", json=tiny_job(decoder_steps=20), headers=A).json()["id"]
    wait_state(api, blocker, A, states=("PROGRESS",))
    low = api.post("/v1/jobs", json=tiny_job(priority=0, seed=1), headers=A).json()["id"]
    high = api.post("/v1/jobs", json=tiny_job(priority=9, seed=2), headers=A).json()["id"]
    wait_state(api, high, A)
    assert api.get(f"/v1/jobs/{low}", headers=A).json()["state"] in ("PENDING", "STARTED", "PROGRESS")
    assert wait_state(api, low, A)["state"] == "SUCCESS"


class Deferred:
    """An ASGI app whose target is swapped in by a fixture: schemathesis loads the schema at import time,
    before the session's Redis and S3 exist. The schema is the same for any settings."""

    def __init__(self, target):
        self.target = target

    async def __call__(self, scope, receive, send):
        await self.target(scope, receive, send)


APP = Deferred(create_api(Settings(), s3=object()))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module")
def open_app(env):
    # Open (no keys) so generated requests reach the handlers; a queue no worker consumes.
    settings = Settings.from_env({**env, "KIQ_QUEUE": f"kiq-schemathesis-{uuid.uuid4().hex[:6]}"})
    APP.target = create_api(settings)
    return APP.target


@schema.parametrize()
@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_server_error(case, open_app):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)


@pytest.fixture
def outage_api(api_env, logs):
    """A second `kiq api` whose S3 and broker connections go through proxies a test can cut."""
    s3_proxy = Proxy(int(api_env["KIQ_S3_ENDPOINT_URL"].rsplit(":", 1)[1]))
    broker = urlsplit(api_env["KIQ_BROKER_URL"])
    redis_proxy = Proxy(broker.port or 6379)
    s3_proxy.start()
    redis_proxy.start()
    env = {**api_env, "KIQ_API_PORT": str(devstack.free_port()), "KIQ_S3_ENDPOINT_URL": s3_proxy.url,
           "KIQ_RESULT_BACKEND": api_env["KIQ_BROKER_URL"],  # idempotency keys and records: the real Redis
           "KIQ_BROKER_URL": f"redis://127.0.0.1:{redis_proxy.port}{broker.path}"}  # fmt: skip
    try:
        with devstack.Stack() as stack, start_api(stack, env, logs / f"api-outage-{uuid.uuid4().hex[:6]}.log") as http:
            yield http, s3_proxy, redis_proxy
    finally:
        s3_proxy.stop()
        redis_proxy.stop()


def test_a_submit_that_failed_on_s3_or_redis_is_created_by_the_idempotent_retry(outage_api, api):
    http, s3_proxy, redis_proxy = outage_api
    job = tiny_job({"text": "a cat", "weight": 0.5}, {"image": "upload:cat", "weight": 0.5}, seed=77)
    body = {"data": {"job": json.dumps(job)}, "files": {"cat": ("cat.png", image_bytes(), "image/png")}}
    key = {"Idempotency-Key": str(uuid.uuid4()), **A}
    s3_proxy.stop()
    failed = http.post("/v1/jobs", headers=key, **body)
    assert failed.status_code == 503 and failed.headers["retry-after"] == "1", failed.text
    s3_proxy.start()
    retried = http.post("/v1/jobs", headers=key, **body)
    assert retried.status_code == 202, retried.text
    assert wait_state(api, retried.json()["id"], A)["state"] == "SUCCESS"
    assert http.post("/v1/jobs", headers=key, **body).json()["id"] == retried.json()["id"]  # now it replays

    key = {"Idempotency-Key": str(uuid.uuid4()), **A}
    redis_proxy.stop()  # the broker goes away after the key is claimed: the publish fails
    failed = http.post("/v1/jobs", headers=key, json=tiny_job(seed=78))
    assert failed.status_code == 503, failed.text
    redis_proxy.start()
    retried = http.post("/v1/jobs", headers=key, json=tiny_job(seed=78))
    assert retried.status_code == 202, retried.text
    assert wait_state(api, retried.json()["id"], A)["state"] == "SUCCESS"


@pytest.fixture
def tripping_api(api_env, logs):
    """A `kiq api` whose one Redis (broker and results, as by default) is behind a proxy that goes down right
    after a chosen command reached Redis; short retry and pending-mark bounds so the outage outlasts both."""
    proxy = Proxy(urlsplit(api_env["KIQ_BROKER_URL"]).port or 6379)
    proxy.start()
    url = f"redis://127.0.0.1:{proxy.port}{urlsplit(api_env['KIQ_BROKER_URL']).path}"
    env = {**api_env, "KIQ_API_PORT": str(devstack.free_port()), "KIQ_BROKER_URL": url, "KIQ_RESULT_BACKEND": url,
           "KIQ_REDIS_RETRY_S": "2", "KIQ_IDEMPOTENCY_PENDING_S": "2"}  # fmt: skip
    try:
        with devstack.Stack() as stack, start_api(stack, env, logs / f"api-trip-{uuid.uuid4().hex[:6]}.log") as http:
            yield http, proxy
    finally:
        proxy.stop()


def test_a_publish_whose_reply_is_lost_is_still_one_job_for_its_idempotency_key(tripping_api, api):
    """Redis ran the publish, then went out of the API's reach for longer than its retries and the key's pending
    mark: the submit answers 503. The key was committed by the publish itself (kiq/publish.py), so the retry gets
    the job that was queued; before, the mark lapsed and the retry queued a second job."""
    http, proxy = tripping_api
    key = {"Idempotency-Key": str(uuid.uuid4()), **A}
    proxy.trip_after(b"kiq.generate", down_s=7)
    failed = http.post("/v1/jobs", headers=key, json=tiny_job(seed=79), timeout=60)
    assert failed.status_code == 503, failed.text
    assert len(proxy.seen) == 1
    queued = re.search(rb'"id": "([0-9a-f-]{36})"', proxy.seen[0]).group(1).decode()
    deadline = time.monotonic() + 30
    while (retried := _post_when_up(http, key)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert retried.status_code == 202 and retried.json()["id"] == queued, (retried.text, queued)
    assert wait_state(api, queued, A)["state"] == "SUCCESS"


def _post_when_up(http, key):
    response = http.post("/v1/jobs", headers=key, json=tiny_job(seed=79), timeout=60)
    return None if response.status_code == 503 else response


def read_events(api, job_id, headers, limit=None):
    """The job's SSE stream as (id, event, status) tuples, plus the comment lines seen."""
    events, comments, fields = [], [], {}
    with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                comments.append(line)
            elif line:
                name, _, value = line.partition(": ")
                fields[name] = value
            elif "data" in fields:
                events.append((fields.get("id", ""), fields["event"], json.loads(fields["data"])))
                fields = {}
                if limit is not None and len(events) == limit:
                    break
    return events, comments


def test_events_stream_states_progress_and_the_final_status_then_resume_without_loss_or_repeats(api, client):
    job_id = api.post("/v1/jobs", json=tiny_job(decoder_steps=6), headers=A).json()["id"]
    assert api.get(f"/v1/jobs/{job_id}/events", headers=B).status_code == 404  # another tenant's job
    events, _ = read_events(api, job_id, A)
    kinds = [kind for _, kind, _ in events]
    assert kinds[-1] == "done" and events[-1][2]["state"] == "SUCCESS" and kinds.count("done") == 1
    assert "state" in kinds and events[-1][2]["result"]["images"][0]["uri"].startswith("s3://")
    decoder = [s["progress"]["step"] for _, k, s in events if k == "progress" and s["progress"]["stage"] == "decoder"]
    # Progress is coalesced (KIQ_PROGRESS_INTERVAL_MS): in order, the first and the last step always there.
    assert decoder == sorted(set(decoder)) and decoder[0] == 1 and decoder[-1] == 6
    ids = [event_id for event_id, _, _ in events if event_id]
    assert len(ids) == len(set(ids)) and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    # Resume from the middle (what EventSource does after a dropped connection): exactly the rest.
    middle = len(ids) // 2
    resumed, _ = read_events(api, job_id, {**A, "Last-Event-ID": ids[middle]})
    assert [e[0] for e in resumed] == ids[middle + 1 :]
    # A finished job's stream replays from the start and ends.
    again, _ = read_events(api, job_id, A)
    assert [e[0] for e in again if e[0]] == ids
    assert api.get(f"/v1/jobs/{job_id}/events", headers={**A, "Last-Event-ID": "x"}).status_code == 400
    # An EventSource reconnects after the stream ended: told to stop (204), not held open with heartbeats.
    assert api.get(f"/v1/jobs/{job_id}/events", headers={**A, "Last-Event-ID": ids[-1]}).status_code == 204
    # The Python client resumes the same way: the rest, then nothing once past the end (it used to block).
    assert [e.id for e in client.events(job_id, last_event_id=ids[middle], timeout=30)] == ids[middle + 1 :]
    assert list(client.events(job_id, last_event_id=ids[-1], timeout=30)) == []


def test_a_finished_jobs_stream_is_kept_an_hour_then_a_resume_gets_the_final_status(api, client):
    from kiq.events import DONE_STREAM_TTL_S
    from kiq.names import events_key

    job_id = api.post("/v1/jobs", json=tiny_job(decoder_steps=2), headers=A).json()["id"]
    events, _ = read_events(api, job_id, A)
    assert 0 < client.redis.ttl(events_key(job_id)) <= DONE_STREAM_TTL_S < client.settings.result_ttl_s
    client.redis.delete(events_key(job_id))  # what the hour does
    resumed, _ = read_events(api, job_id, {**A, "Last-Event-ID": events[-1][0]})
    assert [(kind, status["state"]) for _, kind, status in resumed] == [("done", "SUCCESS")]
    followed = list(client.events(job_id, last_event_id=events[-1][0], timeout=30))  # the Python client too
    assert [(e.id, e.status.state) for e in followed] == [("", "SUCCESS")]


def test_events_of_a_job_still_queued_start_with_pending_and_python_client_follows(api, client):
    blocker = api.post("/v1/jobs", json=tiny_job(decoder_steps=12), headers=A).json()["id"]
    queued = api.post("/v1/jobs", json=tiny_job(seed=3), headers=A).json()["id"]
    first, _ = read_events(api, queued, A, limit=1)
    assert first[0][1:] == ("state", {"id": queued, "state": "PENDING"})
    seen = [event.status.state for event in client.events(queued, timeout=120)]
    assert seen[-1] == "SUCCESS" and "STARTED" in seen and "PROGRESS" in seen
    assert client.wait(blocker, timeout=120).state == "SUCCESS"


def test_list_the_callers_jobs_newest_first_with_cursor_and_state(api):
    key = {"Authorization": f"Bearer {KEY_B}"}
    mine = [api.post("/v1/jobs", json=tiny_job(seed=s, queue=None), headers=key).json()["id"] for s in (11, 12, 13)]
    page = api.get("/v1/jobs", params={"limit": 2}, headers=key).json()
    assert [j["id"] for j in page["jobs"]] == mine[::-1][:2] and page["next_cursor"]
    rest = api.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}, headers=key).json()
    assert mine[0] == rest["jobs"][0]["id"]
    assert not {j["id"] for j in api.get("/v1/jobs", params={"limit": 100}, headers=A).json()["jobs"]} & set(mine)
    for job_id in mine:
        wait_state(api, job_id, key)
    done = api.get("/v1/jobs", params={"state": "SUCCESS", "limit": 100}, headers=key).json()["jobs"]
    assert set(mine) <= {j["id"] for j in done} and all(j["state"] == "SUCCESS" for j in done)
    assert api.get("/v1/jobs", params={"state": "NOPE"}, headers=key).status_code == 422


def test_fleet_lists_workers_and_queue_depth_per_priority_class(api, env):
    fleet = api.get("/v1/fleet", headers=A).json()
    assert fleet["workers"] and all(w["device"] and w["hostname"] for w in fleet["workers"])
    assert set(fleet["queues"][env["KIQ_QUEUE"]]) == {"7-9", "4-6", "1-3", "0"}
    schema = api.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/fleet", "/v1/jobs/{job_id}/events"} <= set(schema["paths"])
