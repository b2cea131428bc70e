"""The MMDiT of SD3 / SD3.5: joint attention over image and text tokens with adaLN-Zero modulation.

Matches diffusers' `SD3Transformer2DModel` (and Stability's `mmditx.py`) number for number: patch embedding
with a centre-cropped sin-cos table, timestep + pooled-text conditioning, joint blocks (optional RMS qk-norm,
MMDiT-X dual attention), a context-pre-only last block, final adaptive norm and unpatchify. Latents are
channels last, (B, H, W, C). Consecutive blocks of one kind form a segment compiled once with `nn.scan`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd3_jax.nn.attention import BACKENDS, attention
from sd3_jax.nn.embeddings import PatchEmbed, TimestepTextEmbed
from sd3_jax.nn.layers import MLP, AdaLNModulation, LayerNorm, RMSNorm, dense, modulate

Dtype = Any
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    depth: int = 24  # number of joint blocks
    num_heads: int = 24  # attention heads; width D = num_heads * head_dim
    head_dim: int = 64  # width of one head
    patch_size: int = 2  # latent pixels per patch side
    in_channels: int = 16  # latent channels in
    out_channels: int = 16  # latent channels out
    context_dim: int = 4096  # width of the text tokens (T5 width)
    pooled_dim: int = 2048  # width of the pooled text vector (CLIP-L + CLIP-G)
    sample_size: int = 128  # training latent side: sets the position-table scale at init
    pos_embed_max_size: int = 192  # side of the position table, in patches
    qk_norm: bool = False  # RMS norm on queries and keys (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # blocks with MMDiT-X image self-attention (SD3.5 Medium)
    mlp_ratio: float = 4.0  # MLP hidden width over model width
    dtype: Dtype = None  # compute dtype; None follows inputs and params (flax convention)
    param_dtype: Dtype = jnp.float32  # dtype params are created in
    attention: str = "auto"  # attention backend, see nn/attention.py
    remat: str = "none"  # rematerialisation policy of each block: none, full, dots, dots_no_batch

    def __post_init__(self):
        sizes = ("depth", "num_heads", "head_dim", "patch_size", "in_channels", "out_channels", "context_dim")
        sizes += ("pooled_dim", "sample_size", "pos_embed_max_size")
        small = [n for n in sizes if getattr(self, n) < 1]
        if small:
            raise ValueError(f"MMDiTConfig: {', '.join(small)} must be positive")
        if (self.num_heads * self.head_dim) % 4:
            raise ValueError(
                f"MMDiTConfig: the width num_heads * head_dim = {self.num_heads * self.head_dim} must be a "
                "multiple of 4 (the 2-D sin-cos position table)"
            )
        if not 0 < self.mlp_ratio < 1e3:
            raise ValueError(f"MMDiTConfig: mlp_ratio must be a positive number, got {self.mlp_ratio}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"MMDiTConfig: dual_attention_layers {bad} outside 0..{self.depth - 1}")
        if self.attention not in BACKENDS:
            raise ValueError(f"MMDiTConfig: attention {self.attention!r} not in {BACKENDS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"MMDiTConfig: remat {self.remat!r} not in {tuple(REMAT_POLICIES)}")
        object.__setattr__(self, "dual_attention_layers", tuple(sorted(set(self.dual_attention_layers))))

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def max_latent_size(self) -> int:
        """The largest latent height or width the position table allows."""
        return self.pos_embed_max_size * self.patch_size

    def segments(self) -> list[tuple[int, int, bool, bool]]:
        """Runs of consecutive blocks of one kind: (start, stop, dual_attention, context_pre_only)."""
        kinds = [(i in self.dual_attention_layers, i == self.depth - 1) for i in range(self.depth)]
        out = []
        for i, kind in enumerate(kinds):
            if out and out[-1][2:] == kind:
                out[-1] = (out[-1][0], i + 1, *kind)
            else:
                out.append((i, i + 1, *kind))
        return out

    def replace(self, **kw) -> MMDiTConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def sd3_medium(cls, **kw) -> MMDiTConfig:
        return cls(**{**dict(depth=24, num_heads=24, pos_embed_max_size=192), **kw})

    @classmethod
    def sd35_medium(cls, **kw) -> MMDiTConfig:
        base = dict(
            depth=24,
            num_heads=24,
            pos_embed_max_size=384,
            qk_norm=True,
            dual_attention_layers=tuple(range(13)),
        )
        return cls(**{**base, **kw})

    @classmethod
    def sd35_large(cls, **kw) -> MMDiTConfig:
        """SD3.5 Large; SD3.5 Large Turbo is the same network."""
        return cls(**{**dict(depth=38, num_heads=38, pos_embed_max_size=192, qk_norm=True), **kw})

    @classmethod
    def tiny(cls, **kw) -> MMDiTConfig:
        base = dict(
            depth=3,
            num_heads=2,
            head_dim=16,
            context_dim=24,
            pooled_dim=20,
            sample_size=8,
            pos_embed_max_size=12,
            in_channels=4,
            out_channels=4,
        )
        return cls(**{**base, **kw})


class Attention(nn.Module):
    """Multi-head attention of a joint block: image tokens, plus text tokens when `context` is given.

    The two streams have their own q/k/v (and output) projections and attend jointly over their
    concatenation (image first, as diffusers' `JointAttnProcessor2_0`).
    """

    num_heads: int
    head_dim: int
    qk_norm: bool = False  # RMS norm over each head's queries and keys
    joint: bool = False  # has the text-stream projections
    context_pre_only: bool = False  # text stream has no output projection (last block)
    backend: str = "auto"
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hk = (self.num_heads, self.head_dim)
        qkv_names = ("embed", "heads", "kv")

        def project(h, prefix, norm_names):
            q = dense(hk, qkv_names, name=f"{prefix[0]}", **kw)(h)
            k = dense(hk, qkv_names, name=f"{prefix[1]}", **kw)(h)
            v = dense(hk, qkv_names, name=f"{prefix[2]}", **kw)(h)
            if self.qk_norm:
                q = RMSNorm(eps=1e-6, param_dtype=self.param_dtype, name=norm_names[0])(q)
                k = RMSNorm(eps=1e-6, param_dtype=self.param_dtype, name=norm_names[1])(k)
            return q, k, v

        q, k, v = project(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        n_x = x.shape[1]
        if self.joint:
            cq, ck, cv = project(
                c, ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k")
            )
            q, k, v = (jnp.concatenate(p, axis=1) for p in ((q, cq), (k, ck), (v, cv)))
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
        v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))
        o = attention(q, k, v, backend=self.backend)
        out_names = ("heads", "kv", "embed")
        x_out = dense(d, out_names, axis=(-2, -1), name="to_out", **kw)(o[:, :n_x])
        c_out = None
        if self.joint and not self.context_pre_only:
            c_out = dense(d, out_names, axis=(-2, -1), name="to_add_out", **kw)(o[:, n_x:])
        return x_out, c_out


class JointBlock(nn.Module):
    """One MMDiT block (diffusers `JointTransformerBlock`), as a scan body over (x, c) carries."""

    num_heads: int
    head_dim: int
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    dual_attention: bool = False  # MMDiT-X: extra self-attention over image tokens
    context_pre_only: bool = False  # last block: text stream only feeds the attention
    backend: str = "auto"
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carry, temb: jax.Array, skip: jax.Array, controls=None, control_index=None):
        """`controls` (N, B, L_image, D), if given, are ControlNet residuals: residual `control_index` is
        added to the image stream after the block (skipped or not), as diffusers does."""
        x, c = carry
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = LayerNorm(eps=1e-6)
        attn_kw = dict(
            num_heads=self.num_heads, head_dim=self.head_dim, qk_norm=self.qk_norm, backend=self.backend
        )

        mods = AdaLNModulation(9 if self.dual_attention else 6, d, name="norm1", **kw)(temb)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        nx = norm(x)
        if self.context_pre_only:
            c_scale, c_shift = AdaLNModulation(2, d, name="norm1_context", **kw)(temb)
            nc = modulate(norm(c), c_shift, c_scale)
        else:
            cmods = AdaLNModulation(6, d, name="norm1_context", **kw)(temb)
            nc = modulate(norm(c), cmods[0], cmods[1])

        a_x, a_c = Attention(
            joint=True, context_pre_only=self.context_pre_only, name="attn", **attn_kw, **kw
        )(modulate(nx, shift, scale), nc)
        x_new = x + gate[:, None] * a_x
        if self.dual_attention:
            shift2, scale2, gate2 = mods[6:]
            a2, _ = Attention(name="attn2", **attn_kw, **kw)(modulate(nx, shift2, scale2))
            x_new = x_new + gate2[:, None] * a2
        hidden = int(d * self.mlp_ratio)
        ff = MLP(hidden, name="ff", **kw)(modulate(norm(x_new), shift_mlp, scale_mlp))
        x_new = nn.with_logical_constraint(x_new + gate_mlp[:, None] * ff, ("batch", "length", "embed"))

        if self.context_pre_only:
            c_new = c
        else:
            _, _, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = cmods
            c_new = c + c_gate[:, None] * a_c
            ff_c = MLP(hidden, name="ff_context", **kw)(modulate(norm(c_new), c_shift_mlp, c_scale_mlp))
            c_new = nn.with_logical_constraint(
                c_new + c_gate_mlp[:, None] * ff_c, ("batch", "length", "embed")
            )
        x_new = jnp.where(skip, x, x_new.astype(x.dtype))
        c_new = jnp.where(skip, c, c_new.astype(c.dtype))
        if controls is not None:
            x_new = x_new + controls[control_index].astype(x.dtype)
        return (x_new, c_new), None


class MMDiT(nn.Module):
    """The SD3 / SD3.5 denoiser: returns the rectified-flow velocity for latents `x` at flow time `t`."""

    config: MMDiTConfig

    def check_latent_shape(self, shape: Sequence[int]) -> None:
        """Raises ValueError unless `shape` is (B, H, W, in_channels) with H, W patchable and in the table."""
        cfg = self.config
        if len(shape) != 4 or shape[-1] != cfg.in_channels:
            raise ValueError(f"MMDiT: latents must be (B, H, W, {cfg.in_channels}), got {tuple(shape)}")
        _, h, w, _ = shape
        p, top = cfg.patch_size, cfg.max_latent_size
        if h % p or w % p:
            raise ValueError(
                f"MMDiT: latent height and width must be multiples of the patch size {p}, got {h}x{w}"
            )
        if h > top or w > top:
            raise ValueError(
                f"MMDiT: latent size {h}x{w} exceeds the position table; the largest allowed is {top}x{top} "
                f"({top * 8}x{top * 8} pixels with the SD3 VAE)"
            )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        context: jax.Array,
        pooled: jax.Array,
        skip_layers: Sequence[int] = (),
        controls: jax.Array | None = None,
    ) -> jax.Array:
        """Velocity for latents x (B, H, W, C) at flow time t (B,) in [0, 1].

        Args:
          x: latents, channels last.
          t: flow time sigma; the network embeds 1000 * t, as both references do.
          context: (B, L, context_dim) text tokens.
          pooled: (B, pooled_dim) pooled text vector.
          skip_layers: indices of blocks to skip (skip-layer guidance).
          controls: (N, B, L_image, D) ControlNet residuals (`sd3_jax.nn.controlnet`), spread over the
            blocks as diffusers spreads them: block i adds residual int(i / (depth / N)), the last
            (context-pre-only) block none.
        """
        cfg = self.config
        self.check_latent_shape(x.shape)
        bad = [i for i in skip_layers if not 0 <= i < cfg.depth]
        if bad:
            raise ValueError(f"MMDiT: skip_layers {bad} outside 0..{cfg.depth - 1}")
        b, height, width, _ = x.shape
        p, d = cfg.patch_size, cfg.width
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)

        h = PatchEmbed(p, d, cfg.pos_embed_max_size, cfg.sample_size // p, name="pos_embed", **kw)(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
        temb = TimestepTextEmbed(d, name="time_text_embed", **kw)(t, pooled)
        c = dense(d, ("cond", "embed"), name="context_embedder", **kw)(context)
        c = nn.with_logical_constraint(c, ("batch", "length", "embed"))
        c = c.astype(h.dtype)

        for k, (start, stop, dual, pre_only) in enumerate(cfg.segments()):
            skip = jnp.array([i in skip_layers for i in range(start, stop)])
            extra = ()
            if controls is not None and not pre_only:  # diffusers adds none after the last block
                per_block = cfg.depth / controls.shape[0]
                extra = (controls, jnp.array([int(i / per_block) for i in range(start, stop)], jnp.int32))
            block = JointBlock
            if cfg.remat != "none":
                block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, 0, nn.broadcast, 0)[: 2 + len(extra)],
                length=stop - start,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            (h, c), _ = stack(
                num_heads=cfg.num_heads,
                head_dim=cfg.head_dim,
                mlp_ratio=cfg.mlp_ratio,
                qk_norm=cfg.qk_norm,
                dual_attention=dual,
                context_pre_only=pre_only,
                backend=cfg.attention,
                name=f"blocks_{k}",
                **kw,
            )((h, c), temb, skip, *extra)

        scale, shift = AdaLNModulation(2, d, name="norm_out", **kw)(temb)
        h = modulate(LayerNorm(eps=1e-6)(h), shift, scale)
        h = dense(p * p * cfg.out_channels, ("embed", None), name="proj_out", **kw)(h)
        gh, gw = height // p, width // p
        h = h.reshape(b, gh, gw, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, height, width, cfg.out_channels)
