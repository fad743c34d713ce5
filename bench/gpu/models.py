"""Random-weight Kandinsky 2.2 pipelines with the real shapes, built with diffusers + torch (no hub).

Shapes as in docs/performance/h100-anchors.md ("Shapes", from the project's reference builder gpu_anchor.py):
CLIP ViT-bigG/14 text and vision towers, the 1B PriorTransformer, the 1.25B UNet and the MoVQ. Timings
depend only on shapes, so random weights measure what the real ones would. `tiny` gives the same
architecture at toy sizes, for checking the code path on a CPU.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def _shapes(tiny: bool) -> dict[str, Any]:
    if tiny:
        embed = 32
        return dict(
            text=dict(hidden_size=32, projection_dim=embed, intermediate_size=37, num_attention_heads=4,
                      num_hidden_layers=2, vocab_size=1000),
            vision=dict(hidden_size=32, image_size=224, projection_dim=embed, intermediate_size=37,
                        num_attention_heads=4, num_hidden_layers=2, patch_size=14),
            prior=dict(num_attention_heads=2, attention_head_dim=12, embedding_dim=embed, num_layers=1),
            unet=dict(block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                      up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                      attention_head_dim=4, cross_attention_dim=32, encoder_hid_dim=embed),
            movq=dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                      up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], layers_per_block=1,
                      norm_num_groups=8, num_vq_embeddings=12),
        )  # fmt: skip
    embed = 1280
    return dict(
        text=dict(hidden_size=1280, projection_dim=embed, intermediate_size=5120, num_attention_heads=20,
                  num_hidden_layers=32, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
        vision=dict(hidden_size=1664, image_size=224, projection_dim=embed, intermediate_size=8192,
                    num_attention_heads=16, num_hidden_layers=48, patch_size=14, hidden_act="gelu"),
        prior=dict(num_attention_heads=32, attention_head_dim=64, embedding_dim=embed, num_layers=20),
        unet=dict(block_out_channels=(384, 768, 1152, 1536), layers_per_block=3,
                  down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                                    "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
                  up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                                  "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                  attention_head_dim=64, cross_attention_dim=768, encoder_hid_dim=embed),
        movq=dict(block_out_channels=[128, 256, 256, 512],
                  down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D",
                                    "AttnDownEncoderBlock2D"],
                  up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
                  layers_per_block=2, norm_num_groups=32, num_vq_embeddings=16384),
    )  # fmt: skip


def _tokenizer() -> Any:
    """A CLIP BPE tokenizer over single letters: enough to tokenize prompts; ids stay below any vocab size."""
    from transformers import CLIPTokenizer

    folder = Path(tempfile.mkdtemp(prefix="kiq-tok-"))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def build(tiny: bool, device: str, dtype: Any) -> tuple[Any, Any, dict[str, float]]:
    """(prior pipeline, decoder pipeline, parameters in millions per module), on `device` in `dtype`."""
    import torch
    from diffusers import (
        DDPMScheduler,
        KandinskyV22Pipeline,
        KandinskyV22PriorPipeline,
        PriorTransformer,
        UnCLIPScheduler,
        UNet2DConditionModel,
        VQModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    s = _shapes(tiny)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes on the CPU
        prior = PriorTransformer(**s["prior"])
        prior.clip_std.data.fill_(1.0)  # zeros would divide by zero when the prior un-normalises
        text_encoder = CLIPTextModelWithProjection(
            CLIPTextConfig(**s["text"], bos_token_id=0, eos_token_id=1, pad_token_id=1)
        )
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**s["vision"]))
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=8, addition_embed_type="image", mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            encoder_hid_dim_type="image_proj", resnet_time_scale_shift="scale_shift", class_embed_type=None,
            **s["unet"],
        )  # fmt: skip
        movq = VQModel(in_channels=3, out_channels=3, latent_channels=4, norm_type="spatial", vq_embed_dim=4,
                       **s["movq"])  # fmt: skip
    modules = dict(prior=prior, text_encoder=text_encoder, image_encoder=image_encoder, unet=unet, movq=movq)
    params = {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for k, m in modules.items()}
    processor = CLIPImageProcessor(crop_size=224, do_center_crop=True, do_normalize=True, do_resize=True,
                                   image_mean=IMAGE_MEAN, image_std=IMAGE_STD, resample=3, size=224)  # fmt: skip
    prior_scheduler = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                      num_train_timesteps=1000, clip_sample=True, clip_sample_range=10.0)  # fmt: skip
    decoder_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085,
                                      beta_end=0.012, clip_sample=False, prediction_type="epsilon",
                                      thresholding=False, variance_type="fixed_small")  # fmt: skip
    prior_pipe = KandinskyV22PriorPipeline(prior=prior, image_encoder=image_encoder, text_encoder=text_encoder,
                                           tokenizer=_tokenizer(), scheduler=prior_scheduler,
                                           image_processor=processor).to(device, dtype)  # fmt: skip
    decoder_pipe = KandinskyV22Pipeline(unet=unet, scheduler=decoder_scheduler, movq=movq).to(device, dtype)
    for pipe in (prior_pipe, decoder_pipe):
        pipe.set_progress_bar_config(disable=True)
    return prior_pipe, decoder_pipe, params


def save(prior_pipe: Any, decoder_pipe: Any, directory: Path) -> tuple[Path, Path]:
    """from_pretrained layout: DIR/prior (with image_processor/) and DIR/decoder, safetensors in the pipes' dtype."""
    prior_dir, decoder_dir = directory / "prior", directory / "decoder"
    prior_pipe.save_pretrained(prior_dir, safe_serialization=True)
    decoder_pipe.save_pretrained(decoder_dir, safe_serialization=True)
    return prior_dir, decoder_dir


def build_and_save(tiny: bool, device: str, dtype: Any, directory: Path) -> tuple[Any, Any, dict[str, Any]]:
    start = time.perf_counter()
    prior_pipe, decoder_pipe, params = build(tiny, device, dtype)
    built = time.perf_counter()
    save(prior_pipe, decoder_pipe, directory)
    info = {"params_M": params, "build_s": round(built - start, 2), "save_s": round(time.perf_counter() - built, 2),
            "bytes_on_disk": sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())}  # fmt: skip
    return prior_pipe, decoder_pipe, info
