"""The SD3 / SD3.5 ControlNet: a copy of the MMDiT's first blocks whose outputs steer its image stream.

Matches diffusers' `SD3ControlNetModel` in both of its configurations:
- joint (SD3 Medium ControlNets, InstantX and alimama): its own patch embedding with a position table,
  timestep + pooled-text conditioning, a context embedder and `depth` joint blocks (none context-pre-only);
- single-stream (Stability's SD3.5 Large ControlNets, `joint_attention_dim=None`): no patch embedding of its
  own (the MMDiT's `pos_embed` embeds the latents and is passed in), no text tokens, blocks of adaLN-Zero
  self-attention over image tokens only.
Both add `pos_embed_input(control latents)`, a patch conv without position table (zero-initialised), to the
image tokens, and map every block's image tokens through a zero-initialised `controlnet_block` linear: the
stacked (depth, B, L, D) residuals, times the conditioning scale, are the MMDiT's `controls`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd3_jax.nn.embeddings import PatchEmbed, TimestepTextEmbed
from sd3_jax.nn.layers import MLP, AdaLNModulation, LayerNorm, dense, modulate
from sd3_jax.nn.mmdit import BACKENDS, REMAT_POLICIES, Attention, JointBlock, MMDiTConfig

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    depth: int = 12  # number of blocks (diffusers `num_layers`), one residual each
    num_heads: int = 24  # attention heads; width D = num_heads * head_dim, the MMDiT's width
    head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16  # latent channels
    extra_channels: int = 0  # control channels beyond the latent ones (1: the inpainting mask)
    context_dim: int | None = 4096  # width of the text tokens; None: single-stream blocks, no text
    pooled_dim: int = 2048
    sample_size: int = 128  # training latent side: sets the position-table scale
    pos_embed_max_size: int = 192  # side of its own position table, in patches; 0: uses the MMDiT's
    qk_norm: bool = False  # RMS qk-norm in the joint blocks
    dual_attention_layers: tuple[int, ...] = ()  # joint blocks with MMDiT-X self-attention
    force_zeros_for_pooled: bool = True  # diffusers' `force_zeros_for_pooled_projection` (pipeline side)
    mlp_ratio: float = 4.0
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"
    remat: str = "none"

    def __post_init__(self):
        sizes = ("depth", "num_heads", "head_dim", "patch_size", "in_channels", "pooled_dim", "sample_size")
        small = [n for n in sizes if getattr(self, n) < 1]
        if small or self.extra_channels < 0 or self.pos_embed_max_size < 0:
            raise ValueError(f"ControlNetConfig: {', '.join(small) or 'sizes'} must be positive")
        if self.context_dim is not None and self.context_dim < 1:
            raise ValueError("ControlNetConfig: context_dim must be positive or None (single-stream)")
        if self.context_dim is None and (self.qk_norm or self.dual_attention_layers):
            raise ValueError("ControlNetConfig: single-stream blocks have no qk-norm or dual attention")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"ControlNetConfig: dual_attention_layers {bad} outside 0..{self.depth - 1}")
        if self.attention not in BACKENDS:
            raise ValueError(f"ControlNetConfig: attention {self.attention!r} not in {BACKENDS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ControlNetConfig: remat {self.remat!r} not in {tuple(REMAT_POLICIES)}")
        object.__setattr__(self, "dual_attention_layers", tuple(sorted(set(self.dual_attention_layers))))

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def joint(self) -> bool:
        return self.context_dim is not None

    @property
    def own_pos_embed(self) -> bool:
        return self.pos_embed_max_size > 0

    def replace(self, **kw) -> ControlNetConfig:
        return dataclasses.replace(self, **kw)

    def segments(self) -> list[tuple[int, int, bool]]:
        """Runs of consecutive blocks of one kind: (start, stop, dual_attention)."""
        out = []
        for i in range(self.depth):
            dual = i in self.dual_attention_layers
            if out and out[-1][2] == dual:
                out[-1] = (out[-1][0], i + 1, dual)
            else:
                out.append((i, i + 1, dual))
        return out

    def check_base(self, base: MMDiTConfig) -> None:
        """Raises ValueError unless this ControlNet fits the MMDiT `base` (width, patch, latent channels)."""
        mine = (self.width, self.patch_size, self.in_channels, self.pooled_dim)
        theirs = (base.width, base.patch_size, base.in_channels, base.pooled_dim)
        if mine != theirs:
            raise ValueError(
                f"this ControlNet (width, patch, latent channels, pooled width) {mine} does not fit the "
                f"transformer's {theirs}: it was made for another model"
            )
        if self.joint and self.context_dim != base.context_dim:
            raise ValueError(
                f"this ControlNet reads {self.context_dim}-wide text tokens, the transformer's are "
                f"{base.context_dim}: it was made for another model"
            )

    @classmethod
    def sd35_large(cls, **kw) -> ControlNetConfig:
        """Stability's SD3.5 Large ControlNets (blur, canny, depth): 19 single-stream blocks."""
        base = dict(depth=19, num_heads=38, context_dim=None, pos_embed_max_size=0)
        return cls(**{**base, "force_zeros_for_pooled": False, **kw})

    @classmethod
    def sd3_medium(cls, **kw) -> ControlNetConfig:
        """The SD3 Medium ControlNets in diffusers' layout (InstantX canny/pose/tile: 6 or 12 blocks)."""
        return cls(**{**dict(depth=12, num_heads=24, pos_embed_max_size=192), **kw})

    @classmethod
    def from_transformer(cls, base: MMDiTConfig, depth: int = 12, **kw) -> ControlNetConfig:
        """A joint ControlNet shaped like `base` (diffusers' `SD3ControlNetModel.from_transformer`)."""
        fields = dict(
            depth=depth,
            num_heads=base.num_heads,
            head_dim=base.head_dim,
            patch_size=base.patch_size,
            in_channels=base.in_channels,
            context_dim=base.context_dim,
            pooled_dim=base.pooled_dim,
            sample_size=base.sample_size,
            pos_embed_max_size=base.pos_embed_max_size,
            qk_norm=base.qk_norm,
            dual_attention_layers=tuple(i for i in base.dual_attention_layers if i < depth),
            mlp_ratio=base.mlp_ratio,
            dtype=base.dtype,
            param_dtype=base.param_dtype,
            attention=base.attention,
            remat=base.remat,
        )
        return cls(**{**fields, **kw})


class SingleBlock(nn.Module):
    """diffusers' `SD3SingleTransformerBlock` (Stability's `DismantledBlock` without context): adaLN-Zero
    self-attention over the image tokens, then the modulated MLP."""

    num_heads: int
    head_dim: int
    mlp_ratio: float = 4.0
    backend: str = "auto"
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = LayerNorm(eps=1e-6)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = AdaLNModulation(6, d, name="norm1", **kw)(temb)
        a, _ = Attention(self.num_heads, self.head_dim, backend=self.backend, name="attn", **kw)(
            modulate(norm(x), shift, scale)
        )
        x_new = x + gate[:, None] * a
        ff = MLP(int(d * self.mlp_ratio), name="ff", **kw)(modulate(norm(x_new), shift_mlp, scale_mlp))
        x_new = x_new + gate_mlp[:, None] * ff
        return nn.with_logical_constraint(x_new.astype(x.dtype), ("batch", "length", "embed"))


class ControlLayer(nn.Module):
    """One ControlNet block and its `controlnet_block` linear, as a scan body: carries the streams and emits
    the block's residual."""

    config: ControlNetConfig
    dual_attention: bool = False

    @nn.compact
    def __call__(self, carry, temb: jax.Array):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        block_kw = dict(num_heads=cfg.num_heads, head_dim=cfg.head_dim, mlp_ratio=cfg.mlp_ratio)
        if cfg.joint:
            carry, _ = JointBlock(
                **block_kw,
                qk_norm=cfg.qk_norm,
                dual_attention=self.dual_attention,
                backend=cfg.attention,
                name="block",
                **kw,
            )(carry, temb, jnp.bool_(False))
            x = carry[0]
        else:
            x = carry = SingleBlock(**block_kw, backend=cfg.attention, name="block", **kw)(carry, temb)
        zero = nn.initializers.zeros_init()  # diffusers' zero_module: a fresh net leaves the MMDiT as it is
        residual = dense(cfg.width, ("mlp", "embed"), name="controlnet_block", kernel_init=zero, **kw)(x)
        return carry, nn.with_logical_constraint(residual, ("batch", "length", "embed"))


class ControlNet(nn.Module):
    """The residuals (depth, B, L_image, D) of one ControlNet for the MMDiT's `controls`."""

    config: ControlNetConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cond: jax.Array,
        t: jax.Array,
        pooled: jax.Array,
        context: jax.Array | None = None,
        scale: jax.Array | float = 1.0,
    ) -> jax.Array:
        """Residuals for the MMDiT.

        Args:
          x: latents (B, H, W, C) when the net has its own position table, else the MMDiT's embedded image
            tokens (B, L, D) (its `pos_embed` applied to the latents).
          cond: control latents (B, H, W, in_channels + extra_channels).
          t: flow time (B,) in [0, 1].
          pooled: (B, pooled_dim); the pipeline passes zeros where `force_zeros_for_pooled`.
          context: (B, L_text, context_dim) text tokens for a joint net; None for single-stream.
          scale: the conditioning scale (a scalar), applied to every residual.
        """
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        p, d = cfg.patch_size, cfg.width
        if cfg.joint != (context is not None):
            raise ValueError(
                "ControlNet: "
                + (
                    "a joint net needs the text tokens"
                    if cfg.joint
                    else "single-stream nets take no text tokens"
                )
            )
        want = cfg.in_channels + cfg.extra_channels
        if cond.ndim != 4 or cond.shape[-1] != want:
            raise ValueError(f"ControlNet: control latents must be (B, H, W, {want}), got {cond.shape}")
        if cfg.own_pos_embed:
            if x.ndim != 4:
                raise ValueError(f"ControlNet: latents must be (B, H, W, C), got {x.shape}")
            x = PatchEmbed(p, d, cfg.pos_embed_max_size, cfg.sample_size // p, name="pos_embed", **kw)(x)
        elif x.ndim != 3:
            raise ValueError(f"ControlNet: without a position table x must be embedded tokens, got {x.shape}")
        zero = nn.initializers.zeros_init()
        h = x + PatchEmbed(p, d, 0, 1, kernel_init=zero, name="pos_embed_input", **kw)(cond).astype(x.dtype)
        h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
        temb = TimestepTextEmbed(d, name="time_text_embed", **kw)(t, pooled)
        carry = h
        if cfg.joint:
            c = dense(d, ("cond", "embed"), name="context_embedder", **kw)(context).astype(h.dtype)
            carry = (h, nn.with_logical_constraint(c, ("batch", "length", "embed")))

        outs = []
        for k, (start, stop, dual) in enumerate(cfg.segments()):
            layer = ControlLayer
            if cfg.remat != "none":
                layer = nn.remat(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
            stack = nn.scan(
                layer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=stop - start,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            carry, res = stack(cfg, dual, name=f"blocks_{k}")(carry, temb)
            outs.append(res)
        residuals = jnp.concatenate(outs) if len(outs) > 1 else outs[0]
        return residuals * jnp.asarray(scale, residuals.dtype)
