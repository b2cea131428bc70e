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

import collections
import contextlib
import dataclasses
import json
import math
import os
import shutil
import types
import typing
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


def _json_type_ok(value: Any, hint: Any) -> bool:
    """Whether a JSON value can stand for a config field annotated `hint` (int, float, str, bool, tuples,
    optionals); unknown annotations accept anything."""
    if hint is Any:
        return True
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_json_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            return False
        inner = args[0] if args and (len(args) == 2 and args[1] is Ellipsis) else None
        return inner is None or all(_json_type_ok(v, inner) for v in value)
    return True


def config_from_json(cls: type, d: Mapping[str, Any], **overrides: Any) -> Any:
    """The config dataclass `cls` from its JSON form; anything that does not fit raises
    CheckpointFormatError naming the field."""
    if not isinstance(d, Mapping):
        raise CheckpointFormatError(f"{cls.__name__}: config is not a JSON object")
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, v in d.items():
        if k not in names:
            raise CheckpointFormatError(f"{cls.__name__}: unknown config field {k!r} in checkpoint")
        if k.endswith("dtype"):
            try:
                v = None if v is None else jnp.dtype(v)
            except TypeError:
                raise CheckpointFormatError(f"{cls.__name__}.{k}: {v!r} is not a dtype") from None
        else:
            if not _json_type_ok(v, hints.get(k, Any)):
                raise CheckpointFormatError(f"{cls.__name__}.{k}: {v!r} does not fit {hints.get(k)}"[:300])
            if isinstance(v, list):
                v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        kw[k] = v
    kw.update(overrides)
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{cls.__name__} from checkpoint: {e}"[:300]) from None


def save_params_streaming(
    directory: str,
    leaves: Iterable[tuple[tuple[str, ...], np.ndarray]],
    chunk_bytes: int = 256 << 20,
) -> int:
    """Writes (path, array) pairs into one Orbax PyTree checkpoint at `directory`.

    Leaves are gathered into partial saves of about `chunk_bytes` each (Orbax v1 partial saves, finalized
    at the end), each written in the background while the next is built: host memory stays at two chunks
    plus the largest leaf, and a small model is written in one save rather than one per leaf (each save
    costs a fixed tenth of a second or so).

    Returns the number of parameters written.
    """
    import orbax.checkpoint.experimental.v1 as ocp
    from orbax.checkpoint.experimental.v1 import partial

    # Uncompressed: weights hardly compress (zstd took a fifth off random bf16 weights, and made SD3
    # Medium's conversion 45 s instead of 26 and every load slower); the checkpoint is the params' size.
    ctx = ocp.Context()
    ctx.array.saving.use_compression = False
    ctx.memory.deepcopy_host_arrays = False  # each leaf is ours alone and never changes: no second copy
    count, pending, size, writing = 0, {}, 0, None

    def flush():  # writes this chunk in the background while the next one is built
        nonlocal pending, size, writing
        if pending:
            with ctx:
                if writing is not None:
                    writing.result()
                writing = partial.save_async(directory, pending)
        pending, size = {}, 0

    for path, value in leaves:
        value = np.asarray(value)
        node = pending
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
        count += value.size
        size += value.nbytes
        del value, node
        if size >= chunk_bytes:
            flush()
    flush()
    with ctx:
        if writing is not None:
            writing.result()
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
    if not os.path.isdir(directory):
        raise CheckpointFormatError(f"{directory}: component folder missing")
    with _unreadable(directory):
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
    sizes = [math.prod(t.shape) * jnp.dtype(t.dtype).itemsize for t in jax.tree.leaves(targets)]
    if jax.process_count() == 1 and _plain_layout(directory):
        with _unreadable(directory):
            return _read_direct(os.path.join(directory, "state"), targets, max(sizes, default=0))
    # Unbounded, Orbax holds read buffers for the whole tree at once (1.45x the params at the peak): fine
    # where that fits three times in the memory available, else reads are kept to the largest array plus 1 GiB
    # ahead of the arrays being placed (slower: SD3.5 Large's 16 GB then loads in 24 GB).
    ctx = ocp.Context()
    if 3 * sum(sizes) > _available_memory():
        ctx.memory.read_concurrent_bytes = max(sizes, default=0) + (1 << 30)
    with _unreadable(directory), ctx:
        return ocp.load(directory, targets)


def _plain_layout(directory: str) -> bool:
    """Whether `directory` holds what `save_params_streaming` writes: one OCDBT database of zarr3 arrays
    under state/, named by their dotted key paths (what `_read_direct` reads)."""
    try:
        with open(os.path.join(directory, "state", "_METADATA")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("use_ocdbt") is True and meta.get("use_zarr3") is True


# In flight at once beyond the largest array: more gains nothing on a local disk and costs host memory.
READ_AHEAD_BYTES = 1 << 30


def _read_direct(state: str, targets: Any, largest: int) -> Any:
    """Reads every array of an OCDBT/zarr3 tree with TensorStore into page-aligned host buffers and places
    them with `jax.device_put` (single process).

    Orbax reads each array into a zeroed buffer after TensorStore's own, then `device_put` copies it
    again: three fresh buffers per byte, where a page fault costs a few microseconds on a virtual machine
    and the copy's transparent huge pages can stall for compaction. Here TensorStore writes into the final
    buffer, and on the CPU backend `device_put` adopts a 64-byte-aligned buffer without a copy: SD3
    Medium's 4.2 GB loads in about the time of one read of its files rather than three.
    """
    import mmap

    import tensorstore as ts

    base = {"driver": "file", "path": state + "/", "file_io_locking": {"mode": "non_atomic"}}
    kvstore = {"driver": "ocdbt", "base": base, "manifest": {"driver": "file", "path": state + "/"}}
    context = ts.Context({"file_io_concurrency": {"limit": 128}})
    leaves, treedef = jax.tree_util.tree_flatten_with_path(targets)

    def buffer(t: jax.ShapeDtypeStruct) -> np.ndarray:
        n = math.prod(t.shape) * np.dtype(t.dtype).itemsize
        if n < 1 << 20:  # small arrays: a copy costs nothing, a mapping each would
            return np.empty(t.shape, t.dtype)
        pages = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return np.frombuffer(pages, t.dtype, math.prod(t.shape)).reshape(t.shape)

    def start(path, t):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        spec = {"driver": "zarr3", "kvstore": {**kvstore, "path": name}, "fill_missing_data_reads": False}
        store = ts.open(spec, open=True, read=True, context=context).result()
        if tuple(store.shape) != tuple(t.shape):
            raise CheckpointFormatError(
                f"{state}: stored {name} is {tuple(store.shape)}, its metadata says {tuple(t.shape)}"
            )
        if store.dtype.numpy_dtype != np.dtype(t.dtype):
            store = ts.cast(store, np.dtype(t.dtype))
        out = buffer(t)
        return out, ts.array(out).write(store)

    placed, pending, in_flight = [], collections.deque(), 0

    def finish():
        nonlocal in_flight
        out, write, t = pending.popleft()
        write.result()
        in_flight -= out.nbytes
        out.flags.writeable = False  # the array's alone; on CPU device_put adopts it
        placed.append(jax.device_put(out, t.sharding))

    for path, t in leaves:
        out, write = start(path, t)
        pending.append((out, write, t))
        in_flight += out.nbytes
        while pending and in_flight > largest + READ_AHEAD_BYTES:
            finish()
    while pending:
        finish()
    return jax.tree_util.tree_unflatten(treedef, placed)


def _available_memory() -> int:
    """Bytes of memory the host can still give (MemAvailable), or a large number where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


@contextlib.contextmanager
def _unreadable(directory: str) -> Iterator[None]:
    """Turns whatever Orbax or TensorStore raise on a damaged folder (missing or truncated files, bad
    metadata: OSError, ValueError, KeyError, tensorstore's own errors...) into one CheckpointFormatError
    line."""
    try:
        yield
    except CheckpointFormatError:
        raise
    except Exception as e:  # noqa: BLE001 -- any failure to read stored params means a damaged checkpoint
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointFormatError(
            f"{directory}: cannot read the stored params, the checkpoint is damaged "
            f"({type(e).__name__}: {first})"
        ) from None


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


KINDS = (
    "mmdit",
    "vae",
    "clip",
    "t5",
    "identity",
    "controlnet",
)  # a manifest's component kinds (components.CONFIG_CLASS)


def write_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump({"format": FORMAT, **manifest}, f, indent=1)


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise CheckpointFormatError(f"{directory}: no such checkpoint directory")
    if not os.path.exists(path):
        raise CheckpointFormatError(f"{directory}: not a complete sd3-jax checkpoint (no {MANIFEST})")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (ValueError, RecursionError) as e:
        raise CheckpointFormatError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise CheckpointFormatError(f"{directory}: checkpoint format {found!r}, expected {FORMAT}"[:300])
    components = manifest.get("components")
    if not isinstance(components, dict) or not all(
        isinstance(c, dict) and c.get("kind") in KINDS and isinstance(c.get("config"), dict)
        for c in components.values()
    ):
        raise CheckpointFormatError(f"{path}: corrupt manifest (components are not {{kind, config}} entries)")
    return manifest
