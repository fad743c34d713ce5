"""The diffusers backend: Kandinsky 2.2 on torch (CUDA fp16 with SDPA attention, CPU fp32).

Same job, same image as the mindone backend: every random number comes from the job's numpy generator in
mindone's order (torch_noise.py), and the denoising loops are diffusers' own, step for step, with two changes for
speed: the scheduler's timesteps stay on the host (its per-step arithmetic then never waits on the device) while
the model gets them from one copy on the device, and the noise arrives pre-drawn. Nothing in a loop syncs with the
device; the images come back in one copy at the end. The prior is always the batched one (fast_prior.py): diffusers'
own `interpolate` draws with torch generators, which cannot give the job's draws.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kiq.errors import SettingsError
from kiq.settings import Settings
from worker.device import DeviceConfig
from worker.pipelines.base import DecoderParams, DecoderRow, LiveRows, PriorParams, StepCallback, loading
from worker.pipelines.fast_prior import Conditions, FastPrior, ReplayGenerator
from worker.pipelines.torch_noise import HostNoise, route_scheduler_noise, select_rows

WARM_SIZE = 768  # the job contract's default height and width: compiled at start
AfterStep = Callable[[int], Sequence[int] | None]  # step done -> the batch positions to keep (None: all)


class _NoRowsLeft(Exception):
    pass


def configure(config: DeviceConfig) -> None:
    if config.target == "GPU":
        if not torch.cuda.is_available():
            raise SettingsError(
                f"KIQ_DEVICE_TARGET=GPU, but torch {torch.__version__} finds no CUDA device "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): run it on a host with "
                "an NVIDIA GPU and a CUDA build of torch, or set KIQ_DEVICE_TARGET=CPU"
            )
        if config.runtime >= torch.cuda.device_count():
            raise SettingsError(f"KIQ_DEVICE_ID={config.device_id}: torch sees {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(config.runtime)
    elif hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # a supervised CPU "device" is one pinned core


def torch_device(config: DeviceConfig) -> torch.device:
    return torch.device("cuda", config.runtime) if config.target == "GPU" else torch.device("cpu")


def load(settings: Settings, device: DeviceConfig) -> DiffusersPipelines:
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline
    from transformers import CLIPImageProcessor

    target, dtype = torch_device(device), torch.float16 if device.half_precision else torch.float32
    with loading("KIQ_PRIOR_MODEL", settings.prior_model):
        # The prior pipeline does not save its image processor; the hub repo keeps it in a subfolder.
        processor = CLIPImageProcessor.from_pretrained(settings.prior_model, subfolder="image_processor")
        prior = KandinskyV22PriorPipeline.from_pretrained(
            settings.prior_model, image_processor=processor, torch_dtype=dtype
        ).to(target)
    with loading("KIQ_DECODER_MODEL", settings.decoder_model):
        decoder = KandinskyV22Pipeline.from_pretrained(settings.decoder_model, torch_dtype=dtype).to(target)
    for pipe in (prior, decoder):
        pipe.set_progress_bar_config(disable=True)
        route_scheduler_noise(pipe.scheduler)
    pipelines = DiffusersPipelines(prior, decoder, target, dtype, settings.embed_cache_mb)
    if settings.torch_compile:
        pipelines.compile_unet(warm_batches(settings.decoder_batch))
    return pipelines


def warm_batches(decoder_batch: int) -> list[int]:
    """Job batch sizes compiled at start: 1, 2, 4, 8 … up to KIQ_DECODER_BATCH."""
    return [1 << k for k in range(max(1, decoder_batch).bit_length())]


def _pad(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows up to `rows`: each row of the UNet is computed alone, so the padding never touches the others."""
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))])


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds n rows (n itself past the largest)."""
    return next((b for b in buckets if b >= n), n)


class PriorOps:
    """The batched prior's tensor operations, in torch; `run` is diffusers' prior loop with the job's draws."""

    def __init__(self, pipe: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.pipe, self.device, self.dtype = pipe, device, dtype

    def run(self, prompts: list[str], steps: int, guidance_scale: float, num_images: int,
            rows: list[ReplayGenerator], done: Callable[[int], None]) -> torch.Tensor:  # fmt: skip
        pipe, cfg = self.pipe, guidance_scale > 1
        embeds, hidden, mask = pipe._encode_prompt(prompts, self.device, num_images, cfg, None)
        scheduler = pipe.scheduler
        scheduler.set_timesteps(steps)  # on the host (see the module's docstring)
        timesteps = scheduler.timesteps
        on_device = timesteps.to(self.device)
        noise = HostNoise(rows, len(rows), (pipe.prior.config.embedding_dim,), 1 + int((timesteps > 0).sum()),
                          self.device, embeds.dtype)  # fmt: skip
        latents = noise.next(noise.shape) * scheduler.init_noise_sigma
        for i, t in enumerate(timesteps):
            model_in = torch.cat([latents] * 2) if cfg else latents
            predicted = pipe.prior(model_in, timestep=on_device[i], proj_embedding=embeds, encoder_hidden_states=hidden,
                                   attention_mask=mask).predicted_image_embedding  # fmt: skip
            if cfg:
                uncond, text = predicted.chunk(2)
                predicted = uncond + guidance_scale * (text - uncond)
            prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
            latents = scheduler.step(predicted, timestep=t, sample=latents, generator=noise,
                                     prev_timestep=prev).prev_sample  # fmt: skip
            done(i + 1)
        return pipe.prior.post_process_latents(latents)

    def encode(self, pixel_values: np.ndarray) -> torch.Tensor:
        encoder = self.pipe.image_encoder
        return encoder(torch.from_numpy(pixel_values).to(self.device, encoder.dtype)).image_embeds

    def weighted_sum(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts).sum(dim=0)

    def numpy(self, tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().double().cpu().numpy()


class DiffusersPipelines:
    def __init__(self, prior: Any, decoder: Any, device: torch.device, dtype: torch.dtype, cache_mb: int = 0) -> None:
        self.prior, self.decoder, self.device, self.dtype = prior, decoder, device, dtype
        self.fast_prior = FastPrior(PriorOps(prior, device, dtype), cache_mb * 1024 * 1024)
        self.unet: Callable[..., Any] = decoder.unet  # what each step calls: the compiled UNet when compiled
        self.buckets: tuple[int, ...] = ()  # UNet batch sizes a batch is padded up to (only when compiled)

    def caches(self) -> dict[str, Any]:
        return {"image": self.fast_prior.image_cache, "text": self.fast_prior.text_cache}

    def probe(self) -> None:
        """For the readiness probe: returns once the GPU has done its queued work (a wedged GPU never does)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def memory_bytes(self) -> float:
        return float(torch.cuda.memory_allocated(self.device)) if self.device.type == "cuda" else float("nan")

    @torch.inference_mode()
    def interpolate(self, conditions: Sequence[Any], weights: Sequence[float], params: PriorParams, generator: Any,
                    on_step: StepCallback | None = None) -> tuple[Any, Any]:  # fmt: skip
        return self.fast_prior.interpolate(
            conditions, weights, steps=params.steps, guidance_scale=params.guidance_scale,
            negative_prompt=params.negative_prompt, num_images=params.num_images, generator=generator,
            on_step=on_step,
        )  # fmt: skip

    @torch.inference_mode()
    def conditions(self, conditions: Sequence[Any], params: PriorParams, generator: Any,
                   on_step: StepCallback | None = None) -> Conditions:  # fmt: skip
        return self.fast_prior.conditions(
            conditions, steps=params.steps, guidance_scale=params.guidance_scale,
            negative_prompt=params.negative_prompt, num_images=params.num_images, generator=generator,
            on_step=on_step,
        )  # fmt: skip

    @torch.inference_mode()
    def mix(self, conditions: Conditions, weights: Sequence[float]) -> torch.Tensor:
        return self.fast_prior.mix(conditions, weights)

    def numpy(self, tensor: torch.Tensor) -> np.ndarray:
        return self.fast_prior.ops.numpy(tensor)

    @torch.inference_mode()
    def decode(self, embeds: Any, negative_embeds: Any, params: DecoderParams, generator: Any,
               on_step: StepCallback) -> list[Any]:  # fmt: skip
        def after_step(step: int) -> None:
            on_step(step, params.steps)

        return self._images(self._denoise(embeds, negative_embeds, params, generator, after_step))

    @torch.inference_mode()
    def decode_batch(self, rows: Sequence[DecoderRow], params: DecoderParams, on_step: LiveRows) -> dict[int, Any]:
        """One decoder call for several jobs' rows (one image each), each drawing from its own generator; rows
        leave the batch when `on_step` stops naming them, and the call stops once none is left."""
        current = list(range(len(rows)))  # the original row of each batch row still computed

        def after_step(step: int) -> list[int]:
            wanted = set(on_step(step, params.steps))
            keep = [k for k, row in enumerate(current) if row in wanted]
            current[:] = [current[k] for k in keep]
            return keep

        embeds = torch.cat([row.embeds for row in rows])
        negative = torch.cat([row.negative_embeds for row in rows])
        try:
            latents = self._denoise(embeds, negative, params, [row.generator for row in rows], after_step)
        except _NoRowsLeft:
            return {}
        return dict(zip(current, self._images(latents), strict=True))

    def _denoise(self, embeds: torch.Tensor, negative: torch.Tensor, params: DecoderParams, generator: Any,
                 after_step: AfterStep) -> torch.Tensor:  # fmt: skip
        """KandinskyV22Pipeline's loop: latents, then per step the guided UNet and the scheduler's step."""
        from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2 import downscale_height_and_width

        scheduler, unet = self.decoder.scheduler, self.decoder.unet
        scheduler.set_timesteps(params.steps)  # on the host (see the module's docstring)
        timesteps = scheduler.timesteps
        on_device = timesteps.to(self.device)
        height, width = downscale_height_and_width(params.height, params.width, self.decoder.movq_scale_factor)
        noise = HostNoise(generator, embeds.shape[0], (unet.config.in_channels, height, width),
                          1 + int((timesteps > 0).sum()), self.device, self.dtype)  # fmt: skip
        latents = noise.next(noise.shape) * scheduler.init_noise_sigma
        embeds, negative = embeds.to(self.device, self.dtype), negative.to(self.device, self.dtype)
        for i, t in enumerate(timesteps):
            predicted = self._guided(latents, on_device[i], embeds, negative, params.guidance_scale)
            latents = scheduler.step(predicted, t, latents, generator=noise)[0]
            keep = after_step(i + 1)
            if keep is not None and len(keep) < latents.shape[0]:
                if not keep:
                    raise _NoRowsLeft
                latents, embeds, negative = (select_rows(x, keep) for x in (latents, embeds, negative))
                noise.keep(keep)
        return latents

    def _guided(self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, negative: torch.Tensor,
                scale: float) -> torch.Tensor:  # fmt: skip
        channels, cfg = latents.shape[1], scale > 1
        sample = torch.cat([latents] * 2) if cfg else latents
        predicted = self._unet(sample, t, torch.cat([negative, embeds]) if cfg else embeds)
        if cfg:
            noise, variance = predicted.split(channels, dim=1)
            uncond, text = noise.chunk(2)
            _, variance_text = variance.chunk(2)
            predicted = torch.cat([uncond + scale * (text - uncond), variance_text], dim=1)
        if self.decoder.scheduler.config.get("variance_type") not in ("learned", "learned_range"):
            predicted = predicted[:, :channels]
        return predicted

    def _unet(self, sample: torch.Tensor, t: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """One UNet call; with a compiled UNet the batch is padded up to its bucket, so shapes stay few."""
        n = sample.shape[0]
        size = bucket(n, self.buckets)
        if size > n:
            sample, image_embeds = (_pad(x, size) for x in (sample, image_embeds))
        out = self.unet(sample=sample, timestep=t, encoder_hidden_states=None,
                        added_cond_kwargs={"image_embeds": image_embeds}, return_dict=False)[0]  # fmt: skip
        return out[:n]

    def _images(self, latents: torch.Tensor) -> list[Any]:
        image = self.decoder.movq.decode(latents, force_not_quantize=True)["sample"]
        image = (image * 0.5 + 0.5).clamp(0, 1)
        return self.decoder.numpy_to_pil(image.cpu().permute(0, 2, 3, 1).float().numpy())

    def compile_unet(self, batches: Sequence[int], size: int = WARM_SIZE, backend: str = "inductor") -> None:
        """torch.compile the UNet with static shapes, and compile now, at start, for each job batch size in
        `batches` at size × size with guidance (batches padded up to a bucket); other shapes compile on first use."""
        import torch._dynamo

        # Each (bucket, size) is one graph: room for the buckets at several sizes before dynamo gives up on a shape.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.unet = torch.compile(self.decoder.unet, dynamic=False, backend=backend)
        most = max(16, 2 * max(batches))  # 8 images of one job with guidance: 16 rows
        self.buckets = tuple(1 << k for k in range(most.bit_length()) if 1 << k <= most)
        self.warm_up(batches, size)

    @torch.inference_mode()
    def warm_up(self, batches: Sequence[int], size: int = WARM_SIZE) -> None:
        from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2 import downscale_height_and_width

        unet = self.decoder.unet
        height, width = downscale_height_and_width(size, size, self.decoder.movq_scale_factor)
        t = torch.tensor(999, device=self.device)
        for jobs in batches:
            rows = 2 * jobs  # with guidance: negatives and positives
            sample = torch.zeros((rows, unet.config.in_channels, height, width), device=self.device, dtype=self.dtype)
            embeds = torch.zeros((rows, unet.config.encoder_hid_dim), device=self.device, dtype=self.dtype)
            self._unet(sample, t, embeds)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
