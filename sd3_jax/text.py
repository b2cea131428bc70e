"""Prompt encoding for SD3: CLIP-L, CLIP-G and T5 states joined the way diffusers' pipeline joins them.

`TextEncoders.encode_prompt` returns what `StableDiffusion3Pipeline.encode_prompt` returns for the same
components: the CLIP-L and CLIP-G penultimate hidden states (before the final norm) joined along channels and
zero-padded to the T5 width, then the T5 states appended along the sequence; pooled = CLIP-L projected pooled
and CLIP-G projected pooled joined along channels. Without T5 its part is zeros of width
`joint_attention_dim`. Negative prompts always use the penultimate layer (the pipeline ignores clip_skip
for them). Tokenizers are transformers' (`CLIPTokenizer`, `T5TokenizerFast`) from a diffusers layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.convert.text_encoders import load_clip, load_t5
from sd3_jax.nn.clip import CLIPConfig, CLIPTextEncoder
from sd3_jax.nn.t5 import T5Config, T5Encoder

logger = logging.getLogger(__name__)
NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5"}


@dataclasses.dataclass(frozen=True)
class Encoder:
    tokenizer: Any  # a transformers tokenizer
    config: CLIPConfig | T5Config
    params: Any  # the encoder's params tree


@functools.partial(jax.jit, static_argnames=("config", "dtype", "skip"))
def _clip_apply(params, ids, *, config: CLIPConfig, dtype, skip: int):
    out = CLIPTextEncoder(config, dtype=dtype).apply({"params": params}, ids, output_hidden_states=True)
    pooled = out.text_embeds if out.text_embeds is not None else out.pooled  # no projection: identity
    return out.hidden_states[-(skip + 2)], pooled


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _t5_apply(params, ids, *, config: T5Config, dtype):
    return T5Encoder(config, dtype=dtype).apply({"params": params}, ids).last_hidden_state


def _as_list(prompt: str | Sequence[str]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


class TextEncoders:
    """The three SD3 text encoders with their tokenizers; T5 is optional."""

    def __init__(
        self,
        clip_l: Encoder,
        clip_g: Encoder,
        t5: Encoder | None = None,
        joint_attention_dim: int = 4096,
        dtype: Any = None,
    ):
        """`joint_attention_dim` sizes the zeros that stand in for T5; `dtype` is the compute and output
        dtype (None: the params' dtype)."""

        def put(e: Encoder | None) -> Encoder | None:
            return None if e is None else dataclasses.replace(e, params=jax.device_put(e.params))

        self.clip_l, self.clip_g, self.t5 = put(clip_l), put(clip_g), put(t5)
        self.joint_attention_dim = joint_attention_dim
        self.dtype = dtype
        self.out_dtype = dtype or self.clip_l.params["token_embedding"]["embedding"].dtype
        max_len = getattr(clip_l.tokenizer, "model_max_length", None)
        self.tokenizer_max_length = max_len if max_len and max_len < 100_000 else 77

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        weights: Any = None,
        use_t5: bool = True,
        dtype: Any = None,
        param_dtype: Any = None,
    ) -> TextEncoders:
        """Tokenizers from a diffusers folder (`tokenizer/`, `tokenizer_2/`, `tokenizer_3/`), weights from
        `weights`: the same folder (default), Stability's bundled single file, or a dict
        {"clip_l": ..., "clip_g": ..., "t5xxl": ...} of separate files. `param_dtype` casts the weights."""
        from transformers import CLIPTokenizer, T5TokenizerFast

        path = os.fspath(path)
        weights = path if weights is None else weights
        src = (lambda k: weights[k]) if isinstance(weights, Mapping) else (lambda k: weights)
        encoders = {}
        for which, folder in (("clip_l", "tokenizer"), ("clip_g", "tokenizer_2")):
            config, params = load_clip(src(which), which=which, dtype=param_dtype)
            encoders[which] = Encoder(
                CLIPTokenizer.from_pretrained(os.path.join(path, folder)), config, params
            )
        t5 = None
        t5_tokenizer = os.path.join(path, "tokenizer_3")
        has_t5_weights = not isinstance(weights, Mapping) or "t5xxl" in weights
        if use_t5 and has_t5_weights and os.path.isdir(t5_tokenizer):
            config, params = load_t5(src("t5xxl"), dtype=param_dtype)
            t5 = Encoder(T5TokenizerFast.from_pretrained(t5_tokenizer), config, params)
        joint = t5.config.d_model if t5 is not None else 4096
        transformer_cfg = os.path.join(path, "transformer", "config.json")
        if os.path.exists(transformer_cfg):
            with open(transformer_cfg) as f:
                joint = json.load(f).get("joint_attention_dim", joint)
        return cls(encoders["clip_l"], encoders["clip_g"], t5, joint_attention_dim=joint, dtype=dtype)

    # -----------------------------------------------------------------------------------------------------

    def _tokenize(self, which: str, tokenizer: Any, prompts: list[str], max_length: int) -> np.ndarray:
        """Pads and truncates to `max_length`, warning with the number of tokens each long prompt lost."""
        ids = tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
        ).input_ids
        full = tokenizer(prompts, padding=False, truncation=False, verbose=False).input_ids
        for i, f in enumerate(full):
            if len(f) > max_length:
                dropped = tokenizer.decode(f[max_length - 1 : -1])
                logger.warning(
                    f"{NAMES[which]} takes at most {max_length} tokens: prompt {i} had {len(f)}, so its last "
                    f"{len(f) - max_length} were dropped: {dropped!r}"
                )
        return ids

    def _clip(self, which: str, prompts: list[str], n: int, clip_skip: int | None):
        enc = getattr(self, which)
        ids = self._tokenize(which, enc.tokenizer, prompts, self.tokenizer_max_length)
        skip = 0 if clip_skip is None else clip_skip
        if not 0 <= skip <= enc.config.layers - 1:
            raise ValueError(f"clip_skip {clip_skip} out of range for {enc.config.layers} layers")
        hidden, pooled = _clip_apply(
            enc.params, jnp.asarray(ids), config=enc.config, dtype=self.dtype, skip=skip
        )
        hidden, pooled = hidden.astype(self.out_dtype), pooled.astype(self.out_dtype)
        return jnp.repeat(hidden, n, axis=0), jnp.repeat(pooled, n, axis=0)

    def _t5(self, prompts: list[str], n: int, max_sequence_length: int) -> jax.Array:
        if self.t5 is None:
            shape = (len(prompts) * n, max_sequence_length, self.joint_attention_dim)
            return jnp.zeros(shape, self.out_dtype)
        ids = self._tokenize("t5", self.t5.tokenizer, prompts, max_sequence_length)
        states = _t5_apply(self.t5.params, jnp.asarray(ids), config=self.t5.config, dtype=self.dtype)
        return jnp.repeat(states.astype(self.out_dtype), n, axis=0)

    def _encode(self, prompts, prompts_2, prompts_3, n, clip_skip, max_sequence_length):
        l_states, l_pooled = self._clip("clip_l", prompts, n, clip_skip)
        g_states, g_pooled = self._clip("clip_g", prompts_2, n, clip_skip)
        clip_states = jnp.concatenate([l_states, g_states], axis=-1)
        t5_states = self._t5(prompts_3, n, max_sequence_length)
        width = t5_states.shape[-1]
        if clip_states.shape[-1] > width:
            raise ValueError(f"CLIP width {clip_states.shape[-1]} exceeds the T5 width {width}")
        clip_states = jnp.pad(clip_states, ((0, 0), (0, 0), (0, width - clip_states.shape[-1])))
        return jnp.concatenate([clip_states, t5_states], axis=-2), jnp.concatenate([l_pooled, g_pooled], -1)

    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        clip_skip: int | None = None,
        max_sequence_length: int = 256,
        prompt_2: str | Sequence[str] | None = None,
        prompt_3: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        negative_prompt_3: str | Sequence[str] | None = None,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
        """(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled), as diffusers' SD3 pipeline.

        prompt_embeds: (B * n, 77 + max_sequence_length, T5 width); pooled: (B * n, CLIP-L + CLIP-G width).
        `prompt_2` / `prompt_3` go to CLIP-G / T5 (default: `prompt`). The negatives are None without
        classifier-free guidance; a missing negative prompt is "".
        """
        prompts = _as_list(prompt)
        batch = len(prompts)
        p2, p3 = _as_list(prompt_2 or prompts), _as_list(prompt_3 or prompts)
        n = num_images_per_prompt
        embeds, pooled = self._encode(prompts, p2, p3, n, clip_skip, max_sequence_length)
        if not do_classifier_free_guidance:
            return embeds, None, pooled, None
        neg = negative_prompt or ""
        neg2, neg3 = negative_prompt_2 or neg, negative_prompt_3 or neg
        negs = [batch * [x] if isinstance(x, str) else list(x) for x in (neg, neg2, neg3)]
        if any(len(x) != batch for x in negs):
            raise ValueError(f"negative_prompt has batch size {len(negs[0])}, prompt has {batch}")
        neg_embeds, neg_pooled = self._encode(*negs, n, None, max_sequence_length)
        return embeds, neg_embeds, pooled, neg_pooled
