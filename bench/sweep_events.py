"""A long sweep's event stream: its bytes in Redis and what one new reader costs, on a private Redis.

Runs a sweep's worth of progress writes (default: 120 frames of 100 decoder steps, 0.15 s a step as a 768²
decoder takes, progress at most every 500 ms as KIQ_PROGRESS_INTERVAL_MS) through the worker's own write path
(worker/records.py → the events writer in kiq/events.py), with S3-presigned URLs like real frames', and no
models: the steps advance a simulated clock. While the job is still running (every frame written), it prints
the stream's entries and bytes (MEMORY USAGE), then one new reader's cost from the start of the stream up to
its newest entry: `Client.events` (bytes Redis sent it, its CPU; also resuming after the oldest entry kept,
the longest backlog a reader can be sent) and an SSE stream from a `kiq api` process
(bytes received, the API process's CPU). Then the final status, and the stream's bytes again.

    PYTHONPATH=. .venv/bin/python bench/sweep_events.py [--frames 120] [--steps 100] [--session-token]

To measure another tree with the same script (the "before" figure): PYTHONPATH=/path/to/that/tree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import httpx
import redis

from kiq.names import events_key, job_record_key
from kiq.settings import Settings
from kiq.status import ImageRef, JobResult, Progress
from producer import devstack
from producer.client import Client
from worker.records import JobRecords
from worker.throttle import ProgressThrottle


def main() -> None:
    args = parse_args()
    url = f"redis://127.0.0.1:{devstack.free_port()}/0"  # its own Redis: nothing else adds to its counters
    scratch = Path(tempfile.mkdtemp(prefix="kiq-sweep-events-"))
    stack, port = devstack.Stack(), devstack.free_port()
    # KIQ_PROGRESS_INTERVAL_MS 0: the bench throttles itself, on its simulated clock
    env = {**os.environ, "KIQ_BROKER_URL": url, "KIQ_API_KEYS": "", "KIQ_API_TENANTS": "",
           "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "KIQ_S3_ENDPOINT_URL": "http://127.0.0.1:9",
           "KIQ_PROGRESS_INTERVAL_MS": "0"}  # fmt: skip
    try:
        devstack.ensure_redis(stack, url, scratch)
        api = stack.spawn([*devstack.kiq_command(), "api", "--port", str(port)], scratch / "api.log", env)
        devstack.wait_until(lambda: devstack.http_up(f"http://127.0.0.1:{port}/healthz"), 60, "api", api)
        client = Client(Settings.from_env(env))
        job_id, records = str(uuid.uuid4()), JobRecords(client.app.backend, client.app, Settings.from_env(env))
        client.redis.set(job_record_key(job_id), json.dumps({"owner": "public", "webhook_url": ""}), ex=3600)
        t0 = time.monotonic()
        frames = write_sweep(records, job_id, args)
        report: dict = {"frames": args.frames, "steps_per_frame": args.steps, "writes_s": round(time.monotonic() - t0)}
        report["running"] = stream_figures(client, job_id)
        report["new_reader_python_client"] = failing_or(lambda: python_reader(client, job_id, url))
        oldest = client.redis.xrange(events_key(job_id), count=1)[0][0].decode()  # the longest backlog kept
        report["resuming_reader_python_client"] = failing_or(lambda: python_reader(client, job_id, url, oldest))
        report["new_reader_sse"] = failing_or(lambda: sse_reader(port, job_id, client, api.pid))
        records.store(job_id, JobResult(images=frames, seed=1, device="bench", timings={}))
        report["finished"] = stream_figures(client, job_id)
        print(json.dumps(report, indent=2))
    finally:
        stack.close()


def write_sweep(records: JobRecords, job_id: str, args: argparse.Namespace) -> list[ImageRef]:
    """STARTED, then each frame's decoder steps (the progress points the throttle lets through) and its upload."""
    clock = [0.0]
    throttle = ProgressThrottle(args.interval_ms / 1000, clock=lambda: clock[0])
    records.started(job_id, 1)
    ctx = records.context(job_id, limit_s=math.inf)
    s3 = boto3.client("s3", region_name="us-east-1", aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
                      aws_secret_access_key="x" * 40,
                      aws_session_token=("IQoJb3JpZ2luX2VjE" + "A" * 1000) if args.session_token else None)  # fmt: skip
    total = args.frames * args.steps
    for k in range(args.frames):
        for s in range(args.steps):
            clock[0] += args.step_s
            step = k * args.steps + s + 1
            if throttle.due(Progress(stage="decoder", step=step, total=total, frames=list(ctx.frames) or None)):
                ctx.progress("decoder", step, total)
        key = f"jobs/{job_id}/{k}.png"
        presigned = s3.generate_presigned_url("get_object", Params={"Bucket": "kiq", "Key": key}, ExpiresIn=3600)
        ctx.frame_done(ImageRef(uri=f"s3://kiq/{key}", url=presigned, width=768, height=768, format="png"))
    return list(ctx.frames)


def failing_or(read: Any) -> dict:
    """The reader's figures, or how it failed (an older tree's SSE stream can die on a huge backlog)."""
    start = time.monotonic()
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the other figures still count
        return {"failed": f"{type(exc).__name__}: {str(exc)[:120]}", "after_s": round(time.monotonic() - start, 1)}


def stream_figures(client: Client, job_id: str) -> dict:
    key = events_key(job_id)
    return {
        "entries_written": client.redis.xinfo_stream(key)["entries-added"],
        "entries": client.redis.xlen(key),
        "stream_mib": round(client.redis.memory_usage(key, samples=0) / 2**20, 2),
    }


def python_reader(client: Client, job_id: str, url: str, after: str | None = None) -> dict:
    """`Client.events` from the start (or after `after`) until the stream's newest entry: Redis's bytes out and
    this process's CPU."""
    counter = redis.Redis.from_url(url)
    newest = client.redis.xrevrange(events_key(job_id), count=1)[0][0].decode()
    before, cpu = int(counter.info("stats")["total_net_output_bytes"]), time.process_time()
    events = 0
    for event in client.events(job_id, last_event_id=after, timeout=600):
        events += 1
        if event.id == newest:
            break
    sent = int(counter.info("stats")["total_net_output_bytes"]) - before
    return {"events": events, "redis_sent_mib": round(sent / 2**20, 2), "cpu_s": round(time.process_time() - cpu, 2)}


def sse_reader(port: int, job_id: str, client: Client, pid: int) -> dict:
    """An SSE stream from the start until the newest entry's event: bytes received, the API process's CPU."""
    newest = client.redis.xrevrange(events_key(job_id), count=1)[0][0].decode()
    httpx.get(f"http://127.0.0.1:{port}/v1/jobs/{job_id}", timeout=60).raise_for_status()  # the API's first request
    received, events, cpu, start = 0, 0, cpu_seconds(pid), time.monotonic()
    with httpx.stream("GET", f"http://127.0.0.1:{port}/v1/jobs/{job_id}/events", timeout=600) as response:
        at_newest = False
        for line in response.iter_lines():
            received += len(line) + 1
            events += line.startswith("data: ")
            at_newest = at_newest or line == f"id: {newest}"
            if at_newest and not line:
                break
    return {"events": events, "sse_mib": round(received / 2**20, 2), "api_cpu_s": round(cpu_seconds(pid) - cpu, 2),
            "wall_s": round(time.monotonic() - start, 2)}  # fmt: skip


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--steps", type=int, default=100, help="decoder steps per frame")
    parser.add_argument("--step-s", type=float, default=0.15, help="simulated seconds per decoder step")
    parser.add_argument(
        "--interval-ms", type=float, default=500, help="the progress throttle (KIQ_PROGRESS_INTERVAL_MS)"
    )
    parser.add_argument("--session-token", action="store_true", help="presign with a session token, as cloud roles do")
    return parser.parse_args()


if __name__ == "__main__":
    main()
