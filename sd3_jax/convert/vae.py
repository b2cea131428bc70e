"""VAE checkpoints: diffusers' `AutoencoderKL` and Stability's (ldm) single-file layouts, both ways.

Two tables, one per source layout, built from the config. The ldm layout numbers decoder levels from the
highest resolution (`decoder.up.0` is diffusers' `up_blocks.{n-1}`), calls the shortcut `nin_shortcut`, and
stores the mid-block attention q/k/v/proj_out as 1x1 convs (C, C, 1, 1) where diffusers has Linears; the
diffusers oracle for that layout is `convert_ldm_vae_checkpoint` in `loaders/single_file_utils.py`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
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
from sd3_jax.nn.vae import VAE, VAEConfig

SAI_PREFIX = "first_stage_model."
Path = tuple[str, ...]


def _conv_fwd(w):  # torch (O, I, kh, kw) -> flax (kh, kw, I, O)
    return w.transpose(2, 3, 1, 0)


def _conv_bwd(k):
    return k.transpose(3, 2, 0, 1)


def _conv(src: str, path: Path) -> list[Rule]:
    return [
        rule(f"{src}.weight", path + ("kernel",), None, _conv_fwd, _conv_bwd),
        rule(f"{src}.bias", path + ("bias",)),
    ]


def _norm(src: str, path: Path) -> list[Rule]:
    return [rule(f"{src}.weight", path + ("scale",)), rule(f"{src}.bias", path + ("bias",))]


def _conv1x1_dense(src: str, path: Path) -> list[Rule]:
    """A 1x1 conv (O, I, 1, 1) as a flax Dense kernel (I, O): the ldm attention projections."""

    def fwd(w):
        if w.ndim != 4 or w.shape[2:] != (1, 1):
            raise ValueError(f"not a 1x1 conv weight: {w.shape}")  # to_params reports both shapes
        return w[:, :, 0, 0].T

    bwd = lambda k: k.T[:, :, None, None]
    return [rule(f"{src}.weight", path + ("kernel",), None, fwd, bwd), rule(f"{src}.bias", path + ("bias",))]


def _resnet(src: str, path: Path, shortcut: str | None) -> list[Rule]:
    rules = _norm(f"{src}.norm1", path + ("norm1",)) + _conv(f"{src}.conv1", path + ("conv1",))
    rules += _norm(f"{src}.norm2", path + ("norm2",)) + _conv(f"{src}.conv2", path + ("conv2",))
    if shortcut is not None:
        rules += _conv(f"{src}.{shortcut}", path + ("shortcut",))
    return rules


def _widths(cfg: VAEConfig, part: str) -> list[list[tuple[int, int]]]:
    """(in, out) channels of each resnet of each level, in our (= diffusers) level order."""
    chans = cfg.block_channels if part == "encoder" else cfg.block_channels[::-1]
    n = cfg.layers_per_block + (part == "decoder")
    prev, out = chans[0], []
    for c in chans:
        out.append([(prev if j == 0 else c, c) for j in range(n)])
        prev = c
    return out


def diffusers_rules(cfg: VAEConfig) -> list[Rule]:
    """The table for diffusers' `AutoencoderKL` state dict names."""
    rules: list[Rule] = []
    levels = len(cfg.block_channels)
    for part, blocks, sampler in (
        ("encoder", "down_blocks", "downsamplers"),
        ("decoder", "up_blocks", "upsamplers"),
    ):
        ours = "down" if part == "encoder" else "up"
        rules += _conv(f"{part}.conv_in", (part, "conv_in"))
        for i, level in enumerate(_widths(cfg, part)):
            for j, (cin, cout) in enumerate(level):
                rules += _resnet(
                    f"{part}.{blocks}.{i}.resnets.{j}",
                    (part, f"{ours}_{i}_resnet_{j}"),
                    "conv_shortcut" if cin != cout else None,
                )
            if i < levels - 1:
                rules += _conv(f"{part}.{blocks}.{i}.{sampler}.0.conv", (part, f"{ours}_{i}_{ours}sample"))
        mid = f"{part}.mid_block"
        rules += _resnet(f"{mid}.resnets.0", (part, "mid", "resnet_0"), None)
        rules += _resnet(f"{mid}.resnets.1", (part, "mid", "resnet_1"), None)
        rules += _norm(f"{mid}.attentions.0.group_norm", (part, "mid", "attn", "norm"))
        for theirs, name in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "out")):
            rules += dense(f"{mid}.attentions.0.{theirs}", (part, "mid", "attn", name))
        rules += _norm(f"{part}.conv_norm_out", (part, "norm_out"))
        rules += _conv(f"{part}.conv_out", (part, "conv_out"))
    return rules


def sai_rules(cfg: VAEConfig) -> list[Rule]:
    """The table for Stability's (ldm) names, without the `first_stage_model.` prefix."""
    rules: list[Rule] = []
    levels = len(cfg.block_channels)
    for part in ("encoder", "decoder"):
        ours = "down" if part == "encoder" else "up"
        rules += _conv(f"{part}.conv_in", (part, "conv_in"))
        for i, level in enumerate(_widths(cfg, part)):
            k = i if part == "encoder" else levels - 1 - i  # ldm numbers decoder levels from the top
            for j, (cin, cout) in enumerate(level):
                rules += _resnet(
                    f"{part}.{ours}.{k}.block.{j}",
                    (part, f"{ours}_{i}_resnet_{j}"),
                    "nin_shortcut" if cin != cout else None,
                )
            if i < levels - 1:
                rules += _conv(f"{part}.{ours}.{k}.{ours}sample.conv", (part, f"{ours}_{i}_{ours}sample"))
        rules += _resnet(f"{part}.mid.block_1", (part, "mid", "resnet_0"), None)
        rules += _resnet(f"{part}.mid.block_2", (part, "mid", "resnet_1"), None)
        rules += _norm(f"{part}.mid.attn_1.norm", (part, "mid", "attn", "norm"))
        for theirs, name in (("q", "q"), ("k", "k"), ("v", "v"), ("proj_out", "out")):
            rules += _conv1x1_dense(f"{part}.mid.attn_1.{theirs}", (part, "mid", "attn", name))
        rules += _norm(f"{part}.norm_out", (part, "norm_out"))
        rules += _conv(f"{part}.conv_out", (part, "conv_out"))
    return rules


# ---------------------------------------------------------------------------------------------------------
# Layout detection and config inference.

_PROBES = {  # layout -> (first resnet conv of encoder level i, of resnet j in level 0)
    "diffusers": (
        "encoder.down_blocks.{i}.resnets.0.conv1.weight",
        "encoder.down_blocks.0.resnets.{j}.conv1.weight",
    ),
    "sai": ("encoder.down.{i}.block.0.conv1.weight", "encoder.down.0.block.{j}.conv1.weight"),
}


def detect_layout(src: TensorSource) -> tuple[str, TensorSource]:
    """Returns ("diffusers" | "sai", source without any prefix), or raises naming what was found."""
    if src.prefixes([SAI_PREFIX]):
        src = src.with_prefix(SAI_PREFIX)
    for layout, (level, _) in _PROBES.items():
        if level.format(i=0) in src:
            return layout, src
    sample = ", ".join(sorted(src.keys())[:5]) or "no tensors"
    raise CheckpointError(
        f"{src.description}: not an AutoencoderKL checkpoint (no encoder level 0; found {sample})"
    )


def _count(src: TensorSource, pattern: str, key: str) -> int:
    n = 0
    while pattern.format(**{key: n}) in src:
        n += 1
    return n


def infer_config(src: TensorSource, layout: str, **overrides: Any) -> VAEConfig:
    """Reads widths, depth and channel counts off tensor shapes; other fields keep SD3's values."""
    level, resnet = _PROBES[layout]
    levels, layers = _count(src, level, "i"), _count(src, resnet, "j")
    for name in ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"):
        if name not in src:
            raise CheckpointError(f"{src.description}: missing tensor {name}")
    fields = dict(
        block_channels=tuple(src.shape(level.format(i=i))[0] for i in range(levels)),
        layers_per_block=layers,
        in_channels=src.shape("encoder.conv_in.weight")[1],
        latent_channels=src.shape("decoder.conv_in.weight")[1],
        out_channels=src.shape("decoder.conv_out.weight")[0],
    )
    fields.update(overrides)
    return VAEConfig(**fields)


DIFFUSERS_CONFIG_FIELDS = {
    "in_channels": "in_channels", "out_channels": "out_channels", "latent_channels": "latent_channels",
    "block_out_channels": "block_channels", "layers_per_block": "layers_per_block",
    "norm_num_groups": "norm_groups", "scaling_factor": "scaling_factor", "shift_factor": "shift_factor",
}  # fmt: skip


def config_from_diffusers(d: Mapping[str, Any]) -> dict[str, Any]:
    """VAEConfig fields from a diffusers `AutoencoderKL` `config.json`; unsupported options raise."""
    for key, ok in (
        ("use_quant_conv", False),
        ("use_post_quant_conv", False),
        ("mid_block_add_attention", True),
    ):
        if key in d and d[key] != ok:
            raise CheckpointError(f"unsupported diffusers VAE config: {key}={d[key]!r} (SD3 has {ok})")
    if d.get("act_fn", "silu") != "silu":
        raise CheckpointError(f"unsupported diffusers VAE config: act_fn={d['act_fn']!r}")
    out = {ours: d[theirs] for theirs, ours in DIFFUSERS_CONFIG_FIELDS.items() if d.get(theirs) is not None}
    if "block_channels" in out:
        out["block_channels"] = tuple(out["block_channels"])
    return out


def config_to_diffusers(cfg: VAEConfig) -> dict[str, Any]:
    """A diffusers `AutoencoderKL` `config.json` for `cfg`."""
    out = {theirs: getattr(cfg, ours) for theirs, ours in DIFFUSERS_CONFIG_FIELDS.items()}
    n = len(cfg.block_channels)
    out.update(
        block_out_channels=list(cfg.block_channels),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        act_fn="silu",
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )
    return {"_class_name": "AutoencoderKL", **out}


def abstract_params(cfg: VAEConfig) -> dict[str, Any]:
    """Param shapes and dtypes of VAE(cfg), at no memory (jax.eval_shape)."""
    x = jax.ShapeDtypeStruct((1, cfg.factor, cfg.factor, cfg.in_channels), jnp.float32)
    return jax.eval_shape(lambda a: nn.meta.unbox(VAE(cfg).init(jax.random.key(0), a)), x)["params"]


def _diffusers_config(source: Any) -> tuple[Any, dict[str, Any]]:
    """The weights path and config.json fields of a diffusers folder, its `vae/` folder, or its file."""
    if not isinstance(source, (str, os.PathLike)):
        return source, {}
    path = os.fspath(source)
    if os.path.isdir(path) and os.path.isdir(os.path.join(path, "vae")):
        path = os.path.join(path, "vae")
    cfg_path = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            d = json.load(f)
        if d.get("_class_name") == "AutoencoderKL":
            return path, config_from_diffusers(d)
    return path, {}


def load_vae(source: Any, dtype: Any = None, **overrides: Any) -> tuple[VAEConfig, dict[str, Any]]:
    """Loads a VAE checkpoint into (config, params) with numpy leaves.

    Args:
      source: a diffusers model folder, its `vae/` folder or `.safetensors` file (a `config.json` beside it
        wins over shapes), a Stability single file (keys under `first_stage_model.`, e.g. sd3_medium) or bare
        ldm keys, or a dict of arrays in either naming.
      dtype: cast every tensor to this dtype; by default the file's dtype is kept.
      **overrides: VAEConfig fields that win over the inferred ones (e.g. norm_groups, which shapes do not
        show).
    """
    path, fields = _diffusers_config(source)
    layout, src = detect_layout(open_tensors(path))
    cfg = infer_config(src, layout, **{**fields, **overrides})
    rules = diffusers_rules(cfg) if layout == "diffusers" else sai_rules(cfg)
    what = (
        f"VAE {layout} layout (block channels {cfg.block_channels}, {cfg.layers_per_block} layers per block)"
    )
    return cfg, to_params(src, rules, abstract_params(cfg), what, dtype)


def export_vae(
    params: Mapping[str, Any], cfg: VAEConfig, layout: str = "diffusers", prefix: str = ""
) -> dict[str, np.ndarray]:
    """Params back to a PyTorch layout: "diffusers" names or Stability's ldm ("sai") names.

    Pass `prefix=SAI_PREFIX` ("first_stage_model.") to nest sai names as in Stability's single files.
    """
    if layout not in ("diffusers", "sai"):
        raise ValueError(f"export layout must be 'diffusers' or 'sai', got {layout!r}")
    rules = diffusers_rules(cfg) if layout == "diffusers" else sai_rules(cfg)
    return {prefix + k: v for k, v in to_source(nn.meta.unbox(params), rules)}
