"""SD3 text conditioning: joining the three encoders and per-encoder condition dropout for training.

SD3 conditions on CLIP-L/14 and OpenCLIP bigG/14 penultimate hidden states, T5-XXL hidden states and the
two CLIPs' pooled outputs (Esser et al. 2024, fig. 2):

    context = [pad_to_T5_width(CLIP-L || CLIP-G along channels) ; T5 along the sequence]   (B, 77 + L, 4096)
    pooled  = CLIP-L pooled || CLIP-G pooled                                                (B, 768 + 1280)

as diffusers' StableDiffusion3Pipeline.encode_prompt and Stability's sd3_infer build them. The paper trains
with each encoder dropped independently (`DEFAULT_DROP_PROB`, 46.4%), which makes CFG possible and lets T5
be left out at inference. A dropped encoder's hidden states and pooled output are zeroed, per example.
All widths and lengths come from the arrays, so tiny test configs work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

ENCODERS = ("clip_l", "clip_g", "t5")  # column order of the keep mask
DEFAULT_DROP_PROB = 0.464


def join_context(clip_l: Array, clip_g: Array, t5: Array) -> Array:
    """(B, Lc, Dl), (B, Lc, Dg), (B, Lt, Dt) -> (B, Lc + Lt, Dt).

    The CLIPs are joined on channels and zero-padded to the T5 width; T5 follows along the sequence.
    """
    clip = jnp.concatenate([clip_l, clip_g], axis=-1)
    pad = t5.shape[-1] - clip.shape[-1]
    if pad < 0:
        raise ValueError(f"joined CLIP width {clip.shape[-1]} exceeds the T5 width {t5.shape[-1]}")
    clip = jnp.pad(clip, ((0, 0),) * (clip.ndim - 1) + ((0, pad),))
    return jnp.concatenate([clip, t5.astype(clip.dtype)], axis=-2)


def join_pooled(pooled_l: Array, pooled_g: Array) -> Array:
    """(B, Dl), (B, Dg) -> (B, Dl + Dg)."""
    return jnp.concatenate([pooled_l, pooled_g], axis=-1)


def encoder_keep_mask(key: Array, batch_size: int, p: float = DEFAULT_DROP_PROB) -> Array:
    """(B, 3) bool, True where an encoder is kept; each of CLIP-L, CLIP-G, T5 dropped i.i.d. with prob. p."""
    return jax.random.uniform(key, (batch_size, len(ENCODERS))) >= p


def drop_and_join(
    key: Array,
    clip_l: Array,
    clip_g: Array,
    t5: Array,
    pooled_l: Array,
    pooled_g: Array,
    p: float = DEFAULT_DROP_PROB,
) -> tuple[Array, Array, Array]:
    """Per-encoder condition dropout, then `join_context` and `join_pooled`.

    Zeroes, per example, the hidden states of every dropped encoder and, for the CLIPs, its pooled half.
    Returns (context (B, Lc + Lt, Dt), pooled (B, Dl + Dg), keep (B, 3) bool in `ENCODERS` order).
    """
    keep = encoder_keep_mask(key, clip_l.shape[0], p)

    def gate(x: Array, k: Array) -> Array:
        return jnp.where(k.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))

    kl, kg, kt = keep[:, 0], keep[:, 1], keep[:, 2]
    context = join_context(gate(clip_l, kl), gate(clip_g, kg), gate(t5, kt))
    pooled = join_pooled(gate(pooled_l, kl), gate(pooled_g, kg))
    return context, pooled, keep
