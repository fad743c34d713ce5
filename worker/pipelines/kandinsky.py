"""mindone's Kandinsky 2.2 prior + decoder, loaded once per process from a hub id or a local directory."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kiq.errors import SettingsError
from worker.device import DeviceConfig
from worker.pipelines.fast_prior import FastPrior

StepCallback = Callable[[int, int], None]
LiveRows = Callable[[int, int], Sequence[int]]  # (step, total) -> the batch rows still wanted


@dataclass(frozen=True)
class DecoderRow:
    """One job's share of a decoder batch: its embeddings and its own generator."""

    embeds: Any
    negative_embeds: Any
    generator: Any


class _NoRowsLeft(Exception):
    pass


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


class KandinskyPipelines:
    def __init__(self, prior: Any, decoder: Any, fast_prior: bool = True, cache_mb: int = 0) -> None:
        self.prior, self.decoder = prior, decoder
        self.fast_prior = FastPrior(prior, cache_mb * 1024 * 1024) if fast_prior else None

    @classmethod
    def load(
        cls, prior_model: str, decoder_model: str, device: DeviceConfig, fast_prior: bool = True, cache_mb: int = 0
    ) -> KandinskyPipelines:
        import mindspore as ms
        from mindone.diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline
        from transformers import CLIPImageProcessor

        dtype = ms.float16 if device.half_precision else ms.float32
        with _loading("KIQ_PRIOR_MODEL", prior_model):
            # The prior pipeline does not save its image processor; the hub repo keeps it in a subfolder.
            processor = CLIPImageProcessor.from_pretrained(prior_model, subfolder="image_processor")
            prior = KandinskyV22PriorPipeline.from_pretrained(
                prior_model, image_processor=processor, mindspore_dtype=dtype
            )
        if not device.half_precision:
            # mindone 0.3-0.5: AttnProcessor2_0's non-flash path (fp32) mis-shapes the attention mask.
            prior.prior.set_default_attn_processor()
        with _loading("KIQ_DECODER_MODEL", decoder_model):
            decoder = KandinskyV22Pipeline.from_pretrained(decoder_model, mindspore_dtype=dtype)
        for pipe in (prior, decoder):
            pipe.set_progress_bar_config(disable=True)
        return cls(prior, decoder, fast_prior, cache_mb)

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
        from mindspore import mint

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
    from mindspore import mint

    return mint.cat([tensor[r : r + 1] for r in rows])


def _select_cfg(embeds: Any, rows: Sequence[int], batch: int) -> Any:
    """Inside the loop the decoder holds [negatives; positives] when guidance is on: keep both halves' rows."""
    if embeds.shape[0] == 2 * batch:
        return _select(embeds, [*rows, *(batch + r for r in rows)])
    return _select(embeds, rows)


@contextmanager
def _loading(variable: str, model: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        raise SettingsError(f"{variable}={model!r} could not be loaded: {type(exc).__name__}: {exc}") from exc
