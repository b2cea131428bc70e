"""`sd3-jax prepare`: precompute VAE latents and text-encoder states of a dataset into ArrayRecord shards.

The paper precomputes both so that training reads only arrays. Each record holds `latents` (scaled, as the
MMDiT sees them), `clip_l`, `clip_g` (penultimate states), `pooled_l`, `pooled_g` and, when the checkpoint
has T5, `t5`: the keys the trainer's prepared data reads. Corrupt images and missing captions are skipped
and counted.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from sd3_jax.convert.orbax_io import config_from_json, read_manifest
from sd3_jax.convert.pipeline_io import load_component
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
    from sd3_jax.pipeline import _load_text, encode

    manifest = read_manifest(ckpt)
    have = manifest["components"]
    for c in ("vae", "text_encoder", "text_encoder_2"):
        if c not in have:
            raise ValueError(f"{ckpt}: checkpoint lacks {c}, which {what} needs")
    if have["vae"]["kind"] == "identity":
        v_cfg, v_params = config_from_json(IdentityAEConfig, have["vae"]["config"]), None
    else:
        v_cfg, v_params = load_component(ckpt, "vae")
    text = _load_text(ckpt, have, None, True, 4096)

    def encode_images(images: np.ndarray) -> np.ndarray:
        return np.asarray(encode(v_params, jnp.asarray((images + 1) / 2), config=v_cfg))

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
) -> dict[str, Any]:
    """Encodes `data` (image folder, .jsonl, or "shapes:N") with the VAE and text encoders of `ckpt`."""
    encode_images, encode_captions = checkpoint_encoders(ckpt, max_sequence_length)
    if os.path.exists(out + ".json"):
        raise FileExistsError(f"{out}.json already exists; choose another --out")

    def encode_fn(images: np.ndarray, captions: list[str]) -> dict[str, np.ndarray]:
        return {"latents": encode_images(images), **encode_captions(captions)}

    return prepare(
        _source(data),
        encode_fn,
        out,
        batch_size,
        num_shards,
        transforms=[BucketResizeCrop([(size, size)], random_crop=False)],
        metadata={"checkpoint": os.path.abspath(ckpt), "size": size},
    )
