"""Checkpoint mappings as tables: source tensor names -> param paths, each with its transform.

A `Rule` says which source tensors make which params and how (transpose, split a fused qkv, swap shift and
scale), and how to go back. `to_params` applies a table to a tensor source, one tensor at a time, checking
names and shapes against the model's abstract params; `to_source` runs the same table backwards to export.
Scanned (stacked) layers are addressed by a `Target` with a layer index into the leading axis.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from sd3_jax.convert.safetensors_io import SafetensorsFile

Path = tuple[str, ...]
FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or misshapen tensors."""


@dataclasses.dataclass(frozen=True)
class Target:
    path: Path  # param path, e.g. ("blocks_0", "attn", "q", "kernel")
    layer: int | None = None  # index into the leading (scanned) axis, None for unstacked params


@dataclasses.dataclass(frozen=True)
class Rule:
    sources: tuple[str, ...]  # source tensor names
    targets: tuple[Target, ...]  # params they make
    forward: Callable[..., tuple[np.ndarray, ...]]  # source arrays -> target arrays
    backward: Callable[..., tuple[np.ndarray, ...]]  # target arrays -> source arrays


def _one(f: Callable[[np.ndarray], np.ndarray]) -> Callable[..., tuple[np.ndarray, ...]]:
    return lambda *a: (f(*a),)


def rule(source: str, path: Path, layer: int | None = None, fwd=None, bwd=None) -> Rule:
    """One tensor to one param, with an optional transform and its inverse."""
    ident = lambda a: a
    return Rule((source,), (Target(path, layer),), _one(fwd or ident), _one(bwd or ident))


def dense(
    source: str, path: Path, layer: int | None = None, bias: bool = True, out_shape=None, in_shape=None
):
    """A torch Linear (`weight` (out, in), `bias`) to a flax kernel (in..., out...) and bias (out...).

    `out_shape`/`in_shape` reshape the output/input features, e.g. (heads, head_dim) for attention.
    """

    def fwd(w):
        w = w.T
        if in_shape is not None:
            w = w.reshape(*in_shape, w.shape[-1])
        if out_shape is not None:
            w = w.reshape(*w.shape[: w.ndim - 1], *out_shape)
        return w

    def bwd(k):
        n_in = len(in_shape) if in_shape is not None else 1
        k = k.reshape(int(np.prod(k.shape[:n_in])), -1)
        return k.T

    rules = [rule(f"{source}.weight", path + ("kernel",), layer, fwd, bwd)]
    if bias:
        bshape = out_shape
        rules.append(
            rule(
                f"{source}.bias",
                path + ("bias",),
                layer,
                (lambda b: b.reshape(bshape)) if bshape is not None else None,
                (lambda b: b.reshape(-1)) if bshape is not None else None,
            )
        )
    return rules


def split(source: str, targets: Sequence[Target], fwd_each: Callable[[np.ndarray], np.ndarray], bwd_each):
    """One fused tensor (e.g. Stability's `qkv`) split in equal parts along axis 0, each transformed."""
    n = len(targets)

    def fwd(a):
        return tuple(fwd_each(p) for p in np.split(a, n, axis=0))

    def bwd(*ps):
        return (np.concatenate([bwd_each(p) for p in ps], axis=0),)

    return Rule((source,), tuple(targets), fwd, bwd)


def swap_halves(a: np.ndarray) -> np.ndarray:
    """(shift, scale) <-> (scale, shift) along axis 0; its own inverse."""
    x, y = np.split(a, 2, axis=0)
    return np.concatenate([y, x], axis=0)


# ---------------------------------------------------------------------------------------------------------
# Tensor sources: one interface over dicts of arrays, safetensors files and diffusers folders.


class TensorSource:
    """Named tensors read one at a time: a dict, one safetensors file, or a sharded set of them."""

    def __init__(
        self,
        readers: Mapping[str, Any],
        prefix: str = "",
        description: str = "tensors",
        metadata: Mapping[str, str] | None = None,
    ):
        self._readers = readers  # name (without prefix) -> object with read/shape/dtype for the full name
        self._prefix = prefix
        self.description = description
        self.metadata = dict(metadata or {})  # the safetensors header's __metadata__, if any

    def keys(self) -> list[str]:
        return list(self._readers)

    def __contains__(self, name: str) -> bool:
        return name in self._readers

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._readers[name].shape(self._prefix + name))

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self._readers[name].dtype(self._prefix + name))

    def read(self, name: str) -> np.ndarray:
        return self._readers[name].read(self._prefix + name)

    def with_prefix(self, prefix: str) -> TensorSource:
        """The tensors whose names start with `prefix`, named without it."""
        readers = {k[len(prefix) :]: r for k, r in self._readers.items() if k.startswith(prefix)}
        return TensorSource(readers, self._prefix + prefix, f"{self.description} [{prefix}]", self.metadata)

    def prefixes(self, candidates: Sequence[str]) -> list[str]:
        return [p for p in candidates if any(k.startswith(p) for k in self._readers)]


class _DictReader:
    def __init__(self, d: Mapping[str, Any]):
        self._d = d

    def _arr(self, name):
        v = self._d[name]
        if hasattr(v, "detach"):  # a torch tensor, kept out of our imports
            import torch

            v = v.detach().cpu()
            if v.dtype == torch.bfloat16:
                import ml_dtypes

                return v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return v.numpy()
        return np.asarray(v)

    def shape(self, name):
        return np.shape(self._d[name])

    def dtype(self, name):
        return self._arr(name).dtype

    def read(self, name):
        return self._arr(name)


def open_tensors(source: Any) -> TensorSource:
    """A TensorSource over a dict, a `.safetensors` file, a diffusers index json, or a folder of those."""
    if isinstance(source, TensorSource):
        return source
    if isinstance(source, Mapping):
        r = _DictReader(source)
        return TensorSource({k: r for k in source}, description="state dict")
    path = os.fspath(source)
    if os.path.isdir(path):
        index = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors.index.json")]
        files = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
        if index:
            return open_tensors(os.path.join(path, index[0]))
        if len(files) != 1:
            raise CheckpointError(
                f"{path}: expected one .safetensors file or an index, found {files or 'none'}"
            )
        return open_tensors(os.path.join(path, files[0]))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.endswith(".index.json"):
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        base = os.path.dirname(path)
        files = {name: SafetensorsFile(os.path.join(base, name)) for name in sorted(set(weight_map.values()))}
        return TensorSource({k: files[v] for k, v in weight_map.items()}, description=path)
    if path.endswith((".pt", ".ckpt", ".bin", ".pth")):
        raise CheckpointError(
            f"{path}: pickled checkpoints are not read (they can run code); convert it to .safetensors first"
        )
    f = SafetensorsFile(path)
    return TensorSource({k: f for k in f.keys()}, description=path, metadata=f.metadata)


# ---------------------------------------------------------------------------------------------------------
# Applying a table.


def _fmt(names: Sequence[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(n if n.isprintable() else repr(n) for n in names[:limit]) + more


def check_keys(src: TensorSource, rules: Sequence[Rule], what: str) -> None:
    """Raises CheckpointError naming missing and unexpected tensors."""
    if "scaled_fp8" in src:
        raise CheckpointError(
            f"{what}: {src.description} is a scaled fp8 file (ComfyUI's *_fp8_scaled, weights with "
            "per-tensor "
            "scale_weight), which is not supported: use the fp16 or plain fp8 file"
        )
    wanted = {s for r in rules for s in r.sources}
    have = set(src.keys())
    missing, unexpected = wanted - have, have - wanted
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors: {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors: {_fmt(unexpected)}")
        raise CheckpointError(f"{src.description} does not match {what}: " + "; ".join(parts))


def _get(tree: Mapping[str, Any], path: Path) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict[str, Any], path: Path, value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def to_params(
    src: TensorSource,
    rules: Sequence[Rule],
    abstract: Mapping[str, Any],
    what: str,
    dtype: Any = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Builds a numpy params tree shaped like `abstract` (a tree of ShapeDtypeStructs) from `src`.

    Tensors keep the file's dtype unless `dtype` is given. Every param must be made by rules, and every
    source tensor used by one.
    """
    out: dict[str, Any] = {}
    for path, value in iter_params(src, rules, abstract, what, dtype, progress):
        _set(out, path, value)
    return out


def iter_params(
    src: TensorSource,
    rules: Sequence[Rule],
    abstract: Mapping[str, Any],
    what: str,
    dtype: Any = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[Path, np.ndarray]]:
    """Yields (param path, array) one param at a time, reading only the tensors that make it.

    Host memory holds one param plus the source tensors of one rule: a stacked param of L layers is filled
    layer by layer. Names are checked before anything is read; shapes as each tensor is read.
    """
    check_keys(src, rules, what)
    by_path: dict[Path, list[tuple[Rule, int, Target]]] = {}
    for r in rules:
        for i, t in enumerate(r.targets):
            by_path.setdefault(t.path, []).append((r, i, t))
    unmade = []
    for path, leaf in _leaves(abstract):
        layers = {t.layer for _, _, t in by_path.get(path, [])}
        if not layers or (None not in layers and layers != set(range(leaf.shape[0]))):
            unmade.append("/".join(path))
    if unmade:
        raise CheckpointError(f"{what}: no tensor in {src.description} makes params {_fmt(unmade)}")
    for path in by_path:
        try:
            _get(abstract, path)
        except (KeyError, TypeError):
            raise CheckpointError(f"{what}: table names param {'/'.join(path)} the model lacks") from None
    order = [(path, leaf, by_path[path]) for path, leaf in _leaves(abstract)]
    reads = _read_ahead(src, [r.sources for _, _, entries in order for r, _, _ in entries])
    for path, leaf, entries in order:
        buf = None
        for r, i, t in entries:
            arrays = next(reads)
            # fp8 files (t5xxl_fp8_e4m3fn) are storage only: every fp8 value is exact in bf16.
            want = np.dtype(dtype) if dtype is not None else None
            if want is None and arrays[0].dtype in FP8:
                want = np.dtype(ml_dtypes.bfloat16)
            if len({a.dtype for a in arrays}) > 1:
                arrays = [a.astype(want or arrays[0].dtype, copy=False) for a in arrays]
            # Otherwise the cast happens in the copy into the param below (rules only rearrange, so casting
            # after them is exact): one pass over the tensor instead of a cast and then a copy.
            if progress is not None:
                progress(sum(a.nbytes for a in arrays) // len(r.targets))
            shape = tuple(leaf.shape) if t.layer is None else tuple(leaf.shape[1:])
            try:
                value = r.forward(*arrays)[i]
            except ValueError:
                value = None
            if value is None or tuple(value.shape) != shape:
                got = ", ".join(f"{s} {tuple(a.shape)}" for s, a in zip(r.sources, arrays))
                raise CheckpointError(
                    f"{what}: shape mismatch for {got}; the model expects "
                    f"{_expected_source_shapes(r, abstract)} "
                    f"(param {'/'.join(t.path)} {shape})"
                )
            if t.layer is None:
                buf = value
                if want is not None and value.dtype != want:
                    buf = np.empty(value.shape, want)
                    _copy(buf, value)
            else:
                if buf is None:
                    buf = np.empty(leaf.shape, want or value.dtype)
                _copy(buf[t.layer], value)
            del arrays, value
        yield path, buf


def _read_ahead(src: TensorSource, groups: Sequence[Sequence[str]], depth: int = 2) -> Iterator[list]:
    """The arrays of each group of tensor names, in order, read `depth` groups ahead on a thread: the disk
    reads (which release the GIL) overlap the copies and casts of the groups before them."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="sd3-jax-read") as pool:
        pending = [pool.submit(lambda g=g: [src.read(s) for s in g]) for g in groups[:depth]]
        for k in range(len(groups)):
            arrays = pending.pop(0).result()
            if k + depth < len(groups):
                g = groups[k + depth]
                pending.append(pool.submit(lambda g=g: [src.read(s) for s in g]))
            yield arrays


def _copy(dst: np.ndarray, value: np.ndarray, block: int = 256) -> None:
    """dst[...] = value, cast to dst's dtype on the way, in cache-sized tiles where value is a transposed
    matrix (torch's (out, in) weights become (in, out...) kernels): numpy's element-by-element strided copy
    is 3-4x slower."""
    m = value.reshape(value.shape[0], -1) if value.ndim >= 2 else None
    if m is None or not (m.T.flags.c_contiguous and np.may_share_memory(m, value)) or m.size < block * block:
        dst[...] = value
        return
    d = dst.reshape(m.shape)
    for i in range(0, m.shape[0], block):
        for j in range(0, m.shape[1], block):
            d[i : i + block, j : j + block] = m[i : i + block, j : j + block]


def _leaves(tree: Mapping[str, Any], prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _expected_source_shapes(r: Rule, abstract: Mapping[str, Any]) -> str:
    return ", ".join(f"{name} {shape}" for name, shape in source_shapes([r], abstract).items())


def source_shapes(rules: Sequence[Rule], abstract: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shape each source tensor must have, from the abstract params (used to stream exports)."""
    shapes = {}
    for r in rules:
        outs = []
        for t in r.targets:
            want = _get(abstract, t.path)
            shape = tuple(want.shape) if t.layer is None else tuple(want.shape[1:])
            outs.append(np.broadcast_to(np.zeros((), np.float32), shape))
        for s, a in zip(r.sources, r.backward(*outs)):
            shapes[s] = tuple(a.shape)
    return shapes


def to_source(params: Mapping[str, Any], rules: Sequence[Rule]) -> Iterator[tuple[str, np.ndarray]]:
    """Runs the table backwards: yields (source name, numpy array) one rule at a time."""
    for r in rules:
        parts = []
        for t in r.targets:
            a = _get(params, t.path)
            parts.append(np.asarray(a if t.layer is None else a[t.layer]))
        for s, a in zip(r.sources, r.backward(*parts)):
            yield s, np.ascontiguousarray(a)
