"""Event streams at their edges, on real Redis and an in-process `kiq api` (uvicorn): a long sweep's stream
stays linear in its frames and capped, and every reader still sees every frame and the final event; and
Last-Event-ID values a client may send (out of range, ahead of the stream), disconnects while the stream's
subscription is pending, and a listener that cannot keep up."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest
import redis.asyncio
import uvicorn

from kiq.errors import InvalidEventId
from kiq.names import events_channel, events_key, job_record_key
from kiq.settings import Settings
from kiq.status import ImageRef, JobResult
from producer import devstack
from producer.api import create_api
from producer.client import Client
from producer.events import EventHub, job_events
from tests.proxy import Proxy
from worker.records import JobRecords

# A presigned URL as S3 gives one (about 600 bytes with a session token's worth of query string).
URL = "https://s3.example.com/kiq/jobs/{job}/{k}.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&" + "X-Amz-Signature=" + "f" * 500


def new_job(client: Client) -> str:
    job_id = str(uuid.uuid4())
    client.redis.set(job_record_key(job_id), json.dumps({"owner": "public", "webhook_url": ""}), ex=3600)
    return job_id


class Sweep:
    """A sweep's writes through the worker's own path (JobRecords → JobContext → the events writer), with no
    models: `steps` decoder steps per frame, each frame uploaded after its steps, then SUCCESS."""

    def __init__(self, client: Client, env: dict[str, str], frames: int, steps: int) -> None:
        settings = Settings.from_env({**env, "KIQ_PROGRESS_INTERVAL_MS": "0"})  # every step written
        self.records = JobRecords(client.app.backend, client.app, settings)
        self.job_id, self.frames, self.steps = new_job(client), frames, steps
        self.ctx = self.records.context(self.job_id, limit_s=math.inf)
        self.done = 0

    def start(self) -> None:
        self.records.started(self.job_id, 1)

    def run_frames(self, until: int) -> None:
        total = self.frames * self.steps
        for k in range(self.done, until):
            for s in range(self.steps):
                self.ctx.progress("decoder", k * self.steps + s + 1, total)
            uri = f"s3://kiq/jobs/{self.job_id}/{k}.png"
            url = URL.format(job=self.job_id, k=k)
            self.ctx.frame_done(ImageRef(uri=uri, url=url, width=768, height=768, format="png"))
        self.done = until

    def finish(self) -> None:
        result = JobResult(images=list(self.ctx.frames), seed=1, device="cpu", timings={})
        self.records.store(self.job_id, result)

    def uris(self) -> list[str]:
        return [f"s3://kiq/jobs/{self.job_id}/{k}.png" for k in range(self.frames)]


def stream_bytes(client: Client, job_id: str) -> int:
    return int(client.redis.memory_usage(events_key(job_id), samples=0))


def test_a_sweeps_event_stream_grows_linearly_in_its_frames(client, env):
    sizes = {}
    for frames in (20, 80):  # both well under the stream's cap: every entry is kept
        sweep = Sweep(client, env, frames, steps=5)
        sweep.start()
        sweep.run_frames(frames)
        sweep.finish()
        sizes[frames] = stream_bytes(client, sweep.job_id)
    ratio = sizes[80] / sizes[20]
    # 4x the frames (and 4x the writes): about 4x the bytes; each write carrying every frame so far gives ~16x.
    assert ratio < 6, f"stream bytes {sizes}: {ratio:.1f}x for 4x the frames"


def follow_frames(client: Client, job_id: str, last_event_id: str | None = None) -> dict:
    """Follow the job with `Client.events`, rebuilding the frame list as a reader does: `progress.frames`
    (a snapshot) replaces it, `progress.new_frames` extend it from index `frames_done - len(new_frames)`."""
    seen: dict = {"frames": [], "events": [], "final": None}
    for event in client.events(job_id, last_event_id=last_event_id, timeout=120):
        seen["events"].append(event)
        p = event.status.progress
        if p is not None and p.frames is not None:
            seen["frames"] = [f.uri for f in p.frames]
        elif p is not None and p.new_frames:
            start = (p.frames_done or 0) - len(p.new_frames)
            assert start <= len(seen["frames"]), f"frames {len(seen['frames'])}..{start - 1} were never seen"
            seen["frames"] = seen["frames"][:start] + [f.uri for f in p.new_frames]
        if event.status.done:
            seen["final"] = event.status
    return seen


def test_a_long_sweeps_stream_is_capped_and_late_readers_still_see_every_frame_and_the_end(client, env):
    from kiq.events import STREAM_MAXLEN

    sweep = Sweep(client, env, frames=120, steps=10)  # 1,200 progress writes
    sweep.start()
    first_id = client.redis.xrange(events_key(sweep.job_id), count=1)[0][0].decode()
    sweep.run_frames(110)
    assert client.redis.xlen(events_key(sweep.job_id)) <= STREAM_MAXLEN + 100  # MAXLEN ~ trims whole nodes
    status = client.status(sweep.job_id)  # a poll lists every frame so far, from the job's frames record
    assert [f.uri for f in status.progress.frames] == sweep.uris()[:109]

    # Readers that start after the stream was trimmed: from the start, and resuming from a trimmed id.
    found: dict[str, dict] = {}
    readers = [threading.Thread(target=lambda n=n, a=a: found.__setitem__(n, follow_frames(client, sweep.job_id, a)))
               for n, a in (("fresh", None), ("resumed", first_id))]  # fmt: skip
    for reader in readers:
        reader.start()
    time.sleep(1)
    sweep.run_frames(120)
    sweep.finish()
    for reader in readers:
        reader.join(120)
    assert client.redis.xlen(events_key(sweep.job_id)) <= STREAM_MAXLEN + 100
    for name, seen in found.items():
        first = seen["events"][0].status.progress
        assert first is not None and first.frames is not None, f"{name}: no snapshot first ({first})"
        assert seen["frames"] == sweep.uris()[:119], name  # the last frame comes with the result
        assert seen["final"].state == "SUCCESS" and [f.uri for f in seen["final"].result.images] == sweep.uris()
        ids = [e.id for e in seen["events"]]
        assert ids == sorted(set(ids), key=lambda i: tuple(map(int, i.split("-")))), name

    # An SSE reader from the start: a snapshot (all frames so far), then the rest, small and in order.
    with serve(create_api(Settings.from_env(open_env(env)))) as http:
        events = read_sse(http, sweep.job_id, {})
    assert events[0][2]["result"]["images"][-1]["uri"] == sweep.uris()[-1] and events[-1][1] == "done"


# --- Last-Event-ID, disconnects and slow listeners: the API in this process, on real Redis -------------------


def open_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "KIQ_API_KEYS": "", "KIQ_API_TENANTS": ""}


@contextmanager
def serve(app):
    port = devstack.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    devstack.wait_until(lambda: server.started, 30, "in-process api")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(15)


def read_sse(http, job_id, headers, within_s=30.0):
    """(id, event, status) until the `done` event; fails if it does not come within `within_s`."""
    events, fields, deadline = [], {}, time.monotonic() + within_s
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            assert time.monotonic() < deadline, f"no done event within {within_s} s; got {events}"
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
            elif not line and "data" in fields:
                events.append((fields.get("id", ""), fields["event"], json.loads(fields["data"])))
                fields = {}
                if events[-1][1] == "done":
                    return events
    raise AssertionError(f"the stream ended without a done event: {events}")


@pytest.fixture(scope="module")
def app(env):
    app = create_api(Settings.from_env(open_env(env)))
    app.state.heartbeat_s = 0.3
    return app


@pytest.fixture(scope="module")
def http(app):
    with serve(app) as http:
        yield http


def test_a_last_event_id_redis_refuses_is_a_typed_400_before_the_stream(http, client):
    job_id = new_job(client)
    client.app.backend.store_result(job_id, {"hostname": "h"}, "STARTED")
    for bad in ("99999999999999999999-0", "1-99999999999999999999", "18446744073709551616-0", "1-" + "9" * 60):
        response = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": bad})
        assert response.status_code == 400, (bad, response.status_code, response.text[:200])
        assert "Last-Event-ID" in response.json()["detail"]
    with pytest.raises(InvalidEventId, match="Last-Event-ID"):  # the Python client: the same check
        next(client.events(job_id, last_event_id="99999999999999999999-0"))
    client.app.backend.mark_as_done(job_id, {"images": [], "seed": 1, "device": "cpu", "timings": {}})


def test_an_id_ahead_of_a_running_jobs_stream_gets_the_current_state_then_the_final_event(http, client):
    job_id = new_job(client)
    backend = client.app.backend
    backend.store_result(job_id, {"hostname": "h"}, "STARTED")
    backend.store_result(job_id, {"stage": "decoder", "step": 1, "total": 2}, "PROGRESS")
    ahead = "99999999999999-0"  # valid, and after anything this stream will hold for a long time

    def finish_later() -> None:
        time.sleep(1.5)
        backend.store_result(job_id, {"stage": "decoder", "step": 2, "total": 2}, "PROGRESS")
        backend.mark_as_done(job_id, {"images": [], "seed": 1, "device": "cpu", "timings": {}})

    threading.Thread(target=finish_later, daemon=True).start()
    events = read_sse(http, job_id, {"Last-Event-ID": ahead}, within_s=15)
    assert events[0][1] == "progress" and events[0][2]["progress"]["step"] in (1, 2)  # the current state
    assert events[-1][1] == "done" and events[-1][2]["state"] == "SUCCESS"
    # The Python client resumes the same way.
    seen = [e.status.state for e in client.events(job_id, last_event_id=ahead, timeout=15)]
    assert seen == ["SUCCESS"]


def test_a_client_that_leaves_while_its_subscription_is_pending_leaves_no_subscription(env, client):
    """The API's Redis (results) through a proxy that starts holding new connections: the event hub's pub/sub
    connection, opened by the first stream, hangs, so that stream's subscription stays pending; its client
    leaves. Once Redis answers again, the job's channel must not stay subscribed (nor a queue fill for it)."""
    results = urlsplit(env["KIQ_BROKER_URL"])
    proxy = Proxy(results.port or 6379)
    proxy.start()
    app = create_api(Settings.from_env({**open_env(env), "KIQ_RESULT_BACKEND": f"redis://127.0.0.1:{proxy.port}"
                                                                             f"{results.path}"}))  # fmt: skip
    app.state.heartbeat_s = 0.3
    left, other = new_job(client), new_job(client)
    for job_id in (left, other):
        client.app.backend.store_result(job_id, {"hostname": "h"}, "STARTED")
    try:
        with serve(app) as http:
            assert http.get(f"/v1/jobs/{left}").status_code == 200  # the API's sync connection, open from now on
            proxy.hold()
            with http.stream("GET", f"/v1/jobs/{left}/events") as response:
                assert response.status_code == 200
                next(response.iter_lines())  # the stream is open, its subscription pending
            time.sleep(1)
            proxy.release()
            # Another stream through the same hub: once its live event arrives, the hub has sent Redis whatever
            # it had queued for the stream that left (Redis runs one connection's commands in order).
            threading.Thread(target=lambda: (time.sleep(1.5), client.app.backend.store_result(
                other, {"stage": "decoder", "step": 1, "total": 1}, "PROGRESS"), client.app.backend.mark_as_done(
                other, {"images": [], "seed": 1, "device": "cpu", "timings": {}})), daemon=True).start()  # fmt: skip
            assert read_sse(http, other, {}, within_s=20)[-1][1] == "done"
            subscribers = dict(client.redis.pubsub_numsub(events_channel(left)))
            assert subscribers[events_channel(left).encode()] == 0, "the stream that left is still subscribed"
    finally:
        proxy.stop()
        client.app.backend.mark_as_done(left, {"images": [], "seed": 1, "device": "cpu", "timings": {}})


def test_a_listener_that_falls_behind_is_bounded_and_resynced_from_the_stream(client, settings):
    job_id = new_job(client)
    backend = client.app.backend
    writes = 600

    async def run() -> list:
        hub = EventHub(redis.asyncio.Redis.from_url(settings.results_server.raw))
        try:
            queue = await hub.listen(job_id)  # a stream that stops reading (a slow client)
            await asyncio.to_thread(lambda: [backend.store_result(job_id, {"stage": "decoder", "step": n,
                                                                           "total": writes}, "PROGRESS")
                                             for n in range(1, writes + 1)])  # fmt: skip
            await asyncio.sleep(1)  # every publish has reached the hub
            assert 0 < queue.maxsize < writes and queue.qsize() <= queue.maxsize, (queue.maxsize, queue.qsize())
            hub.forget(job_id, queue)
            await asyncio.to_thread(backend.mark_as_done, job_id, {"images": [], "seed": 1, "device": "c",
                                                                  "timings": {}})  # fmt: skip
            got = []
            async for event in job_events(hub, job_id, None, 1.0):
                if event is not None:
                    got.append(event)
                    if len(got) == writes + 1:
                        break
            return got
        finally:
            await hub.close()

    assert len(asyncio.run(run())) == writes + 1  # every write, and SUCCESS
