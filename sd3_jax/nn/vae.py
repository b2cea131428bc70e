"""The SD3 autoencoder (diffusers `AutoencoderKL` with SD3's config), channels last.

Images (B, H, W, 3) in [-1, 1] encode to a diagonal Gaussian over latents (B, H/f, W/f, 16) with
f = 2 ** (levels - 1) (8 for SD3). The diffusion model works on scaled latents; `scale_latents` and
`unscale_latents` are the one place the scaling and shift live. GroupNorm and softmax compute in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.nn.layers import dense

Dtype = Any


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3  # image channels
    out_channels: int = 3  # decoded image channels
    latent_channels: int = 16  # channels of the latent
    block_channels: tuple[int, ...] = (128, 256, 512, 512)  # width of each level; all but the last downsample
    layers_per_block: int = 2  # resnets per encoder level (the decoder has one more per level)
    norm_groups: int = 32  # GroupNorm groups
    norm_eps: float = 1e-6  # GroupNorm epsilon
    scaling_factor: float = 1.5305  # latents the MMDiT sees are (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0609

    def __post_init__(self):
        object.__setattr__(self, "block_channels", tuple(self.block_channels))
        if not self.block_channels:
            raise ValueError("VAEConfig: block_channels is empty")
        for c in self.block_channels:
            if c % self.norm_groups:
                raise ValueError(
                    f"VAEConfig: block width {c} is not divisible by norm_groups={self.norm_groups}"
                )
        if min(self.in_channels, self.out_channels, self.latent_channels, self.layers_per_block) < 1:
            raise ValueError(f"VAEConfig: channel counts and layers_per_block must be positive: {self}")
        if self.scaling_factor <= 0:
            raise ValueError(f"VAEConfig: scaling_factor must be positive, got {self.scaling_factor}")

    @property
    def factor(self) -> int:
        """Spatial downsampling factor from image to latent."""
        return 2 ** (len(self.block_channels) - 1)

    @classmethod
    def sd3(cls, **override) -> VAEConfig:
        """The SD3 / SD3.5 autoencoder (83,819,683 parameters)."""
        return cls(**override)

    @classmethod
    def tiny(cls, **override) -> VAEConfig:
        """Two levels of 32 and 64 channels, for tests; still 16 latent channels."""
        kw = dict(block_channels=(32, 64), layers_per_block=1, norm_groups=8)
        return cls(**{**kw, **override})


def scale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """VAE latents -> the latents the MMDiT sees: (z - shift) * scale."""
    return (z - config.shift_factor) * config.scaling_factor


def unscale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """MMDiT latents -> VAE latents: z / scale + shift (the inverse of `scale_latents`)."""
    return z / config.scaling_factor + config.shift_factor


def conv(features: int, kernel: int = 3, stride: int = 1, padding: Any = 1, *, name: str, **kw) -> nn.Module:
    """A conv whose kernel (kh, kw, in, out) and bias carry logical axis names."""
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=pad,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
        **kw,
    )


class GroupNorm(nn.Module):
    """GroupNorm over (H, W, channels of a group), computed in float32 (torch `nn.GroupNorm`)."""

    groups: int  # number of channel groups
    eps: float = 1e-6  # added to the variance
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype, c = x.dtype, x.shape[-1]
        xg = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, c // self.groups)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = jnp.mean(xg, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (c,),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
            (c,),
            self.param_dtype,
        )
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1 conv when widths differ) shortcut (`ResnetBlock2D`)."""

    features: int  # output channels
    groups: int  # GroupNorm groups
    eps: float = 1e-6  # GroupNorm epsilon
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: GroupNorm(self.groups, self.eps, self.param_dtype, name=name)
        h = conv(self.features, name="conv1", **kw)(nn.silu(norm("norm1")(x)))
        h = conv(self.features, name="conv2", **kw)(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != self.features:
            x = conv(self.features, 1, padding=0, name="shortcut", **kw)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions with a residual, in the VAE's mid block."""

    groups: int  # GroupNorm groups
    eps: float = 1e-6  # GroupNorm epsilon
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.groups, self.eps, self.param_dtype, name="norm")(x).reshape(b, hh * ww, c)
        q = dense(c, ("embed", "kv"), name="q", **kw)(h)
        k = dense(c, ("embed", "kv"), name="k", **kw)(h)
        v = dense(c, ("embed", "kv"), name="v", **kw)(h)
        logits = jnp.einsum("BLK,BSK->BLS", q, k, preferred_element_type=jnp.float32) / np.sqrt(c)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = jnp.einsum("BLS,BSK->BLK", probs, v)
        o = dense(c, ("kv", "embed"), name="out", **kw)(o)
        return x + o.reshape(x.shape)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (`UNetMidBlock2D`)."""

    groups: int  # GroupNorm groups
    eps: float = 1e-6  # GroupNorm epsilon
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(groups=self.groups, eps=self.eps, dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock(x.shape[-1], name="resnet_0", **kw)(x)
        x = AttentionBlock(name="attn", **kw)(x)
        return ResnetBlock(x.shape[-1], name="resnet_1", **kw)(x)


class Encoder(nn.Module):
    """Images -> (mean, logvar) of the latent, each (B, H/f, W/f, latent_channels)."""

    config: VAEConfig
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rkw = dict(groups=cfg.norm_groups, eps=cfg.norm_eps, **kw)
        x = conv(cfg.block_channels[0], name="conv_in", **kw)(x)
        for i, c in enumerate(cfg.block_channels):
            for j in range(cfg.layers_per_block):
                x = ResnetBlock(c, name=f"down_{i}_resnet_{j}", **rkw)(x)
            if i < len(cfg.block_channels) - 1:  # asymmetric (0, 1) padding, then a stride-2 conv
                x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
                x = conv(c, 3, 2, padding=0, name=f"down_{i}_downsample", **kw)(x)
        x = MidBlock(name="mid", **rkw)(x)
        x = nn.silu(GroupNorm(cfg.norm_groups, cfg.norm_eps, self.param_dtype, name="norm_out")(x))
        x = conv(2 * cfg.latent_channels, name="conv_out", **kw)(x)
        mean, logvar = jnp.split(x, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> images (B, f*h, f*w, out_channels)."""

    config: VAEConfig
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rkw = dict(groups=cfg.norm_groups, eps=cfg.norm_eps, **kw)
        chans = cfg.block_channels[::-1]
        x = conv(chans[0], name="conv_in", **kw)(z)
        x = MidBlock(name="mid", **rkw)(x)
        for i, c in enumerate(chans):  # diffusers order: up_0 is the lowest resolution
            for j in range(cfg.layers_per_block + 1):
                x = ResnetBlock(c, name=f"up_{i}_resnet_{j}", **rkw)(x)
            if i < len(chans) - 1:  # nearest 2x, then a conv
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
                x = conv(c, name=f"up_{i}_upsample", **kw)(x)
        x = nn.silu(GroupNorm(cfg.norm_groups, cfg.norm_eps, self.param_dtype, name="norm_out")(x))
        return conv(cfg.out_channels, name="conv_out", **kw)(x)


def tile_plan(n: int, tile: int, overlap: int, factor: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Tiles along one axis of `n` latent pixels: starts, per-tile output weights, and their sum.

    Tiles are `min(tile, n)` wide, step `tile - overlap`, and the last one is moved back to end at `n`, so
    all tiles share one shape (one compilation). In output pixels each tile's weight ramps linearly
    (half-pixel centred) across its overlap with each neighbour and is 1 elsewhere, so two overlapping tiles
    cross-fade linearly as in diffusers' `tiled_decode`. Returns (starts, weights (tiles, factor*width),
    weight sum (factor*n,)); dividing by the sum makes the blend a convex combination everywhere.
    """
    t = min(tile, n)
    starts = [0] if n <= tile else list(range(0, n - tile, tile - overlap)) + [n - tile]
    width = factor * t
    pos = np.arange(width, dtype=np.float64) + 0.5
    weights = np.ones((len(starts), width))
    for j, s in enumerate(starts):
        if j > 0 and (left := factor * (starts[j - 1] + t - s)) > 0:
            weights[j] = np.minimum(weights[j], pos / left)
        if j < len(starts) - 1 and (right := factor * (s + t - starts[j + 1])) > 0:
            weights[j] = np.minimum(weights[j], (width - pos) / right)
    total = np.zeros(factor * n)
    for s, w in zip(starts, weights):
        total[factor * s : factor * s + width] += w
    return starts, weights.astype(np.float32), total.astype(np.float32)


class VAE(nn.Module):
    """The autoencoder: `encode` images to (mean, logvar), `decode` unscaled latents to images.

    `__call__` reconstructs images from the posterior mean (used to init both halves).
    """

    config: VAEConfig
    dtype: Dtype = None  # compute dtype; None follows the inputs
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(self.config, **kw)
        self.decoder = Decoder(self.config, **kw)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images)[0])

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), logvar clamped to [-30, 20]."""
        f = self.config.factor
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"VAE.encode: image size {images.shape[1:3]} is not a multiple of {f}")
        return self.encoder(images)

    def decode(self, z: jax.Array, tile: int | None = None, overlap: int = 16) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) -> images (B, f*h, f*w, out_channels).

        With `tile` (latent pixels), decodes overlapping `tile`-sized tiles one after another (a scan, so
        peak memory follows the tile, not the image) and blends them linearly over `overlap` latent pixels.
        GroupNorm statistics and the mid-block attention then see one tile, so the result is close to,
        not equal to, the untiled decode.
        """
        if tile is None or (z.shape[1] <= tile and z.shape[2] <= tile):
            return self.decoder(z)
        if not 0 <= overlap < tile:
            raise ValueError(f"VAE.decode: need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
        return self._decode_tiled(z, tile, overlap)

    def _decode_tiled(self, z: jax.Array, tile: int, overlap: int) -> jax.Array:
        f, (b, h, w, c) = self.config.factor, z.shape
        ys, wy, sy = tile_plan(h, tile, overlap, f)
        xs, wx, sx = tile_plan(w, tile, overlap, f)
        th, tw = min(tile, h), min(tile, w)
        grid = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
        plan = (
            jnp.array([ys[i] for i, _ in grid], jnp.int32),
            jnp.array([xs[j] for _, j in grid], jnp.int32),
            jnp.asarray(wy[[i for i, _ in grid]]),
            jnp.asarray(wx[[j for _, j in grid]]),
        )

        def step(mdl, acc, p):
            y0, x0, wy_t, wx_t = p
            dec = mdl.decoder(jax.lax.dynamic_slice(z, (0, y0, x0, 0), (b, th, tw, c))).astype(jnp.float32)
            at = (0, f * y0, f * x0, 0)
            cur = jax.lax.dynamic_slice(acc, at, dec.shape)
            return jax.lax.dynamic_update_slice(
                acc, cur + dec * (wy_t[:, None] * wx_t[None, :])[..., None], at
            ), None

        scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False})
        acc = jnp.zeros((b, f * h, f * w, self.config.out_channels), jnp.float32)
        acc, _ = scan(self, acc, plan)
        out = acc / jnp.asarray(sy[:, None] * sx[None, :])[..., None]
        return out.astype(self.dtype or jnp.result_type(z.dtype, self.param_dtype))


@dataclasses.dataclass(frozen=True)
class IdentityAEConfig:
    """No autoencoder: models trained in pixel space. Latents are the images in [-1, 1], channels last."""

    channels: int = 3  # latent channels = image channels
    factor: int = 1  # pixels per latent pixel
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
