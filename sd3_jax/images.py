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


def _pil(x: Any, mode: str) -> Any:
    """A PIL image from a PIL image or an (H, W[, C]) uint8 or [0, 1] float array (rounded as diffusers'
    `numpy_to_pil`)."""
    from PIL import Image

    if hasattr(x, "convert"):
        return x.convert(mode)
    a = np.asarray(x)
    if a.dtype == bool:
        a = a.astype(np.float32)
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
            raise ValueError(f"images and masks must be uint8 or finite floats in [0, 1], got {a.dtype}")
        a = (np.clip(a, 0.0, 1.0) * 255).round().astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return Image.fromarray(a).convert(mode)


def crop_region(mask: Any, width: int, height: int, pad: int = 0) -> tuple[int, int, int, int]:
    """diffusers' `VaeImageProcessor.get_crop_region`: the box (x1, y1, x2, y2) around every non-black pixel
    of `mask`, grown by `pad` and then to the aspect ratio width / height, inside the mask."""
    m = np.asarray(_pil(mask, "L"))
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    if not len(cols):
        raise ValueError("mask_image is all black: padding_mask_crop has nothing to crop around")
    x1, y1 = int(max(cols[0] - pad, 0)), int(max(rows[0] - pad, 0))
    x2, y2 = int(min(cols[-1] + 1 + pad, w)), int(min(rows[-1] + 1 + pad, h))
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:  # as diffusers rounds: the float size, its difference truncated
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    """[lo, hi) grown by `diff` about its centre, shifted back inside [0, limit), as diffusers does."""
    lo, hi = lo - diff // 2, hi + diff - diff // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def _resize_and_fill(image: Any, width: int, height: int) -> Any:
    """diffusers' `VaeImageProcessor._resize_and_fill` (Lanczos): fit inside width x height keeping the aspect
    ratio, centred, the margins filled by stretching the edge rows or columns."""
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            edge = (0, resized.height, width, resized.height)
            res.paste(resized.resize((width, fill), box=edge), box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            edge = (resized.width, 0, resized.width, height)
            res.paste(resized.resize((fill, height), box=edge), box=(fill + src_w, 0))
    return res


def crop_and_fill(
    image: Any, box: tuple[int, int, int, int], width: int, height: int, mode: str
) -> np.ndarray:
    """The `box` of an image or mask resized to width x height as diffusers' `preprocess(crops_coords=box,
    resize_mode="fill")` does it; (height, width, 3) for mode "RGB", (height, width) for "L"; uint8."""
    return np.asarray(_resize_and_fill(_pil(image, mode).crop(box), width, height).convert(mode))


def overlay(mask: Any, original: Any, image: Any, box: tuple[int, int, int, int]) -> np.ndarray:
    """diffusers' `VaeImageProcessor.apply_overlay`: `image` (what was sampled for the crop) resized into
    `box` of the original's canvas (Lanczos, cropping the excess), and the original laid over it where the
    mask is black (the mask's greys blend). uint8 (H, W, 3) at the original's size."""
    from PIL import Image, ImageOps

    original, image = _pil(original, "RGB"), _pil(image, "RGB")
    width, height = original.size
    kept = Image.new("RGBa", (width, height))
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(_pil(mask, "L")))
    kept = kept.convert("RGBA")
    x, y, x2, y2 = box
    w, h = x2 - x, y2 - y
    src_w = w if w / h > image.width / image.height else image.width * h // image.height
    src_h = h if w / h <= image.width / image.height else image.height * w // image.width
    fitted = Image.new("RGB", (w, h))  # diffusers' _resize_and_crop
    fitted.paste(
        image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS),
        (w // 2 - src_w // 2, h // 2 - src_h // 2),
    )
    canvas = Image.new("RGBA", (width, height))
    canvas.paste(fitted, (x, y))
    out = canvas.convert("RGB").convert("RGBA")
    out.alpha_composite(kept)
    return np.asarray(out.convert("RGB"))
