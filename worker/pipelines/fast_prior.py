"""`interpolate` without the wasted prior work, with exactly the seed's random draws.

mindone's `KandinskyV22PriorPipeline.interpolate` runs the prior once per text and once more for the
negative prompt — whose result it discards when the negative prompt is "" (it returns the zero-image
embedding instead) — and encodes images one at a time. Here: one batched prior run for all texts (plus the
negative only when it is not ""), one encoder batch for all images, and the zero-image embedding computed
once per process.

The output stays the seed's: `interpolate` draws from one shared numpy generator, in order, per text: the
latents, then one variance-noise draw per UnCLIP step with t > 0. We replay that sequence of draws up front
(no model needed) and hand each batch row a `ReplayGenerator` that serves exactly its own share.

Framework-neutral: the few tensor operations go through the backend's `PriorOps`.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from worker.cache import BoundedLRU

StepCallback = Callable[[int, int], None]


class ReplayGenerator:
    """Quacks like `numpy.random.Generator` for mindone's `randn`: serves pre-drawn blocks in order."""

    def __init__(self, blocks: list[np.ndarray]) -> None:
        self._blocks = deque(blocks)

    def standard_normal(self, size: Any) -> np.ndarray:
        block = self._blocks.popleft()
        if block.shape != tuple(size):
            raise RuntimeError(f"replayed draw has shape {block.shape}, the pipeline asked for {tuple(size)}")
        return block


def _digest(rows: list[ReplayGenerator]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        for block in row._blocks:
            digest.update(block.tobytes())
    return digest.hexdigest()


def replay_rows(generator: np.random.Generator, prompts: int, per_prompt: int, dim: int,
                noisy_steps: int) -> list[ReplayGenerator]:  # fmt: skip
    """What `interpolate`'s sequential calls would draw, split into one generator per batch row."""
    rows = []
    for _ in range(prompts):
        draws = [generator.standard_normal((per_prompt, dim)) for _ in range(1 + noisy_steps)]
        rows += [ReplayGenerator([d[j : j + 1] for d in draws]) for j in range(per_prompt)]
    return rows


class PriorOps(Protocol):
    """What the batched prior needs of a backend; `pipe` is its prior pipeline (scheduler, config, processor)."""

    pipe: Any

    def run(self, prompts: list[str], steps: int, guidance_scale: float, num_images: int,
            rows: list[ReplayGenerator], done: Callable[[int], None]) -> Any:  # fmt: skip
        """The prior pipeline on all prompts, row r drawing from rows[r], `done(step)` after each step:
        (prompts × num_images, dim)."""
        ...

    def encode(self, pixel_values: np.ndarray) -> Any:
        """The CLIP image encoder on a preprocessed batch: (n, dim)."""
        ...

    def weighted_sum(self, parts: list[Any]) -> Any:
        """Sum of (1, num_images, dim) parts: (num_images, dim)."""
        ...

    def numpy(self, tensor: Any) -> np.ndarray:
        """A tensor's values on the host, as float64."""
        ...


@dataclass(frozen=True)
class Conditions:
    """Each input's embedding, (1, num_images, dim) in input order, and the negative embedding: what every
    mix of the job's inputs is made of (`interpolate` is one mix; a sweep makes one per frame)."""

    parts: list[Any]
    negative: Any


class FastPrior:
    def __init__(self, ops: PriorOps, cache_bytes: int = 0) -> None:
        self.ops = ops
        self.pipe = ops.pipe
        self._zero: Any = None
        self.counts = {"prior_runs": 0, "encoder_batches": 0}
        # Both keyed by everything the output depends on, the random draws included: a hit is the same computation.
        self.image_cache = BoundedLRU(cache_bytes // 2)
        self.text_cache = BoundedLRU(cache_bytes // 2)

    def interpolate(self, conditions: Sequence[Any], weights: Sequence[float], *, steps: int, guidance_scale: float,
                    negative_prompt: str, num_images: int, generator: np.random.Generator,
                    on_step: StepCallback | None = None) -> tuple[Any, Any]:  # fmt: skip
        embedded = self.conditions(conditions, steps=steps, guidance_scale=guidance_scale,
                                   negative_prompt=negative_prompt, num_images=num_images, generator=generator,
                                   on_step=on_step)  # fmt: skip
        return self.mix(embedded, weights), embedded.negative

    def conditions(self, conditions: Sequence[Any], *, steps: int, guidance_scale: float, negative_prompt: str,
                   num_images: int, generator: np.random.Generator,
                   on_step: StepCallback | None = None) -> Conditions:  # fmt: skip
        """One batched prior run for the texts (and a non-empty negative), one encoder batch for the images."""
        texts = [c for c in conditions if isinstance(c, str)]
        prompts = texts + ([negative_prompt] if negative_prompt != "" else [])
        text_embeds = self._prior(prompts, steps, guidance_scale, num_images, generator, on_step)
        image_embeds = iter(self._encode([c for c in conditions if not isinstance(c, str)], num_images))
        by_text = iter(text_embeds[: len(texts)])
        parts = [next(by_text) if isinstance(c, str) else next(image_embeds) for c in conditions]
        negative = text_embeds[-1][0] if negative_prompt != "" else self.zero_embed(num_images)
        return Conditions(parts, negative)

    def mix(self, conditions: Conditions, weights: Sequence[float]) -> Any:
        """The weighted sum `interpolate` returns: (num_images, dim). Cheap: no model runs."""
        return self.ops.weighted_sum([part * w for part, w in zip(conditions.parts, weights, strict=True)])

    def _prior(self, prompts: list[str], steps: int, guidance_scale: float, num_images: int,
               generator: np.random.Generator, on_step: StepCallback | None) -> list[Any]:  # fmt: skip
        if not prompts:
            return []
        self.pipe.scheduler.set_timesteps(steps)
        noisy = int((self.pipe.scheduler.timesteps > 0).sum())
        rows = replay_rows(generator, len(prompts), num_images, self.pipe.prior.config.embedding_dim, noisy)
        keys = [(p, steps, guidance_scale, num_images, _digest(rows[i * num_images : (i + 1) * num_images]))
                for i, p in enumerate(prompts)]  # fmt: skip
        found = [self.text_cache.get(key) for key in keys]
        missing = [i for i, value in enumerate(found) if value is None]
        if missing:
            missing_rows = [r for i in missing for r in rows[i * num_images : (i + 1) * num_images]]
            computed = self._run(
                [prompts[i] for i in missing], steps, guidance_scale, num_images, missing_rows, on_step
            )
            for i, value in zip(missing, computed, strict=True):
                found[i] = value
                self.text_cache.put(keys[i], value, value.nbytes)
        return found

    def _run(self, prompts: list[str], steps: int, guidance_scale: float, num_images: int,
             rows: list[ReplayGenerator], on_step: StepCallback | None) -> list[Any]:  # fmt: skip
        def done(step: int) -> None:
            if on_step is not None:
                on_step(step, steps)

        self.counts["prior_runs"] += 1
        embeds = self.ops.run(prompts, steps, guidance_scale, num_images, rows, done)
        return [embeds[i * num_images : (i + 1) * num_images].unsqueeze(0) for i in range(len(prompts))]

    def _encode(self, images: list[Any], num_images: int) -> list[Any]:
        keys = [hashlib.sha256(f"{im.mode}{im.size}".encode() + im.tobytes()).hexdigest() for im in images]
        found = [self.image_cache.get(key) for key in keys]
        missing = [i for i, value in enumerate(found) if value is None]
        if missing:
            batch = self.pipe.image_processor([images[i] for i in missing], return_tensors="np").pixel_values
            self.counts["encoder_batches"] += 1
            embeds = self.ops.encode(batch)
            for row, i in enumerate(missing):
                found[i] = embeds[row : row + 1]
                self.image_cache.put(keys[i], found[i], found[i].nbytes)
        return [value.tile((num_images, 1)).unsqueeze(0) for value in found]

    def zero_embed(self, num_images: int) -> Any:
        if self._zero is None:  # the image encoder on an all-zero image: the same for every job
            self._zero = self.pipe.get_zero_embed(1)
        return self._zero.tile((num_images, 1))
