"""Anything a pipeline can be loaded from, opened the same way: an sd3-jax checkpoint, a training workdir,
or PyTorch weights (a diffusers pipeline folder, Stability single files, a Hugging Face model id) converted
in memory one tensor at a time straight into device arrays, with no Orbax copy written.

`open_source(source)` gives the components' configs (a manifest, as `sd3_jax.json` holds one), the folder
holding the tokenizers, and `load(component, dtype, shardings)` -> (config, params).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from sd3_jax.convert.orbax_io import config_to_json, read_manifest

Loader = Callable[[str, Any, Any], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Opened:
    manifest: dict  # {"components": {name: {"kind", "config"}}, "scheduler", "sampling"?}
    tokenizers: str | None  # the folder with tokenizer/, tokenizer_2/, tokenizer_3/
    load: Loader  # (component, dtype, shardings) -> (config, params as device arrays)


def open_source(
    source: str, step: int | None = None, tokenizers: str | None = None, turbo: bool | None = None
) -> Opened:
    """Opens `source` for loading; `step` picks a training workdir's checkpoint, `tokenizers` a folder for
    single files without a diffusers folder beside them, `turbo` marks SD3.5 Large Turbo (sampling
    defaults) as `sd3-jax convert --turbo` does."""
    from sd3_jax.convert import hub
    from sd3_jax.convert.pipeline_io import load_component
    from sd3_jax.convert.workdir import is_run, open_controlnet_run, open_run, run_info

    if step is not None and not is_run(source):
        raise ValueError(f"{source}: a step asked of something that is not a training workdir")
    if is_run(source) and run_info(source)["adapter"] == "controlnet":
        manifest, load = open_controlnet_run(source, step)
        return Opened(manifest, None, load)
    if is_run(source):
        run = open_run(source, step)

        def load_run(component, dtype=None, shardings=None):
            if component == "transformer":
                return run.transformer(dtype, shardings)
            return load_component(run.base, component, dtype, shardings)

        return Opened(run.manifest, run.base, load_run)
    torch_folder = os.path.isdir(source) and (
        os.path.exists(os.path.join(source, "model_index.json"))
        or any(f.endswith(".safetensors") for f in os.listdir(source))
    )
    if os.path.isdir(source) and not torch_folder:
        # An sd3-jax checkpoint (read_manifest says what is wrong with one that is incomplete).
        manifest = read_manifest(source)
        return Opened(manifest, source, lambda c, dtype=None, sh=None: load_component(source, c, dtype, sh))
    if hub.is_model_id(source):
        source = hub.resolve(source)
    return _open_torch([source], tokenizers, turbo)


def _open_torch(sources: list[str], tokenizers: str | None, turbo: bool | None) -> Opened:
    from sd3_jax.convert.mapping import check_keys
    from sd3_jax.convert.pipeline_io import check_tokenizers, plans, sampling_defaults

    found, folder, scheduler = plans(sources)
    for p in found:  # names first: a missing tensor is one error line before anything is read
        check_keys(p.src, p.rules, p.what)
    tok_dir = tokenizers or folder
    check_tokenizers(found, tok_dir)
    by_name = {p.component: p for p in found}
    manifest: dict[str, Any] = {
        "components": {p.component: {"kind": p.kind, "config": config_to_json(p.config)} for p in found},
        "scheduler": scheduler,
    }
    model, sampling = sampling_defaults(found, sources, turbo)
    if sampling is not None:
        manifest["model"], manifest["sampling"] = model, sampling

    def load(component, dtype=None, shardings=None):
        from sd3_jax.convert.mapping import CheckpointError

        p = by_name.get(component)
        if p is None:
            raise CheckpointError(f"{', '.join(sources)}: no {component} (found {', '.join(by_name)})")
        return p.config, device_params(p, dtype, shardings)

    return Opened(manifest, tok_dir, load)


def device_params(plan: Any, dtype: Any = None, shardings: Any = None) -> Any:
    """A plan's params, read and converted one param at a time, each put on its device(s) at once (sharded
    like `shardings`, a tree as the params', where given); host memory holds one param at a time."""
    import jax
    import numpy as np

    from sd3_jax.convert.mapping import iter_params

    np_dtype = np.dtype(dtype) if dtype is not None else None
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree: dict[str, Any] = {}
    for path, value in iter_params(plan.src, plan.rules, plan.abstract, plan.what, np_dtype):
        sharding = shardings
        for k in path:
            sharding = sharding[k] if sharding is not None else None
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        # A copy of its own: `value` may be a view of the memory-mapped file.
        node[path[-1]] = jax.device_put(np.array(value, copy=True), sharding or device)
        del value
    return tree
