"""ControlNet checkpoints: diffusers' `SD3ControlNetModel` layout and Stability's SD3.5 ControlNet files.

Stability's files (`sd3.5_large_controlnet_{blur,canny,depth}.safetensors`) keep diffusers' names for the
embedders, `pos_embed_input` and `controlnet_blocks`, and `mmditx.py`'s for the blocks (fused `attn.qkv`,
`attn.proj`, `mlp.fc1/fc2`, `adaLN_modulation.1`); the oracle for that mapping is diffusers'
`scripts/convert_sd3_controlnet_to_diffusers.py`. Shapes give the config; a diffusers folder's `config.json`
gives what shapes cannot (`force_zeros_for_pooled_projection`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from sd3_jax.convert.mapping import CheckpointError, Rule, dense, open_tensors, rule, to_params, to_source
from sd3_jax.convert.mmdit import _conv_bwd, _conv_fwd, diffusers_block, split_qkv
from sd3_jax.nn.controlnet import ControlNet, ControlNetConfig

MARKER = "controlnet_blocks.0.weight"  # every SD3 ControlNet file has it, no other checkpoint does


def _location(cfg: ControlNetConfig, i: int) -> tuple[str, int]:
    for k, (start, stop, _) in enumerate(cfg.segments()):
        if start <= i < stop:
            return f"blocks_{k}", i - start
    raise IndexError(i)


def _common(cfg: ControlNetConfig) -> list[Rule]:
    rules = [
        rule("pos_embed_input.proj.weight", ("pos_embed_input", "kernel"), None, _conv_fwd, _conv_bwd),
        rule("pos_embed_input.proj.bias", ("pos_embed_input", "bias")),
        *dense("time_text_embed.timestep_embedder.linear_1", ("time_text_embed", "timestep_1")),
        *dense("time_text_embed.timestep_embedder.linear_2", ("time_text_embed", "timestep_2")),
        *dense("time_text_embed.text_embedder.linear_1", ("time_text_embed", "text_1")),
        *dense("time_text_embed.text_embedder.linear_2", ("time_text_embed", "text_2")),
    ]
    if cfg.own_pos_embed:
        rules += [
            rule("pos_embed.pos_embed", ("pos_embed", "pos_embed")),
            rule("pos_embed.proj.weight", ("pos_embed", "kernel"), None, _conv_fwd, _conv_bwd),
            rule("pos_embed.proj.bias", ("pos_embed", "bias")),
        ]
    if cfg.joint:
        rules += dense("context_embedder", ("context_embedder",))
    for i in range(cfg.depth):
        seg, j = _location(cfg, i)
        rules += dense(f"controlnet_blocks.{i}", (seg, "controlnet_block"), j)
    return rules


def diffusers_rules(cfg: ControlNetConfig) -> list[Rule]:
    """The table for diffusers' `SD3ControlNetModel` state dict names."""
    hk = (cfg.num_heads, cfg.head_dim)
    rules = _common(cfg)
    for i in range(cfg.depth):
        seg, j = _location(cfg, i)
        dual = i in cfg.dual_attention_layers
        rules += diffusers_block(
            f"transformer_blocks.{i}", (seg, "block"), j, hk, cfg.qk_norm, dual, False, cfg.joint
        )
    return rules


def sai_rules(cfg: ControlNetConfig) -> list[Rule]:
    """The table for Stability's SD3.5 ControlNet files (single-stream blocks only)."""
    if cfg.joint:
        raise CheckpointError("Stability's ControlNet layout has single-stream blocks only; use diffusers'")
    hk = (cfg.num_heads, cfg.head_dim)
    rules = _common(cfg)
    for i in range(cfg.depth):
        seg, j = _location(cfg, i)
        src, path = f"transformer_blocks.{i}", (seg, "block")
        rules += split_qkv((*path, "attn"), ("to_q", "to_k", "to_v"), j, hk, f"{src}.attn")
        rules += dense(f"{src}.attn.proj", (*path, "attn", "to_out"), j, in_shape=hk)
        rules += dense(f"{src}.adaLN_modulation.1", (*path, "norm1", "linear"), j)
        rules += dense(f"{src}.mlp.fc1", (*path, "ff", "fc1"), j)
        rules += dense(f"{src}.mlp.fc2", (*path, "ff", "fc2"), j)
    return rules


def is_controlnet(keys) -> bool:
    return MARKER in keys


def detect_layout(src) -> str:
    """ "sai" (fused qkv), "diffusers", or CheckpointError naming what was found."""
    keys = src.keys()
    if not is_controlnet(keys):
        sample = ", ".join(sorted(keys)[:5]) or "no tensors"
        raise CheckpointError(f"{src.description}: not an SD3 ControlNet ({MARKER} missing; found {sample})")
    return "sai" if any(k.endswith(".attn.qkv.weight") for k in keys) else "diffusers"


def infer_config(src, layout: str, **overrides: Any) -> ControlNetConfig:
    """The ControlNet config off tensor shapes; heads = width / 64 unless qk-norm scales say otherwise."""
    keys = src.keys()
    d, c_in, p, _ = src.shape("pos_embed_input.proj.weight")
    depth = 1 + max((int(m.group(1)) for k in keys if (m := re.match(r"controlnet_blocks\.(\d+)\.", k))))
    joint = "context_embedder.weight" in keys
    dual = tuple(
        sorted({int(m.group(1)) for k in keys if (m := re.match(r"transformer_blocks\.(\d+)\.attn2\.", k))})
    )
    qk_norm = any(k.endswith("attn.norm_q.weight") for k in keys)
    head_dim = src.shape(next(k for k in keys if k.endswith("attn.norm_q.weight")))[0] if qk_norm else 64
    if "num_heads" in overrides and "head_dim" not in overrides:
        head_dim = d // overrides["num_heads"]
    head_dim = overrides.get("head_dim", head_dim)
    if d % head_dim:
        raise CheckpointError(f"{src.description}: width {d} is not a multiple of the head width {head_dim}")
    table = 0
    if "pos_embed.pos_embed" in keys:
        n = src.shape("pos_embed.pos_embed")[1]
        table = math.isqrt(n)
        if table * table != n:
            raise CheckpointError(f"{src.description}: position table has {n} rows, not a square")
    elif joint:
        raise CheckpointError(f"{src.description}: a joint ControlNet without its position table")
    # A single-stream net has no latent patch embedding: its control input is taken as all latent channels.
    in_channels = src.shape("pos_embed.proj.weight")[1] if "pos_embed.proj.weight" in keys else c_in
    in_channels = overrides.get("in_channels", in_channels)
    fields = dict(
        depth=depth,
        num_heads=d // head_dim,
        head_dim=head_dim,
        patch_size=p,
        in_channels=in_channels,
        extra_channels=c_in - in_channels,
        context_dim=src.shape("context_embedder.weight")[1] if joint else None,
        pooled_dim=src.shape("time_text_embed.text_embedder.linear_1.weight")[1],
        pos_embed_max_size=table,
        qk_norm=qk_norm,
        dual_attention_layers=dual,
        force_zeros_for_pooled=joint,  # diffusers' defaults: True for the joint nets, False for SD3.5's
    )
    fields.update(overrides)
    if fields["extra_channels"] < 0:
        raise CheckpointError(
            f"{src.description}: control input has {c_in} channels, fewer than the latents'"
        )
    return ControlNetConfig(**fields)


CONFIG_FIELDS = {
    "num_layers": "depth",
    "num_attention_heads": "num_heads",
    "attention_head_dim": "head_dim",
    "patch_size": "patch_size",
    "in_channels": "in_channels",
    "extra_conditioning_channels": "extra_channels",
    "joint_attention_dim": "context_dim",
    "pooled_projection_dim": "pooled_dim",
    "sample_size": "sample_size",
    "dual_attention_layers": "dual_attention_layers",
    "force_zeros_for_pooled_projection": "force_zeros_for_pooled",
}


def config_from_diffusers(d: Mapping[str, Any]) -> dict[str, Any]:
    """ControlNetConfig fields from a diffusers ControlNet `config.json` (what shapes cannot say)."""
    out = {ours: d[theirs] for theirs, ours in CONFIG_FIELDS.items() if theirs in d}
    if "dual_attention_layers" in out:
        out["dual_attention_layers"] = tuple(out["dual_attention_layers"])
    if d.get("qk_norm") not in (None, "rms_norm"):
        raise CheckpointError(
            f"unsupported qk_norm {d['qk_norm']!r} in the ControlNet config (only rms_norm)"
        )
    if d.get("use_pos_embed", True) is False:
        out["pos_embed_max_size"] = 0
    elif d.get("pos_embed_max_size"):
        out["pos_embed_max_size"] = d["pos_embed_max_size"]
    return out


def config_to_diffusers(cfg: ControlNetConfig) -> dict[str, Any]:
    """A diffusers `config.json` for `cfg`: `SD3ControlNetModel.from_pretrained` builds the same net."""
    out = {theirs: getattr(cfg, ours) for theirs, ours in CONFIG_FIELDS.items()}
    out["dual_attention_layers"] = list(cfg.dual_attention_layers)
    out["caption_projection_dim"] = cfg.width
    out["qk_norm"] = "rms_norm" if cfg.qk_norm else None
    out["out_channels"] = cfg.in_channels
    out["use_pos_embed"] = cfg.own_pos_embed
    out["pos_embed_max_size"] = cfg.pos_embed_max_size or None
    out["pos_embed_type"] = "sincos" if cfg.own_pos_embed else None
    return {"_class_name": "SD3ControlNetModel", **out}


def example_inputs(cfg: ControlNetConfig) -> list[jax.ShapeDtypeStruct]:
    """The smallest inputs ControlNet(cfg) takes (for init): x, control latents, t, pooled[, context]."""
    s, d = cfg.patch_size, cfg.width
    x = (1, s, s, cfg.in_channels) if cfg.own_pos_embed else (1, 1, d)
    shapes = [x, (1, s, s, cfg.in_channels + cfg.extra_channels), (1,), (1, cfg.pooled_dim)]
    shapes += [(1, 1, cfg.context_dim)] if cfg.joint else []
    return [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]


def abstract_params(cfg: ControlNetConfig, boxed: bool = False) -> dict[str, Any]:
    """Param shapes and dtypes of ControlNet(cfg), at no memory; `boxed` keeps the logical axis names."""
    import flax.linen as nn

    init = lambda *a: ControlNet(cfg).init(jax.random.key(0), *a)["params"]  # noqa: E731
    tree = jax.eval_shape(init, *example_inputs(cfg))
    if boxed:
        return tree
    # `.value`, not `nn.meta.unbox`: unboxing under a mesh would add a sharding constraint.
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def _folder(source: Any) -> tuple[Any, dict[str, Any]]:
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        folder = os.fspath(source)
        cfg_path = os.path.join(folder, "config.json")
        if os.path.exists(cfg_path):
            try:
                with open(cfg_path) as f:
                    return folder, config_from_diffusers(json.load(f))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
        return folder, {}
    return source, {}


def read_controlnet(source: Any, dtype: Any = None, **overrides: Any) -> tuple[ControlNetConfig, dict]:
    """A ControlNet checkpoint in a PyTorch layout to (config, params with numpy leaves).

    `source`: a diffusers ControlNet folder or its `.safetensors`, a Stability SD3.5 ControlNet file, or a
    dict of arrays; `dtype` casts every tensor; `overrides` are ControlNetConfig fields (e.g. attention).
    """
    path, fields = _folder(source)
    src = open_tensors(path)
    layout = detect_layout(src)
    cfg = infer_config(src, layout, **{**fields, **overrides})
    rules = diffusers_rules(cfg) if layout == "diffusers" else sai_rules(cfg)
    what = f"ControlNet {layout} layout ({cfg.depth} blocks)"
    return cfg, to_params(src, rules, abstract_params(cfg), what, dtype)


def export_controlnet(params: Mapping[str, Any], cfg: ControlNetConfig, layout: str = "diffusers") -> dict:
    """Params back to diffusers' names, or Stability's ("sai", single-stream nets only)."""
    if layout not in ("diffusers", "sai"):
        raise ValueError(f"export layout must be 'diffusers' or 'sai', got {layout!r}")
    rules = diffusers_rules(cfg) if layout == "diffusers" else sai_rules(cfg)
    return dict(to_source(params, rules))


__all__ = [
    "abstract_params",
    "config_from_diffusers",
    "config_to_diffusers",
    "export_controlnet",
    "infer_config",
    "is_controlnet",
    "read_controlnet",
]
