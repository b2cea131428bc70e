"""CLIP and T5 text encoders from transformers layouts and Stability's files, and back.

Sources `load_clip` and `load_t5` read:
  - a transformers folder (`config.json` + safetensors, e.g. a diffusers `text_encoder/`, `text_encoder_2/`,
    `text_encoder_3/`), or the diffusers root holding those folders;
  - Stability's separate files: `clip_l.safetensors`, `clip_g.safetensors` (transformers `CLIPTextModel` keys
    under `text_model.`, clip_g with `text_projection.weight`) and `t5xxl_*.safetensors` (`T5EncoderModel`
    keys);
  - Stability's bundled single file, with the same keys under `text_encoders.clip_l.transformer.`,
    `text_encoders.clip_g.transformer.` and `text_encoders.t5xxl.transformer.`;
  - a dict of arrays or a `TensorSource`.
The config comes from `config.json` where one lies next to the weights, else from the tensor shapes.
Known non-parameter tensors (`position_ids`, CLIP's `logit_scale`, T5's tied `encoder.embed_tokens.weight`)
are named in IGNORED and skipped; any other unknown tensor is an error.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.convert.mapping import (
    CheckpointError,
    Rule,
    TensorSource,
    dense,
    open_tensors,
    rule,
    to_params,
    to_source,
)
from sd3_jax.nn.clip import CLIPConfig, CLIPTextEncoder
from sd3_jax.nn.t5 import T5Config, T5Encoder

# Which diffusers subfolder and which bundled prefix hold each encoder.
SUBFOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
BUNDLED_PREFIX = "text_encoders.{}.transformer."
# Tensors that are not parameters (or are tied copies of one), accepted and dropped.
IGNORED = {
    "clip": ("text_model.embeddings.position_ids", "embeddings.position_ids", "logit_scale"),
    "t5": ("encoder.embed_tokens.weight",),  # tied to shared.weight
}


def _ignore(name: str) -> Rule:
    """A rule that reads a known non-parameter tensor and makes nothing."""
    return Rule((name,), (), lambda a: (), lambda: ())


# ---------------------------------------------------------------------------------------------------------
# Tables.


def clip_rules(config: CLIPConfig, prefix: str = "text_model.") -> list[Rule]:
    """transformers CLIP text names (layers under `prefix`, `text_projection` at the root) -> our params."""
    nk = (config.heads, config.head_dim)
    rules = [
        rule(f"{prefix}embeddings.token_embedding.weight", ("token_embedding", "embedding")),
        rule(f"{prefix}embeddings.position_embedding.weight", ("position_embedding",)),
        rule(f"{prefix}final_layer_norm.weight", ("final_norm", "scale")),
        rule(f"{prefix}final_layer_norm.bias", ("final_norm", "bias")),
    ]
    for i in range(config.layers):
        p = f"{prefix}encoder.layers.{i}."
        for t in "qkv":
            rules += dense(f"{p}self_attn.{t}_proj", ("layers", t), i, out_shape=nk)
        rules += dense(f"{p}self_attn.out_proj", ("layers", "o"), i, in_shape=nk)
        rules += dense(f"{p}mlp.fc1", ("layers", "fc1"), i)
        rules += dense(f"{p}mlp.fc2", ("layers", "fc2"), i)
        for n in ("1", "2"):
            rules.append(rule(f"{p}layer_norm{n}.weight", ("layers", f"ln{n}", "scale"), i))
            rules.append(rule(f"{p}layer_norm{n}.bias", ("layers", f"ln{n}", "bias"), i))
    if config.projection_dim is not None:
        rules += dense("text_projection", ("text_projection",), bias=False)
    return rules


def t5_rules(config: T5Config, embed: str = "shared.weight") -> list[Rule]:
    """transformers `T5EncoderModel` names -> our params (`embed` names the token embedding's tensor)."""
    nk = (config.heads, config.d_kv)
    rules = [
        rule(embed, ("shared", "embedding")),
        rule(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            ("relative_attention_bias",),
        ),
        rule("encoder.final_layer_norm.weight", ("final_norm", "scale")),
    ]
    ff = ("wi_0", "wi_1", "wo") if config.gated else ("wi", "wo")
    for i in range(config.layers):
        p = f"encoder.block.{i}.layer."
        for t in "qkv":
            rules += dense(f"{p}0.SelfAttention.{t}", ("layers", t), i, bias=False, out_shape=nk)
        rules += dense(f"{p}0.SelfAttention.o", ("layers", "o"), i, bias=False, in_shape=nk)
        rules.append(rule(f"{p}0.layer_norm.weight", ("layers", "ln_attn", "scale"), i))
        for t in ff:
            rules += dense(f"{p}1.DenseReluDense.{t}", ("layers", t), i, bias=False)
        rules.append(rule(f"{p}1.layer_norm.weight", ("layers", "ln_ff", "scale"), i))
    return rules


# ---------------------------------------------------------------------------------------------------------
# Abstract params.


def _unbox(tree: Any) -> Any:
    import flax.linen as nn

    return nn.meta.unbox(tree)


def clip_abstract(config: CLIPConfig) -> dict[str, Any]:
    """The CLIP params tree as ShapeDtypeStructs (no memory)."""
    model = CLIPTextEncoder(config)
    ids = jax.ShapeDtypeStruct((1, config.max_length), jnp.int32)
    return _unbox(jax.eval_shape(lambda i: model.init(jax.random.key(0), i), ids)["params"])


def t5_abstract(config: T5Config) -> dict[str, Any]:
    """The T5 params tree as ShapeDtypeStructs (no memory)."""
    model = T5Encoder(config)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return _unbox(jax.eval_shape(lambda i: model.init(jax.random.key(0), i), ids)["params"])


def count_params(abstract: Mapping[str, Any]) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract)))


# ---------------------------------------------------------------------------------------------------------
# Finding the tensors.


def _resolve(source: Any, which: str) -> tuple[TensorSource, dict[str, Any] | None]:
    """The tensors of encoder `which` in `source`, and the transformers config.json beside them, if any."""
    hf_config = None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        sub = os.path.join(path, SUBFOLDERS[which])
        if os.path.isdir(path) and os.path.isdir(sub):
            path = sub
        cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else None
        if cfg_path and os.path.exists(cfg_path):
            with open(cfg_path) as f:
                hf_config = json.load(f)
        source = path
    src = open_tensors(source)
    bundled = sorted({m.group(1) for k in src.keys() if (m := re.match(r"text_encoders\.([^.]+)\.", k))})
    if bundled:
        prefix = BUNDLED_PREFIX.format(which)
        if not src.prefixes([prefix]):
            raise CheckpointError(f"{src.description} holds no {which} (no {prefix}*); it holds {bundled}")
        src = src.with_prefix(prefix)
    return src, hf_config


def _ignored(src: TensorSource, kind: str) -> list[Rule]:
    return [_ignore(n) for n in IGNORED[kind] if n in src]


def _layer_count(src: TensorSource, pattern: str) -> int:
    found = {int(m.group(1)) for k in src.keys() if (m := re.match(pattern, k))}
    if not found:
        raise CheckpointError(f"{src.description}: no layers found (pattern {pattern})")
    return max(found) + 1


def clip_config_from(src: TensorSource, hf_config: Mapping[str, Any] | None = None) -> tuple[CLIPConfig, str]:
    """The CLIP config and layer prefix ("text_model." or "" for a flattened `CLIPTextModel`) of `src`.

    Shapes give the sizes; heads are width / 64 (CLIP-L 12, bigG 20) and the activation is quick_gelu up to
    width 768 (OpenAI) and gelu above (OpenCLIP) unless a transformers config.json says otherwise.
    """
    prefix = "text_model." if any(k.startswith("text_model.") for k in src.keys()) else ""
    name = f"{prefix}embeddings.token_embedding.weight"
    if name not in src:
        raise CheckpointError(f"{src.description}: not a CLIP text model (no {name})")
    vocab, width = src.shape(name)
    proj = src.shape("text_projection.weight")[0] if "text_projection.weight" in src else None
    cfg = dict(
        vocab_size=vocab,
        width=width,
        layers=_layer_count(src, rf"{re.escape(prefix)}encoder\.layers\.(\d+)\."),
        heads=max(1, width // 64),
        mlp_dim=src.shape(f"{prefix}encoder.layers.0.mlp.fc1.weight")[0],
        max_length=src.shape(f"{prefix}embeddings.position_embedding.weight")[0],
        act="quick_gelu" if width <= 768 else "gelu",
        projection_dim=proj,
    )
    if hf_config is not None:
        hf = hf_config.get("text_config", hf_config)
        keys = dict(
            num_attention_heads="heads", hidden_act="act", layer_norm_eps="eps", eos_token_id="eos_token_id"
        )
        cfg.update({ours: hf[theirs] for theirs, ours in keys.items() if hf.get(theirs) is not None})
    return CLIPConfig(**cfg), prefix


def t5_config_from(src: TensorSource, hf_config: Mapping[str, Any] | None = None) -> T5Config:
    """The T5 config of `src`: sizes from shapes, max_distance 128 unless config.json says otherwise."""
    embed = "shared.weight" if "shared.weight" in src else "encoder.embed_tokens.weight"
    if embed not in src:
        raise CheckpointError(f"{src.description}: not a T5 encoder (no shared.weight)")
    vocab, d_model = src.shape(embed)
    rb = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    buckets, heads = src.shape(rb) if rb in src else (32, 64)
    inner = src.shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in src
    wi = "wi_0" if gated else "wi"
    cfg = dict(
        vocab_size=vocab,
        d_model=d_model,
        heads=heads,
        d_kv=inner // heads,
        d_ff=src.shape(f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight")[0],
        layers=_layer_count(src, r"encoder\.block\.(\d+)\."),
        num_buckets=buckets,
        gated=gated,
    )
    if hf_config is not None:
        keys = dict(relative_attention_max_distance="max_distance", layer_norm_epsilon="eps")
        cfg.update({ours: hf_config[theirs] for theirs, ours in keys.items() if theirs in hf_config})
        ff = hf_config.get("feed_forward_proj")
        if ff is not None:
            act = ff.split("-")[-1]
            act = {"gelu_python": "gelu", "gelu": "gelu_new" if ff.startswith("gated-") else "gelu"}.get(
                act, act
            )
            if act not in ("gelu_new", "gelu", "relu"):
                raise CheckpointError(f"T5 feed_forward_proj {ff!r} is not supported")
            cfg["act"], cfg["gated"] = act, ff.startswith("gated-")
    return T5Config(**cfg)


# ---------------------------------------------------------------------------------------------------------
# Loading and exporting.


def load_clip(
    source: Any, which: str = "clip_l", config: CLIPConfig | None = None, dtype: Any = None
) -> tuple[CLIPConfig, dict[str, Any]]:
    """CLIP text encoder params (numpy) and config from any layout in the module docstring.

    Args:
      source: folder, safetensors file, index json, dict or TensorSource.
      which: "clip_l" or "clip_g": picks the diffusers subfolder or the bundled prefix (ignored otherwise).
      config: overrides the inferred config (it must still fit the tensors).
      dtype: cast every tensor to this dtype (default: keep the file's).
    """
    if which not in ("clip_l", "clip_g"):
        raise ValueError(f"which must be 'clip_l' or 'clip_g', got {which!r}")
    src, hf_config = _resolve(source, which)
    inferred, prefix = clip_config_from(src, hf_config)
    config = config or inferred
    rules = clip_rules(config, prefix) + _ignored(src, "clip")
    return config, to_params(src, rules, clip_abstract(config), f"CLIP text encoder {which}", dtype)


def load_t5(
    source: Any, config: T5Config | None = None, dtype: Any = None
) -> tuple[T5Config, dict[str, Any]]:
    """T5 encoder params (numpy) and config from any layout in the module docstring; see `load_clip`."""
    src, hf_config = _resolve(source, "t5xxl")
    config = config or t5_config_from(src, hf_config)
    if "shared.weight" in src:
        rules = t5_rules(config) + _ignored(src, "t5")
    else:
        rules = t5_rules(config, embed="encoder.embed_tokens.weight")
    return config, to_params(src, rules, t5_abstract(config), "T5 encoder", dtype)


def export_clip(
    params: Mapping[str, Any], config: CLIPConfig, prefix: str = "text_model."
) -> dict[str, np.ndarray]:
    """Params -> transformers `CLIPTextModelWithProjection` tensors (`prefix=""`: flat `CLIPTextModel`)."""
    return dict(to_source(params, clip_rules(config, prefix)))


def export_t5(params: Mapping[str, Any], config: T5Config) -> dict[str, np.ndarray]:
    """Params -> transformers `T5EncoderModel` tensors (`shared.weight` and `encoder.*`)."""
    return dict(to_source(params, t5_rules(config)))


def hf_clip_config(config: CLIPConfig) -> dict[str, Any]:
    """A transformers `CLIPTextConfig` dict for `config`, to write next to exported weights."""
    return dict(
        model_type="clip_text_model",
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=config.mlp_dim,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        max_position_embeddings=config.max_length,
        hidden_act=config.act,
        layer_norm_eps=config.eps,
        projection_dim=config.projection_dim or config.width,
        eos_token_id=config.eos_token_id,
    )


def hf_t5_config(config: T5Config) -> dict[str, Any]:
    """A transformers `T5Config` dict for `config`."""
    act = (
        {"gelu_new": "gelu", "gelu": "gelu_python"}.get(config.act, config.act)
        if config.gated
        else config.act
    )
    return dict(
        model_type="t5",
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_kv=config.d_kv,
        d_ff=config.d_ff,
        num_layers=config.layers,
        num_heads=config.heads,
        relative_attention_num_buckets=config.num_buckets,
        relative_attention_max_distance=config.max_distance,
        layer_norm_epsilon=config.eps,
        feed_forward_proj=f"gated-{act}" if config.gated else act,
        is_encoder_decoder=False,
    )
