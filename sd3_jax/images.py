"""Images and masks given to the pipeline, as diffusers' image processors prepare them."""

from __future__ import annotations

from typing import Any

import numpy as np


def latent_mask(mask: Any, n: int, size: tuple[int, int], factor: int) -> np.ndarray:
    """An inpainting mask as diffusers' StableDiffusion3InpaintPipeline makes it: greyscale in [0, 1],
    binarized at 0.5 (1 = repaint), nearest-resized to the latents (every `factor`-th pixel), repeated to `n`
    images; (n, H / factor, W / factor, 1) float32."""
    if hasattr(mask, "convert"):  # a PIL image
        mask = np.asarray(mask.convert("L"))
    m = np.asarray(mask)
    if m.dtype == np.uint8:
        m = m.astype(np.float32) / 255.0
    elif m.dtype == bool or np.issubdtype(m.dtype, np.floating):
        m = m.astype(np.float32)
    else:
        raise ValueError(f"mask_image must be uint8, bool or float, got {m.dtype}")
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[1:] != tuple(size):
        raise ValueError(
            f"mask_image must be {size[0]}x{size[1]} like the image, (N,) H, W (, 1); got {m.shape}"
        )
    if not np.isfinite(m).all():
        raise ValueError("mask_image has NaN or infinite values")
    if n % m.shape[0]:
        raise ValueError(f"cannot repeat {m.shape[0]} masks for {n} prompts x images")
    m = np.where(m < 0.5, 0.0, 1.0).astype(np.float32)[:, ::factor, ::factor, None]
    return np.repeat(m, n // m.shape[0], axis=0)
