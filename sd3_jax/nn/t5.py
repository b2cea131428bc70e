"""The T5 v1.1 encoder (XXL is SD3's `text_encoder_3`), matching transformers' `T5EncoderModel`.

Pre-RMS-norm blocks with a gated-GELU feed-forward, attention without score scaling, and one bucketed relative
position bias, learned in the first layer and shared by all of them.

bf16: T5 v1.1 activations grow large and fp16 overflows (transformers clamps fp16 and keeps `wo` in fp32
through `_keep_in_fp32_modules`). Here the residual stream is always float32, attention logits accumulate
in float32, `wo` computes in float32 (`wo_dtype`), and only the norms' outputs are cast to the compute dtype
for the matmuls; a bf16 run stays finite and close to fp32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.nn.layers import RMSNorm, dense

Dtype = Any
ACTIVATIONS = ("gelu_new", "gelu", "relu")


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128  # rows of the shared token embedding
    d_model: int = 4096  # model width D
    heads: int = 64  # attention heads N
    d_kv: int = 64  # head width K (heads * d_kv need not equal d_model)
    d_ff: int = 10240  # feed-forward width F
    layers: int = 24  # encoder blocks
    num_buckets: int = 32  # relative position buckets (half per direction)
    max_distance: int = 128  # distances at or beyond this share the last bucket
    eps: float = 1e-6  # RMS norm epsilon
    act: str = "gelu_new"  # feed-forward activation; gelu_new is tanh-approximate GELU
    gated: bool = True  # act(wi_0 x) * wi_1 x (v1.1 "gated-gelu"); False: act(wi x)

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act {self.act!r} is not one of {ACTIVATIONS}")
        if self.num_buckets % 4:
            raise ValueError(f"num_buckets {self.num_buckets} must be a multiple of 4")

    @classmethod
    def t5_xxl(cls, **override) -> T5Config:
        """google/t5-v1_1-xxl encoder, 4.76B parameters."""
        return cls(**override)

    @classmethod
    def tiny(cls, **override) -> T5Config:
        """A two-layer model for tests; 8 buckets and max distance 16, so 24 tokens reach the log buckets."""
        kw = dict(
            vocab_size=101, d_model=32, heads=4, d_kv=8, d_ff=48, layers=2, num_buckets=8, max_distance=16
        )
        return cls(**{**kw, **override})


@flax.struct.dataclass
class T5Output:
    last_hidden_state: jax.Array  # (B, L, D) after the final RMS norm
    hidden_states: jax.Array | None  # (layers + 1, B, L, D) embeddings, then each block; last one normed


def relative_position_buckets(
    query_length: int, key_length: int, num_buckets: int, max_distance: int
) -> np.ndarray:
    """(L, S) bidirectional bucket of key position minus query position (Mesh TensorFlow, T5 paper sec. 2.1).

    Half the buckets per direction; of those, half are exact distances and half log-spaced up to max_distance.
    Computed on the host in float32, as transformers does, so the bucket edges agree exactly.
    """
    rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    n = num_buckets // 2
    buckets = (rel > 0).astype(np.int32) * n
    dist = np.abs(rel)
    exact = n // 2
    scaled = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(exact))
    scaled = scaled / np.float32(math.log(max_distance / exact)) * np.float32(n - exact)
    large = np.minimum(exact + scaled.astype(np.int32), n - 1)
    return buckets + np.where(dist < exact, dist, large).astype(np.int32)


def _attention_with_bias(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """softmax(q k^T + bias) v with T5's unscaled scores; logits and softmax in fp32."""
    logits = jnp.einsum("BLNK,BSNK->BNLS", q, k, preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("BNLS,BSNK->BLNK", probs, v)


def _act(name: str, x: jax.Array) -> jax.Array:
    if name == "gelu_new":
        return nn.gelu(x, approximate=True)
    if name == "gelu":
        return nn.gelu(x, approximate=False)
    return nn.relu(x)


class T5Block(nn.Module):
    """x + attn(norm(x)) then x + ff(norm(x)), on a float32 residual stream."""

    config: T5Config
    emit: bool = False  # also return the block output as the scan's per-layer output
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    wo_dtype: Dtype = jnp.float32  # compute dtype of the feed-forward output projection

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        cast = (lambda t: t.astype(self.dtype)) if self.dtype is not None else (lambda t: t)

        h = cast(RMSNorm(cfg.eps, param_dtype=self.param_dtype, name="ln_attn")(x))
        q, k, v = (dense((cfg.heads, cfg.d_kv), ("embed", "heads", "kv"), name=n, **kw)(h) for n in "qkv")
        q, k, v = (nn.with_logical_constraint(t, ("batch", "length", "heads", "kv")) for t in (q, k, v))
        a = _attention_with_bias(q, k, v, bias)
        o = dense(cfg.d_model, ("heads", "kv", "embed"), axis=(-2, -1), name="o", **kw)(a)
        x = x + o.astype(jnp.float32)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        h = cast(RMSNorm(cfg.eps, param_dtype=self.param_dtype, name="ln_ff")(x))
        if cfg.gated:
            g = dense(cfg.d_ff, ("embed", "mlp"), name="wi_0", **kw)(h)
            u = dense(cfg.d_ff, ("embed", "mlp"), name="wi_1", **kw)(h)
            h = _act(cfg.act, g) * u
        else:
            h = _act(cfg.act, dense(cfg.d_ff, ("embed", "mlp"), name="wi", **kw)(h))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        out = dense(cfg.d_model, ("mlp", "embed"), name="wo", **{**kw, "dtype": self.wo_dtype})(h)
        x = x + out.astype(jnp.float32)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, (x if self.emit else None)


class T5Encoder(nn.Module):
    """T5 encoder stack; `__call__(input_ids, attention_mask)` -> T5Output."""

    config: T5Config
    dtype: Dtype = None  # compute dtype of the matmuls (None: from params and inputs); residual stays fp32
    param_dtype: Dtype = jnp.float32
    wo_dtype: Dtype = jnp.float32  # compute dtype of each block's `wo` (transformers keeps it fp32)
    remat: bool = False  # rematerialize each block in the backward pass

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> T5Output:
        """Encodes (B, L) token ids; `attention_mask` (B, L) is 1 for tokens, 0 for padding (keys only)."""
        cfg = self.config
        embed_init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed"))
        x = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            param_dtype=self.param_dtype,
            embedding_init=embed_init,
            name="shared",
        )(input_ids).astype(jnp.float32)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        length = input_ids.shape[-1]
        rb_init = nn.with_logical_partitioning(nn.initializers.normal(cfg.d_model**-0.5), (None, "heads"))
        table = self.param("relative_attention_bias", rb_init, (cfg.num_buckets, cfg.heads), self.param_dtype)
        buckets = relative_position_buckets(length, length, cfg.num_buckets, cfg.max_distance)
        bias = jnp.transpose(table.astype(jnp.float32)[buckets], (2, 0, 1))[None]  # (1, N, L, S)
        if attention_mask is not None:
            pad = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
            bias = bias + pad
        bias = nn.with_logical_constraint(bias, ("batch", "heads", "length", None))

        block = nn.remat(T5Block) if self.remat else T5Block
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,),
            length=cfg.layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        blocks = stack(
            config=cfg,
            emit=output_hidden_states,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            wo_dtype=self.wo_dtype,
            name="layers",
        )
        y, per_layer = blocks(x, bias)
        y = RMSNorm(cfg.eps, param_dtype=self.param_dtype, name="final_norm")(y)
        if self.dtype is not None:
            y = y.astype(self.dtype)
        hidden_states = None
        if output_hidden_states:
            hidden_states = jnp.concatenate([x[None], per_layer[:-1], y[None].astype(x.dtype)], axis=0)
        return T5Output(last_hidden_state=y, hidden_states=hidden_states)
