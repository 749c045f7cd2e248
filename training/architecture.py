"""The demo model's architecture: Stable Diffusion's three networks, scaled down.

The same classes as Stable Diffusion 1.x (``CLIPTextModel``, ``UNet2DConditionModel``,
``AutoencoderKL``) so that the demo model exercises exactly the export and serving code a real
checkpoint does. Sizes were chosen so that the whole model trains on a 2-core CPU in well
under 40 minutes and still draws what the caption says at 32x32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

TEXT_HIDDEN = 64
LATENT_CHANNELS = 4
IMAGE_SIZE = 32
VAE_SCALE = 4  # two downsampling stages: 32x32 pixels -> 8x8 latents
LATENT_SIZE = IMAGE_SIZE // VAE_SCALE


def vae_config() -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "latent_channels": LATENT_CHANNELS,
        "norm_num_groups": 16,
        "sample_size": IMAGE_SIZE,
    }


def unet_config() -> dict[str, Any]:
    return {
        "sample_size": LATENT_SIZE,
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "block_out_channels": [64, 128],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": TEXT_HIDDEN,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }


def text_encoder_config(*, vocab_size: int, bos_token_id: int, eos_token_id: int, max_length: int) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 2 * TEXT_HIDDEN,
        "projection_dim": TEXT_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": max_length,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "hidden_act": "quick_gelu",
    }


def scheduler_config() -> dict[str, Any]:
    """Stable Diffusion 1.x's noise schedule (the DDIM form it ships with)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }


def build_vae() -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config())


def build_unet() -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config())


def build_text_encoder(**kwargs: int) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**text_encoder_config(**kwargs)))
