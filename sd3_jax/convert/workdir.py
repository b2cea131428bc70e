"""A training workdir read as a checkpoint: its EMA transformer with the `init_from` checkpoint's VAE, text
encoders, tokenizers, scheduler and sampling defaults.

`sd3-jax train` writes WORKDIR/run.json when it starts (the transformer's config and the checkpoint it was
initialised from); `SD3Pipeline.load(WORKDIR, step=N)`, `sd3-jax sample --checkpoint WORKDIR [--step N]` and
`sd3-jax export WORKDIR` read a run through `open_run`. Only the `ema_params` subtree of the step's train
state is restored, straight into device arrays, not the params and optimizer moments beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from sd3_jax.convert.orbax_io import CheckpointFormatError, config_to_json, read_manifest

RUN = "run.json"


def write_run_info(
    workdir: str, model: Any, init_from: str | None, adapter: str, adapter_config: Any = None
) -> None:
    """Records what a checkpoint of this run needs to be sampled (process 0 writes it, atomically): the
    transformer's config, the checkpoint it started from, the adapter and its config (the ControlNet's, or
    the LoRA's rank, alpha and targets) under the adapter's name."""
    info = {
        "model": config_to_json(model),
        "init_from": os.path.abspath(init_from) if init_from else None,
        "adapter": adapter,
    }
    if adapter_config is not None:
        info[adapter] = config_to_json(adapter_config)
    tmp = os.path.join(workdir, RUN + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(workdir, RUN))


def is_run(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RUN)) and os.path.isdir(os.path.join(path, "checkpoints"))


@dataclasses.dataclass(frozen=True)
class Run:
    workdir: str
    step: int
    base: str  # the init_from checkpoint: every component but the transformer, and the tokenizers
    manifest: dict  # the base's, with the run's transformer config

    @property
    def transformer_config(self) -> Any:
        from sd3_jax.convert.components import read_config

        return read_config("mmdit", self.manifest["components"]["transformer"]["config"])

    def transformer(self, dtype: Any = None, shardings: Any = None) -> tuple[Any, Any]:
        """(config, EMA params of the step) as device arrays, sharded like `shardings` where given."""
        from sd3_jax.convert.mmdit import abstract_params

        cfg = self.transformer_config
        return cfg, restore_ema(self.workdir, self.step, abstract_params(cfg), dtype, shardings)


def restore_ema(workdir: str, step: int, abstract: Any, dtype: Any = None, shardings: Any = None) -> Any:
    """The `ema_params` subtree of a run's train state at `step`, shaped like `abstract`, as device arrays
    (one device, or sharded like `shardings`); nothing else of the state is read."""
    import jax
    import orbax.checkpoint as ocp

    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s), abstract, shardings
    )
    restore = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype), target)
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    try:
        got = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"ema_params": target}, restore_args={"ema_params": restore}, partial_restore=True
                )
            ),
        )
    except (ValueError, KeyError, OSError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointFormatError(
            f"{workdir}: cannot read the EMA params of step {step} ({type(e).__name__}: {first})"
        ) from None
    return got.state["ema_params"]


def run_info(workdir: str) -> dict:
    """WORKDIR/run.json, checked for the fields every run has."""
    path = os.path.join(workdir, RUN)
    try:
        with open(path) as f:
            info = json.load(f)
        info["model"], info["init_from"], info["adapter"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointFormatError(f"{path}: corrupt run record ({type(e).__name__}: {e})") from None
    return info


def run_step(workdir: str, step: int | None) -> int:
    """`step` if the run has a complete checkpoint there; None: its latest."""
    import orbax.checkpoint as ocp

    steps = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints")).all_steps()
    if not steps:
        raise CheckpointFormatError(f"{workdir}: no complete checkpoint yet")
    if step is None:
        return max(steps)
    if step not in steps:
        raise ValueError(
            f"{workdir}: no checkpoint at step {step} (have {', '.join(map(str, sorted(steps)))})"
        )
    return step


def _adapter_info(workdir: str, adapter: str) -> dict:
    info = run_info(workdir)
    if info["adapter"] != adapter:
        raise ValueError(f"{workdir}: not a {adapter} run (adapter {info['adapter'] or 'none'})")
    if adapter not in info:
        raise CheckpointFormatError(
            f"{workdir}: run.json predates {adapter} configs in it; load what the run exported, "
            f"{os.path.join(workdir, adapter)}"
        )
    return info


def lora_of_run(workdir: str, step: int | None = None) -> tuple[Any, Any]:
    """(transformer config, the EMA adapter of `step`, None: the latest) of a LoRA run."""
    import jax

    from sd3_jax.convert.components import read_config
    from sd3_jax.convert.mmdit import abstract_params
    from sd3_jax.lora import LoraConfig, init_lora

    info = _adapter_info(workdir, "lora")
    model = read_config("mmdit", info["model"])
    lora_cfg = LoraConfig(**info["lora"])
    abstract = jax.eval_shape(lambda k: init_lora(k, abstract_params(model), lora_cfg), jax.random.key(0))
    return model, restore_ema(os.path.abspath(workdir), run_step(workdir, step), abstract)


def open_controlnet_run(workdir: str, step: int | None = None) -> tuple[dict, Any]:
    """A ControlNet run read as a ControlNet checkpoint: (manifest, load(component, dtype, shardings)) with
    the EMA net of `step` (None: the latest)."""
    from sd3_jax.convert.components import read_config
    from sd3_jax.convert.controlnet import abstract_params

    info = _adapter_info(workdir, "controlnet")
    step = run_step(workdir, step)
    manifest = {"components": {"controlnet": {"kind": "controlnet", "config": info["controlnet"]}}}
    cfg = read_config("controlnet", info["controlnet"])

    def load(component, dtype=None, shardings=None):
        return cfg, restore_ema(os.path.abspath(workdir), step, abstract_params(cfg), dtype, shardings)

    return manifest, load


def open_run(workdir: str, step: int | None = None) -> Run:
    """The run in `workdir` at `step` (None: its latest complete checkpoint)."""
    info = run_info(workdir)
    model, init_from, adapter = info["model"], info["init_from"], info["adapter"]
    if adapter:  # ControlNet runs open as ControlNets (open_controlnet_run) before they get here
        raise ValueError(
            f"{workdir}: a {adapter} run: sample its base with it, "
            f"`sd3-jax sample --checkpoint {init_from} --lora {workdir}`"
        )
    if not init_from:
        raise ValueError(
            f"{workdir}: trained from scratch (no init_from), so it has no VAE or text encoders to sample "
            "with; train with --set init_from=CHECKPOINT"
        )
    step = run_step(workdir, step)
    manifest = read_manifest(init_from)
    components = dict(manifest["components"])
    components["transformer"] = {**components.get("transformer", {}), "kind": "mmdit", "config": model}
    return Run(os.path.abspath(workdir), step, init_from, {**manifest, "components": components})
