"""Any Celery client on Celery's defaults talks to kiq's workers: a plain app submits (with priorities),
inspects and broadcasts, and Flower lists the worker. None of these clients knows kiq's broker options."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
from celery import Celery

from kiq.celeryconf import priority_lists
from kiq.errors import UnknownJob
from producer import devstack
from tests.integration.conftest import REDIS_URL
from tests.integration.jobs import tiny_job


@pytest.fixture(scope="module")
def plain():
    """A Celery app with nothing but the broker URL: every transport option at Celery's default."""
    app = Celery("plain", broker=REDIS_URL, set_as_current=False)
    yield app
    app.close()


def lists_holding(redis_client, job_id: str) -> list[bytes]:
    return [key for key in redis_client.scan_iter(_type="list") if any(job_id.encode() in m for m in
            redis_client.lrange(key, 0, -1))]  # fmt: skip


def worker_name(client, settings) -> str:
    (beat,) = [w for w in client.fleet() if w["queues"] == settings.queue]
    return beat["hostname"]


def assert_no_value_errors(logs) -> None:
    text = (logs / "worker.log").read_text(errors="replace")
    assert "ValueError" not in text, text[text.index("ValueError") - 2000 :][:4000]


def test_a_plain_celery_apps_jobs_run_with_and_without_a_priority(worker, plain, client, settings, redis_client, logs):
    ids = {}
    for priority in (None, 0, 5, 9):
        job_id = str(uuid.uuid4())
        options = {} if priority is None else {"priority": priority}
        plain.send_task("kiq.generate", args=[tiny_job(seed=11)], task_id=job_id, queue=settings.queue, **options)
        ids[priority] = job_id
    for priority, job_id in ids.items():
        state = lambda job_id=job_id: client.app.backend.get_task_meta(job_id)["status"]  # noqa: E731
        try:
            devstack.wait_until(lambda state=state: state() == "SUCCESS", 120, f"job sent with priority {priority}")
        except devstack.StackError:
            pytest.fail(f"priority {priority}: {state()}, its message waits in {lists_holding(redis_client, job_id)}"
                        f" and the worker reads {priority_lists(settings.queue)}")  # fmt: skip
        assert client.status(job_id).state == "SUCCESS"  # `kiq status` knows a foreign job once it has started
    assert_no_value_errors(logs)


def test_a_foreign_job_is_unknown_to_status_until_a_worker_starts_it(plain, client, settings, redis_client):
    """What a foreign submit gets: no job record (kiq's submit writes one), so `status` and `wait` cannot tell
    its queued job from a made-up id until a worker starts it. The message itself is on kiq's lists."""
    queue = f"kiq-nobody-{uuid.uuid4().hex[:8]}"  # no worker: it stays queued
    job_id = str(uuid.uuid4())
    plain.send_task("kiq.generate", args=[tiny_job()], task_id=job_id, queue=queue, priority=5)
    assert lists_holding(redis_client, job_id) == [priority_lists(queue)[1].encode()]  # sent 5: step 3
    assert client.queue_depths([queue])[queue] == {"7-9": 0, "4-6": 1, "1-3": 0, "0": 0}  # kiq priority 9 - 5
    with pytest.raises(UnknownJob):
        client.status(job_id)


def test_a_plain_celery_app_inspects_and_broadcasts_to_the_worker(worker, plain, client, settings, logs):
    name = worker_name(client, settings)
    inspect = plain.control.inspect(destination=[name], timeout=10)
    assert (inspect.ping() or {}).get(name) == {"ok": "pong"}
    stats = (inspect.stats() or {}).get(name)
    assert stats is not None and stats["pool"]["max-concurrency"] == 1
    queues = [q["name"] for q in (inspect.active_queues() or {}).get(name, [])]
    assert settings.queue in queues
    replies = plain.control.broadcast("ping", destination=[name], reply=True, timeout=10)
    assert replies == [{name: {"ok": "pong"}}]
    assert_no_value_errors(logs)


def test_kiqs_own_app_still_inspects_the_worker(worker, client, settings, logs):
    name = worker_name(client, settings)
    assert (client.app.control.inspect(destination=[name], timeout=10).ping() or {}).get(name) == {"ok": "pong"}
    assert_no_value_errors(logs)


def flower_get(port: int, path: str):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 404 "Unknown worker": no inspect reply came back
        return {"error": f"{exc.code} {exc.read().decode(errors='replace')}"}


def test_flower_as_compose_starts_it_lists_and_inspects_the_worker(worker, client, settings, logs, stack):
    name = worker_name(client, settings)
    port = devstack.free_port()
    # docker-compose.yml's command, on this Redis: `celery --broker=… flower`, no kiq option anywhere.
    argv = [sys.executable, "-m", "celery", f"--broker={REDIS_URL}", "flower", f"--port={port}", "--address=127.0.0.1"]
    env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"}
    log = logs / f"flower-{port}.log"
    proc = stack.spawn(argv, log, env)
    try:
        devstack.wait_until(lambda: b"Visit me" in log.read_bytes() if log.exists() else False, 60, "flower", proc, log)
        # The worker list: the worker's own events (heartbeats every 2 s) as Flower's receiver saw them.
        listed = lambda: name in [w.get("hostname") for w in flower_get(port, "/workers?json=1")["data"]]  # noqa: E731
        devstack.wait_until(listed, 30, "the worker in Flower's list", proc, log)
        # What Flower shows of a worker: inspect replies (stats, active_queues, registered, conf).
        deadline = time.monotonic() + 60
        info: dict = {}
        while time.monotonic() < deadline and not info.get("stats"):
            info = flower_get(port, f"/api/workers?refresh=1&workername={name}").get(name, {})
        assert info.get("stats", {}).get("pool", {}).get("max-concurrency") == 1, (info, log.read_text()[-3000:])
        assert settings.queue in [q["name"] for q in info["active_queues"]]
        assert "kiq.generate" in info["registered"]
    finally:
        devstack.stop(proc)
    assert_no_value_errors(logs)
