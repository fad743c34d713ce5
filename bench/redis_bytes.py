"""Bytes written to Redis by one job with 8 inline (data:) 4 MiB images, submit to result, on a private Redis.

Counts everything Redis takes in (`INFO stats total_net_input_bytes`): the message, job record, STARTED and
PROGRESS writes, the result, delivery bookkeeping and task events — and, while the job runs, what any idle
worker sends anyway (Celery's worker heartbeat events, the fleet heartbeat, lease renewals, broker polling).
That background is measured first with the worker idle and reported apart, since tiny models on a 2-core CPU
take minutes where a device takes seconds.

    .venv/bin/python bench/redis_bytes.py [--decoder-steps 10 50]

To measure another tree with the same script (the "before" figure): PYTHONPATH=/path/to/that/tree.
"""

from __future__ import annotations

import argparse
import base64
import io
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import redis
from _stack import bring_up
from PIL import Image

from kiq.settings import Settings
from producer import devstack
from producer.client import Client

MAX_INLINE = 4 * 1024 * 1024


def noise_png(seed: int) -> bytes:
    """An incompressible PNG just under the 4 MiB inline cap."""
    side = 1180
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    data = buffer.getvalue()
    assert len(data) <= MAX_INLINE, len(data)
    return data


def input_bytes(client: redis.Redis) -> int:
    return int(client.info("stats")["total_net_input_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder-steps", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--idle-s", type=float, default=30.0)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="kiq-bench-"))
    stack = devstack.Stack()
    url = f"redis://127.0.0.1:{devstack.free_port()}/0"  # a Redis of its own: nothing else adds to its counters
    images = [noise_png(n) for n in range(8)]
    inputs = [{"image": "data:image/png;base64," + base64.b64encode(d).decode(), "weight": 1.0} for d in images]
    try:
        # Tiny models on a CPU run far slower per step than the time limits assume for a real device.
        env = {**bring_up(stack, scratch, url, "kiq-bench"), "KIQ_QUEUE": f"kiq-bytes-{uuid.uuid4().hex[:6]}",
               "KIQ_TIME_LIMIT_MIN_S": "3000", "KIQ_TIME_LIMIT_MAX_S": "3000"}  # fmt: skip
        client = Client(Settings.from_env(env))
        devstack.start_worker(stack, env, scratch / "worker.log")
        counter = redis.Redis.from_url(url)
        time.sleep(5)
        idle_start, before = time.monotonic(), input_bytes(counter)
        time.sleep(args.idle_s)
        rate = (input_bytes(counter) - before) / (time.monotonic() - idle_start)
        print(f"idle worker background: {rate:.0f} bytes/s")
        for steps in args.decoder_steps:
            job = {"inputs": inputs, "height": 64, "width": 64, "prior_steps": 10, "decoder_steps": steps, "seed": 1}
            start, before = time.monotonic(), input_bytes(counter)
            final = client.wait(client.submit(job), timeout=3000)
            written, elapsed = input_bytes(counter) - before, time.monotonic() - start
            assert final.state == "SUCCESS", final.error
            own = written - rate * elapsed
            print(f"8 inline images of {sum(map(len, images)) / 8 / 2**20:.2f} MiB each, 64x64, 10 prior + {steps} "
                  f"decoder steps, {elapsed:.0f} s: Redis took in {written / 1024:.1f} KiB, of which the job's own "
                  f"{own / 1024:.1f} KiB (the rest: idle background for as long)")  # fmt: skip
    finally:
        stack.close()


if __name__ == "__main__":
    main()
