"""The seed's direct mindone call vs kiq, same tiny models, same job mix, on this machine's CPU.

For 1 job alone and for N jobs queued at once: jobs/s and per-job latency p50/p95, for the direct call
and for kiq with each optimisation on and off; then model forward passes per job (prior denoising
loops, text/image encoder calls, UNet steps), which do not depend on machine noise.

    .venv/bin/python bench/seed_vs_kiq.py [--jobs 16] [--prior-steps 10] [--decoder-steps 8] [--size 64]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from _stack import bring_up
from PIL import Image

from kiq.settings import Settings
from producer import devstack
from producer.client import Client

MODULES = ("prior", "text_encoder", "image_encoder", "unet")


def images() -> list[bytes]:
    rng = np.random.default_rng(3)
    out = []
    for shape in ((60, 50, 3), (80, 70, 3)):
        buf = io.BytesIO()
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def job_mix(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    cat, starry = (f"data:image/png;base64,{base64.b64encode(b).decode()}" for b in images())
    kinds = [
        [{"text": "a cat", "weight": 0.3}, {"image": cat, "weight": 0.3}, {"image": starry, "weight": 0.4}],
        [{"text": "a cat", "weight": 0.5}, {"text": "starry night", "weight": 0.5}],
        [{"image": cat, "weight": 0.5}, {"image": starry, "weight": 0.5}],
    ]
    return [{"inputs": kinds[i % 3], "height": args.size, "width": args.size, "prior_steps": args.prior_steps,
             "decoder_steps": args.decoder_steps, "seed": i} for i in range(n)]  # fmt: skip


def conditions(job: dict[str, Any]) -> tuple[list[Any], list[float]]:
    conds = [i["text"] if "text" in i else decode(i["image"]) for i in job["inputs"]]
    return conds, [i["weight"] for i in job["inputs"]]


def decode(data_uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_uri.split(",")[1]))).convert("RGB")


class Direct:
    """The seed's code: interpolate, then the decoder, in this process."""

    def __init__(self, env: dict[str, str]) -> None:
        from worker import device
        from worker.pipelines import base
        from worker.pipelines.mindspore_mindone import MindonePipelines

        config = device.DeviceConfig("CPU", 0)
        base.configure(config)
        self.pipes = MindonePipelines.load(env["KIQ_PRIOR_MODEL"], env["KIQ_DECODER_MODEL"], config, fast_prior=True)
        self.counts: dict[str, int] = dict.fromkeys(MODULES, 0)
        prior, decoder = self.pipes.prior, self.pipes.decoder
        cells = (prior.prior, prior.text_encoder, prior.image_encoder, decoder.unet)
        for name, cell in zip(MODULES, cells, strict=True):
            cell.register_forward_pre_hook(self._counter(name))

    def _counter(self, name: str) -> Any:
        def hook(cell: Any, inputs: Any) -> None:
            self.counts[name] += 1

        return hook

    def run(self, job: dict[str, Any], fast_prior: bool = False) -> Any:
        conds, weights = conditions(job)
        if fast_prior:
            emb, neg = self.pipes.fast_prior.interpolate(conds, weights, steps=job["prior_steps"], guidance_scale=4.0,
                                                         negative_prompt="", num_images=1,
                                                         generator=np.random.default_rng(job["seed"]))  # fmt: skip
        else:
            emb, neg = self.pipes.prior.interpolate(conds, weights, num_inference_steps=job["prior_steps"],
                                                    generator=np.random.default_rng(job["seed"]))  # fmt: skip
        return self.pipes.decoder(image_embeds=emb, negative_image_embeds=neg, height=job["height"],
                                  width=job["width"], num_inference_steps=job["decoder_steps"],
                                  generator=np.random.default_rng(job["seed"]))[0][0]  # fmt: skip

    def forward_counts(self, job: dict[str, Any], fast_prior: bool) -> dict[str, int]:
        self.counts = dict.fromkeys(MODULES, 0)
        self.run(job, fast_prior)
        return dict(self.counts)


def timed_direct(direct: Direct, jobs: list[dict[str, Any]]) -> tuple[float, list[float]]:
    start, done = time.perf_counter(), []
    for job in jobs:
        direct.run(job)
        done.append(time.perf_counter() - start)
    return time.perf_counter() - start, done


def timed_kiq(
    env: dict[str, str], jobs: list[dict[str, Any]], scratch: Path, fast_prior: bool, batch: int = 1
) -> tuple[float, list[float]]:
    worker_env = {**env, "KIQ_QUEUE": f"kiq-bench-{uuid.uuid4().hex[:6]}", "KIQ_FAST_PRIOR": "1" if fast_prior else "0",
                  "KIQ_DECODER_BATCH": str(batch)}  # fmt: skip
    client, stack = Client(Settings.from_env(worker_env)), devstack.Stack()
    try:
        devstack.start_worker(stack, worker_env, scratch / f"worker-{uuid.uuid4().hex[:6]}.log")
        client.wait(client.submit(jobs[0]), timeout=600)  # warm-up, as for the direct call
        start = time.perf_counter()
        ids = [client.submit(job) for job in jobs]
        finished: dict[str, float] = {}
        while len(finished) < len(ids):
            for job_id in ids:
                if job_id not in finished and client.status(job_id).done:
                    assert client.status(job_id).state == "SUCCESS"
                    finished[job_id] = time.perf_counter() - start
            time.sleep(0.02)
        return max(finished.values()), list(finished.values())
    finally:
        stack.close()


def row(name: str, jobs: int, total: float, latencies: list[float]) -> tuple[str, int, float, float, float, float]:
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else [latencies[0]] * 19
    return name, jobs, total, jobs / total, statistics.median(latencies), q[18]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--prior-steps", type=int, default=10)
    parser.add_argument("--decoder-steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="KIQ_DECODER_BATCH for the batching rows")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="kiq-bench-"))
    stack = devstack.Stack()
    rows = []
    try:
        env = bring_up(stack, scratch, args.redis, "kiq-bench")
        jobs = job_mix(args.jobs, args)
        for fast, batch in ((True, 1), (False, 1), (True, args.batch)):
            label = f"kiq, fast prior {'on' if fast else 'off'}, decoder batch {batch}"
            rows.append(row(f"{label}, 1 job", 1, *timed_kiq(env, jobs[:1], scratch, fast, batch)))
            rows.append(row(f"{label}, {args.jobs} queued", args.jobs, *timed_kiq(env, jobs, scratch, fast, batch)))
        direct = Direct(env)
        direct.run(jobs[0])  # warm-up: kiq's worker has loaded and warmed its models before the clock starts
        rows.insert(0, row(f"direct call, {args.jobs} in a row", args.jobs, *timed_direct(direct, jobs)))
        rows.insert(0, row("direct call, 1 job", 1, *timed_direct(direct, jobs[:1])))
        counts = [(kind, direct.forward_counts(jobs[i], False), direct.forward_counts(jobs[i], True))
                  for i, kind in enumerate(("text + 2 images (the seed's)", "2 texts", "2 images"))]  # fmt: skip
    finally:
        stack.close()
    print(f"\n{'':60} {'jobs':>4} {'seconds':>8} {'jobs/s':>7} {'p50 s':>7} {'p95 s':>7}")
    for name, n, total, rate, p50, p95 in rows:
        print(f"{name:60} {n:>4} {total:>8.2f} {rate:>7.3f} {p50:>7.2f} {p95:>7.2f}")
    base = {r[1]: r[3] for r in rows if r[0].startswith("direct")}
    for name, n, _, rate, *_ in rows[2:]:
        print(f"throughput ratio vs the direct call, {name}: {rate / base[n]:.2f}x")
    print(f"\nforward passes per job ({args.prior_steps} prior steps, {args.decoder_steps} decoder steps):")
    print(f"{'job':30} {'path':12} " + " ".join(f"{m:>13}" for m in MODULES))
    for kind, seed, fast in counts:
        for path, c in (("direct", seed), ("kiq", fast)):
            print(f"{kind:30} {path:12} " + " ".join(f"{c[m]:>13}" for m in MODULES))
    print("prior loops per job: direct = texts + 1; kiq = 1 with any text, 0 for image-only jobs")


if __name__ == "__main__":
    sys.exit(main())
