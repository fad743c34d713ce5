"""A 16-frame sweep vs the same 16 frames as 16 separate jobs, on one in-process Runner (the worker's own code
from fetch to upload, in-memory storage), tiny models on this machine's CPU.

The sweep morphs over the seed's three conditions ("a cat" and two images): keyframes [1, 0, 0] → [0, 1, 0] →
[0, 0, 1]; the separate jobs have frame k's weights and the same seed, so each gives the same picture. Prints
model forward passes per stage (prior denoising steps, text and image encoder runs, UNet steps: they do not depend
on machine noise) and wall time; no assertions.

    PYTHONPATH=. .venv/bin/python bench/sweep.py [--frames 16] [--prior-steps 10] [--decoder-steps 8] [--size 64]
                                                  [--backend mindone|diffusers] [--batch 4]
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kiq.contract import parse_job
from kiq.settings import Settings
from producer import devstack
from worker.cache import BoundedLRU
from worker.device import DeviceConfig
from worker.pipelines import base
from worker.runner import JobContext, Runner
from worker.storage import MemoryStorage
from worker.sweep import run_job

STAGES = ("prior", "text_encoder", "image_encoder", "unet")
CACHE_BYTES = 256 * 1024 * 1024  # KIQ_EMBED_CACHE_MB's default


def data_uri(shape: tuple[int, int, int], seed: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def sweep_job(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "inputs": [{"text": "a cat", "weight": 1.0}, {"image": data_uri((60, 50, 3), 1), "weight": 0.0},
                   {"image": data_uri((80, 70, 3), 2), "weight": 0.0}],
        "height": args.size, "width": args.size, "prior_steps": args.prior_steps,
        "decoder_steps": args.decoder_steps, "seed": 42,
        "sweep": {"keyframes": [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], "frames": args.frames},
    }  # fmt: skip


def frame_jobs(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    plain = {k: v for k, v in sweep.items() if k != "sweep"}
    return [{**plain, "inputs": [{**i, "weight": w} for i, w in zip(sweep["inputs"], weights, strict=True)]}
            for weights in parse_job(sweep).frame_weights()]  # fmt: skip


class Counted:
    """The backend's pipelines with a forward counter on each stage's model."""

    def __init__(self, pipelines: Any) -> None:
        self.pipelines = pipelines
        self.counts = dict.fromkeys(STAGES, 0)
        prior, decoder = pipelines.prior, pipelines.decoder
        for name, model in zip(STAGES, (prior.prior, prior.text_encoder, prior.image_encoder, decoder.unet),
                               strict=True):  # fmt: skip
            model.register_forward_pre_hook(self._counter(name))

    def _counter(self, name: str) -> Any:
        def hook(*_: Any) -> None:
            self.counts[name] += 1

        return hook

    def fresh_caches(self, max_bytes: int) -> None:
        prior = self.pipelines.fast_prior
        prior.image_cache, prior.text_cache = BoundedLRU(max_bytes // 2), BoundedLRU(max_bytes // 2)

    def measure(self, run: Any) -> tuple[dict[str, int], float, dict[str, float]]:
        self.counts = dict.fromkeys(STAGES, 0)
        start = time.perf_counter()
        timings = run()
        return dict(self.counts), time.perf_counter() - start, timings


def context(job_id: str) -> JobContext:
    return JobContext(job_id=job_id, report=lambda _: None, cancelled=lambda: False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--prior-steps", type=int, default=10)
    parser.add_argument("--decoder-steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="KIQ_DECODER_BATCH for the batched sweep row")
    parser.add_argument("--backend", default="mindone", choices=("mindone", "diffusers"))
    args = parser.parse_args()
    prior_dir, decoder_dir = devstack.make_tiny_models(Path(tempfile.mkdtemp(prefix="kiq-bench-sweep-")) / "models")
    settings = Settings(device_target="CPU", backend=args.backend, prior_model=str(prior_dir),
                        decoder_model=str(decoder_dir))  # fmt: skip
    counted = Counted(base.load(settings, DeviceConfig.from_settings(settings)))
    storage = MemoryStorage()
    runner = Runner(settings, storage=storage, pipelines=counted.pipelines)
    sweep = sweep_job(args)
    jobs = [parse_job(j) for j in frame_jobs(sweep)]
    runner.run(jobs[0], context("warm-up"))  # the worker has loaded and warmed its models before a job arrives

    def separate() -> dict[str, float]:
        total: dict[str, float] = {}
        for k, job in enumerate(jobs):
            for stage, seconds in runner.run(job, context(f"frame-{k}")).timings.items():
                total[stage] = total.get(stage, 0.0) + seconds
        return total

    def swept(batch: int) -> Any:
        sweeper = Runner(replace(settings, decoder_batch=batch), storage=storage, pipelines=counted.pipelines)
        return lambda: run_job(sweeper, parse_job(sweep), context(f"sweep-{batch}")).timings

    rows = []
    for label, cache, run in ((f"{args.frames} separate jobs, caches off", 0, separate),
                              (f"{args.frames} separate jobs, caches on (default 256 MB)", CACHE_BYTES, separate),
                              ("1 sweep, decoder batch 1 (default)", CACHE_BYTES, swept(1)),
                              (f"1 sweep, decoder batch {args.batch}", CACHE_BYTES, swept(args.batch))):  # fmt: skip
        counted.fresh_caches(cache)
        rows.append((label, *counted.measure(run)))
    print(f"\n{args.backend} on CPU, tiny models, {args.size}x{args.size}, {args.frames} frames, "
          f"{args.prior_steps} prior + {args.decoder_steps} decoder steps")  # fmt: skip
    print(f"{'':52} " + " ".join(f"{s:>13}" for s in STAGES) + f" {'wall s':>8} {'decoder s':>9}")
    for label, counts, wall, timings in rows:
        print(f"{label:52} " + " ".join(f"{counts[s]:>13}" for s in STAGES)
              + f" {wall:>8.2f} {timings.get('decoder', 0):>9.2f}")  # fmt: skip
    decoder_alone = rows[0][3]["decoder"]
    for label, _, wall, _ in rows[2:]:
        print(f"{label}: wall {wall:.2f} s = {wall / decoder_alone:.3f}x the {args.frames} separate jobs' decoder "
              f"time ({decoder_alone:.2f} s); {rows[0][2] / wall:.2f}x faster than the separate jobs")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
