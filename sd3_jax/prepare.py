"""`sd3-jax prepare`: precompute VAE latents and text-encoder states of a dataset into ArrayRecord shards.

The paper precomputes both so that training reads only arrays. Each record holds `latents` (scaled, as the
MMDiT sees them), `clip_l`, `clip_g` (penultimate states), `pooled_l`, `pooled_g` and, when the checkpoint
has T5, `t5`: the keys the trainer's prepared data reads; a JSONL with "control" images adds `control`, their
latents as the pipeline makes them for a ControlNet `sd3-jax train --set adapter=controlnet` trains (without
the VAE's shift, as diffusers does for nets with `force_zeros_for_pooled_projection`). Corrupt images and
missing captions are skipped and counted.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from sd3_jax.convert.orbax_io import config_from_json
from sd3_jax.data.pipeline import BucketResizeCrop
from sd3_jax.data.records import prepare
from sd3_jax.data.sources import open_source
from sd3_jax.nn.vae import IdentityAEConfig


def _source(data: str) -> Any:
    if data.startswith("shapes:"):
        from sd3_jax.data.shapes import ShapesDataset

        return ShapesDataset(seed=0, length=int(data.split(":", 1)[1]))
    return open_source(data)


def checkpoint_encoders(
    ckpt: str, max_sequence_length: int = 256, what: str = "prepare"
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[list[str]], dict[str, np.ndarray]]]:
    """(encode_images, encode_captions) with the autoencoder and text encoders of an sd3-jax checkpoint.

    encode_images: (B, H, W, 3) in [-1, 1] -> scaled latents (B, h, w, C), as the MMDiT sees them.
    encode_captions: captions -> {clip_l, clip_g (penultimate states), pooled_l, pooled_g[, t5]}, batched.
    """
    from sd3_jax.convert.opened import open_source
    from sd3_jax.pipeline import _load_text, encode

    opened = open_source(ckpt)  # a checkpoint, a workdir, or PyTorch weights converted in memory
    have = opened.manifest["components"]
    for c in ("vae", "text_encoder", "text_encoder_2"):
        if c not in have:
            raise ValueError(f"{ckpt}: lacks {c}, which {what} needs")
    if have["vae"]["kind"] == "identity":
        v_cfg, v_params = config_from_json(IdentityAEConfig, have["vae"]["config"]), None
    else:
        v_cfg, v_params = opened.load("vae", None, None)
    text = _load_text(opened, None, True, 4096)

    def encode_images(images: np.ndarray, unshifted: bool = False) -> np.ndarray:
        z = encode(v_params, jnp.asarray((images + 1) / 2), config=v_cfg)
        if unshifted:  # a ControlNet's control latents (`sd3_jax.controlnet.control_latents`)
            z = z + v_cfg.shift_factor * v_cfg.scaling_factor
        return np.asarray(z)

    def encode_captions(captions: list[str]) -> dict[str, np.ndarray]:
        l_states, l_pooled = text._clip("clip_l", list(captions), 1, None)
        g_states, g_pooled = text._clip("clip_g", list(captions), 1, None)
        rec = {"clip_l": l_states, "clip_g": g_states, "pooled_l": l_pooled, "pooled_g": g_pooled}
        if text.t5 is not None:
            rec["t5"] = text._t5(list(captions), 1, max_sequence_length)
        return {k: np.asarray(v) for k, v in rec.items()}

    return encode_images, encode_captions


def prepare_dataset(
    data: str,
    ckpt: str,
    out: str,
    size: int = 256,
    batch_size: int = 8,
    num_shards: int = 1,
    max_sequence_length: int = 256,
    val_fraction: float = 0.0,
) -> dict[str, Any]:
    """Encodes `data` (image folder, .jsonl, or "shapes:N") with the VAE and text encoders of `ckpt`.

    With `val_fraction` > 0, every round(1 / val_fraction)-th example (the last of each such run, at least
    one) goes to the validation split `out`-val, which `train` evaluates on; the rest to `out`.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    for path in (out + ".json", out + "-val.json"):
        if os.path.exists(path):
            raise FileExistsError(f"{path} already exists; choose another --out")
    encode_images, encode_captions = checkpoint_encoders(ckpt, max_sequence_length)

    def encode_fn(images: np.ndarray, captions: list[str], controls=None) -> dict[str, np.ndarray]:
        rec = {"latents": encode_images(images), **encode_captions(captions)}
        if controls is not None:  # as the pipeline encodes them for a trained ControlNet (InstantX-style)
            rec["control"] = encode_images(controls, unshifted=True)
        return rec

    def write(source, prefix):
        return prepare(
            source,
            encode_fn,
            prefix,
            batch_size,
            num_shards,
            transforms=[BucketResizeCrop([(size, size)], random_crop=False)],
            metadata={"checkpoint": os.path.abspath(ckpt), "size": size},
        )

    source = _source(data)
    if val_fraction == 0.0:
        return write(source, out)
    every = max(2, round(1 / val_fraction))
    n = len(source)
    val = [i for i in range(n) if i % every == every - 1] or [n - 1]
    held = set(val)
    if len(held) >= n:
        raise ValueError(f"{data}: {n} example(s) leave none to train on after the validation split")
    val_stats = write(_Subset(source, val), out + "-val")  # first: the train index, last, marks completion
    stats = write(
        _Subset(source, [i for i in range(n) if i not in held], getattr(source, "skipped", ())), out
    )
    reasons = collections.Counter(stats.get("reasons", {}))
    reasons.update(val_stats.get("reasons", {}))
    return {
        **stats,
        "skipped": stats["skipped"] + val_stats["skipped"],
        "reasons": dict(reasons),
        "val_written": val_stats["written"],
    }


class _Subset:
    """Some records of a source, in order; `skipped` carries the source's index-time skips to one split."""

    def __init__(self, source: Any, indices: list[int], skipped: Any = ()):
        self.source, self.indices, self.skipped = source, indices, list(skipped)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.source[self.indices[i]]
