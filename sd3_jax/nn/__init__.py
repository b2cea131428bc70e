"""Flax linen modules of SD3: the MMDiT, the VAE and the text encoders.

Einsum axis letters, used the same way in every module:
  B batch, L sequence (query side), S sequence (key side), D model width, N heads, K head width,
  F feed-forward width, H/W spatial height/width, C channels.
"""

from sd3_jax.nn.attention import attention
from sd3_jax.nn.clip import CLIPConfig, CLIPOutput, CLIPTextEncoder
from sd3_jax.nn.mmdit import MMDiT, MMDiTConfig
from sd3_jax.nn.t5 import T5Config, T5Encoder, T5Output
from sd3_jax.nn.vae import VAE, VAEConfig, scale_latents, unscale_latents

__all__ = [
    "CLIPConfig",
    "CLIPOutput",
    "CLIPTextEncoder",
    "MMDiT",
    "MMDiTConfig",
    "T5Config",
    "T5Encoder",
    "T5Output",
    "VAE",
    "VAEConfig",
    "attention",
    "scale_latents",
    "unscale_latents",
]
