"""`sd3-jax convert`: PyTorch SD3 checkpoints to an sd3-jax Orbax checkpoint (`export.py` goes back).

Inputs: a diffusers pipeline folder; Stability's single files (with the separate clip_l / clip_g / t5xxl
files beside them); one component's file alone; or a Hugging Face model id (its diffusers folder).
Conversion streams one param at a time into Orbax and is atomic (see `orbax_io`).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

from sd3_jax.convert import components as comp
from sd3_jax.convert.mapping import CheckpointError, check_keys, iter_params
from sd3_jax.convert.orbax_io import (
    atomic_directory,
    config_to_json,
    read_manifest,
    restore_params,
    save_params_streaming,
    write_manifest,
)

DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
DEFAULT_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": False,
}  # fmt: skip
TEXT = ("text_encoder", "text_encoder_2", "text_encoder_3")
# Sampling defaults of the released models (their diffusers model cards), written into the checkpoint by
# `convert` so that `sample` and `SD3Pipeline.generate` use them; guidance <= 1 samples without CFG.
RELEASED_SAMPLING = {
    "sd3_medium": dict(steps=28, guidance_scale=7.0),
    "sd35_medium": dict(steps=40, guidance_scale=4.5),
    "sd35_large": dict(steps=28, guidance_scale=3.5),
    "sd35_large_turbo": dict(steps=4, guidance_scale=0.0),
}


def released_model(cfg: Any, turbo: bool = False) -> str | None:
    """Which released model an MMDiTConfig is, by its shapes (SD3.5 Large Turbo, the same network as
    SD3.5 Large, only by `turbo`); None for any other network."""
    from sd3_jax.nn.mmdit import MMDiTConfig

    shape = lambda c: (c.depth, c.num_heads, c.head_dim, c.qk_norm, c.dual_attention_layers, c.context_dim)
    for name in ("sd3_medium", "sd35_medium", "sd35_large"):
        if shape(cfg) == shape(getattr(MMDiTConfig, name)()):
            if turbo and name != "sd35_large":
                raise ValueError(f"--turbo: only SD3.5 Large has a Turbo; these weights are {name}")
            return name + ("_turbo" if turbo else "")
    if turbo:
        raise ValueError("--turbo: these weights are not SD3.5 Large's shapes")
    return None


def _dtype(name: str | None) -> np.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def beside_single_file(path: str) -> dict[str, str]:
    """The text-encoder files Stability ships next to its single files, by component: `clip_l.safetensors`,
    `clip_g.safetensors` and `t5xxl_*.safetensors` in the file's folder or its `text_encoders/`; of several
    T5 files the first in name order that is not fp8 (the fp16 one), else an fp8 one."""
    here = os.path.dirname(os.path.abspath(path))
    out: dict[str, str] = {}
    for folder in (here, os.path.join(here, "text_encoders")):
        for component, name in (
            ("text_encoder", "clip_l.safetensors"),
            ("text_encoder_2", "clip_g.safetensors"),
        ):
            if os.path.isfile(os.path.join(folder, name)):
                out.setdefault(component, os.path.join(folder, name))
        t5 = sorted(glob.glob(os.path.join(folder, "t5xxl_*.safetensors")), key=lambda p: ("fp8" in p, p))
        if t5:
            out.setdefault("text_encoder_3", t5[0])
    return out


def plans(sources: Sequence[str]) -> tuple[list[comp.Plan], str | None, dict[str, Any]]:
    """Plans for all sources (model ids resolved to their diffusers folder); the diffusers folder (for
    tokenizers) and scheduler config if any."""
    from sd3_jax.convert import hub

    plans: list[comp.Plan] = []
    single_files: list[str] = []  # files holding a transformer: text encoders may lie beside them
    folder, scheduler = None, dict(DEFAULT_SCHEDULER)
    for s in sources:
        if hub.is_model_id(s):
            s = hub.resolve(s)
        if not os.path.exists(s):
            raise FileNotFoundError(f"{s}: no such file or folder")
        if os.path.isdir(s) and os.path.exists(os.path.join(s, "model_index.json")):
            plans += comp.plans_from_diffusers(s)
            folder = s
            sched = os.path.join(s, "scheduler", "scheduler_config.json")
            if os.path.exists(sched):
                with open(sched) as f:
                    scheduler = json.load(f)
        elif os.path.isdir(s) and all(os.path.isdir(os.path.join(s, t)) for t in TOKENIZERS[:2]):
            folder = s  # a folder of tokenizers only
        elif os.path.isdir(s) and _controlnet_folder(s):
            plans.append(comp.plan_component("controlnet", comp.open_tensors(s), s))
        elif os.path.isdir(s):
            raise CheckpointError(f"{s}: a folder without model_index.json is not a diffusers pipeline")
        else:
            file_plans = comp.plans_from_file(s)
            plans += file_plans
            if any(p.component == "transformer" for p in file_plans):
                single_files.append(s)
    have = {p.component for p in plans}
    for s in single_files:  # sources take precedence over the files beside them
        for component, path in beside_single_file(s).items():
            if component not in have:
                plans.append(comp.plan_component(component, comp.open_tensors(path)))
                have.add(component)
    seen: dict[str, str] = {}
    for p in plans:
        if p.component in seen:
            raise CheckpointError(
                f"two sources hold the {p.component}: {seen[p.component]} and {p.src.description}"
            )
        seen[p.component] = p.src.description
    if not plans:
        raise CheckpointError(f"no model weights found in {', '.join(sources)}")
    return plans, folder, scheduler


def convert(
    sources: Sequence[str],
    out: str,
    dtype: str | None = "bf16",
    tokenizers: str | None = None,
    progress: bool = True,
    turbo: bool | None = None,
) -> dict[str, Any]:
    """Converts `sources` into an sd3-jax checkpoint at `out`; returns the summary it prints.

    The transformer's released model, recognised from its shapes, sets the checkpoint's sampling defaults
    (`RELEASED_SAMPLING`); `turbo` marks SD3.5 Large Turbo (None: when a source's name says "turbo").
    """
    t0 = time.perf_counter()
    np_dtype = _dtype(dtype)
    found, folder, scheduler = plans(sources)
    model, sampling = sampling_defaults(found, sources, turbo)
    tok_dir = tokenizers or folder
    check_tokenizers(found, tok_dir)
    for p in found:  # names first: a missing tensor is one error line before anything is sized or read
        check_keys(p.src, p.rules, p.what)
    total = sum(_nbytes(p) for p in found)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", dynamic_ncols=True)
    summary: dict[str, Any] = {"components": {}, "dtype": dtype or "as stored"}
    with atomic_directory(out) as tmp:
        for p in found:
            count = save_params_streaming(
                os.path.join(tmp, p.component),
                iter_params(p.src, p.rules, p.abstract, p.what, np_dtype, bar.update if bar else None),
            )
            summary["components"][p.component] = {
                "kind": p.kind,
                "config": config_to_json(p.config),
                "params": count,
                "dtype": dtype or str(p.src.dtype(p.rules[0].sources[0])),
            }
        if tok_dir:
            for t in TOKENIZERS:
                if os.path.isdir(os.path.join(tok_dir, t)):
                    shutil.copytree(os.path.join(tok_dir, t), os.path.join(tmp, t))
        summary["scheduler"] = scheduler
        if model is not None:
            summary["model"], summary["sampling"] = model, sampling
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        write_manifest(tmp, summary)
    if bar is not None:
        bar.close()
    return summary


def _controlnet_folder(folder: str) -> bool:
    """Whether `folder` is a diffusers ControlNet (its config.json names SD3ControlNetModel)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("_class_name") == "SD3ControlNetModel"
    except (OSError, ValueError, AttributeError):
        return False


def sampling_defaults(
    found: Sequence[comp.Plan], sources: Sequence[str], turbo: bool | None
) -> tuple[str | None, dict[str, Any] | None]:
    """The released model a transformer's shapes name, and its sampling defaults (`RELEASED_SAMPLING`);
    `turbo` marks SD3.5 Large Turbo (None: when a source's name says "turbo")."""
    named_turbo = any("turbo" in os.path.basename(os.path.normpath(s)).lower() for s in sources)
    model = None
    for p in found:
        if p.component == "transformer":
            model = released_model(p.config, bool(turbo))
            if model == "sd35_large" and turbo is None and named_turbo:
                model = "sd35_large_turbo"
    return model, RELEASED_SAMPLING[model] if model is not None else None


def check_tokenizers(found: Sequence[comp.Plan], tok_dir: str | None) -> None:
    """Text encoders come with their tokenizers, or one error line says which are missing."""
    components = {p.component for p in found}
    if components & set(TEXT):
        missing = [
            t
            for t in TOKENIZERS[: 3 if "text_encoder_3" in components else 2]
            if not (tok_dir and os.path.isdir(os.path.join(tok_dir, t)))
        ]
        if missing:
            raise CheckpointError(
                f"text encoders need their tokenizers: pass --tokenizers DIR, a diffusers folder holding "
                f"{', '.join(m + '/' for m in missing)} (e.g. the stable-diffusion-3-medium-diffusers folder)"
            )


def _nbytes(p: comp.Plan) -> int:
    n = 0
    for r in p.rules:
        if r.targets:
            for s in r.sources:
                n += int(np.prod(p.src.shape(s))) * p.src.dtype(s).itemsize
    return n


def print_summary(summary: dict[str, Any], out: str) -> None:
    print(f"wrote {out} ({summary['dtype']}, {summary['seconds']} s)")
    if "sampling" in summary:
        d = summary["sampling"]
        cfg = f"CFG {d['guidance_scale']}" if d["guidance_scale"] > 1 else "no CFG"
        print(f"  {summary['model']}: samples with {d['steps']} steps, {cfg} by default")
    for name, c in summary["components"].items():
        print(f"  {name:15s} {c['kind']:6s} {c['params']:>15,d} params")


def load_component(ckpt: str, component: str, dtype: Any = None, shardings: Any = None) -> tuple[Any, Any]:
    """(config, params) of one component of an sd3-jax checkpoint, params restored as device arrays."""
    manifest = read_manifest(ckpt)
    entry = manifest["components"].get(component)
    if entry is None:
        have = ", ".join(manifest["components"]) or "nothing"
        raise CheckpointError(f"{ckpt}: checkpoint has no {component} (it holds {have})")
    cfg = comp.read_config(entry["kind"], entry["config"])
    abstract = comp.ABSTRACT[entry["kind"]](cfg)
    return cfg, restore_params(os.path.join(ckpt, component), abstract, dtype, shardings)
