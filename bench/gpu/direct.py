"""The baseline: the seed's direct call, in a process of its own (its GPU memory is gone when it exits).

    python bench/gpu/direct.py --framework diffusers --build full --models DIR --out direct.json
    python bench/gpu/direct.py --framework mindone --models DIR --out direct.json    # dry run, CPU

diffusers: builds the random full-size (or --build tiny) pipelines on the GPU, saves them to DIR in the
from_pretrained layout for the kiq workers, then times interpolate(["a cat", cat, starry], [0.3, 0.3, 0.4])
and the decoder with the pipelines still in memory, fp16. mindone: loads DIR (the tiny models) the way the
CPU worker does and times the same two calls. One warm-up run, then up to --reps timed runs within --budget-s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EXAMPLES = ROOT / "producer" / "examples"
sys.path[1:1] = [str(HERE), str(ROOT)]  # this folder's modules, then the repo's packages before any installed kiq

import report  # noqa: E402


def seed_conditions() -> tuple[list[Any], list[float]]:
    images = [Image.open(EXAMPLES / name).convert("RGB") for name in ("cat.png", "starry.jpeg")]
    return ["a cat", *images], [0.3, 0.3, 0.4]


class Diffusers:
    def __init__(self, args: argparse.Namespace, out: dict[str, Any]) -> None:
        import diffusers
        import models
        import torch
        import transformers

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        out["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "transformers": transformers.__version__, "python": sys.version.split()[0]}  # fmt: skip
        out["device"] = torch.cuda.get_device_name() if self.device == "cuda" else "cpu"
        out["dtype"] = str(dtype).removeprefix("torch.")
        if args.build == "none":
            from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

            self.prior = KandinskyV22PriorPipeline.from_pretrained(args.models / "prior", torch_dtype=dtype)
            self.decoder = KandinskyV22Pipeline.from_pretrained(args.models / "decoder", torch_dtype=dtype)
            self.prior.to(self.device)
            self.decoder.to(self.device)
        else:
            self.prior, self.decoder, out["models"] = models.build_and_save(
                args.build == "tiny", self.device, dtype, args.models
            )
        for pipe in (self.prior, self.decoder):
            pipe.set_progress_bar_config(disable=True)

    def generator(self, seed: int) -> Any:
        return self.torch.Generator(self.device).manual_seed(seed)

    def interpolate(self, conds: list[Any], weights: list[float], steps: int, seed: int) -> tuple[Any, Any]:
        out = self.prior.interpolate(conds, weights, num_inference_steps=steps, generator=self.generator(seed))
        return out.image_embeds, out.negative_image_embeds

    def decode(self, embeds: Any, negative: Any, size: int, steps: int, seed: int) -> Any:
        return self.decoder(image_embeds=embeds, negative_image_embeds=negative, height=size, width=size,
                            num_inference_steps=steps, generator=self.generator(seed)).images[0]  # fmt: skip

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def memory(self) -> dict[str, float]:
        if self.device != "cuda":
            return {}
        cuda = self.torch.cuda
        return {"torch_max_allocated": round(cuda.max_memory_allocated() / 2**30, 2),
                "torch_max_reserved": round(cuda.max_memory_reserved() / 2**30, 2)}  # fmt: skip


class Mindone:
    """The seed's call on the CPU worker's own loader (tiny models, dry run)."""

    def __init__(self, args: argparse.Namespace, out: dict[str, Any]) -> None:
        import mindspore as ms

        from worker import device
        from worker.pipelines import base
        from worker.pipelines.mindspore_mindone import MindonePipelines

        config = device.DeviceConfig("CPU", 0)
        base.configure(config)
        pipes = MindonePipelines.load(str(args.models / "prior"), str(args.models / "decoder"), config,
                                        fast_prior=False)  # fmt: skip
        self.prior, self.decoder = pipes.prior, pipes.decoder
        out["versions"] = {"mindspore": ms.__version__, "python": sys.version.split()[0]}
        out["device"], out["dtype"] = "cpu", "float32"

    def interpolate(self, conds: list[Any], weights: list[float], steps: int, seed: int) -> tuple[Any, Any]:
        import numpy as np

        return self.prior.interpolate(conds, weights, num_inference_steps=steps, generator=np.random.default_rng(seed))

    def decode(self, embeds: Any, negative: Any, size: int, steps: int, seed: int) -> Any:
        import numpy as np

        return self.decoder(image_embeds=embeds, negative_image_embeds=negative, height=size, width=size,
                            num_inference_steps=steps, generator=np.random.default_rng(seed))[0][0]  # fmt: skip

    def sync(self) -> None:
        pass

    def memory(self) -> dict[str, float]:
        return {}


def one_run(pipes: Any, args: argparse.Namespace) -> tuple[float, float]:
    conds, weights = seed_conditions()
    start = time.perf_counter()
    embeds, negative = pipes.interpolate(conds, weights, args.prior_steps, args.seed)
    pipes.sync()
    prior_done = time.perf_counter()
    pipes.decode(embeds, negative, args.size, args.decoder_steps, args.seed)
    pipes.sync()
    return prior_done - start, time.perf_counter() - prior_done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("diffusers", "mindone"), default="diffusers")
    parser.add_argument("--build", choices=("full", "tiny", "none"), default="full", help="diffusers only")
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--prior-steps", type=int, default=25)
    parser.add_argument("--decoder-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop timing new runs after this")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    start = time.monotonic()
    out: dict[str, Any] = {"status": "running", "framework": args.framework}
    pipes = (Diffusers if args.framework == "diffusers" else Mindone)(args, out)
    out["setup_s"] = round(time.monotonic() - start, 2)
    args.out.write_text(json.dumps(out))  # the models exist now, whatever happens to the timing
    warm = one_run(pipes, args)  # first call: kernels picked, allocator grown; kiq's workers warm up too
    out["warmup_s"] = round(sum(warm), 3)
    runs: list[tuple[float, float]] = []
    while len(runs) < args.reps:
        if runs and time.monotonic() - start + sum(runs[-1]) > args.budget_s:
            out["note"] = f"{len(runs)} of {args.reps} timed runs: budget of {args.budget_s:.0f} s"
            break
        runs.append(one_run(pipes, args))
    totals = [p + d for p, d in runs]
    out.update(status="ok", s_per_image=round(statistics.median(totals), 4), latency_s=report.latency_summary(totals),
               prior_s=round(statistics.median(p for p, _ in runs), 4),
               decoder_s=round(statistics.median(d for _, d in runs), 4),
               peak_gpu_memory_gib=pipes.memory(), wall_s=round(time.monotonic() - start, 2))  # fmt: skip
    args.out.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
