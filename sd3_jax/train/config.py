"""Typed training configs, Python config files, and `--set key=value` overrides by dotted name."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import typing
from typing import Any

from sd3_jax.lora import LoraConfig
from sd3_jax.nn.mmdit import MMDiTConfig
from sd3_jax.sharding.mesh import MeshConfig


def check_ranges(obj: Any, **ranges: tuple[float | None, float | None]) -> None:
    """Raises ValueError for a float field of `obj` that is NaN or infinite, or a field outside its
    [low, high] in `ranges` (None: unbounded on that side)."""
    name = type(obj).__name__
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{name}.{f.name} must be a finite number, got {v}")
    for field, (low, high) in ranges.items():
        v = getattr(obj, field)
        values = v if isinstance(v, tuple) else (v,)
        if any((low is not None and x < low) or (high is not None and x > high) for x in values):
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            raise ValueError(f"{name}.{field} must lie in [{lo}, {hi}], got {v}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4  # peak learning rate
    warmup_steps: int = 0  # linear warmup from 0
    schedule: str = "constant"  # after warmup: constant or cosine (to 0 at the last step)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled (AdamW)
    clip_norm: float = 1.0  # global gradient norm clip; 0 disables

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule must be constant or cosine, got {self.schedule!r}")
        check_ranges(
            self,
            lr=(0, None),
            warmup_steps=(0, None),
            b1=(0, 1),
            b2=(0, 1),
            eps=(0, None),
            weight_decay=(0, None),
            clip_norm=(0, None),
        )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # synthetic (random latents/embeddings), prepared (ArrayRecord shards), pairs (a JSONL of preference
    # pairs for objective="dpo", see sd3_jax.train.dpo.PairsSource)
    kind: str = "synthetic"
    path: str = ""  # prefix of prepared shards, or the pairs JSONL
    num_examples: int = 256  # synthetic: dataset size
    latent_size: int = 8  # synthetic: latent side
    text_len: int = 4  # synthetic: tokens per CLIP stream and T5
    clip_l_dim: int = 8  # synthetic widths of the text streams (CLIP-L + CLIP-G <= context_dim)
    clip_g_dim: int = 8
    t5_len: int = 4
    val_examples: int = 16  # held-out examples for the validation loss
    shuffle: bool = True

    def __post_init__(self):
        if self.kind not in ("synthetic", "prepared", "shapes", "pairs"):
            raise ValueError(f"data.kind must be synthetic, prepared, shapes or pairs, got {self.kind!r}")
        check_ranges(
            self,
            num_examples=(1, None),
            latent_size=(1, None),
            text_len=(1, None),
            clip_l_dim=(1, None),
            clip_g_dim=(1, None),
            t5_len=(0, None),
            val_examples=(0, None),
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: MMDiTConfig = dataclasses.field(default_factory=MMDiTConfig.tiny)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    formulation: str = "rectified_flow"  # rectified_flow, ldm_linear, cosine, edm
    timesteps: str = "logit_normal"  # training density: uniform, logit_normal, mode, cosmap
    logit_m: float = 0.0  # logit-normal location
    logit_s: float = 1.0  # logit-normal scale
    mode_s: float = 1.29  # mode-sampling heavy-tail scale
    shift: float = 1.0  # resolution-dependent timestep shift alpha applied to training t (1: none)
    text_dropout: float = 0.464  # per-encoder condition dropout probability
    batch_size: int = 8  # global batch, over all processes
    steps: int = 100
    seed: int = 0
    ema_decay: float = 0.999  # 0 disables EMA (ema_params track params)
    compute_dtype: str = "bfloat16"  # activations; master params stay float32
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    log_every: int = 10
    eval_every: int = 50  # validation loss every N steps (0: never)
    eval_timesteps: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # fixed t for the validation loss
    init_from: str = ""  # sd3-jax checkpoint directory to fine-tune from ("" trains from scratch)
    # Fine-tuning through a LoRA adapter: adapter="lora" trains `lora` on the frozen init_from transformer
    # (only the adapter is in the optimizer state and the checkpoints; the trained EMA adapter is written
    # to WORKDIR/lora/pytorch_lora_weights.safetensors in diffusers' layout). objective="dpo" trains it
    # with Diffusion-DPO on data.kind="pairs", the frozen init_from transformer as the reference, weight
    # dpo_beta, plus dpo_sft_weight times the policy's denoising error on the preferred images (an SFT
    # anchor; 0 is plain Diffusion-DPO, dpo_beta=0 with a weight > 0 is SFT on the preferred images alone).
    # adapter="controlnet" trains a ControlNet steering the frozen init_from transformer from the data's
    # "control" latents: controlnet_layers blocks (0: half the base's), initialised from the base's first
    # blocks (controlnet_init="base", as diffusers' from_transformer) or "fresh", controlnet_extra_channels
    # control channels beyond the latent ones (1: an inpainting mask); exported to WORKDIR/controlnet/.
    adapter: str = ""  # "" (train the whole MMDiT), "lora" or "controlnet"
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    controlnet_layers: int = 0
    controlnet_init: str = "base"
    controlnet_extra_channels: int = 0
    objective: str = "denoise"  # "denoise" (the formulation's loss) or "dpo"
    dpo_beta: float = 2000.0
    dpo_sft_weight: float = 0.0
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0: look up by device kind
    # Reporting: TensorBoard events in WORKDIR/tensorboard/ (the scalars of metrics.jsonl); every
    # sample_every steps (0: never) a grid of sample_prompts (`--set sample_prompts=a cat|a dog`), each
    # sample_images times from sample_seed, sampled with the EMA params in sample_steps steps at
    # sample_size pixels (0: the checkpoint's default size).
    tensorboard: bool = True
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ("a photo of a cat", "a red square in the top left")
    sample_images: int = 4
    sample_steps: int = 28
    sample_seed: int = 0
    sample_size: int = 0

    def __post_init__(self):
        if self.formulation not in ("rectified_flow", "ldm_linear", "cosine", "edm"):
            raise ValueError(f"formulation {self.formulation!r} unknown")
        if self.timesteps not in ("uniform", "logit_normal", "mode", "cosmap"):
            raise ValueError(f"timesteps {self.timesteps!r} unknown")
        if self.batch_size < 1 or self.steps < 0:
            raise ValueError("batch_size must be >= 1 and steps >= 0")
        if self.adapter not in ("", "lora", "controlnet"):
            raise ValueError(f"adapter {self.adapter!r} unknown; expected '', 'lora' or 'controlnet'")
        if self.controlnet_init not in ("base", "fresh"):
            raise ValueError(f"controlnet_init {self.controlnet_init!r} unknown; expected 'base' or 'fresh'")
        if self.objective not in ("denoise", "dpo"):
            raise ValueError(f"objective {self.objective!r} unknown; expected 'denoise' or 'dpo'")
        if self.dpo_beta < 0 or self.dpo_sft_weight < 0:
            raise ValueError(
                f"dpo_beta ({self.dpo_beta}) and dpo_sft_weight ({self.dpo_sft_weight}) must be >= 0"
            )
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"compute_dtype {self.compute_dtype!r} unknown")
        check_ranges(
            self,
            logit_s=(1e-6, None),
            mode_s=(-1, 2 / (math.pi - 2)),  # the paper's range, where the density is positive
            shift=(1e-6, None),
            text_dropout=(0, 1),
            ema_decay=(0, 1),
            checkpoint_every=(1, None),
            keep_checkpoints=(1, None),
            log_every=(1, None),
            eval_every=(0, None),
            eval_timesteps=(0, 1),
            peak_flops=(0, None),
            sample_every=(0, None),
            sample_images=(1, None),
            sample_steps=(1, None),
            sample_size=(0, None),
            controlnet_layers=(0, None),
            controlnet_extra_channels=(0, None),
        )
        from sd3_jax.nn.mmdit import MMDiT  # a synthetic size the model cannot take fails here, not later

        n = self.data.latent_size
        MMDiT(self.model).check_latent_shape((1, n, n, self.model.in_channels))
        if self.sample_every and not self.sample_prompts:
            raise ValueError("sample_every needs at least one of sample_prompts")


def check_finetune(cfg: TrainConfig) -> None:
    """Raises ValueError when the adapter, objective, data and init_from settings do not go together."""
    if cfg.adapter and not cfg.init_from:
        raise ValueError(
            f"adapter={cfg.adapter!r} needs init_from: the sd3-jax checkpoint whose transformer it steers"
        )
    if cfg.adapter == "controlnet" and cfg.data.kind != "prepared":
        raise ValueError(
            "adapter='controlnet' reads prepared records with a 'control' array: data.kind='prepared'"
        )
    if cfg.objective == "dpo":
        if cfg.adapter != "lora":
            raise ValueError("objective='dpo' trains through a LoRA adapter: set adapter='lora'")
        if cfg.data.kind != "pairs":
            raise ValueError(
                f"objective='dpo' reads preference pairs: set data.kind='pairs', not {cfg.data.kind!r}"
            )
    elif cfg.data.kind == "pairs":
        raise ValueError("data.kind='pairs' is for objective='dpo'")


def load_config(path: str) -> Any:
    """Runs a Python config file and returns its `get_config()`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"sd3_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config()")
    return module.get_config()


def _parse_dtype(value: str) -> Any:
    """A compute or param dtype by name (float32, bfloat16, float16), or None."""
    if value.lower() == "none":
        return None
    if value not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"expected float32, bfloat16, float16 or none, got {value!r}")
    import jax.numpy as jnp

    return jnp.dtype(value)


def _parse(value: str, current: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if isinstance(current, bool) or hint is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(current, tuple) or origin is tuple:
        items = [v for v in value.strip("()[] ").split(",") if v.strip()]
        args = typing.get_args(hint)
        conv = args[0] if args and args[0] in (int, float, str) else (type(current[0]) if current else str)
        if conv is str and "|" in value:  # prompts hold commas: "|" between them ("a, b|" for one)
            return tuple(v.strip() for v in value.split("|") if v.strip())
        return tuple(conv(v.strip()) for v in items)
    if value.lower() == "none" and (current is None or type(None) in typing.get_args(hint)):
        return None
    for t in (int, float):
        if isinstance(current, t) and not isinstance(current, bool) or hint is t:
            return t(value)
    return value


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Returns `cfg` with each `dotted.name=value` applied; unknown names and bad values raise ValueError."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        shown = item if item.isprintable() else repr(item)
        cfg = _replace(cfg, key.strip().split("."), value.strip(), shown)
    return cfg


def _preset(cls: type, name: str, full: str) -> Any:
    """`--set model=sd35_large`: a config section replaced whole by one of its classmethod presets."""
    presets = sorted(k for k, v in vars(cls).items() if isinstance(v, classmethod))
    if name not in presets:
        raise ValueError(f"--set {full}: {name!r} is not a {cls.__name__} preset ({', '.join(presets)})")
    return getattr(cls, name)()


def _replace(obj: Any, path: list[str], value: str, full: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ValueError(f"--set {full}: {'.'.join(path)} is not a config section")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    name = path[0]
    if name not in fields:
        raise ValueError(
            f"--set {full}: {type(obj).__name__} has no field {name!r} (fields: {', '.join(fields)})"
        )
    current = getattr(obj, name)
    if len(path) == 1 and dataclasses.is_dataclass(current):
        new = _preset(type(current), value, full)
    elif len(path) > 1:
        new = _replace(current, path[1:], value, full)
    else:
        try:
            hints = typing.get_type_hints(type(obj), globalns=vars(sys.modules[type(obj).__module__]))
        except NameError:
            hints = {}
        try:
            if name.endswith("dtype") and not isinstance(current, str):
                new = _parse_dtype(value)
            else:
                new = _parse(value, current, hints.get(name))
        except ValueError as e:
            raise ValueError(f"--set {full}: {e}") from None
    try:
        return dataclasses.replace(obj, **{name: new})
    except TypeError as e:  # a value of the wrong type that a check compared or did arithmetic with
        raise ValueError(f"--set {full}: {e}") from None
