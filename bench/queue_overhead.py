"""Queue overhead: submit -> result in S3, minus the pipeline's own time, for trivial jobs (64², 2 prior
steps, 1 decoder step) one at a time; and the submit throughput of one producer process.

    .venv/bin/python bench/queue_overhead.py [--jobs 50] [--submits 500]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from _stack import bring_up

from kiq.settings import Settings
from producer import devstack
from producer.client import Client

TRIVIAL = {"inputs": [{"text": "a cat", "weight": 1.0}], "height": 64, "width": 64, "prior_steps": 2,
           "decoder_steps": 1}  # fmt: skip


def overheads(client: Client, jobs: int) -> list[float]:
    client.wait(client.submit(TRIVIAL), timeout=300)  # warm-up
    out = []
    for n in range(jobs):
        start = time.perf_counter()
        job_id = client.submit({**TRIVIAL, "seed": n})
        while not (status := client.status(job_id)).done:
            time.sleep(0.001)
        elapsed = time.perf_counter() - start
        assert status.result is not None, status.error
        out.append(elapsed - sum(status.result.timings.values()))
    return out


def submit_rate(client: Client, submits: int) -> float:
    start = time.perf_counter()
    for n in range(submits):
        client.submit({**TRIVIAL, "seed": n})
    return submits / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--submits", type=int, default=500)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/8")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="kiq-bench-"))
    stack = devstack.Stack()
    try:
        env = {**bring_up(stack, scratch, args.redis, "kiq-bench"), "KIQ_QUEUE": f"kiq-oh-{uuid.uuid4().hex[:6]}"}
        client = Client(Settings.from_env(env))
        devstack.start_worker(stack, env, scratch / "worker.log")
        measured = overheads(client, args.jobs)
        idle = Client(Settings.from_env({**env, "KIQ_QUEUE": f"kiq-idle-{uuid.uuid4().hex[:6]}"}))
        rate = submit_rate(idle, args.submits)
    finally:
        stack.close()
    q = statistics.quantiles(measured, n=100)
    print(f"queue overhead over {len(measured)} trivial jobs (latency minus the job's own stage timings, polled "
          f"every 1 ms): p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms")  # fmt: skip
    print(f"submit throughput, one producer process, sequential: {rate:.0f} jobs/s")


if __name__ == "__main__":
    main()
