"""Patch embedding with the cropped 2D sin-cos position table, timestep and pooled-text embeddings."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.nn.layers import dense

Dtype = Any


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """Transformer sin-cos embedding of positions: [sin(pos w), cos(pos w)], w_i = 10000^(-2i/dim)."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_table(dim: int, grid_size: int, base_size: int, interpolation_scale: float = 1.0) -> np.ndarray:
    """The (1, grid_size**2, dim) position table of SD3 (diffusers `get_2d_sincos_pos_embed`).

    Positions are scaled by base_size / grid_size; the first half of the channels encodes the column, the
    second the row, tokens in row-major order.
    """
    grid = np.arange(grid_size, dtype=np.float32) / (grid_size / base_size) / interpolation_scale
    # Each token's embedding is (its column's, its row's): the same values diffusers computes on the full
    # meshgrid, built from the grid_size distinct ones (an SD3 table is 36864 tokens x 1536 channels).
    one = sincos_1d(dim // 2, grid).astype(np.float32)  # (grid_size, dim / 2)
    emb = np.empty((grid_size, grid_size, dim), np.float32)  # (row, column, channel)
    emb[:, :, : dim // 2] = one[None, :, :]
    emb[:, :, dim // 2 :] = one[:, None, :]
    return emb.reshape(1, grid_size * grid_size, dim)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep features, cosine half first (diffusers `Timesteps(flip_sin_to_cos=True)`), fp32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv plus the centre crop of the position table for this latent size."""

    patch_size: int  # side of a square patch, in latent pixels
    features: int  # model width D
    pos_embed_max_size: int  # side of the stored position table, in patches; 0: no table (a plain conv)
    base_size: int  # sample_size // patch_size: sets the table's position scale at init
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p, m = self.patch_size, self.pos_embed_max_size
        b, height, width, c = x.shape
        h, w = height // p, width // p
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, (None, None, "conv_in", "embed")),
            (p, p, c, self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            (self.features,),
            self.param_dtype,
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        patches = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, p * p * c)
        tokens = patches @ kernel.reshape(p * p * c, self.features) + bias
        if not m:
            return tokens
        table = self.param(
            "pos_embed",
            nn.with_logical_partitioning(
                lambda *_: jnp.asarray(sincos_2d_table(self.features, m, self.base_size)),
                (None, None, "embed"),
            ),
            (1, m * m, self.features),
            self.param_dtype,
        )
        top, left = (m - h) // 2, (m - w) // 2
        pos = table.reshape(m, m, self.features)[top : top + h, left : left + w].reshape(1, h * w, -1)
        return tokens + pos.astype(tokens.dtype)


class TimestepTextEmbed(nn.Module):
    """Conditioning vector MLP(sinusoid(1000 t)) + MLP(pooled text) (diffusers `CombinedTimestepTextProj`)."""

    features: int  # model width D
    freq_dim: int = 256  # sinusoid features of the timestep
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array, pooled: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def mlp(name, h):
            h = dense(self.features, (None, "cond"), name=f"{name}_1", **kw)(h)
            return dense(self.features, (None, "cond"), name=f"{name}_2", **kw)(nn.silu(h))

        # The timestep MLP's input width is the sinusoid size, not D: named separately.
        # Sinusoid in fp32, then cast to the text's dtype as diffusers does.
        t_emb = timestep_embedding(t.astype(jnp.float32) * 1000.0, self.freq_dim).astype(pooled.dtype)
        return mlp("timestep", t_emb) + mlp("text", pooled)
