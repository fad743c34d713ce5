"""Scaling benchmark: the same batch of tiny jobs through 1 and then 2 supervised CPU device workers.

Prints jobs/s for each and the ratio. Brings up what it needs (Redis if none answers, a moto S3 server,
tiny models) and stops it after.

    .venv/bin/python bench/scaling.py [--jobs 12] [--steps 8] [--size 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _stack import bring_up

from kiq.settings import Settings
from producer import devstack
from producer.client import Client


def main() -> None:
    args = parse_args()
    stack = devstack.Stack()
    scratch = Path(tempfile.mkdtemp(prefix="kiq-bench-"))
    try:
        env = bring_up(stack, scratch, args.redis, "kiq-bench")
        results = {n: run(env, scratch, n, args) for n in (1, 2)}
    finally:
        stack.close()
    print(f"\n{'workers':>8} {'jobs':>5} {'seconds':>8} {'jobs/s':>7}")
    for n, (jobs, seconds) in results.items():
        print(f"{n:>8} {jobs:>5} {seconds:>8.2f} {jobs / seconds:>7.3f}")
    ratio = (results[2][0] / results[2][1]) / (results[1][0] / results[1][1])
    print(f"speed-up 2 vs 1: {ratio:.2f}x on {os.cpu_count()} CPU cores (each CPU 'device' is pinned to one core)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=8, help="decoder steps per job")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/11")
    return parser.parse_args()


def run(base_env: dict[str, str], scratch: Path, workers: int, args: argparse.Namespace) -> tuple[int, float]:
    env = {**base_env, "KIQ_QUEUE": f"kiq-bench-{uuid.uuid4().hex[:8]}"}
    client = Client(Settings.from_env(env))
    log = scratch / f"supervisor-{workers}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--devices", f"0-{workers - 1}"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        live = lambda: len([w for w in client.fleet() if w["queues"] == env["KIQ_QUEUE"]])  # noqa: E731
        devstack.wait_until(lambda: live() == workers, 300, "workers", proc, log)
        job = {"inputs": [{"text": "a cat", "weight": 1.0}], "height": args.size, "width": args.size,
               "prior_steps": 5, "decoder_steps": args.steps}  # fmt: skip
        start = time.perf_counter()
        ids = [client.submit({**job, "seed": n}) for n in range(args.jobs)]
        states = [client.wait(job_id, timeout=1800).state for job_id in ids]
        seconds = time.perf_counter() - start
        assert states == ["SUCCESS"] * args.jobs, states
        print(f"{workers} worker(s): {args.jobs} jobs in {seconds:.2f} s", file=sys.stderr)
        return args.jobs, seconds
    finally:
        devstack.stop(proc, grace_s=60)


if __name__ == "__main__":
    main()
