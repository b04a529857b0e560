"""Stable-Diffusion-shaped components built from configs: the embedded model's and the tests' tiny ones."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from research.tokenizer import build_clip_tokenizer


@dataclass(frozen=True)
class ComponentSpec:
    """Sizes of a Stable-Diffusion-family model; the defaults are the embedded tiny-digits model."""

    image_size: int = 32  # pixels; the VAE halves it (len(vae_channels) - 1) times
    vae_channels: tuple[int, ...] = (32, 64, 64)  # 32x32 -> 8x8 latents
    latent_channels: int = 4  # as Stable Diffusion
    unet_channels: tuple[int, ...] = (64, 96, 96)
    unet_layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 16
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 16  # prompts are short ("a photo of the digit seven" is 8 tokens)


def build_components(spec: ComponentSpec, words: list[str], seed: int = 0) -> dict:
    """Freshly initialised `vae`, `unet`, `text_encoder`, `tokenizer`, `scheduler` (seeded)."""
    torch.manual_seed(seed)
    n_vae = len(spec.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.norm_num_groups,
        sample_size=spec.image_size,
    )
    tokenizer = build_clip_tokenizer(words, spec.max_tokens)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=2 * spec.text_hidden,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            max_position_embeddings=spec.max_tokens,
            projection_dim=spec.text_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    n_unet = len(spec.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=spec.image_size // 2 ** (n_vae - 1),
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        layers_per_block=spec.unet_layers_per_block,
        block_out_channels=spec.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n_unet - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_unet - 1),
        cross_attention_dim=spec.text_hidden,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.norm_num_groups,
    )
    # Stable Diffusion's training schedule: 1000 steps, scaled-linear betas, epsilon prediction.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return {
        "vae": vae,
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def assemble_pipeline(components: dict) -> StableDiffusionPipeline:
    """A stock StableDiffusionPipeline around the components, without a safety checker."""
    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def spec_dict(spec: ComponentSpec) -> dict:
    return asdict(spec)
