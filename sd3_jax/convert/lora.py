"""LoRA files: diffusers/peft (what `StableDiffusion3Pipeline.load_lora_weights` reads) and kohya/ComfyUI.

A LoRA on a torch Linear is lora_A / lora_down (r, in) and lora_B / lora_up (out, r), with the update
(alpha / r) B A on its weight (out, in). Which Linear each key names, and how that weight becomes our kernel
(transpose, head reshape, Stability's fused qkv split in three, swapped shift/scale halves), is read off the
MMDiT checkpoint tables `diffusers_rules` and `sai_rules`: one `Site` per Linear. The transforms act on
the weight's output axis only, so for each site A gives our `a` by a transpose (and head reshape), and the
table's own forward, run on B P with P the first r rows of the identity, gives our `b` for every target:
whatever the table does to output rows, the adapter follows.

Key names read, each with `.lora_A.weight`/`.lora_B.weight` or `.lora_down.weight`/`.lora_up.weight`
and an optional `.alpha`:

    transformer.transformer_blocks.3.attn.to_q           diffusers / peft (also base_model.model., bare)
    lora_transformer_transformer_blocks_3_attn_to_q      OneTrainer (diffusers names, dots as underscores)
    lora_unet_joint_blocks_3_x_block_attn_qkv            kohya sd-scripts (Stability names)
    diffusion_model.joint_blocks.3.x_block.attn.qkv      ComfyUI (Stability names)

A fused qkv LoRA shares one A across q, k and v and splits B (3D, r) in three. Alpha comes from `.alpha`
keys, else from diffusers' `lora_adapter_metadata` (peft `lora_alpha`, `alpha_pattern`, `use_rslora`),
else alpha = r. Imported adapters carry alpha / r folded into b (scaling 1). Export writes diffusers'
layout with alpha / r folded into lora_B, which every loader reads as alpha = r: no metadata needed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from sd3_jax.convert.mapping import CheckpointError, Rule, Target, TensorSource, _fmt, open_tensors
from sd3_jax.convert.mmdit import SAI_PREFIX, abstract_params, diffusers_rules, sai_rules
from sd3_jax.convert.safetensors_io import SafetensorsFile, write_safetensors
from sd3_jax.lora import CONV_MODULES, Lora, _get, _set, adapter_modules, layout
from sd3_jax.nn.mmdit import MMDiTConfig

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_down.weight": "A",
    ".lora_up.weight": "B",
    ".alpha": "alpha",
}
DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.", "")
SAI_PREFIXES = (SAI_PREFIX, "diffusion_model.")
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1.", "te2.", "te3.")


@dataclasses.dataclass(frozen=True)
class Site:
    name: str  # the torch Linear, e.g. "transformer_blocks.3.attn.to_q" or "joint_blocks.3.x_block.attn.qkv"
    rule: Rule  # the checkpoint table's rule for its weight
    targets: tuple[Target, ...]  # our modules (kernel parents) with layer index, one per part of the output


def sites(cfg: MMDiTConfig, layout_name: str = "diffusers") -> list[Site]:
    """Every Linear of the `layout_name` ("diffusers" or "sai") table, as LoRA sites."""
    rules = diffusers_rules(cfg) if layout_name == "diffusers" else sai_rules(cfg)
    out = []
    for r in rules:
        src, kernels = r.sources[0], all(t.path[-1] == "kernel" for t in r.targets)
        if len(r.sources) != 1 or not src.endswith(".weight") or not kernels:
            continue
        targets = tuple(Target(t.path[:-1], t.layer) for t in r.targets)
        if any(t.path in CONV_MODULES for t in targets):  # the patch convolution
            continue
        out.append(Site(src[: -len(".weight")], r, targets))
    return out


def _aliases(cfg: MMDiTConfig) -> dict[str, Site]:
    """Every module key a LoRA file may use, to its site."""
    table: dict[str, Site] = {}
    for s in sites(cfg, "diffusers"):
        for p in DIFFUSERS_PREFIXES:
            table[p + s.name] = s
        table["lora_transformer_" + s.name.replace(".", "_")] = s
    for s in sites(cfg, "sai"):
        for p in SAI_PREFIXES:
            table[p + s.name] = s
        table["lora_unet_" + s.name.replace(".", "_")] = s
    return table


# ---------------------------------------------------------------------------------------------------------
# Factor maps, taken from the table rules.


def _kernel_shapes(site: Site, abstract: Mapping[str, Any]) -> list[tuple[int, ...]]:
    shapes = []
    for t in site.targets:
        k = _get(abstract, t.path)["kernel"]
        shapes.append(tuple(k.shape) if t.layer is None else tuple(k.shape[1:]))
    return shapes


def _factors_in(site: Site, A: np.ndarray, B: np.ndarray, abstract) -> list[tuple[np.ndarray, np.ndarray]]:
    """torch (A (r, in), B (out, r)) -> our (a (in..., r), b (r, out...)) for each target of the site."""
    r, n = A.shape
    if r < 1:
        raise CheckpointError(f"LoRA {site.name}: rank 0 (lora_A {A.shape})")
    if B.shape[1] != r:
        raise CheckpointError(f"LoRA {site.name}: lora_A {A.shape} and lora_B {B.shape} ranks differ")
    if r > n:
        raise CheckpointError(f"LoRA {site.name}: rank {r} exceeds the input width {n}")
    probe = B @ np.eye(r, n, dtype=B.dtype)  # (out, in), B in the first r columns
    try:
        kernels = site.rule.forward(probe)
    except ValueError:
        kernels = None
    shapes = _kernel_shapes(site, abstract)
    if kernels is None or [tuple(k.shape) for k in kernels] != shapes:
        raise CheckpointError(
            f"LoRA {site.name}: lora_A {A.shape}, lora_B {B.shape} do not fit the model's kernels {shapes}"
        )
    out = []
    for t, kernel in zip(site.targets, kernels):
        _, n_in = layout(t.path)
        ins, outs = kernel.shape[:n_in], kernel.shape[n_in:]
        a = A.T.reshape(*ins, r)
        b = kernel.reshape(math.prod(ins), -1)[:r].reshape(r, *outs)
        out.append((a, b))
    return out


def _factors_out(site: Site, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our (a, b) of a one-target site -> torch A (r, in), B (out, r): the table run backwards."""
    r = a.shape[-1]
    n = math.prod(a.shape[:-1])
    if r > n:
        raise CheckpointError(f"LoRA {site.name}: rank {r} exceeds the input width {n}")
    probe = np.zeros((n, math.prod(b.shape[1:])), b.dtype)
    probe[:r] = b.reshape(r, -1)
    (w,) = site.rule.backward(probe.reshape(*a.shape[:-1], *b.shape[1:]))
    return np.ascontiguousarray(a.reshape(n, r).T), np.ascontiguousarray(w[:, :r])


# ---------------------------------------------------------------------------------------------------------
# Import.


def _resolve(source: Any) -> tuple[Any, dict[str, Any]]:
    """(tensor source, peft config from diffusers' metadata) for a dict, a .safetensors file or a folder."""
    if isinstance(source, Mapping):
        return source, {}
    path = os.fspath(source)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, WEIGHT_NAME)):
            path = os.path.join(path, WEIGHT_NAME)
        else:
            files = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
            if len(files) != 1:
                raise CheckpointError(
                    f"{path}: expected {WEIGHT_NAME} or one .safetensors file, found {files}"
                )
            path = os.path.join(path, files[0])
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    with SafetensorsFile(path) as f:
        raw = f.metadata.get(METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: {METADATA_KEY} in the file's metadata is not a JSON object")
    peft = {k[len("transformer.") :]: v for k, v in meta.items() if k.startswith("transformer.")}
    return path, peft


def _pattern(patterns: Mapping[str, Any], name: str) -> Any:
    """peft's `get_pattern_key`: the first pattern matching the end of the module name."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error:
            raise CheckpointError(
                f"LoRA metadata: alpha_pattern key {key!r} is not a regular expression"
            ) from None
    return None


def _alpha(
    site_key: str, site: Site, r: int, alphas: Mapping[str, np.ndarray], peft: Mapping[str, Any]
) -> float:
    """alpha / r for one module (alpha / sqrt(r) with rsLoRA); kohya reads alpha 0 as alpha = r."""
    if site_key in alphas:
        a = np.asarray(alphas[site_key])
        if a.size != 1 or not np.isfinite(a.astype(np.float64)).all():
            raise CheckpointError(f"LoRA {site.name}: alpha must be one finite number, got shape {a.shape}")
        alpha = float(a.astype(np.float64).reshape(()))
        return alpha / r if alpha else 1.0
    if not peft:
        return 1.0
    patterns = peft.get("alpha_pattern") or {}
    alpha = _pattern(patterns, site.name) if isinstance(patterns, Mapping) else None
    alpha = peft.get("lora_alpha", r) if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(
            f"LoRA {site.name}: lora_alpha in the file's metadata is {alpha!r}, not a number"
        )
    return float(alpha) / (math.sqrt(r) if peft.get("use_rslora") else r)


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, kind in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


def import_lora(
    source: Any, cfg: MMDiTConfig, ignore_text_encoders: bool = False, step: int | None = None
) -> Lora:
    """Reads a LoRA file (any layout in the module docstring) into an adapter for MMDiT(cfg).

    Args:
      source: a `.safetensors` file, a folder holding `pytorch_lora_weights.safetensors` (or one
        .safetensors), a dict of arrays / torch tensors, or a LoRA training workdir (its EMA adapter at
        `step`, None: the latest checkpoint).
      cfg: the model the adapter is for (e.g. the config `load_mmdit` returned).
      ignore_text_encoders: drop text-encoder LoRA keys (`lora_te*`, `text_encoder*`) instead of raising.
      step: a workdir's checkpoint.

    Returns a `Lora` with scaling 1 (each module's alpha / r folded into b). Modules of one scanned segment
    with different ranks are zero-padded to the largest; blocks the file leaves out get zero factors.

    Raises:
      CheckpointError naming unknown keys, modules missing lora_A or lora_B, and shape mismatches.
    """
    from sd3_jax.convert.workdir import is_run

    if not isinstance(source, Mapping) and is_run(os.fspath(source)):
        return _run_lora(os.fspath(source), cfg, step)
    if step is not None:
        raise ValueError(f"{source}: a step asked of something that is not a training workdir")
    path, peft = _resolve(source)
    if peft.get("use_dora"):
        raise CheckpointError(
            f"{path if isinstance(path, str) else 'state dict'}: DoRA adapters are not supported"
        )
    src: TensorSource = open_tensors(path)
    aliases = _aliases(cfg)
    modules: dict[str, dict[str, str]] = {}
    unknown = []
    for key in src.keys():
        parts = _split_key(key)
        if parts is not None and parts[0] in aliases:
            modules.setdefault(parts[0], {})[parts[1]] = key
        elif not (ignore_text_encoders and key.startswith(TEXT_ENCODER_PREFIXES)):
            unknown.append(key)
    if unknown:
        hint = (
            "; text-encoder LoRAs are not read: pass ignore_text_encoders=True"
            if any(k.startswith(TEXT_ENCODER_PREFIXES) for k in unknown)
            else ""
        )
        raise CheckpointError(
            f"{src.description}: {len(unknown)} LoRA keys name no MMDiT linear layer: {_fmt(unknown)}{hint}"
        )
    incomplete = [f"{m} (has {sorted(k)})" for m, k in modules.items() if not {"A", "B"} <= set(k)]
    if incomplete:
        raise CheckpointError(f"{src.description}: LoRA modules without both factors: {_fmt(incomplete)}")
    if not modules:
        raise CheckpointError(f"{src.description}: no LoRA tensors found")

    abstract = abstract_params(cfg)
    alphas = {m: src.read(k["alpha"]) for m, k in modules.items() if "alpha" in k}
    pieces: dict[Target, list[tuple[np.ndarray, np.ndarray]]] = {}
    for m, keys in sorted(modules.items()):
        site = aliases[m]
        A = src.read(keys["A"]).astype(np.float32)
        B = src.read(keys["B"]).astype(np.float32)
        if A.ndim != 2 or B.ndim != 2:
            raise CheckpointError(
                f"{src.description}: LoRA {m}: factors must be matrices, got {A.shape}, {B.shape}"
            )
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise CheckpointError(f"{src.description}: LoRA {m}: factors hold NaN or infinite values")
        scale = _alpha(m, site, A.shape[0], alphas, peft)
        for t, (a, b) in zip(site.targets, _factors_in(site, A, B, abstract)):
            b = b.astype(np.float64) * scale
            if not np.isfinite(b).all() or np.abs(b).max(initial=0) > np.finfo(np.float32).max:
                raise CheckpointError(
                    f"{src.description}: LoRA {m}: alpha / rank {scale:g} overflows its factors"
                )
            pieces.setdefault(t, []).append((a, b.astype(np.float32)))
    return Lora(params=_stack(pieces, abstract), scaling=1.0)


def _run_lora(workdir: str, cfg: MMDiTConfig, step: int | None) -> Lora:
    """A LoRA run's EMA adapter, checked to fit MMDiT(cfg)."""
    from sd3_jax.convert.workdir import lora_of_run

    _, lora = lora_of_run(workdir, step)
    base = abstract_params(cfg)
    for path, ab in adapter_modules(lora.params):
        lead, n_in = layout(path)
        try:
            k = _get(base, path)["kernel"].shape
        except (KeyError, TypeError):
            k = None
        a, b = ab["a"].shape, ab["b"].shape
        if k is None or a[:-1] != k[: lead + n_in] or b[:lead] + b[lead + 1 :] != k[:lead] + k[lead + n_in :]:
            where = "/".join(path)
            raise CheckpointError(f"{workdir}: its LoRA is for another model (no {where} of that shape)")
    return lora


def _stack(pieces: Mapping[Target, list[tuple[np.ndarray, np.ndarray]]], abstract) -> dict[str, Any]:
    """Per-layer factors -> the adapter tree; several modules on one kernel concatenate along the rank."""
    by_path: dict[tuple[str, ...], dict[int | None, tuple[np.ndarray, np.ndarray]]] = {}
    for t, ab in pieces.items():
        a = np.concatenate([p[0] for p in ab], axis=-1)
        b = np.concatenate([p[1] for p in ab], axis=0)
        by_path.setdefault(t.path, {})[t.layer] = (a, b)
    params: dict[str, Any] = {}
    for path, layers in by_path.items():
        if None in layers:
            _set(params, path, dict(zip("ab", layers[None])))
            continue
        n = _get(abstract, path)["kernel"].shape[0]
        r = max(a.shape[-1] for a, _ in layers.values())
        a0, b0 = next(iter(layers.values()))
        a_all = np.zeros((n, *a0.shape[:-1], r), np.float32)
        b_all = np.zeros((n, r, *b0.shape[1:]), np.float32)
        for j, (a, b) in layers.items():
            a_all[j, ..., : a.shape[-1]] = a
            b_all[j, : b.shape[0]] = b
        _set(params, path, {"a": a_all, "b": b_all})
    return params


# ---------------------------------------------------------------------------------------------------------
# Export.


def lora_to_diffusers(lora: Lora, cfg: MMDiTConfig, prefix: str = "transformer.") -> dict[str, np.ndarray]:
    """The adapter as a diffusers/peft state dict, alpha / r folded into lora_B.

    Keys are `{prefix}{module}.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), as diffusers'
    `StableDiffusion3Pipeline.save_lora_weights` writes them.
    """
    by_target = {(t.path, t.layer): s for s in sites(cfg, "diffusers") for t in s.targets}
    out: dict[str, np.ndarray] = {}
    for path, ab in adapter_modules(lora.params):
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        n_lead, _ = layout(path)
        layers = [None] if n_lead == 0 else list(range(a.shape[0]))
        for j in layers:
            site = by_target.get((path, j))
            if site is None:
                raise CheckpointError(
                    f"LoRA module {'/'.join(path)} (layer {j}) has no diffusers name for MMDiT"
                )
            aj, bj = (a, b) if j is None else (a[j], b[j])
            A, B = _factors_out(site, aj, bj * np.float32(lora.scaling))
            out[f"{prefix}{site.name}.lora_A.weight"] = A
            out[f"{prefix}{site.name}.lora_B.weight"] = B
    return out


def export_lora_diffusers(lora: Lora, cfg: MMDiTConfig, path: str | os.PathLike) -> str:
    """Writes `path/pytorch_lora_weights.safetensors` for `StableDiffusion3Pipeline.load_lora_weights(path)`.

    Returns the file's path.
    """
    os.makedirs(path, exist_ok=True)
    file = os.path.join(os.fspath(path), WEIGHT_NAME)
    write_safetensors(file, lora_to_diffusers(lora, cfg), metadata={"format": "pt"})
    return file
