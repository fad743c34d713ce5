"""The seam between the runner and a model backend: one job contract, one backend module per framework.

`mindspore_mindone` runs mindone on MindSpore (Ascend, CPU); `torch_diffusers` runs HuggingFace diffusers on
torch (CUDA, CPU). Both load the same model directories and draw every random number from the job's numpy
generator in the same order, so a job gives the same image on either. This module imports neither framework.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from kiq.errors import SettingsError
from kiq.settings import Settings
from worker.device import DeviceConfig

StepCallback = Callable[[int, int], None]
LiveRows = Callable[[int, int], Sequence[int]]  # (step, total) -> the batch rows still wanted

MODULES = {"mindone": "worker.pipelines.mindspore_mindone", "diffusers": "worker.pipelines.torch_diffusers"}
EXTRAS = {"mindone": "worker", "diffusers": "cuda"}


@dataclass(frozen=True)
class PriorParams:
    steps: int
    guidance_scale: float
    negative_prompt: str
    num_images: int


@dataclass(frozen=True)
class DecoderParams:
    height: int
    width: int
    steps: int
    guidance_scale: float


@dataclass(frozen=True)
class DecoderRow:
    """One job's share of a decoder batch: its embeddings and its own generator."""

    embeds: Any
    negative_embeds: Any
    generator: Any


class Pipelines(Protocol):
    """What the runner needs of a backend. Embeddings are the backend's own tensors, opaque to the runner."""

    def interpolate(self, conditions: Sequence[Any], weights: Sequence[float], params: PriorParams, generator: Any,
                    on_step: StepCallback | None = None) -> tuple[Any, Any]:  # fmt: skip
        """Texts and PIL images in, (image_embeds, negative_image_embeds) out, with mindone's draws."""
        ...

    def decode(self, embeds: Any, negative_embeds: Any, params: DecoderParams, generator: Any,
               on_step: StepCallback) -> list[Any]:  # fmt: skip
        """PIL images, one per embedding row."""
        ...

    def decode_batch(self, rows: Sequence[DecoderRow], params: DecoderParams, on_step: LiveRows) -> dict[int, Any]:
        """One decoder call for several jobs; rows leave when `on_step` stops naming them. {row: PIL image}."""
        ...

    def conditions(self, conditions: Sequence[Any], params: PriorParams, generator: Any,
                   on_step: StepCallback | None = None) -> Any:  # fmt: skip
        """Each input's embedding and the negative, once (a fast_prior.Conditions): the prior's draws and
        results are `interpolate`'s, so `mix(…, weights)` of them is what `interpolate` with those weights gives."""
        ...

    def mix(self, conditions: Any, weights: Sequence[float]) -> Any:
        """The weighted sum of the inputs' embeddings, (num_images, dim): no model runs."""
        ...

    def numpy(self, tensor: Any) -> Any:
        """A tensor's values on the host (float64 numpy), for the sweep's slerp coefficients."""
        ...

    def caches(self) -> dict[str, Any]:
        """The embedding caches by name (hits and misses go to the metrics); empty without the batched prior."""
        ...

    def memory_bytes(self) -> float:
        """Device memory in use, NaN where the framework does not say."""
        ...


def backend_module(backend: str) -> Any:
    """The module of one backend (imports its framework)."""
    try:
        return importlib.import_module(MODULES[backend])
    except ImportError as exc:
        raise SettingsError(
            f"KIQ_BACKEND={backend} (from KIQ_BACKEND/KIQ_DEVICE_TARGET) needs the {EXTRAS[backend]!r} extra: "
            f"pip install 'kiq[{EXTRAS[backend]}]' ({exc})"
        ) from exc


def configure(config: DeviceConfig) -> None:
    """Bind the backend's framework to the device; call once, before any model is built."""
    backend_module(config.backend).configure(config)


def load(settings: Settings, device: DeviceConfig) -> Pipelines:
    """Bind the backend's framework to the device, then load both pipelines from KIQ_PRIOR_MODEL/KIQ_DECODER_MODEL."""
    module = backend_module(device.backend)
    module.configure(device)
    pipelines: Pipelines = module.load(settings, device)
    return pipelines


@contextmanager
def loading(variable: str, model: str) -> Iterator[None]:
    """A model that does not load is a settings error naming the variable."""
    try:
        yield
    except Exception as exc:
        raise SettingsError(f"{variable}={model!r} could not be loaded: {type(exc).__name__}: {exc}") from exc
