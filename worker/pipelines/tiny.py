"""Tiny random-weight Kandinsky 2.2 pipelines in the `from_pretrained` layout.

Written to disk so the worker loads them exactly like the real hub weights, with either backend: mindone
builds and saves them, then the weight files are put in the hub's torch layout (see `_torch_layout`). Every shape
is the smallest that exercises the real code path (prior, CLIP text and vision towers, UNet with image
embeddings, MoVQ).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

_HIDDEN = 32
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
# mindone.transformers saves MindSpore's parameter names for nn.Embedding and nn.LayerNorm; the hub uses torch's.
_TORCH_NAMES = {".embedding_table": ".weight", ".gamma": ".weight", ".beta": ".bias"}


def make_tiny_models(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write `out_dir/prior` and `out_dir/decoder`; the same seed gives the same weights."""
    from mindone.diffusers.utils import logging

    from worker import device
    from worker.pipelines import base

    logging.set_verbosity_error()  # save_pretrained logs the whole image processor it cannot save
    base.configure(device.DeviceConfig(target="CPU", device_id=0))
    out = Path(out_dir)
    prior_dir, decoder_dir = out / "prior", out / "decoder"
    _seed_everything(seed)
    with tempfile.TemporaryDirectory() as scratch:
        build_prior(Path(scratch)).save_pretrained(prior_dir)
    _save_image_processor(prior_dir)
    _seed_everything(seed + 1)
    build_decoder().save_pretrained(decoder_dir)
    for weights in sorted(out.glob("*/*/*.safetensors")):
        _torch_layout(weights)
    return prior_dir, decoder_dir


def _torch_layout(path: Path) -> None:
    """Rewrite a weight file as the hub has them: torch parameter names and `format: pt`. mindone loads that
    (it maps torch names itself, as for hub weights); transformers refuses files whose metadata says `np`."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    save_file({_torch_name(name): value for name, value in tensors.items()}, path, metadata={"format": "pt"})


def _torch_name(name: str) -> str:
    for ours, theirs in _TORCH_NAMES.items():
        if name.endswith(ours):
            return name.removesuffix(ours) + theirs
    return name


def _seed_everything(seed: int) -> None:
    import mindspore as ms
    import numpy as np

    ms.set_seed(seed)
    np.random.seed(seed)


def build_prior(tokenizer_dir: Path) -> Any:
    from mindone.diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPScheduler
    from mindone.transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
    from transformers import CLIPTextConfig, CLIPVisionConfig

    tokenizer = build_tokenizer(tokenizer_dir)
    text_config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=_HIDDEN,
        projection_dim=_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=_HIDDEN,
        projection_dim=_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=224,
        patch_size=14,
        num_channels=3,
    )
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=_HIDDEN, num_layers=1)
    # clip_std starts at 0, which would make post_process_latents return a constant.
    prior.clip_std.set_data(prior.clip_std.new_ones(prior.clip_std.shape))
    scheduler = UnCLIPScheduler(
        variance_type="fixed_small_log",
        prediction_type="sample",
        num_train_timesteps=1000,
        clip_sample=True,
        clip_sample_range=10.0,
    )
    return KandinskyV22PriorPipeline(
        prior=prior,
        image_encoder=CLIPVisionModelWithProjection(vision_config),
        text_encoder=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer,
        scheduler=scheduler,
        image_processor=build_image_processor(),
    )


def build_decoder() -> Any:
    from mindone.diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=8,
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=_HIDDEN,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=_HIDDEN,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    movq = VQModel(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        in_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        out_channels=3,
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        vq_embed_dim=4,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
        thresholding=False,
    )
    return KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)


def build_tokenizer(directory: Path) -> Any:
    """A byte-level CLIP BPE tokenizer with no merges, written locally (no hub)."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + list(_SPECIAL)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        model_max_length=77,
        bos_token=_SPECIAL[0],
        eos_token=_SPECIAL[1],
        pad_token=_SPECIAL[1],
        unk_token=_SPECIAL[1],
    )


def build_image_processor() -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        crop_size=224,
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        size=224,
        resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def _save_image_processor(prior_dir: Path) -> None:
    # KandinskyV22PriorPipeline.save_pretrained skips the image processor; the hub repo has it here.
    build_image_processor().save_pretrained(prior_dir / "image_processor")
