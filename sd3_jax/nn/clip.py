"""The CLIP text transformer: OpenAI CLIP-L (quick_gelu) and OpenCLIP bigG (gelu, text projection).

Matches transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`: token + learned position embeddings,
pre-LN blocks under a causal mask, a final LayerNorm, the pooled state at the first EOS token and an optional
bias-free projection of it. SD3 conditions on the penultimate layer's output, taken before the final norm
(`hidden_states[-2]`, as diffusers' `StableDiffusion3Pipeline` does).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from sd3_jax.nn.attention import attention
from sd3_jax.nn.layers import LayerNorm, dense

Dtype = Any
ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408  # token embedding rows
    width: int = 768  # model width D (transformers `hidden_size`)
    layers: int = 12  # transformer blocks
    heads: int = 12  # attention heads N; head width is width // heads
    mlp_dim: int = 3072  # hidden width of the MLP (transformers `intermediate_size`)
    max_length: int = 77  # position embedding rows (transformers `max_position_embeddings`)
    act: str = "quick_gelu"  # MLP activation: "quick_gelu" (OpenAI CLIP) or "gelu" (exact, OpenCLIP)
    projection_dim: int | None = 768  # width of `text_projection`, None for a model without one
    eps: float = 1e-5  # LayerNorm epsilon
    eos_token_id: int = 49407  # pooled state is taken at its first occurrence; 2 means legacy argmax of ids

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act {self.act!r} is not one of {ACTIVATIONS}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @classmethod
    def clip_l(cls, **override) -> CLIPConfig:
        """OpenAI CLIP ViT-L/14 text tower, SD3's `text_encoder` (123M parameters with projection)."""
        return cls(**override)

    @classmethod
    def clip_g(cls, **override) -> CLIPConfig:
        """OpenCLIP ViT-bigG/14 text tower, SD3's `text_encoder_2` (695M parameters with projection)."""
        kw = dict(width=1280, layers=32, heads=20, mlp_dim=5120, act="gelu", projection_dim=1280)
        return cls(**{**kw, **override})

    @classmethod
    def tiny(cls, **override) -> CLIPConfig:
        """A two-layer model for tests."""
        kw = dict(
            vocab_size=99,
            width=32,
            layers=2,
            heads=4,
            mlp_dim=37,
            max_length=16,
            projection_dim=24,
            eos_token_id=98,
        )
        return cls(**{**kw, **override})


@flax.struct.dataclass
class CLIPOutput:
    last_hidden_state: jax.Array  # (B, L, D) the last block's output after the final LayerNorm
    pooled: jax.Array  # (B, D) last_hidden_state at the first EOS token (transformers `pooler_output`)
    text_embeds: jax.Array | None  # (B, P) pooled @ text_projection, None without a projection
    hidden_states: jax.Array | None  # (layers + 1, B, L, D) embeddings, then each block (no final norm)


def quick_gelu(x: jax.Array) -> jax.Array:
    """x * sigmoid(1.702 x), the GELU approximation OpenAI CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


def causal_mask(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """(B, 1, L, L) boolean mask, True where query l may attend key s: s <= l and s is not padding."""
    length = input_ids.shape[-1]
    mask = jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
    if attention_mask is not None:
        mask = mask & (attention_mask[:, None, None, :] > 0)
    return mask


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """(B,) index of the pooled token: the first EOS, or the largest id when `eos_token_id == 2`.

    transformers keeps the argmax for configs whose `eos_token_id` is the legacy 2; with CLIP's vocabulary the
    EOS token has the largest id, so both agree on real tokenizers.
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPBlock(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: CLIPConfig
    emit: bool = True  # also return the block output as the scan's per-layer output
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    attention_backend: str = "auto"  # see sd3_jax.nn.attention.BACKENDS

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv_names = ("embed", "heads", "kv")
        h = LayerNorm(cfg.eps, use_scale=True, use_bias=True, param_dtype=self.param_dtype, name="ln1")(x)
        q, k, v = (dense((cfg.heads, cfg.head_dim), qkv_names, name=n, **kw)(h) for n in ("q", "k", "v"))
        q, k, v = (nn.with_logical_constraint(t, ("batch", "length", "heads", "kv")) for t in (q, k, v))
        a = attention(q, k, v, mask=mask, backend=self.attention_backend)
        x = x + dense(cfg.width, ("heads", "kv", "embed"), axis=(-2, -1), name="o", **kw)(a)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        h = LayerNorm(cfg.eps, use_scale=True, use_bias=True, param_dtype=self.param_dtype, name="ln2")(x)
        h = dense(cfg.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(h)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = quick_gelu(h) if cfg.act == "quick_gelu" else nn.gelu(h, approximate=False)
        x = x + dense(cfg.width, ("mlp", "embed"), name="fc2", **kw)(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, (x if self.emit else None)


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer; `__call__(input_ids, attention_mask)` -> CLIPOutput."""

    config: CLIPConfig
    dtype: Dtype = None  # compute dtype (None: from params and inputs)
    param_dtype: Dtype = jnp.float32
    remat: bool = False  # rematerialize each block in the backward pass
    attention_backend: str = "auto"  # see sd3_jax.nn.attention.BACKENDS

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, output_hidden_states: bool = True
    ) -> CLIPOutput:
        """Encodes (B, L) token ids, L <= max_length; `attention_mask` (B, L): 1 for tokens, 0 for padding."""
        cfg = self.config
        if input_ids.shape[-1] > cfg.max_length:
            raise ValueError(f"sequence length {input_ids.shape[-1]} exceeds max_length {cfg.max_length}")
        embed_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        tok = nn.Embed(
            cfg.vocab_size,
            cfg.width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=embed_init,
            name="token_embedding",
        )(input_ids)
        pos_init = nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed"))
        pos = self.param("position_embedding", pos_init, (cfg.max_length, cfg.width), self.param_dtype)
        x = tok + pos[: input_ids.shape[-1]].astype(tok.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        block = nn.remat(CLIPBlock) if self.remat else CLIPBlock
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,),
            length=cfg.layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        mask = causal_mask(input_ids, attention_mask)
        blocks = stack(
            config=cfg,
            emit=output_hidden_states,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_backend=self.attention_backend,
            name="layers",
        )
        y, per_layer = blocks(x, mask)
        hidden_states = jnp.concatenate([x[None], per_layer], axis=0) if output_hidden_states else None

        last = LayerNorm(
            cfg.eps, use_scale=True, use_bias=True, param_dtype=self.param_dtype, name="final_norm"
        )(y)
        idx = eos_positions(input_ids, cfg.eos_token_id)
        pooled = jnp.take_along_axis(last, idx[:, None, None], axis=1)[:, 0]
        text_embeds = None
        if cfg.projection_dim is not None:
            proj = dense(
                cfg.projection_dim,
                ("embed", None),
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="text_projection",
            )
            text_embeds = proj(pooled)
        return CLIPOutput(
            last_hidden_state=last, pooled=pooled, text_embeds=text_embeds, hidden_states=hidden_states
        )
