"""The sd3-jax checkpoint: one Orbax directory per component, written leaf by leaf and atomically.

    CKPT/
      sd3_jax.json            manifest, written last: format, components (kind, config, dtype), scheduler
      transformer/ vae/ text_encoder/ text_encoder_2/ text_encoder_3/   Orbax PyTree checkpoints of params
      tokenizer/ tokenizer_2/ tokenizer_3/                                tokenizer files, copied as they are

Params are streamed into Orbax one leaf at a time (Orbax partial saves, finalized per component), so a
conversion holds one param in host memory. The whole directory is built beside its destination and renamed
into place at the end: a conversion that fails or is killed leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "sd3-jax/1"
MANIFEST = "sd3_jax.json"


class CheckpointFormatError(ValueError):
    """A directory that is not a complete sd3-jax checkpoint."""


def dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else jnp.dtype(dtype).name


def config_to_json(cfg: Any) -> dict[str, Any]:
    """A frozen config dataclass as JSON: tuples as lists, dtypes by name."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name.endswith("dtype"):
            v = dtype_name(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def config_from_json(cls: type, d: Mapping[str, Any], **overrides: Any) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in d.items():
        if k not in names:
            raise CheckpointFormatError(f"{cls.__name__}: unknown config field {k!r} in checkpoint")
        if k.endswith("dtype"):
            v = None if v is None else jnp.dtype(v)
        elif isinstance(v, list):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        kw[k] = v
    kw.update(overrides)
    return cls(**kw)


def _nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    tree: Any = value
    for p in reversed(path):
        tree = {p: tree}
    return tree


def save_params_streaming(directory: str, leaves: Iterable[tuple[tuple[str, ...], np.ndarray]]) -> int:
    """Writes (path, array) pairs into one Orbax PyTree checkpoint at `directory`, one leaf per save.

    Returns the number of parameters written.
    """
    from orbax.checkpoint.experimental.v1 import partial

    count = 0
    for path, value in leaves:
        partial.save(directory, _nest(path, np.asarray(value)))
        count += int(np.prod(np.shape(value)))
        del value
    partial.finalize(directory)
    return count


def restore_params(directory: str, abstract: Any, dtype: Any = None, shardings: Any = None) -> Any:
    """Restores a component's params straight into device arrays (sharded when `shardings` is given).

    Args:
      directory: the component directory inside a checkpoint.
      abstract: a tree of ShapeDtypeStructs (the model's `jax.eval_shape` params).
      dtype: dtype to restore in; None keeps the stored dtype of each param.
      shardings: a tree of `jax.sharding.Sharding` like `abstract`; None: everything on the default device.
    """
    import orbax.checkpoint.experimental.v1 as ocp

    # Read with the API that wrote it (`save_params_streaming`: orbax v1 partial saves), which keeps its
    # metadata beside the component, not in state/ where the v0 StandardCheckpointer looks (and warns).
    directory = os.path.abspath(directory)  # orbax finds no metadata under relative paths
    stored = ocp.metadata(directory).metadata
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if shardings is None:
        shardings = jax.tree.map(lambda _: device, abstract)

    def target(path, a, m, s):
        if tuple(a.shape) != tuple(m.shape):
            raise CheckpointFormatError(
                f"{directory}: stored param {jax.tree_util.keystr(path)} is {tuple(m.shape)}, model wants "
                f"{tuple(a.shape)}"
            )
        return jax.ShapeDtypeStruct(a.shape, dtype or m.dtype, sharding=s)

    try:
        targets = jax.tree_util.tree_map_with_path(target, abstract, stored, shardings)
    except ValueError as e:
        raise CheckpointFormatError(
            f"{directory}: stored params do not match the model's tree: {e}"
        ) from None
    return ocp.load(directory, targets)


@contextlib.contextmanager
def atomic_directory(out: str) -> Iterator[str]:
    """Yields a scratch directory beside `out` that becomes `out` only if the block finishes.

    Refuses to replace an existing `out`. On any error (or a kill) the scratch directory is removed or left
    under a name that does not look like a checkpoint.
    """
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise FileExistsError(f"{out} already exists; choose another --out or remove it first")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.partial-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump({"format": FORMAT, **manifest}, f, indent=1)


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise CheckpointFormatError(f"{directory}: no such checkpoint directory")
    if not os.path.exists(path):
        raise CheckpointFormatError(f"{directory}: not a complete sd3-jax checkpoint (no {MANIFEST})")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise CheckpointFormatError(
            f"{directory}: checkpoint format {manifest.get('format')!r}, expected {FORMAT}"
        )
    return manifest
