"""HTTP API benchmark on loopback, one `kiq api` process: status-poll throughput and submit latency.

Jobs go to a queue no worker consumes, so this measures the API, Redis and the broker publish only.

    .venv/bin/python bench/api_bench.py [--seconds 10] [--threads 8] [--submits 300]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from producer import devstack

JOB = {"inputs": [{"text": "a cat", "weight": 1.0}], "height": 64, "width": 64, "prior_steps": 2,
       "decoder_steps": 1}  # fmt: skip


def main() -> None:
    args = parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="kiq-api-bench-"))
    stack = devstack.Stack()
    port = devstack.free_port()
    env = {**os.environ, "KIQ_BROKER_URL": args.redis, "KIQ_API_PORT": str(port), "KIQ_API_KEYS": "",
           "KIQ_QUEUE": f"kiq-api-bench-{uuid.uuid4().hex[:6]}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "KIQ_S3_ENDPOINT_URL": "http://127.0.0.1:9"}  # fmt: skip
    try:
        devstack.ensure_redis(stack, args.redis, scratch)
        proc = stack.spawn([*devstack.kiq_command(), "api"], scratch / "api.log", env)
        devstack.wait_until(lambda: devstack.http_up(f"http://127.0.0.1:{port}/healthz"), 60, "api", proc)
        latencies = submit_latencies(port, args.submits)
        job_id = post(http.client.HTTPConnection("127.0.0.1", port))[1]
        rate = poll_rate(port, job_id, args.seconds, args.threads)
    finally:
        stack.close()
    q = statistics.quantiles(latencies, n=100)
    print(f"submit latency over {len(latencies)} sequential POST /v1/jobs: p50 {q[49] * 1000:.1f} ms, "
          f"p99 {q[98] * 1000:.1f} ms")  # fmt: skip
    print(f"status polls: {rate:.0f} requests/s (GET /v1/jobs/{{id}}, {args.threads} keep-alive clients, "
          f"{args.seconds:g} s, one API process, {os.cpu_count()} cores shared with the clients)")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--submits", type=int, default=300)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/10")
    return parser.parse_args()


def post(conn: http.client.HTTPConnection) -> tuple[float, str]:
    start = time.perf_counter()
    conn.request("POST", "/v1/jobs", body=json.dumps(JOB), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    body = response.read()
    assert response.status == 202, body
    return time.perf_counter() - start, json.loads(body)["id"]


def submit_latencies(port: int, count: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(20):  # warm-up
        post(conn)
    return [post(conn)[0] for _ in range(count)]


def poll_rate(port: int, job_id: str, seconds: float, threads: int) -> float:
    counts = [0] * threads
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        while time.perf_counter() < deadline:
            conn.request("GET", f"/v1/jobs/{job_id}")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            counts[i] += 1

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
