"""Image transforms and the grain loader: aspect-ratio buckets, crops, flips, sharding, resumable state.

The loader is a grain `MapDataset` pipeline, per group of same-shaped records:

    source -> shuffle (reshuffled each epoch) -> repeat -> transforms -> [shard_index::shard_count]
           -> to_iter_dataset -> drop skip records, counting them, and stack batches

Groups (e.g. one per aspect-ratio bucket, from `bucket_groups` or `PreparedSource.groups()`) are mixed
batch by batch in proportion to their sizes, so every batch holds one shape. Without groups the whole
source is one group, which suits sources whose records all share a shape (the shapes demo, data prepared
at one resolution, or images passed through a single-bucket `BucketResizeCrop`).

Random transforms draw from a generator grain seeds with (seed, group, position in the repeated stream),
so augmentations are a pure function of the seed, the record and the epoch, independent of the number of
processes and workers. Sharding slices the shuffled stream, so in each epoch the processes see disjoint
records, and with no worker processes and no skipped records the union of the processes' k-th batches
is stream positions [k B P, (k + 1) B P) whatever the process count P. Finite streams are cut to a
multiple of shard_count so every process gets as many records. Worker processes (`worker_count`) each
batch their own slice of the stream, so the worker count changes which records share a batch (not their
augmentations); resume with the worker count that saved the state.

The iterator's state (`get_state`, a JSON-able dict) is the position in each group's stream plus the skip
counts; a restored iterator yields bitwise the batches the original would have. It is a grain
`DatasetIterator`, so `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` also store it in an
Orbax checkpoint.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

Bucket = tuple[int, int]  # (width, height) in pixels


# ---------------------------------------------------------------------------------------------------------
# Buckets and image operations.


MAX_BUCKET_AREA_ERROR = 0.25  # buckets whose area is off base_size² by more than this fraction are dropped


def buckets(base_size: int, step: int = 64, max_ratio: float = 2.0) -> list[Bucket]:
    """Aspect-ratio buckets of area about base_size², sides multiples of step, sorted by width / height.

    For each landscape width w (a multiple of step from base_size up) the height is the multiple of step
    whose area w * h is nearest base_size² (halves round up); buckets with w / h over max_ratio, or area
    off by more than MAX_BUCKET_AREA_ERROR (a step coarse next to base_size), are dropped, and each is
    mirrored to its portrait twin. E.g. `buckets(64, 16)` is [(48, 96), (48, 80), (64, 64), (80, 48),
    (96, 48)], and `buckets(1024, 64)` has 13 from (768, 1408) to (1408, 768).
    """
    if base_size <= 0 or step <= 0 or base_size % step:
        raise ValueError(f"base_size {base_size} must be a positive multiple of step {step}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio {max_ratio} must be at least 1")
    area, found = base_size * base_size, set()
    for w in range(base_size, int(base_size * max_ratio) + step, step):
        h = math.floor(area / w / step + 0.5) * step
        if h <= 0 or w / h > max_ratio + 1e-9:
            break
        if abs(w * h / area - 1) <= MAX_BUCKET_AREA_ERROR:
            found.update({(w, h), (h, w)})
    return sorted(found, key=lambda b: b[0] / b[1])


def nearest_bucket(width: int, height: int, bucket_list: Sequence[Bucket]) -> Bucket:
    """The bucket nearest in log aspect ratio to a (width, height) image; ties go to the larger area."""
    target = math.log(width / height)
    return min(bucket_list, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def bucket_key(bucket: Bucket) -> str:
    """The name of a bucket, 'WxH'."""
    return f"{bucket[0]}x{bucket[1]}"


def resize_to_cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resizes (Lanczos, keeping aspect) so the image covers width x height; a no-op when already covering
    exactly on one side and at least on the other."""
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) == (w, h):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.LANCZOS))


def crop(image: np.ndarray, width: int, height: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A width x height window: centred when rng is None, else at a uniformly drawn offset."""
    h, w = image.shape[:2]
    if w < width or h < height:
        raise ValueError(f"cannot crop {width}x{height} from a {w}x{h} image")
    if rng is None:
        top, left = (h - height) // 2, (w - width) // 2
    else:
        top, left = int(rng.integers(0, h - height + 1)), int(rng.integers(0, w - width + 1))
    return image[top : top + height, left : left + width]


# ---------------------------------------------------------------------------------------------------------
# Transforms. Each passes skip records ({"skip": True, ...}) through untouched.


class BucketResizeCrop(grain.transforms.RandomMap):
    """Resizes "image" (uint8 HWC) to cover its nearest bucket, then crops to it (centre or random); a
    "control" image of the same size goes through the same resize and crop."""

    def __init__(self, bucket_list: Sequence[Bucket], random_crop: bool = False):
        """Args: bucket_list: allowed (width, height)s, e.g. `buckets(...)` or one size; random_crop:
        crop at a random offset instead of the centre."""
        if not bucket_list:
            raise ValueError("need at least one bucket")
        self.bucket_list, self.random_crop = [tuple(map(int, b)) for b in bucket_list], random_crop

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if element.get("skip"):
            return element
        image = element["image"]
        bw, bh = nearest_bucket(image.shape[1], image.shape[0], self.bucket_list)
        crop_rng = rng if self.random_crop else None
        state = crop_rng.bit_generator.state if crop_rng is not None else None  # for a control image
        image = crop(resize_to_cover(image, bw, bh), bw, bh, crop_rng)
        out = {**element, "image": np.ascontiguousarray(image)}
        if "control" in element:  # cropped at the same offset
            if state is not None:
                crop_rng.bit_generator.state = state
            control = crop(resize_to_cover(element["control"], bw, bh), bw, bh, crop_rng)
            out["control"] = np.ascontiguousarray(control)
        return out


class RandomFlip(grain.transforms.RandomMap):
    """Mirrors "image" (and a "control" image with it) left-right with probability p."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability {p} is outside [0, 1]")
        self.p = p

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if element.get("skip") or not rng.random() < self.p:
            return element
        flip = lambda a: np.ascontiguousarray(a[:, ::-1])  # noqa: E731
        return {**element, **{k: flip(element[k]) for k in ("image", "control") if k in element}}


class Normalize(grain.transforms.Map):
    """uint8 "image" in [0, 255] to float32 in [-1, 1]: x / 127.5 - 1."""

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        if element.get("skip"):
            return element
        return {**element, "image": normalize(element["image"])}


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] to float32 [-1, 1]; float input is returned as float32 unchanged."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return image.astype(np.float32, copy=False)


def image_transforms(
    bucket_list: Sequence[Bucket], random_crop: bool = True, flip_p: float = 0.5
) -> list[grain.transforms.Map | grain.transforms.RandomMap]:
    """The training chain: bucket resize and crop, flip, normalise to [-1, 1]."""
    out: list[Any] = [BucketResizeCrop(bucket_list, random_crop)]
    if flip_p > 0:
        out.append(RandomFlip(flip_p))
    return out + [Normalize()]


def apply_transforms(element: dict[str, Any], transforms: Sequence[Any], rng: np.random.Generator) -> dict:
    """Runs a transform chain on one element outside grain (as `prepare` does)."""
    for t in transforms:
        if isinstance(t, grain.transforms.RandomMap):
            element = t.random_map(element, rng)
        elif isinstance(t, grain.transforms.Map):
            element = t.map(element)
        else:
            element = t(element)
    return element


def bucket_groups(
    source: Sequence[dict[str, Any]], bucket_list: Sequence[Bucket]
) -> tuple[dict[str, list[int]], list[int]]:
    """Indices of a source's records per nearest bucket, from image headers (`source.image_size(i)`).

    Returns:
      (groups, unreadable): {bucket_key: [indices]} for `make_loader(groups=...)`, and the indices whose
      header could not be read (they would be skipped at read time anyway).
    """
    groups: dict[str, list[int]] = collections.defaultdict(list)
    unreadable = []
    for i in range(len(source)):
        try:
            w, h = source.image_size(i)
        except Exception:  # a corrupt file: counted here, skipped by the reader
            unreadable.append(i)
            continue
        groups[bucket_key(nearest_bucket(w, h, bucket_list))].append(i)
    if unreadable:
        log.warning("%d images with unreadable headers left out of the buckets", len(unreadable))
    return dict(sorted(groups.items())), unreadable


# ---------------------------------------------------------------------------------------------------------
# Batching with skip counting.


def stack(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Stacks per-example dicts into a batch: arrays and numbers with np.stack, strings as an object array."""
    keys = list(examples[0])
    for e in examples:
        if e.keys() != examples[0].keys():
            raise ValueError(f"examples disagree on keys: {sorted(keys)} vs {sorted(e)}")
    out = {}
    for k in keys:
        values = [e[k] for e in examples]
        if isinstance(values[0], str):
            out[k] = np.array(values, dtype=object)
            continue
        arrays = [np.asarray(v) for v in values]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"cannot batch {k!r} of shapes {sorted(shapes)}; group records by bucket")
        out[k] = np.stack(arrays)
    return out


class _BatchIterator(grain.DatasetIterator):
    """Yields (batch or None, {reason: skips}); None marks the end, carrying the last skips."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, drop_remainder: bool, epoch: int):
        super().__init__(parent)
        self._batch_size, self._drop_remainder, self._epoch = batch_size, drop_remainder, epoch

    def __next__(self) -> tuple[dict[str, np.ndarray] | None, dict[str, int]]:
        examples, skipped, in_a_row = [], collections.Counter(), 0
        while len(examples) < self._batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                break
            if isinstance(element, Mapping) and element.get("skip"):
                skipped[str(element.get("reason", "unknown"))] += 1
                in_a_row += 1
                if in_a_row >= self._epoch:
                    raise ValueError(f"{in_a_row} records in a row were skipped: no usable record is left")
                continue
            in_a_row = 0
            examples.append(element)
        if not examples or (self._drop_remainder and len(examples) < self._batch_size):
            return None, dict(skipped)
        return stack(examples), dict(skipped)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()  # nothing is buffered between batches

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class _BatchDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool, epoch: int):
        super().__init__(parent)
        self._args = (batch_size, drop_remainder, epoch)

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self._parent.__iter__(), *self._args)


class LoaderIterator(grain.DatasetIterator):
    """Batches of the loader; `skipped` counts the records dropped so far, per reason, across restores."""

    def __init__(self, parent: grain.DatasetIterator, copy: bool = False):
        super().__init__(parent)
        self._skipped: collections.Counter[str] = collections.Counter()
        self._done = False
        self._copy = copy  # worker batches arrive in shared memory; copy them out to free it at once

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done:
            raise StopIteration
        batch, skipped = next(self._parent)
        self._skipped.update(skipped)
        if batch is None:
            self._done = True
            raise StopIteration
        return {k: np.array(v) for k, v in batch.items()} if self._copy else batch

    @property
    def skipped(self) -> dict[str, int]:
        """Records dropped at read time so far, per reason (see `sources.SKIP_REASONS`)."""
        return dict(sorted(self._skipped.items()))

    @property
    def num_skipped(self) -> int:
        return sum(self._skipped.values())

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "skipped": self.skipped, "done": self._done}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self._skipped = collections.Counter(state.get("skipped", {}))
        self._done = bool(state.get("done", False))


class _LoaderDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, copy: bool):
        super().__init__(parent)
        self._copy = copy

    def __iter__(self) -> LoaderIterator:
        return LoaderIterator(self._parent.__iter__(), self._copy)


# ---------------------------------------------------------------------------------------------------------
# The loader.


class _Subset:
    """The records of a source at given indices (a grain RandomAccessDataSource)."""

    def __init__(self, source: Sequence[Any], indices: Sequence[int]):
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.source[int(self.indices[index])]


def _derive_seed(seed: int, *path: int) -> int:
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


def make_loader(
    source: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    transforms: Sequence[Any] = (),
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    groups: Mapping[str, Sequence[int]] | None = None,
    drop_remainder: bool = True,
    read_options: grain.ReadOptions | None = None,
) -> LoaderIterator:
    """A resumable iterator of batches (dicts of stacked numpy arrays) for this process.

    Args:
      source: any random-access source (`ImageCaptionFolder`, `JsonlSource`, `PreparedSource`,
        `ShapesDataset`, ...); records flagged {"skip": True} are dropped and counted in `it.skipped`.
      batch_size: examples per batch on this process.
      seed: seeds the shuffle and every random transform.
      shuffle: reshuffle the records each epoch; False keeps source order.
      num_epochs: passes over the data; None repeats forever (training).
      transforms: grain `Map`/`RandomMap` transforms applied per record, e.g. `image_transforms(...)`.
      shard_index, shard_count: this process's shard; default `jax.process_index()/process_count()`.
      worker_count: grain worker processes (0 reads in this process, with threads).
      groups: {name: source indices} of records that batch together (same shapes); None is one group.
      drop_remainder: drop a last batch smaller than batch_size (finite epochs only).
      read_options: grain thread-prefetch options per group; default 8 threads reading up to two
        batches ahead (grain's own default of 500 records per group holds too many decoded images).

    With finite num_epochs and several groups, iteration stops when the first group runs out.
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is outside [0, {shard_count})")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be positive")
    if groups is None:
        groups = {"all": range(len(source))}
    streams, weights = {}, {}
    for name, indices in sorted(groups.items()):
        if not len(indices):
            continue
        g = zlib.crc32(name.encode())  # seeds of a group do not move when other groups come or go
        ds = grain.MapDataset.source(_Subset(source, indices))
        if shuffle:
            ds = ds.shuffle(seed=_derive_seed(seed, g, 0))
        ds = ds.repeat(num_epochs)
        for k, t in enumerate(transforms):
            if isinstance(t, grain.transforms.RandomMap):
                ds = ds.random_map(t, seed=_derive_seed(seed, g, k + 1))
            else:
                ds = ds.map(t)
        if num_epochs is not None:
            ds = ds[: len(ds) // shard_count * shard_count]
        ds = ds[shard_index::shard_count]
        if not len(ds):
            raise ValueError(f"group {name!r} has no record for shard {shard_index} of {shard_count}")
        it_ds = ds.to_iter_dataset(
            read_options or grain.ReadOptions(num_threads=8, prefetch_buffer_size=max(8, 2 * batch_size))
        )
        streams[name] = _BatchDataset(it_ds, batch_size, drop_remainder, epoch=len(indices))
        weights[name] = len(indices)
    if not streams:
        raise ValueError("the source has no records")
    out = next(iter(streams.values())) if len(streams) == 1 else grain.IterDataset.mix(streams, weights)
    if worker_count > 0:
        from absl import flags  # grain reads absl flags in mp_prefetch; default them outside absl.app

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(_LoaderDataset(out, copy=worker_count > 0))


def iterator_state_to_json(it: grain.DatasetIterator) -> str:
    """The iterator's state as a JSON string, to store beside a checkpoint."""
    return json.dumps(it.get_state(), sort_keys=True)


def restore_iterator(
    it: grain.DatasetIterator, state: str | bytes | Mapping[str, Any]
) -> grain.DatasetIterator:
    """Sets a freshly made iterator (same source and arguments) to a saved state; returns it."""
    if isinstance(state, (str, bytes)):
        state = json.loads(state)
    it.set_state(dict(state))
    return it


def take(it: Iterator[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    """The next n batches of an iterator (fewer if it ends)."""
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out
