"""Tracing (KIQ_TRACING) through real processes: a `kiq api`, a traced `kiq worker` (decoder batches of 2) and a
`kiq webhook-worker`, each writing its finished spans to a file (the SDK's span processor, a JSON-lines
exporter). One job submitted with a W3C traceparent must come back as one trace across the three processes."""

import json
import secrets
import time
import uuid
from collections import defaultdict

import httpx
import pytest

from kiq.names import GENERATE_TASK
from kiq.settings import Settings
from producer import devstack
from producer.client import Client
from tests.helpers import Receiver, http_server, image_bytes, wait_state
from tests.integration.jobs import tiny_job

STAGES = {"fetch", "fetch input", "prior", "decoder", "encode", "upload"}
HOOK_SECRET = "webhook-secret-for-tracing"


@pytest.fixture(scope="module")
def traced(env, logs, tmp_path_factory):
    spans = tmp_path_factory.mktemp("spans") / "spans.jsonl"
    traced_env = {**env, "KIQ_TRACING": f"file:{spans}", "KIQ_QUEUE": f"kiq-trace-{uuid.uuid4().hex[:6]}",
                  "KIQ_DECODER_BATCH": "2", "KIQ_DECODER_BATCH_WAIT_MS": "3000", "KIQ_WEBHOOK_SECRET": HOOK_SECRET,
                  "KIQ_API_PORT": str(devstack.free_port())}  # fmt: skip
    with devstack.Stack() as stack:
        devstack.start_worker(stack, traced_env, logs / "worker-traced.log")
        stack.spawn([*devstack.kiq_command(), "webhook-worker"], logs / "webhooks-traced.log", traced_env)
        base = f"http://127.0.0.1:{traced_env['KIQ_API_PORT']}"
        api = stack.spawn([*devstack.kiq_command(), "api"], logs / "api-traced.log", traced_env)
        devstack.wait_until(lambda: devstack.http_up(base + "/healthz"), 60, "kiq api", api, logs / "api-traced.log")
        with httpx.Client(base_url=base, timeout=60) as http:
            yield http, spans, traced_env


def traceparent() -> tuple[str, str, str]:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent}-01", trace_id, parent


def read_spans(path, until=lambda spans: True, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        spans = [json.loads(line) for line in lines]
        by_trace = defaultdict(list)
        for s in spans:
            by_trace[s["trace_id"]].append(s)
        if until(by_trace) or time.monotonic() > deadline:
            return by_trace
        time.sleep(0.3)


def test_one_trace_from_the_request_through_the_worker_to_the_webhook(traced):
    http, path, _ = traced
    header, trace_id, parent = traceparent()
    with http_server({"/in.png": (200, "image/png", image_bytes())}) as site, Receiver() as receiver:
        job = tiny_job({"image": f"{site}/in.png", "weight": 0.5}, {"text": "a cat", "weight": 0.5},
                       webhook_url=receiver.url)  # fmt: skip
        job_id = http.post("/v1/jobs", json=job, headers={"traceparent": header}).json()["id"]
        assert wait_state(http, job_id, timeout=180)["state"] == "SUCCESS"
        wanted = {"POST /v1/jobs", "submit", "queue wait", "job", *STAGES, "webhook delivery"}
        spans = read_spans(path, lambda t: wanted <= {s["name"] for s in t[trace_id]})[trace_id]
        deadline = time.monotonic() + 30
        while not receiver.calls and time.monotonic() < deadline:
            time.sleep(0.2)
    names = {s["name"] for s in spans}
    assert wanted <= names, sorted(names)
    assert {s["service"] for s in spans} == {"kiq-api", "kiq-worker", "kiq-webhook-worker"}
    ids = {s["span_id"] for s in spans}
    assert all(s["parent_id"] in ids or s["parent_id"] == parent for s in spans), "one tree under the caller's span"
    by_name = {s["name"]: s for s in spans}
    assert by_name["POST /v1/jobs"]["parent_id"] == parent
    assert by_name["job"]["parent_id"] == by_name["queue wait"]["parent_id"] == by_name["submit"]["span_id"]
    assert all(by_name[stage]["parent_id"] == by_name["job"]["span_id"] for stage in STAGES - {"fetch input"})
    assert by_name["fetch input"]["parent_id"] == by_name["fetch"]["span_id"]
    assert by_name["job"]["attributes"]["kiq.job_id"] == job_id
    # the webhook's POST carries the trace on to the receiver
    assert receiver.calls and receiver.calls[0][0]["traceparent"].split("-")[1] == trace_id


def test_batch_mates_link_their_decoder_span_to_the_leaders(traced):
    http, path, _ = traced
    headers = [traceparent() for _ in range(2)]
    ids = [http.post("/v1/jobs", json=tiny_job(seed=n), headers={"traceparent": h}).json()["id"]
           for n, (h, _, _) in enumerate(headers)]  # fmt: skip
    assert [wait_state(http, job_id, timeout=180)["state"] for job_id in ids] == ["SUCCESS", "SUCCESS"]
    trace_ids = [t for _, t, _ in headers]
    done = lambda t: all({"decoder", "upload"} <= {s["name"] for s in t[x]} for x in trace_ids)  # noqa: E731
    by_trace = read_spans(path, done)
    decoders = {t: next(s for s in by_trace[t] if s["name"] == "decoder") for t in trace_ids}
    leader = next(t for t in trace_ids if decoders[t]["attributes"].get("kiq.batch_size") == 2)
    mate = next(t for t in trace_ids if t != leader)
    assert decoders[mate]["links"] == [{"trace_id": leader, "span_id": decoders[leader]["span_id"]}]
    # each job's other stages stay in its own trace
    for t in trace_ids:
        assert {"fetch", "prior", "encode", "upload", "job"} <= {s["name"] for s in by_trace[t]}


def test_a_message_without_trace_headers_still_runs_in_a_trace_of_its_own(traced):
    _, path, traced_env = traced
    client = Client(Settings.from_env(traced_env))
    job_id = str(uuid.uuid4())  # sent the plain Celery way: no kiq headers at all
    client.app.send_task(GENERATE_TASK, args=[tiny_job()], task_id=job_id, queue=traced_env["KIQ_QUEUE"])
    deadline = time.monotonic() + 180  # no job record (a plain Celery send): read the result backend itself
    while client.app.backend.get_task_meta(job_id)["status"] != "SUCCESS" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert client.app.backend.get_task_meta(job_id)["status"] == "SUCCESS"
    found = lambda t: any(s["attributes"].get("kiq.job_id") == job_id for v in t.values() for s in v)  # noqa: E731
    by_trace = read_spans(path, found)
    trace = next(v for v in by_trace.values() if any(s["attributes"].get("kiq.job_id") == job_id for s in v))
    job = next(s for s in trace if s["name"] == "job")
    assert job["parent_id"] is None and {"prior", "decoder", "upload"} <= {s["name"] for s in trace}
