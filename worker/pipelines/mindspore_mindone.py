"""The mindone backend: Kandinsky 2.2 on MindSpore (Ascend fp16, CPU fp32 with kernel stand-ins).

mindone's pipelines take numpy generators themselves, so the job's draws need no help here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import mint

from kiq.settings import Settings
from worker.device import DeviceConfig
from worker.pipelines.base import DecoderParams, DecoderRow, LiveRows, PriorParams, StepCallback, loading
from worker.pipelines.fast_prior import Conditions, FastPrior, ReplayGenerator


class _NoRowsLeft(Exception):
    pass


def configure(config: DeviceConfig) -> None:
    """Bind MindSpore to the device (PyNative mode); call once, before any model is built."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device(config.target, config.runtime)
    if config.target == "CPU":
        from worker.pipelines import cpu_fallbacks

        cpu_fallbacks.apply()


def load(settings: Settings, device: DeviceConfig) -> MindonePipelines:
    return MindonePipelines.load(settings.prior_model, settings.decoder_model, device, settings.fast_prior,
                                 settings.embed_cache_mb)  # fmt: skip


class PriorOps:
    """The batched prior's tensor operations, in MindSpore."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def run(self, prompts: list[str], steps: int, guidance_scale: float, num_images: int,
            rows: list[ReplayGenerator], done: Callable[[int], None]) -> Any:  # fmt: skip
        def callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            done(i + 1)
            return kwargs

        return self.pipe(prompts, num_images_per_prompt=num_images, num_inference_steps=steps, generator=rows,
                         guidance_scale=guidance_scale, callback_on_step_end=callback)[0]  # fmt: skip

    def encode(self, pixel_values: np.ndarray) -> Any:
        return self.pipe.image_encoder(ms.tensor(pixel_values).to(dtype=self.pipe.image_encoder.dtype))[0]

    def weighted_sum(self, parts: list[Any]) -> Any:
        return mint.sum(mint.cat(parts), dim=0)

    def numpy(self, tensor: Any) -> np.ndarray:
        return tensor.float().asnumpy().astype(np.float64)


class MindonePipelines:
    def __init__(self, prior: Any, decoder: Any, fast_prior: bool = True, cache_mb: int = 0) -> None:
        self.prior, self.decoder = prior, decoder
        self.fast_prior = FastPrior(PriorOps(prior), cache_mb * 1024 * 1024) if fast_prior else None
        # A sweep needs each input's embedding, which mindone's `interpolate` never returns: with
        # KIQ_FAST_PRIOR=0 sweeps still use the batched prior (same draws, same result), without caches.
        self.sweep_prior = self.fast_prior or FastPrior(PriorOps(prior))

    @classmethod
    def load(
        cls, prior_model: str, decoder_model: str, device: DeviceConfig, fast_prior: bool = True, cache_mb: int = 0
    ) -> MindonePipelines:
        from mindone.diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline
        from transformers import CLIPImageProcessor

        dtype = ms.float16 if device.half_precision else ms.float32
        with loading("KIQ_PRIOR_MODEL", prior_model):
            # The prior pipeline does not save its image processor; the hub repo keeps it in a subfolder.
            processor = CLIPImageProcessor.from_pretrained(prior_model, subfolder="image_processor")
            prior = KandinskyV22PriorPipeline.from_pretrained(
                prior_model, image_processor=processor, mindspore_dtype=dtype
            )
        if not device.half_precision:
            # mindone 0.3-0.5: AttnProcessor2_0's non-flash path (fp32) mis-shapes the attention mask.
            prior.prior.set_default_attn_processor()
        with loading("KIQ_DECODER_MODEL", decoder_model):
            decoder = KandinskyV22Pipeline.from_pretrained(decoder_model, mindspore_dtype=dtype)
        for pipe in (prior, decoder):
            pipe.set_progress_bar_config(disable=True)
        return cls(prior, decoder, fast_prior, cache_mb)

    def caches(self) -> dict[str, Any]:
        if self.fast_prior is None:
            return {}
        return {"image": self.fast_prior.image_cache, "text": self.fast_prior.text_cache}

    def memory_bytes(self) -> float:
        try:
            return float(ms.runtime.memory_allocated())
        except Exception:  # noqa: BLE001 - not every target reports it (CPU does not)
            return float("nan")

    def interpolate(
        self,
        conditions: Sequence[Any],
        weights: Sequence[float],
        params: PriorParams,
        generator: Any,
        on_step: StepCallback | None = None,
    ) -> tuple[Any, Any]:
        """Texts and PIL images in, (image_embeds, negative_image_embeds) out: mindone's `interpolate`
        semantics and draws; the fast path (see fast_prior.py) also reports every prior step."""
        if self.fast_prior is not None:
            return self.fast_prior.interpolate(
                conditions, weights, steps=params.steps, guidance_scale=params.guidance_scale,
                negative_prompt=params.negative_prompt, num_images=params.num_images, generator=generator,
                on_step=on_step,
            )  # fmt: skip
        return self.prior.interpolate(
            list(conditions),
            list(weights),
            num_images_per_prompt=params.num_images,
            num_inference_steps=params.steps,
            generator=generator,
            negative_prompt=params.negative_prompt,
            guidance_scale=params.guidance_scale,
        )

    def conditions(self, conditions: Sequence[Any], params: PriorParams, generator: Any,
                   on_step: StepCallback | None = None) -> Conditions:  # fmt: skip
        return self.sweep_prior.conditions(
            conditions, steps=params.steps, guidance_scale=params.guidance_scale,
            negative_prompt=params.negative_prompt, num_images=params.num_images, generator=generator,
            on_step=on_step,
        )  # fmt: skip

    def mix(self, conditions: Conditions, weights: Sequence[float]) -> Any:
        return self.sweep_prior.mix(conditions, weights)

    def numpy(self, tensor: Any) -> np.ndarray:
        return self.sweep_prior.ops.numpy(tensor)

    def decode(
        self, embeds: Any, negative_embeds: Any, params: DecoderParams, generator: Any, on_step: StepCallback
    ) -> list[Any]:
        def callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            on_step(i + 1, params.steps)
            return kwargs

        return self._decoder_call(embeds, negative_embeds, params, generator, callback, ["latents"])

    def _decoder_call(self, embeds: Any, negative_embeds: Any, params: DecoderParams, generator: Any,
                      callback: Callable[..., dict[str, Any]], tensor_inputs: list[str]) -> list[Any]:  # fmt: skip
        return self.decoder(
            image_embeds=embeds,
            negative_image_embeds=negative_embeds,
            height=params.height,
            width=params.width,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            generator=generator,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=tensor_inputs,
        )[0]

    def decode_batch(self, rows: Sequence[DecoderRow], params: DecoderParams, on_step: LiveRows) -> dict[int, Any]:
        """One decoder call for several jobs' rows (one image each), each drawing from its own generator.

        After each step `on_step` names the rows still wanted; the others (cancelled, timed out) leave the batch:
        their latents, embeddings and generators are dropped, so later steps compute only live rows, and the call
        stops once none is left. Returns {row: image} for the rows that finished."""
        generators = [row.generator for row in rows]  # mutated in place: the pipeline and scheduler hold this list
        current = list(range(len(rows)))  # the original row of each batch row still computed

        def callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            wanted = set(on_step(i + 1, params.steps))
            keep = [k for k, row in enumerate(current) if row in wanted]
            if not keep:
                raise _NoRowsLeft
            if len(keep) < len(current):
                kwargs = {"latents": _select(kwargs["latents"], keep),
                          "image_embeds": _select_cfg(kwargs["image_embeds"], keep, len(current))}  # fmt: skip
                generators[:] = [generators[k] for k in keep]
                current[:] = [current[k] for k in keep]
            return kwargs

        embeds = mint.cat([row.embeds for row in rows])
        negatives = mint.cat([row.negative_embeds for row in rows])
        try:
            images = self._decoder_call(embeds, negatives, params, generators, callback, ["latents", "image_embeds"])
        except _NoRowsLeft:
            return {}
        return dict(zip(current, images, strict=True))


def _select(tensor: Any, rows: Sequence[int]) -> Any:
    return mint.cat([tensor[r : r + 1] for r in rows])


def _select_cfg(embeds: Any, rows: Sequence[int], batch: int) -> Any:
    """Inside the loop the decoder holds [negatives; positives] when guidance is on: keep both halves' rows."""
    if embeds.shape[0] == 2 * batch:
        return _select(embeds, [*rows, *(batch + r for r in rows)])
    return _select(embeds, rows)
