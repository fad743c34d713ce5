"""Work that outlasts its bounds (issue 20, defect 8): a slow multipart submit must never let its retry create
a second job, and an s3:// input read must end within the job's fetch deadline like an HTTP fetch — against a
real `kiq api` whose S3 link is slow, and a real worker whose S3 endpoint accepts and never answers."""

import json
import threading
import time
import uuid

import httpx

from kiq.celeryconf import priority_lists
from kiq.errors import FetchUnavailable
from kiq.names import tenant_queues_key
from kiq.settings import Settings
from producer import devstack
from producer.client import Client
from tests.blackhole import SilencingProxy, silent_server
from tests.helpers import image_bytes
from tests.integration.jobs import tiny_job
from worker.fetch import Fetcher, FetchLimits
from worker.storage import S3Storage

PENDING_S = 2  # the idempotency mark's lifetime; each upload below takes longer than half of it
UPLOADS = 4


def test_a_retry_while_a_slow_submit_is_in_flight_never_creates_a_second_job(env, logs, redis_client):
    slow_s3 = SilencingProxy(int(env["KIQ_S3_ENDPOINT_URL"].rsplit(":", 1)[1]), delay_s=1.0)
    slow_s3.start()
    queue = f"kiq-slow-submit-{uuid.uuid4().hex[:8]}"  # no worker: the jobs only need to be enqueued
    api_env = {**env, "KIQ_QUEUE": queue, "KIQ_S3_ENDPOINT_URL": slow_s3.url, "KIQ_API_PORT": str(devstack.free_port()),
               "KIQ_IDEMPOTENCY_PENDING_S": str(PENDING_S)}  # fmt: skip
    base = f"http://127.0.0.1:{api_env['KIQ_API_PORT']}"
    inputs = [{"image": f"upload:part{n}", "weight": 1.0} for n in range(UPLOADS)]
    files = {f"part{n}": (f"{n}.png", image_bytes(color=(n, 2, 3)), "image/png") for n in range(UPLOADS)}
    body = {"data": {"job": json.dumps(tiny_job(*inputs))}, "files": files}
    key = {"Idempotency-Key": str(uuid.uuid4())}
    try:
        with devstack.Stack() as stack, httpx.Client(base_url=base, timeout=120) as http:
            proc = stack.spawn([*devstack.kiq_command(), "api"], logs / f"api-slow-{uuid.uuid4().hex[:6]}.log", api_env)
            devstack.wait_until(lambda: devstack.http_up(base + "/healthz"), 60, "kiq api", proc)
            first: list[httpx.Response] = []
            started = time.monotonic()
            thread = threading.Thread(target=lambda: first.append(http.post("/v1/jobs", headers=key, **body)))
            thread.start()
            time.sleep(PENDING_S + 1)  # the first submit is still uploading, past the mark's lifetime
            retry = http.post("/v1/jobs", headers=key, **body)
            thread.join(120)
            took = time.monotonic() - started
            assert first and first[0].status_code == 202, first and first[0].text
            assert took > PENDING_S + 1, f"the first submit took {took:.1f} s: not slower than the mark's lifetime"
            job_id = first[0].json()["id"]
            assert retry.status_code == 409 and "still in progress" in retry.text, (retry.status_code, retry.text)
            replay = http.post("/v1/jobs", headers=key, **body)
            assert (replay.status_code, replay.json()["id"]) == (202, job_id)
            # one job enqueued, whatever the retries: in the queue or (fair share) one of its tenant queues
            names = [queue, *(k.decode() for k in redis_client.hkeys(tenant_queues_key(queue)))]
            assert sum(redis_client.llen(n) for name in names for n in priority_lists(name)) == 1
    finally:
        slow_s3.stop()


def test_an_s3_read_from_a_silent_server_ends_within_the_fetch_deadline(settings):
    with silent_server() as endpoint:
        silent = Settings.from_env({"KIQ_S3_ENDPOINT_URL": endpoint, "KIQ_S3_BUCKET": settings.s3_bucket,
                                    "KIQ_FETCH_TIMEOUT_S": "2", "KIQ_FETCH_RETRIES": "0"})  # fmt: skip
        fetcher = Fetcher(S3Storage.from_settings(silent), FetchLimits.from_settings(silent))
        outcome: list = []

        def read():
            start = time.monotonic()
            try:
                fetcher.image(f"s3://{settings.s3_bucket}/inputs/any.png", deadline=time.monotonic() + 1.0)
            except Exception as exc:  # noqa: BLE001 - the outcome under test
                outcome.append((exc, time.monotonic() - start))

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        thread.join(20)
        assert outcome, "the s3:// read was still waiting after 20 s, past its 1 s deadline"
        error, took = outcome[0]
        assert isinstance(error, FetchUnavailable) and took < 1.5, (error, took)
        assert "time limit" in str(error)


def test_a_job_whose_s3_input_never_answers_fails_with_a_fetch_error_within_its_deadline(env, spawn_worker):
    with silent_server() as endpoint:
        overrides = {"KIQ_QUEUE": f"kiq-silent-s3-{uuid.uuid4().hex[:8]}", "KIQ_S3_ENDPOINT_URL": endpoint,
                     "KIQ_FETCH_TIMEOUT_S": "2", "KIQ_FETCH_RETRIES": "1"}  # fmt: skip
        client = Client(Settings.from_env({**env, "KIQ_QUEUE": overrides["KIQ_QUEUE"]}))
        spawn_worker("silent-s3", **overrides)
        bucket = env["KIQ_S3_BUCKET"]
        job_id = client.submit(tiny_job({"image": f"s3://{bucket}/inputs/slow/cat.png", "weight": 1.0}))
        final = client.wait(job_id, timeout=40)  # two reads of 2 s and a backoff; before: 2 x 2 x 30 s
        assert (final.state, final.error.type, final.error.retryable) == ("FAILURE", "FetchUnavailable", True)
        assert f"s3://{bucket}/inputs/slow/cat.png" in final.error.message, final.error.message
