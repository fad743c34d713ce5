"""Small builders and checks shared by unit and integration tests (no test module imports another)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from producer.client import Client


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (32, 24), color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


ALLOWED_HOST = "127.0.0.2"  # the test web server's address; workers under test allowlist it (KIQ_FETCH_ALLOW)


@dataclass(frozen=True)
class Reply:
    status: int = 200
    content_type: str = "image/png"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    drip_s: float = 0.0  # seconds between single bytes: a slow-loris sender


def redirect(location: str, status: int = 302) -> Reply:
    return Reply(status=status, content_type="text/plain", headers=(("Location", location),))


@contextmanager
def http_server(routes: dict[str, Reply | tuple[int, str, bytes]], host: str = ALLOWED_HOST) -> Iterator[str]:
    """Serve fixed replies on a loopback address; yields the base URL. Unknown paths are 404."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            reply = routes.get(self.path, Reply(404, "text/plain", b"not found"))
            if isinstance(reply, tuple):
                reply = Reply(*reply)
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers:
                self.send_header(name, value)
            self.end_headers()
            self._body(reply)

        def _body(self, reply):
            if not reply.drip_s:
                self.wfile.write(reply.body)
                return
            for i in range(len(reply.body)):
                self.wfile.write(reply.body[i : i + 1])
                self.wfile.flush()
                time.sleep(reply.drip_s)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Receiver:
    """A webhook endpoint on the allowlisted loopback address: answers 500 to the first `failures` posts.
    A context manager, so that a failing test still stops its server."""

    def __init__(self, failures: int = 0):
        self.calls, self.failures_left = [], failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((dict(self.headers), body))
                status = 500 if receiver.failures_left > 0 else 200
                receiver.failures_left -= 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((ALLOWED_HOST, 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://{ALLOWED_HOST}:{self.server.server_address[1]}/hook"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@contextmanager
def calling_server(on_request) -> Iterator[str]:
    """A URL whose every GET calls `on_request()` and then never answers: a job that takes its worker down."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            on_request()
            time.sleep(30)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((ALLOWED_HOST, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{ALLOWED_HOST}:{server.server_address[1]}/crash.png"
    finally:
        server.shutdown()
        server.server_close()


def redis_databases() -> tuple[str, str]:
    """This test process's Redis database and a spare one (DB - 1) of its own. Under pytest-xdist each worker
    process (gw0, gw1) gets two databases apart (13/12, then 15/14), since the session flushes its own."""
    base = os.environ.get("KIQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
    prefix, db = base.rsplit("/", 1)
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    own = int(db) + 2 * index
    return f"{prefix}/{own}", f"{prefix}/{own - 1}"


def wait_state(api, job_id: str, headers: dict[str, str] | None = None,
               states: tuple[str, ...] = ("SUCCESS", "FAILURE", "REVOKED"), timeout: float = 120) -> dict:  # fmt: skip
    """Poll `GET /v1/jobs/{id}` through an httpx client until the job reaches one of `states`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = api.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if status["state"] in states:
            return status
        time.sleep(0.1)
    raise AssertionError(f"{job_id} never reached {states}")


# Integration tests' helpers: jobs on queues of their own, checks on their progress, outputs and logs.

# A short visibility timeout so a killed worker's job comes back within seconds. Leases keep live jobs, so
# time limits need no change (test_guarantees.py shows the same on the 60 s default).
FAST_REDELIVERY = {"KIQ_VISIBILITY_TIMEOUT_S": "6"}


def own_queue(**overrides):
    return {"KIQ_QUEUE": f"kiq-fault-{uuid.uuid4().hex[:8]}", **overrides}


def client_for(env, overrides) -> Client:
    from kiq.settings import Settings
    from producer.client import Client

    return Client(Settings.from_env({**env, **overrides}))


def wait_for_step(client, job_id, stage="decoder", step=2, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.status(job_id)
        if status.progress and status.progress.stage == stage and status.progress.step >= step:
            return status
        assert not status.done, status
        time.sleep(0.05)
    raise AssertionError(f"{job_id} never reached {stage} step {step}")


def objects_of(s3, settings, job_id):
    listed = s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=f"{settings.s3_prefix}{job_id}/")
    return [o["Key"] for o in listed.get("Contents", [])]


def count_in_logs(logs, needle):
    return sum(path.read_text(errors="replace").count(needle) for path in logs)


def on_queue(redis_client, queue, job_id):
    """Whether the job waits in any of the queue's priority lists."""
    from kiq.celeryconf import priority_lists

    return any(job_id.encode() in m for name in priority_lists(queue) for m in redis_client.lrange(name, 0, -1))


def received(log, job_id):
    return log.exists() and f"[{job_id}] received" in log.read_text(errors="replace")


def kiq_cli(env, *args, stdin=None, timeout=300):
    """The `kiq` CLI (producer.cli) in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args], env=env, input=stdin, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
