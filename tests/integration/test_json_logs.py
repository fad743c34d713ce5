"""KIQ_LOG_FORMAT=json through real processes: a password-protected Redis of its own, a `kiq worker` and a
`kiq api`; planted secrets (an API key, the AWS secret, the Redis password) never reach the logs, every line
is one JSON object, and a job's lines carry its id, tenant and device (and stage, where one is running)."""

import base64
import json
import re
import time
import uuid

import httpx
import pytest

from producer import devstack
from tests.helpers import ALLOWED_HOST, data_uri, image_bytes, wait_state
from tests.integration.conftest import SECRET as AWS_SECRET
from tests.integration.jobs import tiny_job

API_KEY = "kiq-planted-API-KEY-5b2f8d7c31"
REDIS_PASSWORD = "kiq-planted-REDIS-PW-93ae6410"
WEBHOOK_SECRET = "kiq-planted-WEBHOOK-0d9c2e"
PLANTED = (API_KEY, AWS_SECRET, REDIS_PASSWORD, WEBHOOK_SECRET)


@pytest.fixture(scope="module")
def json_stack(env, logs, tmp_path_factory):
    port = devstack.free_port()
    spans = tmp_path_factory.mktemp("json-log-spans") / "spans.jsonl"
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
    log_env = {**env, "KIQ_BROKER_URL": url, "KIQ_LOG_FORMAT": "json", "KIQ_API_KEYS": API_KEY,
               "KIQ_WEBHOOK_SECRET": WEBHOOK_SECRET, "KIQ_API_PORT": str(devstack.free_port()),
               "KIQ_QUEUE": f"kiq-logs-{uuid.uuid4().hex[:6]}", "KIQ_TRACING": f"file:{spans}"}  # fmt: skip
    with devstack.Stack() as stack:
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--requirepass", REDIS_PASSWORD,
                "--save", "", "--appendonly", "no", "--dir", str(logs)]  # fmt: skip
        proc = stack.spawn(argv, logs / "redis-json-logs.log")
        devstack.wait_until(lambda: devstack.redis_ping(url), 20, "redis-server with a password", proc)
        worker_log, api_log = logs / "worker-json.log", logs / "api-json.log"
        devstack.start_worker(stack, log_env, worker_log)
        base = f"http://127.0.0.1:{log_env['KIQ_API_PORT']}"
        api = stack.spawn([*devstack.kiq_command(), "api"], api_log, log_env)
        devstack.wait_until(lambda: devstack.http_up(base + "/healthz"), 60, "kiq api", api, api_log)
        yield (
            httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}),
            worker_log,
            api_log,
        )


def json_lines(path):
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    parsed = []
    for line in lines:
        entry = json.loads(line)  # every line is one JSON object
        assert isinstance(entry, dict) and {"time", "level", "logger", "process", "message"} <= entry.keys(), line
        parsed.append(entry)
    return lines, parsed


def test_json_logs_parse_carry_the_ids_and_never_the_secrets(json_stack):
    http, worker_log, api_log = json_stack
    png = image_bytes(size=(40, 32))
    ok = http.post("/v1/jobs", json=tiny_job({"image": data_uri(png), "weight": 0.5}, {"text": "a cat", "weight": 0.5}))
    assert ok.status_code == 202, ok.text
    # a reference whose URL carries the secrets: its fetch fails, and the failure is logged with the URL
    leaky = f"http://kiq:{REDIS_PASSWORD}@{ALLOWED_HOST}:9/{AWS_SECRET}.png?key={API_KEY}"
    bad = http.post("/v1/jobs", json=tiny_job({"image": leaky, "weight": 1.0}))
    assert bad.status_code == 202, bad.text
    assert wait_state(http, ok.json()["id"], timeout=180)["state"] == "SUCCESS"
    assert wait_state(http, bad.json()["id"], timeout=180)["state"] == "FAILURE"
    time.sleep(1)  # the last lines of the worker's log pipe
    worker_lines, worker = json_lines(worker_log)
    api_lines, api = json_lines(api_log)
    image_b64 = base64.b64encode(png).decode()
    for text in (*worker_lines, *api_lines):
        for secret in PLANTED:
            assert secret not in text, f"{secret!r} leaked: {text[:300]}"
        assert image_b64[20:80] not in text
        assert not re.search(r"X-Amz-Signature=[0-9a-f]", text), "a presigned URL (a bearer link) leaked"
    assert any("X-Amz-Signature=***" in line for line in worker_lines), "Celery's success line, scrubbed"
    owner = {e.get("tenant") for e in api if e.get("job_id") == ok.json()["id"]}
    assert len(owner) == 1 and None not in owner, "the API logs the submit with the job id and tenant"
    mine = [e for e in worker if e.get("job_id") == bad.json()["id"]]
    assert mine and all(e["tenant"] in owner and e["device"] == "cpu:0" for e in mine)
    traces = {e.get("trace_id") for e in mine} | {e.get("trace_id") for e in api if e.get("job_id") == bad.json()["id"]}
    assert len(traces) == 1 and None not in traces, "the API's and the worker's lines of a job share its trace id"
    assert any(e.get("stage") == "fetch" for e in mine), [e["message"][:100] for e in mine]
    assert {e["process"] for e in worker} == {"worker"} and {e["process"] for e in api} == {"api"}
    assert any("ready" in e["message"] for e in worker)  # Celery's own lines come through as JSON too
