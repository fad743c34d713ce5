"""The job's random draws for the torch backend: made on the host from its numpy generator(s), exactly as mindone
makes them, and served to diffusers on the device.

mindone draws with `generator.standard_normal(shape)` (float64, then cast): one generator for the whole batch, or
one per row (each drawing its own `(1, …)` block). Its pipelines draw the latents first, then the scheduler draws
one noise block per step with t > 0. torch generators cannot replay that, and `latents=` alone is not enough, so
the schedulers' `randn_tensor` is routed to a `HostNoise` passed as their `generator`.

Draws are made ahead in chunks and copied to the device in one transfer per chunk (one per job at usual sizes),
so the denoising loop never waits on the host.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

CHUNK_BYTES = 64 * 1024 * 1024  # device bytes drawn ahead at most: bounds host and device memory at large sizes
_ROUTED: set[str] = set()


class HostNoise:
    def __init__(self, generator: Any, rows: int, row_shape: Sequence[int], draws: int, device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        self.generator = generator  # one numpy generator for all rows, or a list of one per row
        self.rows, self.row_shape = rows, tuple(row_shape)
        self.expected = draws  # latents + noisy steps: never drawn past, so a shared generator stays in step
        self.device, self.dtype = device, dtype
        self._ready: deque[torch.Tensor] = deque()

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.row_shape)

    def next(self, shape: Sequence[int]) -> torch.Tensor:
        """The next draw, as the pipeline or scheduler asks for it."""
        if tuple(shape) != self.shape:
            raise RuntimeError(f"noise of shape {tuple(shape)} asked for, {self.shape} drawn")
        if not self._ready:
            self._refill()
        return self._ready.popleft()

    def keep(self, positions: Sequence[int]) -> None:
        """Rows leave the batch: their generators and drawn-ahead blocks go (per-row generators only)."""
        if not isinstance(self.generator, list):
            raise RuntimeError("rows can only leave a batch drawn with one generator per row")
        self.generator[:] = [self.generator[k] for k in positions]
        self._ready = deque(select_rows(block, positions) for block in self._ready)
        self.rows = len(positions)

    def _refill(self) -> None:
        per_draw = math.prod(self.shape) * torch.finfo(self.dtype).bits // 8
        count = max(1, min(self.expected, CHUNK_BYTES // max(per_draw, 1)))
        # Cast each float64 draw on the host as it is made: mindone's rounding, and no float64 stack in memory.
        host = torch.stack([torch.from_numpy(self._draw()).to(self.dtype) for _ in range(count)])
        if self.device.type == "cuda":
            host = host.pin_memory()
        self._ready.extend(host.to(self.device, non_blocking=True).unbind(0))
        self.expected = max(0, self.expected - count)

    def _draw(self) -> np.ndarray:
        if isinstance(self.generator, list):
            return np.concatenate([g.standard_normal((1, *self.row_shape)) for g in self.generator])
        return self.generator.standard_normal(self.shape)


def select_rows(tensor: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    # Slices and one cat: no index tensor to copy to the device.
    return torch.cat([tensor[k : k + 1] for k in positions])


def route_scheduler_noise(scheduler: Any) -> None:
    """Make the scheduler's module serve a HostNoise passed as `generator`; other generators draw as before."""
    module = sys.modules[type(scheduler).__module__]
    original = getattr(module, "randn_tensor", None)
    if original is None or module.__name__ in _ROUTED:
        return  # a scheduler that draws nothing, or already routed

    def randn_tensor(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None,
                     layout: Any = None) -> torch.Tensor:  # fmt: skip
        if isinstance(generator, HostNoise):
            return generator.next(shape)
        return original(shape, generator=generator, device=device, dtype=dtype, layout=layout)

    module.randn_tensor = randn_tensor
    _ROUTED.add(module.__name__)
