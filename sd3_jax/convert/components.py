"""The components of an SD3 pipeline and how each is read from a PyTorch layout: one `Plan` per component.

A plan is everything needed to stream a component's params out of a tensor source: its config, its
table of rules, the model's abstract params and a name for errors. The kinds are mmdit, vae, clip, t5.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from sd3_jax.convert import controlnet as cn_convert
from sd3_jax.convert import mmdit as mmdit_convert
from sd3_jax.convert import orbax_io
from sd3_jax.convert import text_encoders as te
from sd3_jax.convert import vae as vae_convert
from sd3_jax.convert.mapping import CheckpointError, Rule, TensorSource, open_tensors
from sd3_jax.nn.clip import CLIPConfig
from sd3_jax.nn.controlnet import ControlNetConfig
from sd3_jax.nn.mmdit import MMDiTConfig
from sd3_jax.nn.t5 import T5Config
from sd3_jax.nn.vae import VAEConfig

# Component directory names, as diffusers names its subfolders.
KIND_OF = {"transformer": "mmdit", "vae": "vae", "text_encoder": "clip", "text_encoder_2": "clip",
           "text_encoder_3": "t5", "controlnet": "controlnet"}  # fmt: skip
CONFIG_CLASS = {"mmdit": MMDiTConfig, "vae": VAEConfig, "clip": CLIPConfig, "t5": T5Config,
                "controlnet": ControlNetConfig}  # fmt: skip
assert set(CONFIG_CLASS) < set(orbax_io.KINDS)  # what read_manifest accepts
ABSTRACT = {
    "mmdit": mmdit_convert.abstract_params,
    "vae": vae_convert.abstract_params,
    "clip": te.clip_abstract,
    "t5": te.t5_abstract,
    "controlnet": cn_convert.abstract_params,
}
# Stability single-file prefixes.
SAI_PREFIXES = {
    "transformer": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}


@dataclasses.dataclass
class Plan:
    component: str  # transformer, vae, text_encoder, text_encoder_2, text_encoder_3
    config: Any
    src: TensorSource
    rules: list[Rule]
    abstract: Any
    what: str

    @property
    def kind(self) -> str:
        return KIND_OF[self.component]


def _hf_config(folder: str | None) -> dict[str, Any] | None:
    if folder and os.path.exists(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f)
    return None


# Config fields that tensor shapes cannot tell; sd3-jax's own exports record them in the file's metadata.
UNSEEN_FIELDS = {
    "mmdit": ("num_heads", "head_dim", "sample_size"),
    "vae": ("norm_groups", "norm_eps", "scaling_factor", "shift_factor"),
    "clip": ("heads", "act", "eps", "eos_token_id"),
    "t5": ("max_distance", "act", "eps"),
    "controlnet": (
        "num_heads",
        "head_dim",
        "sample_size",
        "in_channels",
        "extra_channels",
        "force_zeros_for_pooled",
    ),
}
METADATA_KEY = "sd3_jax.config.{}"


def unseen_config(component: str, cfg: Any) -> dict[str, str]:
    """Safetensors metadata recording the fields of `cfg` that shapes cannot tell."""
    fields = {k: v for k, v in orbax_io.config_to_json(cfg).items() if k in UNSEEN_FIELDS[KIND_OF[component]]}
    return {METADATA_KEY.format(component): json.dumps(fields)}


def plan_component(component: str, src: TensorSource, folder: str | None = None) -> Plan:
    """The plan for one component whose tensors (without any single-file prefix) are in `src`.

    `folder` is the diffusers subfolder it came from, whose config.json wins over shapes; a file exported by
    sd3-jax carries the fields shapes cannot tell in its metadata.
    """
    cfg_json = _hf_config(folder)
    kind = KIND_OF[component]
    recorded = json.loads(src.metadata.get(METADATA_KEY.format(component), "{}"))
    if kind == "mmdit":
        layout, src = mmdit_convert.detect_layout(src)
        fields = mmdit_convert.config_from_diffusers(cfg_json) if cfg_json else {}
        cfg = mmdit_convert.infer_config(src, layout, **{**recorded, **fields})
        rules = mmdit_convert.diffusers_rules(cfg) if layout == "diffusers" else mmdit_convert.sai_rules(cfg)
        what = f"MMDiT {layout} layout"
    elif kind == "vae":
        layout, src = vae_convert.detect_layout(src)
        fields = vae_convert.config_from_diffusers(cfg_json) if cfg_json else {}
        cfg = vae_convert.infer_config(src, layout, **{**recorded, **fields})
        rules = vae_convert.diffusers_rules(cfg) if layout == "diffusers" else vae_convert.sai_rules(cfg)
        what = f"VAE {layout} layout"
    elif kind == "controlnet":
        layout = cn_convert.detect_layout(src)
        fields = cn_convert.config_from_diffusers(cfg_json) if cfg_json else {}
        cfg = cn_convert.infer_config(src, layout, **{**recorded, **fields})
        rules = cn_convert.diffusers_rules(cfg) if layout == "diffusers" else cn_convert.sai_rules(cfg)
        what = f"ControlNet {layout} layout"
    elif kind == "clip":
        cfg, prefix = te.clip_config_from(src, cfg_json)
        cfg = dataclasses.replace(cfg, **recorded) if recorded and not cfg_json else cfg
        rules = te.clip_rules(cfg, prefix) + te._ignored(src, "clip")
        what = f"CLIP text encoder ({component})"
    else:
        cfg = te.t5_config_from(src, cfg_json)
        cfg = dataclasses.replace(cfg, **recorded) if recorded and not cfg_json else cfg
        embed = "shared.weight" if "shared.weight" in src else "encoder.embed_tokens.weight"
        rules = te.t5_rules(cfg, embed=embed) + (te._ignored(src, "t5") if embed == "shared.weight" else [])
        what = "T5 encoder"
    return Plan(component, cfg, src, rules, ABSTRACT[kind](cfg), what)


def _guess_bare(src: TensorSource) -> str:
    """Which component a file without single-file prefixes holds."""
    keys = src.keys()
    if cn_convert.is_controlnet(keys):
        return "controlnet"
    if any(k.startswith(("joint_blocks.", "transformer_blocks.")) for k in keys):
        return "transformer"
    if "encoder.conv_in.weight" in src or "decoder.conv_in.weight" in src:
        return "vae"
    if "shared.weight" in src or any(k.startswith("encoder.block.") for k in keys):
        return "text_encoder_3"
    name = next((k for k in keys if k.endswith("embeddings.token_embedding.weight")), None)
    if name is not None:
        return "text_encoder" if src.shape(name)[1] <= 768 else "text_encoder_2"
    sample = ", ".join(sorted(keys)[:5]) or "no tensors"
    raise CheckpointError(
        f"{src.description}: unsupported architecture: not an SD3 transformer, VAE, CLIP or T5 "
        f"(found {sample})"
    )


def plans_from_file(path: str) -> list[Plan]:
    """Plans for every component in one safetensors file (a Stability single file or one component)."""
    src = open_tensors(path)
    found = [(c, p) for c, p in SAI_PREFIXES.items() if src.prefixes([p])]
    if not found:
        return [plan_component(_guess_bare(src), src)]
    covered = set()
    plans = []
    for component, prefix in found:
        sub = src.with_prefix(prefix)
        covered.update(prefix + k for k in sub.keys())
        plans.append(plan_component(component, sub))
    rest = [k for k in src.keys() if k not in covered]
    if rest:
        raise CheckpointError(
            f"{path}: unexpected {len(rest)} tensors outside the known prefixes: {rest[:8]}"
        )
    return plans


def plans_from_diffusers(folder: str) -> list[Plan]:
    """Plans for the model components of a diffusers pipeline folder (with model_index.json)."""
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    cls = index.get("_class_name", "")
    if not re.match(r"StableDiffusion3", cls):
        raise CheckpointError(f"{folder}: unsupported pipeline {cls!r} (expected StableDiffusion3Pipeline)")
    plans = []
    for component in KIND_OF:
        entry = index.get(component)
        sub = os.path.join(folder, component)
        if entry is None or entry == [None, None] or not os.path.isdir(sub):
            continue
        plans.append(plan_component(component, open_tensors(sub), sub))
    return plans


def read_config(kind: str, d: Mapping[str, Any], **overrides: Any) -> Any:
    return orbax_io.config_from_json(CONFIG_CLASS[kind], d, **overrides)
