"""ArrayRecord shards of precomputed arrays (VAE latents, text embeddings), and `prepare`, which writes them.

A record set with prefix `out/train` is the shards `out/train-00000-of-00004.array_record`, ... and the
index `out/train.json`, written last: a record set without its index is incomplete and is never read.
Example i goes to shard i % num_shards, so shards fill evenly from a stream of unknown length, and
`PreparedSource(prefix)[i]` is the i-th example written.

Each record is one example, a dict of numpy arrays, serialised without pickle as

    b"SD3R" | uint32 LE header length | JSON header [[key, dtype, shape], ...] | raw C-order bytes per key

where dtype is numpy's `dtype.str` (e.g. "<f4", "<U12"), or the name for ml_dtypes types ("bfloat16",
"float8_e4m3fn"), whose `str` is an opaque "<V2". Round trips are bitwise.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import ml_dtypes  # noqa: F401  (registers bfloat16 and friends with numpy, for np.dtype(name))
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from sd3_jax.data import pipeline

log = logging.getLogger(__name__)

FORMAT = "sd3_jax.records/1"
_MAGIC = b"SD3R"
PREPARED_KEYS = ("latents", "clip_l", "clip_g", "t5", "pooled_l", "pooled_g")  # names encode_fn returns

EncodeFn = Callable[[np.ndarray, list[str]], Mapping[str, np.ndarray]]


# ---------------------------------------------------------------------------------------------------------
# One record.


def _dtype_name(dtype: np.dtype) -> str:
    if dtype.kind == "O":
        raise ValueError("object arrays cannot be stored; convert strings with np.asarray(..., dtype=str)")
    return dtype.name if dtype.kind == "V" else dtype.str


def encode_example(example: Mapping[str, Any]) -> bytes:
    """Serialises a dict of arrays (or values np.asarray accepts) into one record's bytes."""
    arrays = {k: np.asarray(v) for k, v in example.items()}  # tobytes below writes C order
    header = json.dumps([[k, _dtype_name(a.dtype), list(a.shape)] for k, a in arrays.items()]).encode()
    return b"".join([_MAGIC, struct.pack("<I", len(header)), header, *(a.tobytes() for a in arrays.values())])


def decode_example(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode_example`; arrays are read-only views of `data`."""
    if data[:4] != _MAGIC:
        raise ValueError("not an sd3_jax record: bad magic bytes")
    (n,) = struct.unpack("<I", data[4:8])
    offset, out = 8 + n, {}
    for key, dtype, shape in json.loads(data[8 : 8 + n]):
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        out[key] = np.frombuffer(data, dtype, count, offset).reshape(tuple(shape))
        offset += count * dtype.itemsize
    if offset != len(data):
        raise ValueError(f"record has {len(data) - offset} trailing bytes")
    return out


# ---------------------------------------------------------------------------------------------------------
# Record sets.


def index_path(path_prefix: str | os.PathLike) -> Path:
    """The index file of a record set: `{prefix}.json`."""
    return Path(f"{os.fspath(path_prefix)}.json")


def shard_paths(path_prefix: str | os.PathLike, num_shards: int) -> list[Path]:
    """`{prefix}-00000-of-0000N.array_record`, ..."""
    return [
        Path(f"{os.fspath(path_prefix)}-{i:05d}-of-{num_shards:05d}.array_record") for i in range(num_shards)
    ]


def _signature(example: Mapping[str, np.ndarray]) -> str:
    return ";".join(f"{k}:{'x'.join(map(str, a.shape))}" for k, a in example.items())


def write_records(
    path_prefix: str | os.PathLike,
    examples: Iterable[Mapping[str, Any]],
    num_shards: int,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes examples (dicts of arrays, all with the same keys and dtypes) as ArrayRecord shards.

    Shards are written under temporary names and renamed once all are complete; the index `{prefix}.json`
    is removed first and written last (also via rename), so a run that fails leaves no index behind.

    Args:
      path_prefix: output path prefix; its folder is created.
      examples: the examples, consumed once.
      num_shards: number of shard files.
      metadata: stored in the index under "metadata"; read after `examples` is exhausted, so a generator
        may fill it in as it goes.

    Returns:
      The index: count, keys, dtypes, shapes (None for a key whose shape varies), shard names and counts,
      and, when examples have more than one set of shapes, "groups": {signature: [indices]}.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards {num_shards} must be positive")
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    index_file = index_path(prefix)
    index_file.unlink(missing_ok=True)
    paths = shard_paths(prefix, num_shards)
    tmps = [p.with_name(p.name + ".tmp") for p in paths]
    writers = [ArrayRecordWriter(os.fspath(t), "group_size:1") for t in tmps]
    counts, groups = [0] * num_shards, collections.defaultdict(list)
    dtypes: dict[str, str] = {}
    shapes: dict[str, list[int] | None] = {}
    n = 0
    try:
        for n, example in enumerate(examples, 1):
            arrays = {k: np.asarray(v) for k, v in example.items()}
            kinds = {k: _dtype_name(a.dtype) for k, a in arrays.items()}
            if n == 1:
                dtypes, shapes = kinds, {k: list(a.shape) for k, a in arrays.items()}
            elif kinds != dtypes:
                raise ValueError(f"example {n - 1} has dtypes {kinds}, the first had {dtypes}")
            for k, a in arrays.items():
                if shapes[k] is not None and list(a.shape) != shapes[k]:
                    shapes[k] = None
            writers[(n - 1) % num_shards].write(encode_example(arrays))
            counts[(n - 1) % num_shards] += 1
            groups[_signature(arrays)].append(n - 1)
        while writers:
            writers.pop().close()
        for t, p in zip(tmps, paths):
            os.replace(t, p)
    except BaseException:
        for w in writers:
            try:
                w.close()
            except Exception:  # already failing; the temporary files go next
                pass
        for t in tmps:
            t.unlink(missing_ok=True)
        raise
    index = {
        "format": FORMAT,
        "count": n,
        "keys": list(dtypes),
        "dtypes": dtypes,
        "shapes": shapes,
        "num_shards": num_shards,
        "shards": [p.name for p in paths],
        "shard_counts": counts,
        "metadata": dict(metadata or {}),
    }
    if len(groups) > 1:
        index["groups"] = dict(groups)
    tmp = index_file.with_name(index_file.name + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_file)
    log.info("wrote %d records in %d shards to %s", n, num_shards, prefix)
    return index


class PreparedSource:
    """Random access to a record set written by `write_records`; item i is a dict of arrays."""

    def __init__(self, path_prefix: str | os.PathLike):
        """Reads the index and opens the shards.

        Raises:
          FileNotFoundError: when the index is missing (the set was never completed).
        """
        self.prefix = Path(path_prefix)
        file = index_path(self.prefix)
        if not file.is_file():
            raise FileNotFoundError(f"no record index {file}: the record set is missing or incomplete")
        self.index = json.loads(file.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{file} has format {self.index.get('format')!r}, expected {FORMAT!r}")
        counts = self.index["shard_counts"]
        self._num_shards = len(counts)
        self._offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        paths = [os.fspath(self.prefix.parent / name) for name in self.index["shards"]]
        self._records = grain.sources.ArrayRecordDataSource(paths)
        if len(self._records) != self.index["count"]:
            raise ValueError(
                f"{self.prefix}: shards hold {len(self._records)} records, index says {len(self)}"
            )

    def __len__(self) -> int:
        return int(self.index["count"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        shard, position = index % self._num_shards, index // self._num_shards
        return decode_example(self._records[int(self._offsets[shard]) + position])

    def groups(self) -> dict[str, list[int]] | None:
        """{shape signature: indices} when records come in several shapes (buckets), else None."""
        return self.index.get("groups")

    @property
    def metadata(self) -> dict[str, Any]:
        return self.index.get("metadata", {})

    def __repr__(self) -> str:
        return (
            f"PreparedSource({os.fspath(self.prefix)!r}, {len(self)} records, shapes={self.index['shapes']})"
        )


# ---------------------------------------------------------------------------------------------------------
# Precomputing latents and text embeddings.


def prepare(
    source: Sequence[dict[str, Any]],
    encode_fn: EncodeFn,
    out_prefix: str | os.PathLike,
    batch_size: int,
    num_shards: int,
    *,
    transforms: Sequence[Any] = (),
    seed: int = 0,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Encodes a source in order (no shuffle) and writes the outputs as a record set.

    Records flagged {"skip": True} are counted, never encoded. The rest pass through `transforms` (e.g.
    `[pipeline.BucketResizeCrop(buckets)]`; a RandomMap draws from a generator seeded with (seed, index))
    and are batched per image shape; images reach `encode_fn` as float32 (B, H, W, 3) in [-1, 1]. A last
    short batch of a shape is padded by repeating its final image, so a jitted encoder sees one batch
    size, and the padding's outputs are dropped.

    Args:
      source: records {"image": uint8 or [-1, 1] float (H, W, 3), "caption": str}.
      encode_fn: (images (B, H, W, 3), captions) -> {name: (B, ...) array}, e.g. keys of PREPARED_KEYS;
        records with a "control" image add `controls=` (B, H, W, 3) in [-1, 1].
      out_prefix: record set prefix (see `write_records`).
      batch_size: images per encode_fn call.
      num_shards: shard files.
      transforms: per-record transforms applied before encoding.
      seed: seed of random transforms.
      metadata: stored in the index (e.g. which VAE and text encoders made the arrays), with the stats.

    Returns:
      {"written": n, "skipped": m, "reasons": {reason: count}}, counting the source's own index-time
      skips (`source.skipped`) too.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be positive")
    reasons: collections.Counter[str] = collections.Counter(r for _, r in getattr(source, "skipped", ()))
    meta = dict(metadata or {})

    def encode(pending: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        images = [pipeline.normalize(np.asarray(e["image"])) for e in pending]
        images += [images[-1]] * (batch_size - len(images))
        captions = [str(e["caption"]) for e in pending]
        captions += [captions[-1]] * (batch_size - len(captions))
        kw = {}
        if "control" in pending[0]:  # ControlNet data: the control images, encoded as the images are
            controls = [pipeline.normalize(np.asarray(e["control"])) for e in pending]
            kw["controls"] = np.stack(controls + [controls[-1]] * (batch_size - len(controls)))
        out = {k: np.asarray(v) for k, v in encode_fn(np.stack(images), captions, **kw).items()}
        for k, v in out.items():
            if v.shape[:1] != (batch_size,):
                raise ValueError(f"encode_fn returned {k!r} of shape {v.shape}, expected ({batch_size}, ...)")
        return [{k: v[i] for k, v in out.items()} for i in range(len(pending))]

    def examples():
        buffers: dict[tuple[int, ...], list[dict[str, Any]]] = collections.defaultdict(list)
        for i in range(len(source)):
            element = source[i]
            if not element.get("skip"):
                rng = np.random.default_rng((seed, i))
                element = pipeline.apply_transforms(element, transforms, rng)
            if element.get("skip"):
                reasons[str(element.get("reason", "unknown"))] += 1
                continue
            shape = np.shape(element["image"])
            buffers[shape].append(element)
            if len(buffers[shape]) == batch_size:
                yield from encode(buffers.pop(shape))
            if (i + 1) % (100 * batch_size) == 0:
                log.info(
                    "prepare: %d / %d records read, %d skipped", i + 1, len(source), sum(reasons.values())
                )
        for shape in sorted(buffers):
            yield from encode(buffers[shape])
        meta["prepare"] = {"skipped": sum(reasons.values()), "reasons": dict(sorted(reasons.items()))}

    index = write_records(out_prefix, examples(), num_shards, metadata=meta)
    stats = {
        "written": index["count"],
        "skipped": sum(reasons.values()),
        "reasons": dict(sorted(reasons.items())),
    }
    log.info("prepare: %s", stats)
    return stats
