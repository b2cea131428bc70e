"""`sd3-jax export`: an sd3-jax checkpoint (or a training workdir, or anything `SD3Pipeline.load` opens)
written as a diffusers folder or one Stability-layout single file."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from sd3_jax.convert import components as comp
from sd3_jax.convert import controlnet as cn_convert
from sd3_jax.convert import mmdit as mmdit_convert
from sd3_jax.convert import text_encoders as te
from sd3_jax.convert import vae as vae_convert
from sd3_jax.convert.mapping import source_shapes, to_source
from sd3_jax.convert.orbax_io import atomic_directory
from sd3_jax.convert.pipeline_io import DEFAULT_SCHEDULER, TOKENIZERS
from sd3_jax.convert.safetensors_io import write_safetensors


def _rules_for_export(component: str, cfg: Any, layout: str) -> tuple[list, str]:
    kind = comp.KIND_OF[component]
    if kind == "controlnet":
        rules = cn_convert.diffusers_rules(cfg) if layout == "diffusers" else cn_convert.sai_rules(cfg)
        return [r for r in rules if r.targets], ""  # Stability's ControlNet files have no prefix
    if kind == "mmdit":
        rules = mmdit_convert.diffusers_rules(cfg) if layout == "diffusers" else mmdit_convert.sai_rules(cfg)
    elif kind == "vae":
        rules = vae_convert.diffusers_rules(cfg) if layout == "diffusers" else vae_convert.sai_rules(cfg)
    elif kind == "clip":
        rules = te.clip_rules(cfg, "text_model.")
    else:
        rules = te.t5_rules(cfg)
    prefix = "" if layout == "diffusers" else comp.SAI_PREFIXES[component]
    return [r for r in rules if r.targets], prefix


def _stream(params, rules, abstract, prefix: str):
    shapes = source_shapes(rules, abstract)
    dtypes = {}
    for r in rules:
        for s in r.sources:
            t = r.targets[0]
            leaf = params
            for k in t.path:
                leaf = leaf[k]
            dtypes[s] = np.dtype(leaf.dtype)
    header = {prefix + k: (shapes[k], dtypes[k]) for r in rules for k in r.sources}
    items = ((prefix + k, v) for k, v in to_source(params, rules))
    return header, items


def export(ckpt: str, fmt: str, out: str, step: int | None = None) -> list[str]:
    """Writes an sd3-jax checkpoint to a diffusers folder (fmt "diffusers") or one Stability file ("sai").

    `ckpt` may be an `sd3-jax train` workdir (its EMA transformer at `step`, None: the latest, with the rest
    of its `init_from` checkpoint), or anything else `SD3Pipeline.load` takes."""
    import jax

    from sd3_jax.convert.opened import open_source

    if fmt not in ("diffusers", "sai"):
        raise ValueError(f"--format must be diffusers or sai, got {fmt!r}")
    from sd3_jax.convert.workdir import is_run, lora_of_run, run_info

    if is_run(ckpt) and run_info(ckpt)["adapter"] == "lora":  # the adapter of a step, as the run exports it
        from sd3_jax.convert.lora import export_lora_diffusers

        if fmt != "diffusers":
            raise ValueError("a LoRA run exports in diffusers' layout only: --format diffusers")
        model, lora = lora_of_run(ckpt, step)
        with atomic_directory(out) as tmp:
            export_lora_diffusers(jax.device_get(lora), model, tmp)
        return ["lora"]
    opened = open_source(ckpt, step)
    manifest = opened.manifest
    if "controlnet" in manifest["components"]:
        return _export_controlnet(opened, fmt, out)

    written = []
    if fmt == "sai":
        if os.path.exists(out):
            raise FileExistsError(f"{out} already exists")
        header, gens, meta = {}, [], {"format": "pt"}
        for component, entry in manifest["components"].items():
            cfg, params = opened.load(component, None, None)
            params = jax.device_get(params)
            rules, prefix = _rules_for_export(component, cfg, "sai")
            h, items = _stream(params, rules, comp.ABSTRACT[entry["kind"]](cfg), prefix)
            header.update(h)
            gens.append(items)
            meta.update(comp.unseen_config(component, cfg))
        write_safetensors(out, (kv for g in gens for kv in g), metadata=meta, shapes=header)
        return [out]
    with atomic_directory(out) as tmp:
        index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.30.0"}
        classes = {
            "mmdit": ("diffusers", "SD3Transformer2DModel"),
            "vae": ("diffusers", "AutoencoderKL"),
            "clip": ("transformers", "CLIPTextModelWithProjection"),
            "t5": ("transformers", "T5EncoderModel"),
        }
        for component, entry in manifest["components"].items():
            kind = entry["kind"]
            cfg, params = opened.load(component, None, None)
            params = jax.device_get(params)
            rules, prefix = _rules_for_export(component, cfg, "diffusers")
            header, items = _stream(params, rules, comp.ABSTRACT[kind](cfg), prefix)
            os.makedirs(os.path.join(tmp, component))
            fname = "diffusion_pytorch_model.safetensors" if kind in ("mmdit", "vae") else "model.safetensors"
            write_safetensors(
                os.path.join(tmp, component, fname), items, metadata={"format": "pt"}, shapes=header
            )
            config = {
                "mmdit": mmdit_convert.config_to_diffusers,
                "vae": vae_convert.config_to_diffusers,
                "clip": te.hf_clip_config,
                "t5": te.hf_t5_config,
            }[kind](cfg)
            with open(os.path.join(tmp, component, "config.json"), "w") as f:
                json.dump(config, f, indent=1)
            index[component] = list(classes[kind])
            written.append(component)
        base = opened.tokenizers or ""
        for t in TOKENIZERS:
            if os.path.isdir(os.path.join(base, t)):
                shutil.copytree(os.path.join(base, t), os.path.join(tmp, t))
                fast = os.path.exists(os.path.join(base, t, "tokenizer.json")) and t == "tokenizer_3"
                index[t] = [
                    "transformers",
                    "T5TokenizerFast" if fast or t == "tokenizer_3" else "CLIPTokenizer",
                ]
        os.makedirs(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(manifest.get("scheduler", DEFAULT_SCHEDULER), f, indent=1)
        index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        for name in (
            "text_encoder",
            "text_encoder_2",
            "text_encoder_3",
            "tokenizer",
            "tokenizer_2",
            "tokenizer_3",
        ):
            index.setdefault(name, [None, None])
        index.setdefault("image_encoder", [None, None])
        index.setdefault("feature_extractor", [None, None])
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(index, f, indent=1)
    return written


def _export_controlnet(opened: Any, fmt: str, out: str) -> list[str]:
    """A ControlNet as diffusers saves one (a folder with config.json and diffusion_pytorch_model.safetensors)
    or as one Stability-layout file (single-stream nets)."""
    import jax

    cfg, params = opened.load("controlnet", None, None)
    params = jax.device_get(params)
    rules, _ = _rules_for_export("controlnet", cfg, fmt)
    header, items = _stream(params, rules, comp.ABSTRACT["controlnet"](cfg), "")
    if fmt == "sai":
        if os.path.exists(out):
            raise FileExistsError(f"{out} already exists")
        meta = {"format": "pt", **comp.unseen_config("controlnet", cfg)}
        write_safetensors(out, items, metadata=meta, shapes=header)
        return [out]
    with atomic_directory(out) as tmp:
        path = os.path.join(tmp, "diffusion_pytorch_model.safetensors")
        write_safetensors(path, items, metadata={"format": "pt"}, shapes=header)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cn_convert.config_to_diffusers(cfg), f, indent=1)
    return ["controlnet"]
