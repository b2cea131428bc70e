"""MMDiT checkpoints: diffusers' `SD3Transformer2DModel` and Stability's single-file layouts, both ways.

Two tables, one per source layout, built from the config: each maps source tensors to the scanned params
of `sd3_jax.nn.MMDiT` (block i lives at layer i - start of its segment). Stability fuses q/k/v into `qkv`
and stores adaLN (shift, scale) where diffusers stores (scale, shift) in the continuous norms; the
diffusers oracle for that layout is `convert_sd3_transformer_checkpoint_to_diffusers`.
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
import numpy as np

from sd3_jax.convert.mapping import (
    CheckpointError,
    Rule,
    Target,
    TensorSource,
    dense,
    open_tensors,
    rule,
    split,
    swap_halves,
    to_params,
    to_source,
)
from sd3_jax.nn.mmdit import MMDiT, MMDiTConfig

SAI_PREFIX = "model.diffusion_model."


def _conv_fwd(w):  # torch (D, C, p, p) -> (p, p, C, D)
    return w.transpose(2, 3, 1, 0)


def _conv_bwd(k):
    return k.transpose(3, 2, 0, 1)


def _block_location(cfg: MMDiTConfig, i: int) -> tuple[str, int]:
    for k, (start, stop, _, _) in enumerate(cfg.segments()):
        if start <= i < stop:
            return f"blocks_{k}", i - start
    raise IndexError(i)


def diffusers_rules(cfg: MMDiTConfig) -> list[Rule]:
    """The table for diffusers' `SD3Transformer2DModel` state dict names."""
    hk = (cfg.num_heads, cfg.head_dim)
    rules = [
        rule("pos_embed.pos_embed", ("pos_embed", "pos_embed")),
        rule("pos_embed.proj.weight", ("pos_embed", "kernel"), None, _conv_fwd, _conv_bwd),
        rule("pos_embed.proj.bias", ("pos_embed", "bias")),
        *dense("time_text_embed.timestep_embedder.linear_1", ("time_text_embed", "timestep_1")),
        *dense("time_text_embed.timestep_embedder.linear_2", ("time_text_embed", "timestep_2")),
        *dense("time_text_embed.text_embedder.linear_1", ("time_text_embed", "text_1")),
        *dense("time_text_embed.text_embedder.linear_2", ("time_text_embed", "text_2")),
        *dense("context_embedder", ("context_embedder",)),
        *dense("norm_out.linear", ("norm_out", "linear")),
        *dense("proj_out", ("proj_out",)),
    ]
    for i in range(cfg.depth):
        seg, j = _block_location(cfg, i)
        pre_only, dual = i == cfg.depth - 1, i in cfg.dual_attention_layers
        rules += diffusers_block(f"transformer_blocks.{i}", (seg,), j, hk, cfg.qk_norm, dual, pre_only)
    return rules


def diffusers_block(
    src: str, path: tuple, j: int, hk, qk_norm: bool, dual: bool, pre_only: bool, joint: bool = True
) -> list[Rule]:
    """One diffusers `JointTransformerBlock` (or, not `joint`, `SD3SingleTransformerBlock`) at `src` to the
    params at `path` + layer j of a scanned segment."""
    rules = []
    attns = [("attn", joint)] + ([("attn2", False)] if dual else [])
    for attn, with_text in attns:
        a = f"{src}.{attn}"
        for name in ("to_q", "to_k", "to_v"):
            rules += dense(f"{a}.{name}", (*path, attn, name), j, out_shape=hk)
        rules += dense(f"{a}.to_out.0", (*path, attn, "to_out"), j, in_shape=hk)
        norms = ["norm_q", "norm_k"]
        if with_text:
            for name in ("add_q_proj", "add_k_proj", "add_v_proj"):
                rules += dense(f"{a}.{name}", (*path, attn, name), j, out_shape=hk)
            if not pre_only:
                rules += dense(f"{a}.to_add_out", (*path, attn, "to_add_out"), j, in_shape=hk)
            norms += ["norm_added_q", "norm_added_k"]
        if qk_norm:
            rules += [rule(f"{a}.{n}.weight", (*path, attn, n, "scale"), j) for n in norms]
    rules += dense(f"{src}.norm1.linear", (*path, "norm1", "linear"), j)
    if joint:
        rules += dense(f"{src}.norm1_context.linear", (*path, "norm1_context", "linear"), j)
    streams = ["ff"] + ([] if pre_only or not joint else ["ff_context"])
    for name in streams:
        rules += dense(f"{src}.{name}.net.0.proj", (*path, name, "fc1"), j)
        rules += dense(f"{src}.{name}.net.2", (*path, name, "fc2"), j)
    return rules


def split_qkv(path: tuple[str, ...], names: tuple[str, str, str], j: int, hk, src: str) -> list[Rule]:
    def w_fwd(w):
        return w.T.reshape(w.shape[1], *hk)

    def w_bwd(k):
        return k.reshape(k.shape[0], -1).T

    targets_w = [Target(path + (n, "kernel"), j) for n in names]
    targets_b = [Target(path + (n, "bias"), j) for n in names]
    return [
        split(f"{src}.qkv.weight", targets_w, w_fwd, w_bwd),
        split(f"{src}.qkv.bias", targets_b, lambda b: b.reshape(hk), lambda b: b.reshape(-1)),
    ]


def sai_rules(cfg: MMDiTConfig) -> list[Rule]:
    """The table for Stability's single-file names (`mmditx.py`), without the `model.diffusion_model.`."""
    hk = (cfg.num_heads, cfg.head_dim)
    swap_t = lambda w: swap_halves(w).T
    t_swap = lambda k: swap_halves(k.T)
    rules = [
        rule("pos_embed", ("pos_embed", "pos_embed")),
        rule("x_embedder.proj.weight", ("pos_embed", "kernel"), None, _conv_fwd, _conv_bwd),
        rule("x_embedder.proj.bias", ("pos_embed", "bias")),
        *dense("t_embedder.mlp.0", ("time_text_embed", "timestep_1")),
        *dense("t_embedder.mlp.2", ("time_text_embed", "timestep_2")),
        *dense("y_embedder.mlp.0", ("time_text_embed", "text_1")),
        *dense("y_embedder.mlp.2", ("time_text_embed", "text_2")),
        *dense("context_embedder", ("context_embedder",)),
        rule("final_layer.adaLN_modulation.1.weight", ("norm_out", "linear", "kernel"), None, swap_t, t_swap),
        rule(
            "final_layer.adaLN_modulation.1.bias",
            ("norm_out", "linear", "bias"),
            None,
            swap_halves,
            swap_halves,
        ),
        *dense("final_layer.linear", ("proj_out",)),
    ]
    for i in range(cfg.depth):
        seg, j = _block_location(cfg, i)
        src, pre_only = f"joint_blocks.{i}", i == cfg.depth - 1
        xb, cb = f"{src}.x_block", f"{src}.context_block"
        rules += split_qkv((seg, "attn"), ("to_q", "to_k", "to_v"), j, hk, f"{xb}.attn")
        rules += dense(f"{xb}.attn.proj", (seg, "attn", "to_out"), j, in_shape=hk)
        rules += split_qkv((seg, "attn"), ("add_q_proj", "add_k_proj", "add_v_proj"), j, hk, f"{cb}.attn")
        if not pre_only:
            rules += dense(f"{cb}.attn.proj", (seg, "attn", "to_add_out"), j, in_shape=hk)
        if cfg.qk_norm:
            rules += [
                rule(f"{xb}.attn.ln_q.weight", (seg, "attn", "norm_q", "scale"), j),
                rule(f"{xb}.attn.ln_k.weight", (seg, "attn", "norm_k", "scale"), j),
                rule(f"{cb}.attn.ln_q.weight", (seg, "attn", "norm_added_q", "scale"), j),
                rule(f"{cb}.attn.ln_k.weight", (seg, "attn", "norm_added_k", "scale"), j),
            ]
        if i in cfg.dual_attention_layers:
            rules += split_qkv((seg, "attn2"), ("to_q", "to_k", "to_v"), j, hk, f"{xb}.attn2")
            rules += dense(f"{xb}.attn2.proj", (seg, "attn2", "to_out"), j, in_shape=hk)
            if cfg.qk_norm:
                rules += [
                    rule(f"{xb}.attn2.ln_q.weight", (seg, "attn2", "norm_q", "scale"), j),
                    rule(f"{xb}.attn2.ln_k.weight", (seg, "attn2", "norm_k", "scale"), j),
                ]
        rules += dense(f"{xb}.adaLN_modulation.1", (seg, "norm1", "linear"), j)
        if pre_only:
            path = (seg, "norm1_context", "linear")
            rules += [
                rule(f"{cb}.adaLN_modulation.1.weight", path + ("kernel",), j, swap_t, t_swap),
                rule(f"{cb}.adaLN_modulation.1.bias", path + ("bias",), j, swap_halves, swap_halves),
            ]
        else:
            rules += dense(f"{cb}.adaLN_modulation.1", (seg, "norm1_context", "linear"), j)
        rules += dense(f"{xb}.mlp.fc1", (seg, "ff", "fc1"), j)
        rules += dense(f"{xb}.mlp.fc2", (seg, "ff", "fc2"), j)
        if not pre_only:
            rules += dense(f"{cb}.mlp.fc1", (seg, "ff_context", "fc1"), j)
            rules += dense(f"{cb}.mlp.fc2", (seg, "ff_context", "fc2"), j)
    return rules


# ---------------------------------------------------------------------------------------------------------
# Layout detection and config inference.


def detect_layout(src: TensorSource) -> tuple[str, TensorSource]:
    """Returns ("diffusers" | "sai", source without any prefix), or raises naming what was found."""
    keys = src.keys()
    if any(k.startswith(SAI_PREFIX + "joint_blocks.") for k in keys):
        return "sai", src.with_prefix(SAI_PREFIX)
    if "x_embedder.proj.weight" in src:
        return "sai", src
    if "pos_embed.proj.weight" in src:
        return "diffusers", src
    sample = ", ".join(sorted(keys)[:5]) or "no tensors"
    raise CheckpointError(
        f"{src.description}: not an SD3 MMDiT checkpoint (no x_embedder/pos_embed.proj weights; "
        f"found {sample})"
    )


def infer_config(src: TensorSource, layout: str, **overrides: Any) -> MMDiTConfig:
    """Reads the MMDiT config off tensor shapes; heads = width / 64 as in every released model."""
    names = {
        "diffusers": (
            "pos_embed.proj.weight",
            "time_text_embed.text_embedder.linear_1.weight",
            "proj_out.weight",
            r"transformer_blocks\.(\d+)\.",
            r"transformer_blocks\.(\d+)\.attn2\.",
            "attn.norm_q.weight",
            "pos_embed.pos_embed",
        ),
        "sai": (
            "x_embedder.proj.weight",
            "y_embedder.mlp.0.weight",
            "final_layer.linear.weight",
            r"joint_blocks\.(\d+)\.",
            r"joint_blocks\.(\d+)\.x_block\.attn2\.",
            "attn.ln_q.weight",
            "pos_embed",
        ),
    }[layout]
    patch_w, pooled_w, out_w, block_re, attn2_re, qk_key, table = names
    d, c_in, p, _ = src.shape(patch_w)
    keys = src.keys()
    depth = 1 + max((int(m.group(1)) for k in keys if (m := re.match(block_re, k))), default=-1)
    if depth == 0:
        raise CheckpointError(f"{src.description}: no transformer blocks found")
    dual = tuple(sorted({int(m.group(1)) for k in keys if (m := re.match(attn2_re, k))}))
    table_len = src.shape(table)[1] if table in src else 0
    m = math.isqrt(table_len)
    if table in src and m * m != table_len:
        raise CheckpointError(f"{src.description}: position table {table} has {table_len} rows, not a square")
    qk_norm = any(k.endswith(qk_key) for k in keys)
    # Head width: read off the qk-norm scales where present, else 64 as in every released model.
    head_dim = src.shape(next(k for k in keys if k.endswith(qk_key)))[0] if qk_norm else 64
    if "num_heads" in overrides and "head_dim" not in overrides:
        head_dim = d // overrides["num_heads"]
    head_dim = overrides.get("head_dim", head_dim)
    if d % head_dim:
        raise CheckpointError(
            f"{src.description}: width {d} is not a multiple of the head width {head_dim}; pass num_heads="
        )
    fields = dict(
        depth=depth,
        num_heads=d // head_dim,
        head_dim=head_dim,
        patch_size=p,
        in_channels=c_in,
        out_channels=src.shape(out_w)[0] // (p * p),
        context_dim=src.shape("context_embedder.weight")[1],
        pooled_dim=src.shape(pooled_w)[1],
        pos_embed_max_size=m or 192,
        qk_norm=qk_norm,
        dual_attention_layers=dual,
    )
    fields.update(overrides)
    return MMDiTConfig(**fields)


DIFFUSERS_CONFIG_FIELDS = {
    "num_layers": "depth",
    "num_attention_heads": "num_heads",
    "attention_head_dim": "head_dim",
    "patch_size": "patch_size",
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "joint_attention_dim": "context_dim",
    "pooled_projection_dim": "pooled_dim",
    "sample_size": "sample_size",
    "pos_embed_max_size": "pos_embed_max_size",
    "dual_attention_layers": "dual_attention_layers",
}


def config_from_diffusers(d: Mapping[str, Any]) -> dict[str, Any]:
    """MMDiTConfig fields from a diffusers transformer `config.json`."""
    out = {ours: d[theirs] for theirs, ours in DIFFUSERS_CONFIG_FIELDS.items() if d.get(theirs) is not None}
    if "dual_attention_layers" in out:
        out["dual_attention_layers"] = tuple(out["dual_attention_layers"])
    if "qk_norm" in d:
        if d["qk_norm"] not in (None, "rms_norm"):
            raise CheckpointError(f"unsupported qk_norm {d['qk_norm']!r} in diffusers config (only rms_norm)")
        out["qk_norm"] = d["qk_norm"] == "rms_norm"
    if d.get("caption_projection_dim") not in (
        None,
        d.get("num_attention_heads", 0) * d.get("attention_head_dim", 0),
    ):
        raise CheckpointError("unsupported: caption_projection_dim differs from the model width")
    return out


def config_to_diffusers(cfg: MMDiTConfig) -> dict[str, Any]:
    """A diffusers transformer `config.json` for `cfg`."""
    out = {theirs: getattr(cfg, ours) for theirs, ours in DIFFUSERS_CONFIG_FIELDS.items()}
    out["dual_attention_layers"] = list(cfg.dual_attention_layers)
    out["caption_projection_dim"] = cfg.width
    out["qk_norm"] = "rms_norm" if cfg.qk_norm else None
    return {"_class_name": "SD3Transformer2DModel", **out}


def abstract_params(cfg: MMDiTConfig, boxed: bool = False) -> dict[str, Any]:
    """Param shapes and dtypes of MMDiT(cfg), at no memory (jax.eval_shape).

    With `boxed`, leaves stay wrapped in `nn.LogicallyPartitioned` (their logical axis names), for sharding.
    """
    import flax.linen as nn

    s = cfg.patch_size
    x = jax.ShapeDtypeStruct((1, s, s, cfg.in_channels), jnp.float32)
    args = (
        x,
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, cfg.context_dim), jnp.float32),
        jax.ShapeDtypeStruct((1, cfg.pooled_dim), jnp.float32),
    )
    tree = jax.eval_shape(lambda *a: MMDiT(cfg).init(jax.random.key(0), *a), *args)["params"]
    if boxed:
        return tree
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def _diffusers_folder(source: Any) -> tuple[Any, dict[str, Any]]:
    """If `source` is a diffusers model folder (or its transformer/), the weights path and config fields."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        folder = os.fspath(source)
        if os.path.isdir(os.path.join(folder, "transformer")):
            folder = os.path.join(folder, "transformer")
        cfg_path = os.path.join(folder, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                return folder, config_from_diffusers(json.load(f))
        return folder, {}
    return source, {}


def load_mmdit(source: Any, dtype: Any = None, **overrides: Any) -> tuple[MMDiTConfig, dict[str, Any]]:
    """Loads an MMDiT checkpoint into (config, params) with numpy leaves.

    Args:
      source: a Stability single-file `.safetensors` (keys under `model.diffusion_model.` or bare), a
        diffusers model folder, its `transformer/` folder or `.safetensors`, or a dict of arrays in either
        naming.
      dtype: cast every tensor to this dtype; by default the file's dtype is kept.
      **overrides: MMDiTConfig fields that win over the inferred ones (e.g. attention, remat).
    """
    path, fields = _diffusers_folder(source)
    src = open_tensors(path)
    layout, src = detect_layout(src)
    cfg = infer_config(src, layout, **{**fields, **overrides})
    rules = diffusers_rules(cfg) if layout == "diffusers" else sai_rules(cfg)
    params = to_params(src, rules, abstract_params(cfg), f"MMDiT {layout} layout ({cfg.depth} blocks)", dtype)
    return cfg, params


def export_mmdit(
    params: Mapping[str, Any], cfg: MMDiTConfig, layout: str = "diffusers", prefix: str | None = None
) -> dict[str, np.ndarray]:
    """Params back to a PyTorch layout: "diffusers" names or Stability's "sai" names.

    `prefix` defaults to "" for diffusers and `model.diffusion_model.` for sai.
    """
    if layout not in ("diffusers", "sai"):
        raise ValueError(f"export layout must be 'diffusers' or 'sai', got {layout!r}")
    rules = diffusers_rules(cfg) if layout == "diffusers" else sai_rules(cfg)
    if prefix is None:
        prefix = "" if layout == "diffusers" else SAI_PREFIX
    return {prefix + k: v for k, v in to_source(params, rules)}
