"""The one attention function of sd3_jax and its backends.

`attention(q, k, v)` takes (B, L, N, K) queries and (B, S, N, K) keys/values and returns (B, L, N, K).
Backends: cuDNN flash attention on NVIDIA GPUs (`jax.nn.dot_product_attention(implementation="cudnn")`,
bf16/fp16 only), the Pallas flash kernel on TPU, and XLA everywhere else. `"auto"` picks one from the
platform and dtype; any backend can be forced.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "cudnn", "pallas")


def select_backend(dtype: jnp.dtype, platform: str | None = None) -> str:
    """The backend "auto" resolves to for inputs of `dtype` on `platform` (default: jax's default)."""
    platform = platform or jax.default_backend()
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if platform == "tpu" and _pallas_tpu_flash() is not None:
        return "pallas"
    return "xla"


@functools.cache
def _pallas_tpu_flash():
    try:
        from jax.experimental.pallas.ops.tpu import flash_attention
    except ImportError:
        return None
    return flash_attention.flash_attention


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None, backend: str = "auto"
) -> jax.Array:
    """Scaled dot-product attention, softmax in fp32: softmax(q k^T / sqrt(K)) v.

    Args:
      q: (B, L, N, K) queries.
      k: (B, S, N, K) keys.
      v: (B, S, N, K) values.
      mask: optional boolean mask broadcastable to (B, N, L, S), True where attending is allowed.
      backend: one of BACKENDS.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        backend = select_backend(q.dtype)
        if mask is not None and backend == "pallas":
            backend = "xla"
    if backend == "pallas":
        flash = _pallas_tpu_flash()
        if flash is None:
            raise ValueError("attention backend 'pallas' needs jax.experimental.pallas TPU kernels")
        if mask is not None:
            raise ValueError("attention backend 'pallas' takes no mask here")
        out = flash(
            q.transpose(0, 2, 1, 3),
            k.transpose(0, 2, 1, 3),
            v.transpose(0, 2, 1, 3),
            sm_scale=1.0 / math.sqrt(q.shape[-1]),
        )
        return out.transpose(0, 2, 1, 3)
    if backend == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    return _xla_attention(q, k, v, mask)


def _xla_attention(q, k, v, mask):
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("BLNK,BSNK->BNLS", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("BNLS,BSNK->BLNK", probs, v)
