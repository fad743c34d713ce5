"""Event streams at scale: N concurrent `GET /v1/jobs/{id}/events` streams on one `kiq api` process.

A writer thread makes the worker's progress writes (the same `EventsBackend.store_result` call a worker's
JobRecords makes) for N jobs, a step per job every `--interval` seconds; the bench prints the delay from
each write to its event at the client (p50, p99, max), the API process's CPU while the writes ran, and the
Redis reads the API made meanwhile (XRANGE, GET, EXISTS: none per event; the streams share one pub/sub).
The clients run in this process, so on a small machine they compete with the API for the cores.

    .venv/bin/python bench/events_bench.py [--streams 500] [--steps 10] [--interval 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import redis

from kiq.names import job_record_key
from kiq.settings import Settings
from producer import devstack
from producer.client import Client

READS = ("xrange", "get", "exists", "mget", "xread")


def main() -> None:
    args = parse_args()
    args.redis = args.redis or f"redis://127.0.0.1:{devstack.free_port()}/0"
    scratch = Path(tempfile.mkdtemp(prefix="kiq-events-bench-"))
    stack, port = devstack.Stack(), devstack.free_port()
    env = {**os.environ, "KIQ_BROKER_URL": args.redis, "KIQ_API_KEYS": "", "KIQ_API_TENANTS": "",
           "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "KIQ_S3_ENDPOINT_URL": "http://127.0.0.1:9"}  # fmt: skip
    try:
        devstack.ensure_redis(stack, args.redis, scratch)
        proc = stack.spawn([*devstack.kiq_command(), "api", "--port", str(port)], scratch / "api.log", env)
        devstack.wait_until(lambda: devstack.http_up(f"http://127.0.0.1:{port}/healthz"), 60, "api", proc)
        client = Client(Settings.from_env(env))
        jobs = [str(uuid.uuid4()) for _ in range(args.streams)]
        with client.redis.pipeline() as pipe:
            for job_id in jobs:
                pipe.set(job_record_key(job_id), json.dumps({"owner": "public"}), ex=3600)
            pipe.execute()
        report = asyncio.run(run(args, port, client, jobs, proc.pid))
        print(json.dumps(report, indent=2))
    finally:
        stack.close()


async def run(args: argparse.Namespace, port: int, client: Client, jobs: list[str], pid: int) -> dict:
    written: dict[tuple[str, int], float] = {}
    delays: list[float] = []  # progress events
    finals: list[float] = []  # the final status (each stream then closes)
    ready = asyncio.Semaphore(0)
    limits = httpx.Limits(max_connections=args.streams + 10, max_keepalive_connections=args.streams + 10)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=None, limits=limits) as http:
        tasks = [asyncio.create_task(follow(http, job_id, written, delays, finals, ready)) for job_id in jobs]
        for _ in jobs:
            await asyncio.wait_for(ready.acquire(), 120)
        await asyncio.sleep(2)  # every stream past its first event and subscribed
        reads_before, cpu_before, t0 = redis_reads(client.redis), cpu_seconds(pid), time.monotonic()
        writer = threading.Thread(target=write, args=(client, jobs, args, written))
        writer.start()
        await asyncio.to_thread(writer.join)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        wall, cpu = time.monotonic() - t0, cpu_seconds(pid) - cpu_before
        reads = {k: v - reads_before.get(k, 0) for k, v in redis_reads(client.redis).items()}
    delays.sort()
    finals.sort()
    return {
        "streams": len(jobs), "events_per_stream": args.steps + 1, "write_interval_s": args.interval,
        "events_received": len(delays) + len(finals), "events_written": len(written),
        "progress_delay_ms": percentiles(delays), "final_status_delay_ms": percentiles(finals),
        "api_cpu_percent_of_one_core": round(100 * cpu / wall, 1), "wall_s": round(wall, 1),
        # Redis-wide: the API's reads plus the writer's (Celery's store_result GETs the old state first: one per write)
        "redis_reads_during_writes": reads,
    }  # fmt: skip


async def follow(http: httpx.AsyncClient, job_id: str, written: dict, delays: list, finals: list,
                 ready: asyncio.Semaphore) -> None:  # fmt: skip
    first = True
    async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.time()
            status = json.loads(line[6:])
            if first:
                first = False
                ready.release()
                continue
            if status["state"] == "SUCCESS":
                finals.append(now - written[(job_id, -1)])
                return
            delays.append(now - written[(job_id, status["progress"]["step"])])


def write(client: Client, jobs: list[str], args: argparse.Namespace, written: dict) -> None:
    backend, gap = client.app.backend, args.interval / len(jobs)
    result = {"images": [], "seed": 1, "device": "bench", "timings": {}}
    start = time.monotonic()
    for step in [*range(1, args.steps + 1), -1]:
        for n, job_id in enumerate(jobs):
            time.sleep(max(0.0, start + ((step if step > 0 else args.steps + 1) - 1) * args.interval + n * gap
                           - time.monotonic()))  # fmt: skip
            written[(job_id, step)] = time.time()
            if step > 0:
                backend.store_result(job_id, {"stage": "decoder", "step": step, "total": args.steps}, "PROGRESS")
            else:
                backend.mark_as_done(job_id, result)


def percentiles(values: list[float]) -> dict[str, float]:
    p99 = values[int(0.99 * (len(values) - 1))]
    return {"p50": round(1000 * statistics.median(values), 2), "p99": round(1000 * p99, 2),
            "max": round(1000 * values[-1], 2)}  # fmt: skip


def redis_reads(r: redis.Redis) -> dict[str, int]:
    stats = r.info("commandstats")
    return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in READS}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between one job's steps")
    parser.add_argument(
        "--redis",
        help="default: a private redis-server on a free port, so that Redis's command counts are the API's alone",
    )
    return parser.parse_args()


if __name__ == "__main__":
    main()
