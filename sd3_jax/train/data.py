"""Training batches through grain, identical for any mesh and any number of processes.

Global batch b is examples perm[b*B:(b+1)*B] of a seeded shuffle; process p reads only its slice
[p*B/P, (p+1)*B/P) of it, so the global batch (and the losses) do not depend on how many processes read
it. The grain iterator's state is a small JSON blob, saved with every checkpoint.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np

from sd3_jax.train.config import DataConfig, TrainConfig


class SyntheticLatents:
    """Random latents and text-encoder outputs, deterministic per index (a grain RandomAccessDataSource)."""

    def __init__(self, cfg: DataConfig, channels: int, seed: int = 0, offset: int = 0):
        self.cfg, self.channels, self.seed, self.offset = cfg, channels, seed, offset

    def __len__(self) -> int:
        return self.cfg.num_examples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        c = self.cfg
        r = np.random.default_rng([self.seed, self.offset + int(i)])
        f = lambda *s: r.standard_normal(s).astype(np.float32)
        return {
            "latents": f(c.latent_size, c.latent_size, self.channels),
            "clip_l": f(c.text_len, c.clip_l_dim),
            "clip_g": f(c.text_len, c.clip_g_dim),
            "t5": f(c.t5_len, 0) if c.t5_len == 0 else f(c.t5_len, c.clip_l_dim + c.clip_g_dim),
            "pooled_l": f(c.clip_l_dim),
            "pooled_g": f(c.clip_g_dim),
        }

    def __repr__(self) -> str:
        return (
            f"SyntheticLatents({self.cfg}, channels={self.channels}, seed={self.seed}, offset={self.offset})"
        )


def _stack(examples: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class _ReadSlice(grain.transforms.Map):
    def __init__(self, source, lo: int, hi: int):
        self.source, self.lo, self.hi = source, lo, hi

    def map(self, indices):
        return _stack([self.source[int(i)] for i in indices[self.lo : self.hi]])


def make_source(cfg: TrainConfig, split: str = "train") -> Any:
    """The training or validation source of a config."""
    d = cfg.data
    if d.kind == "synthetic":
        offset = 0 if split == "train" else 10**9
        src = SyntheticLatents(d, cfg.model.in_channels, cfg.seed, offset)
        return src if split == "train" else _Prefix(src, d.val_examples)
    if d.kind == "prepared":
        from sd3_jax.data.records import PreparedSource

        path = d.path if split == "train" else d.path + "-val"
        return PreparedSource(path)
    if d.kind == "pairs":
        return None if split == "val" else pairs_source(cfg)
    raise ValueError(f"data.kind {d.kind!r} has no latent source (shapes data is prepared first)")


def pairs_source(cfg: TrainConfig) -> Any:
    """The preference pairs of data.path; captions and images without precomputed files are encoded with
    the text encoders and autoencoder of cfg.init_from, loaded on first use.

    grain reads examples from several threads, and tokenizers are not thread-safe: one lock serialises
    the encoders (loading them included).
    """
    from sd3_jax.train.dpo import PairsSource

    encoders: list[Any] = []
    lock = threading.Lock()

    def get():
        if not encoders:
            from sd3_jax.prepare import checkpoint_encoders

            encoders.extend(checkpoint_encoders(cfg.init_from, what="data.kind='pairs'"))
        return encoders

    def encode_text(caption: str) -> dict[str, np.ndarray]:
        with lock:
            return {k: v[0] for k, v in get()[1]([caption]).items()}

    def encode_image(image: np.ndarray) -> np.ndarray:
        with lock:
            return get()[0](image[None].astype(np.float32) / 127.5 - 1.0)[0]

    have = bool(cfg.init_from)
    if not os.path.isfile(cfg.data.path):
        raise ValueError(f"data.path {cfg.data.path!r}: no such pairs file")
    return PairsSource(cfg.data.path, encode_text if have else None, encode_image if have else None)


class _Prefix:
    def __init__(self, src, n):
        self.src, self.n = src, min(n, len(src))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.src[i]


def make_iterator(source: Any, batch_size: int, seed: int, shuffle: bool = True) -> Any:
    """An endless iterator of this process's slices of global batches, with get_state/set_state."""
    n_proc, p = jax.process_count(), jax.process_index()
    if batch_size % n_proc:
        raise ValueError(f"batch_size {batch_size} does not divide over {n_proc} processes")
    if len(source) < batch_size:
        raise ValueError(f"dataset has {len(source)} examples, fewer than one batch of {batch_size}")
    local = batch_size // n_proc
    ds = grain.MapDataset.range(len(source))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = (
        ds.repeat().batch(batch_size, drop_remainder=True).map(_ReadSlice(source, p * local, (p + 1) * local))
    )
    return iter(ds.to_iter_dataset())


def iterator_state(it: Any) -> dict[str, Any]:
    """The iterator's position as JSON-able data."""
    return json.loads(json.dumps(it.get_state(), default=_jsonable))


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, bytes):
        return x.decode()
    raise TypeError(f"unserialisable iterator state {type(x)}")


def fixed_batches(source: Any, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The whole (small) validation set as this process's slices of fixed batches (full batches only; a
    set smaller than one batch is repeated to fill one, so that a small held-out split is still used)."""
    n_proc, p = jax.process_count(), jax.process_index()
    local = batch_size // n_proc
    out = []
    starts = range(0, len(source) - batch_size + 1, batch_size) if len(source) >= batch_size else [0]
    for start in starts if len(source) else []:
        idx = [i % len(source) for i in range(start, start + batch_size)][p * local : (p + 1) * local]
        out.append(_stack([source[i] for i in idx]))
    return out
