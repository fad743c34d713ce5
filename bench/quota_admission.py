"""What quotas cost a submit, on a private Redis: `Client.submit` with no quota set (no admission at all) and with
all three counted quotas, and the admission script alone when refusing at a queued cap of N jobs (where it first
looks for entries whose job has ended, so a refusal costs O(N)).

    .venv/bin/python bench/quota_admission.py [--submits 300] [--cap 1000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from _stack import bring_up

from kiq.contract import parse_job
from kiq.errors import QuotaExceeded
from kiq.settings import Settings
from producer import devstack
from producer.client import Client
from producer.quotas import Quotas

JOB = {"inputs": [{"text": "a cat", "weight": 1.0}], "height": 64, "width": 64, "prior_steps": 3, "decoder_steps": 4}


def timed_ms(call, n: int) -> list[float]:
    spent = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        spent.append((time.perf_counter() - start) * 1000)
    return spent


def summary(spent: list[float]) -> str:
    ordered = sorted(spent)
    return f"median {statistics.median(ordered):.2f} ms, p99 {ordered[int(len(ordered) * 0.99) - 1]:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=300)
    parser.add_argument("--cap", type=int, default=1000)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="kiq-bench-"))
    stack = devstack.Stack()
    url = f"redis://127.0.0.1:{devstack.free_port()}/0"
    try:
        env = {**bring_up(stack, scratch, url, "kiq-bench"), "KIQ_QUEUE": f"kiq-quota-{uuid.uuid4().hex[:6]}"}
        client = Client(Settings.from_env(env))
        counted = Quotas(submits_per_minute=10**9, queued=10**9, running=10**9)
        for name, quotas in [("no quotas", Quotas()), ("3 counted quotas", counted)] * 2:  # twice, interleaved
            client.submit(JOB, owner=name, quotas=quotas)  # warm the connections
            spent = timed_ms(lambda q=quotas, o=name: client.submit(JOB, owner=o, quotas=q), args.submits)
            print(f"Client.submit, {name}: {summary(spent)} over {args.submits} submits")
        owner, job = "capped", parse_job(JOB)
        for _ in range(args.cap):
            client.submit(job, owner=owner, quotas=Quotas(queued=args.cap))

        def refused() -> None:
            try:
                client.admit(job, owner, str(uuid.uuid4()), Quotas(queued=args.cap))
            except QuotaExceeded:
                return
            raise AssertionError("admitted over the cap")

        print(f"admission refused at a cap of {args.cap} queued: {summary(timed_ms(refused, 200))}")
    finally:
        stack.close()


if __name__ == "__main__":
    main()
