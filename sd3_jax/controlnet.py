"""ControlNets in sampling: load one, describe how it steers a run (`Control`), and the model function that
adds their residuals to the MMDiT inside the jitted loop.

    net = load_controlnet("sd3.5_large_controlnet_canny.safetensors")      # or a diffusers folder, or an
    images = pipe.generate(prompt, controls=[Control(net, edges, scale=0.8)])  # sd3-jax checkpoint

As diffusers' `StableDiffusion3ControlNetPipeline`: the control image is VAE-encoded (without the VAE's
shift for the nets with `force_zeros_for_pooled`, InstantX's, which were trained so), each net sees the
pipeline's latents and timestep, the text tokens (joint nets) and the pooled text (zeros where
`force_zeros_for_pooled`), its residuals are scaled by `scale` on the steps i with start <= i / n and
(i + 1) / n <= end, and the nets' residuals are summed. With `mask`, the control is the inpainting one of
`StableDiffusion3ControlNetInpaintingPipeline`: the image with the masked pixels set to black (-1), encoded,
and 1 - mask (binarized, at latent size) as an extra channel; the pooled text is zeros.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.nn.controlnet import ControlNet, ControlNetConfig
from sd3_jax.nn.embeddings import PatchEmbed
from sd3_jax.nn.mmdit import MMDiT, MMDiTConfig


@dataclasses.dataclass(frozen=True)
class ControlNetModel:
    """A loaded ControlNet: its config and params (arrays on device)."""

    config: ControlNetConfig
    params: Any


@dataclasses.dataclass(frozen=True)
class Control:
    """One ControlNet's part in a run (diffusers' `control_image`, `controlnet_conditioning_scale`,
    `control_guidance_start`, `control_guidance_end`, and the inpainting pipeline's `control_mask`).

    image: a PIL image (resized to the output size, Lanczos, as diffusers does), or (H, W, 3) / (N, H, W, 3)
      uint8 or [0, 1] floats at the output size; N is 1 or the number of images.
    mask: for an inpainting ControlNet, where to repaint (white), as `generate`'s `mask_image`.
    """

    net: ControlNetModel
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mask: Any = None

    def __post_init__(self):
        for name in ("scale", "start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v):
                raise ValueError(f"Control: {name} must be a finite number, got {v!r}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"Control: need 0 <= start <= end <= 1, got start={self.start}, end={self.end}")
        want = 1 if self.mask is not None else 0
        if self.net.config.extra_channels != want:
            kind = (
                "an inpainting ControlNet (one mask channel)"
                if self.net.config.extra_channels
                else "a plain one"
            )
            raise ValueError(
                f"Control: this net is {kind}; " + ("give mask=" if not want else "it takes no mask")
            )


def load_controlnet(
    source: str, dtype: Any = None, attention: str | None = None, step: int | None = None
) -> ControlNetModel:
    """A ControlNet from an sd3-jax checkpoint (`sd3-jax convert` of one), a ControlNet training workdir (the
    EMA net of its checkpoint at `step`, None: the latest), a diffusers ControlNet folder, or a
    `.safetensors` in diffusers' or Stability's SD3.5 layout (PyTorch layouts are converted in memory;
    nothing is written). `attention` picks its attention backend."""
    from sd3_jax.convert.mapping import CheckpointError
    from sd3_jax.convert.opened import open_source

    opened = open_source(source, step)
    have = opened.manifest["components"]
    if "controlnet" not in have:
        raise CheckpointError(f"{source}: not a ControlNet (it holds {', '.join(have) or 'nothing'})")
    cfg, params = opened.load("controlnet", dtype, None)
    return ControlNetModel(cfg if attention is None else cfg.replace(attention=attention), params)


def _images(image: Any, n: int, size: tuple[int, int]) -> np.ndarray:
    """A control image as (n, H, W, 3) float32 in [0, 1]."""
    if hasattr(image, "convert"):  # PIL: resized as diffusers' VaeImageProcessor does
        from PIL import Image

        image = image.convert("RGB")
        if image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), resample=Image.LANCZOS)
        image = np.asarray(image)
    a = np.asarray(image)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[1:] != (*size, 3):
        raise ValueError(f"control image must be {size[0]}x{size[1]} RGB, (N,) H, W, 3; got {a.shape}")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
    else:
        raise ValueError(f"control image must be uint8 or float, got {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError("control image has NaN or infinite values")
    if n % a.shape[0]:
        raise ValueError(f"cannot repeat {a.shape[0]} control images for {n} prompts x images")
    return np.repeat(a, n // a.shape[0], axis=0)


def control_latents(
    control: Control, n: int, size: tuple[int, int], encode: Any, vae_config: Any
) -> jax.Array:
    """The control input of one net for n images of `size`, (n, h, w, in_channels + extra_channels);
    `encode` maps images in [0, 1] to the VAE's scaled latents (`sd3_jax.pipeline.encode`)."""
    from sd3_jax.images import latent_mask

    images = _images(control.image, n, size)
    cfg = control.net.config
    if control.mask is None:
        z = encode(jnp.asarray(images))
        if cfg.force_zeros_for_pooled:  # InstantX's nets: encoded without the VAE's shift
            z = z + vae_config.shift_factor * vae_config.scaling_factor
        return z
    mask = latent_mask(control.mask, n, size, 1)  # binarized at the image's size
    z = encode(jnp.asarray(np.where(mask > 0.5, 0.0, images)))  # masked pixels black: -1 to the VAE
    f = vae_config.factor
    return jnp.concatenate([z, jnp.asarray(1.0 - mask[:, ::f, ::f])], axis=-1)


def scale_table(controls: Sequence[Control], steps: int) -> np.ndarray:
    """(steps, nets) conditioning scales: `scale` where start <= i / steps and (i + 1) / steps <= end."""
    keep = [[not (i / steps < c.start or (i + 1) / steps > c.end) for c in controls] for i in range(steps)]
    return np.asarray(keep, np.float32) * np.asarray([c.scale for c in controls], np.float32)


def controlled_model_fn(
    base: MMDiTConfig, params: Any, nets: Sequence[ControlNetConfig], net_params: Any, inpaint: Sequence[bool]
):
    """`model_fn(x, sigma, context, pooled, skip_layers=(), control=(), scales=None)`: the MMDiT with the
    summed residuals of `nets` (given their control latents `control` and per-net `scales`)."""
    model = MMDiT(base)

    def model_fn(x, sigma, context, pooled, skip_layers=(), control=(), scales=None):
        total = None
        tokens = None
        for k, (cfg, p, cond) in enumerate(zip(nets, net_params, control)):
            if cfg.own_pos_embed:
                inp = x
            else:
                if tokens is None:
                    ps = base.patch_size
                    embed = PatchEmbed(
                        ps, base.width, base.pos_embed_max_size, base.sample_size // ps, dtype=base.dtype
                    )
                    tokens = embed.apply({"params": params["pos_embed"]}, x)
                inp = tokens
            zero_pooled = cfg.force_zeros_for_pooled or inpaint[k]
            res = ControlNet(cfg).apply(
                {"params": p},
                inp,
                cond.astype(x.dtype),
                sigma,
                jnp.zeros_like(pooled) if zero_pooled else pooled,
                context if cfg.joint else None,
                scales[k],
            )
            if total is not None and res.shape[0] != total.shape[0]:
                raise ValueError(
                    f"ControlNets with {total.shape[0]} and {res.shape[0]} blocks cannot be combined "
                    "(diffusers sums their residuals block by block)"
                )
            total = res if total is None else total + res
        return model.apply(
            {"params": params}, x, sigma, context, pooled, skip_layers=skip_layers, controls=total
        )

    return model_fn
