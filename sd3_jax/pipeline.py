"""`SD3Pipeline`: text-to-image and image-to-image sampling from an sd3-jax checkpoint, jitted end to end.

    pipe = SD3Pipeline.load("ckpt/", dtype=jnp.bfloat16)
    images = pipe.generate("a photo of a cat", steps=28, guidance_scale=7.0, seed=0)  # (N, H, W, 3) uint8

Matches diffusers' `StableDiffusion3Pipeline` (and `StableDiffusion3Img2ImgPipeline`) given the same initial
latents: the whole denoising loop is one jitted function (`lax.fori_loop` inside the samplers), compiled once
per shape and sampler; only the prompt tokenization runs in Python.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.convert.orbax_io import config_from_json
from sd3_jax.flow import samplers as smp
from sd3_jax.flow import schedules
from sd3_jax.images import crop_and_fill, crop_region, latent_mask, overlay
from sd3_jax.nn.mmdit import MMDiT, MMDiTConfig
from sd3_jax.nn.vae import VAE, IdentityAEConfig, VAEConfig, scale_latents, unscale_latents

DEFAULTS = dict(height=1024, width=1024, steps=28, guidance_scale=7.0, max_sequence_length=256)
_BAR: list[Any] = []  # the progress bar of the generate call in flight, updated from the device loop


def _tick(i: int) -> None:
    if _BAR:
        _BAR[0].n = max(_BAR[0].n, int(i) + 1)
        _BAR[0].refresh()


@functools.partial(
    jax.jit,
    static_argnames=(
        "config",
        "sampler",
        "use_cfg",
        "slg_layers",
        "slg_scale",
        "slg_start",
        "slg_stop",
        "control_nets",
        "control_inpaint",
    ),
)
def denoise(
    params: Any,
    x: jax.Array,
    sigmas: jax.Array,
    cond: dict,
    uncond: dict | None,
    scale: jax.Array,
    adapters: Sequence[Any] = (),
    inpaint: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    controls: tuple[Any, jax.Array] | None = None,
    *,
    config: MMDiTConfig,
    sampler: str,
    use_cfg: bool,
    control_nets: tuple[Any, ...] = (),
    control_inpaint: tuple[bool, ...] = (),
    slg_layers: tuple[int, ...] = (),
    slg_scale: float = 0.0,
    slg_start: float = 0.01,
    slg_stop: float = 0.2,
) -> jax.Array:
    """The whole denoising loop: `sampler` over `sigmas` with CFG (and skip-layer guidance) on the MMDiT.

    `adapters` are (Lora, strength) pairs applied inside the jit, so the stored params never change.
    `inpaint`, (clean latents, initial noise, latent mask), keeps the unmasked region on the image's own
    noising path (`samplers.inpaint_blend`). `controls`, (the nets' params, their (steps, nets) scale
    table), with static `control_nets` (their configs) and `control_inpaint`, adds ControlNet residuals
    (`sd3_jax.controlnet`); their control latents are `cond["control"]` and `uncond["control"]`.
    """
    model = MMDiT(config)
    if adapters:
        from sd3_jax.lora import apply_lora

        params = apply_lora(params, list(adapters))

    def model_fn(x, sigma, context, pooled, skip_layers=()):
        return model.apply({"params": params}, x, sigma, context, pooled, skip_layers=skip_layers)

    def guided(model_fn):
        if not use_cfg:
            return smp.with_cond(model_fn, **cond)
        if slg_layers:
            return smp.skip_layer_cfg(
                model_fn,
                scale,
                cond,
                uncond,
                num_steps=sigmas.shape[0] - 1,
                skip_layers=slg_layers,
                slg_scale=slg_scale,
                start=slg_start,
                stop=slg_stop,
            )
        return smp.cfg(model_fn, scale, cond, uncond)

    vf = guided(model_fn)
    if control_nets:
        from sd3_jax.controlnet import controlled_model_fn

        net_params, table = controls
        with_nets = controlled_model_fn(config, params, control_nets, net_params, control_inpaint)

        def vf(x, sigma, step):  # the step's scales: a model function per step, bound inside the loop
            return guided(functools.partial(with_nets, scales=table[step]))(x, sigma, step)

    after = smp.inpaint_blend(*inpaint, sigmas) if inpaint is not None else None
    return smp.SAMPLERS[sampler](vf, x, sigmas, progress=_tick, after_step=after)


@functools.partial(jax.jit, static_argnames=("config", "tile"))
def decode(
    params: Any, z: jax.Array, *, config: VAEConfig | IdentityAEConfig, tile: int | None = None
) -> jax.Array:
    """Scaled latents -> images in [0, 1] (float32), one image after another (`lax.map`).

    Every image is decoded alone (GroupNorm's statistics are per image, so the result is the batched
    decode's), which keeps the decoder's working set at one image: four 1024 px images decoded at once need
    about 14 GiB of temporaries, more than a v5e chip's HBM beside the weights (`sd3-jax plan`).
    """
    if isinstance(config, IdentityAEConfig):
        return jnp.clip(z.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    vae = VAE(config)

    def one(z1):
        return vae.apply({"params": params}, unscale_latents(z1[None], config), tile=tile, method=VAE.decode)[
            0
        ]

    x = jax.lax.map(one, z)
    return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("config",))
def encode(params: Any, images: jax.Array, *, config: VAEConfig | IdentityAEConfig) -> jax.Array:
    """Images in [0, 1] -> scaled latents (the posterior mean: a deterministic encode)."""
    if isinstance(config, IdentityAEConfig):
        return images * 2 - 1
    mean, _ = VAE(config).apply({"params": params}, images * 2 - 1, method=VAE.encode)
    return scale_latents(mean, config)


def _as_prompts(prompt: str | Sequence[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("prompt list is empty: give at least one prompt")
    return prompts


class SD3Pipeline:
    """An SD3 / SD3.5 pipeline over explicit params: MMDiT, VAE, text encoders and tokenizers."""

    def __init__(
        self,
        transformer: tuple[MMDiTConfig, Any],
        vae: tuple[VAEConfig, Any],
        text: Any,
        scheduler: dict[str, Any],
        name: str = "sd3",
        defaults: dict[str, Any] | None = None,
    ):
        self.transformer_config, self.transformer_params = transformer
        self.vae_config, self.vae_params = vae
        self.text = text
        self.scheduler = scheduler
        self.name = name
        # Sampling defaults of this model (a checkpoint's "sampling" entry); arguments left None take them.
        self.defaults = {**DEFAULTS, **(defaults or {})}
        self.mesh = None  # set by load(mesh=...): inputs are then replicated over it

    @classmethod
    def load(
        cls,
        ckpt_dir: str,
        dtype: Any = None,
        mesh: jax.sharding.Mesh | None = None,
        use_t5: bool = True,
        attention: str = "auto",
        step: int | None = None,
        tokenizers: str | None = None,
        turbo: bool | None = None,
    ) -> SD3Pipeline:
        """Loads a pipeline straight into device arrays (the MMDiT sharded by the rules on `mesh`).

        Args:
          ckpt_dir: an sd3-jax checkpoint (`sd3-jax convert`); an `sd3-jax train` workdir of a run with
            `init_from` (its EMA transformer with that checkpoint's VAE, text encoders and defaults); or
            PyTorch weights converted in memory, one tensor at a time, with no Orbax copy written: a
            diffusers pipeline folder, a Stability single file (text encoders beside it found as `convert`
            finds them), or a Hugging Face model id such as `stabilityai/stable-diffusion-3.5-medium`
            (through huggingface_hub's cache; only the diffusers folder is fetched).
          step: a workdir's checkpoint step (None: the latest).
          dtype: params and compute dtype (None: as stored).
          mesh: shard the MMDiT over this mesh by its logical axis names (the VAE and text encoders are
            replicated over it); None: one device.
          use_t5: load T5 (False saves its memory; its tokens are then zeros, as in diffusers).
          attention: the MMDiT attention backend.
          tokenizers: a folder with tokenizer/, tokenizer_2/ (tokenizer_3/) for single files that have no
            diffusers folder beside them.
          turbo: SD3.5 Large Turbo's sampling defaults for PyTorch weights (None: when the name says so).
        """
        from sd3_jax.convert.opened import open_source

        opened = open_source(ckpt_dir, step, tokenizers, turbo)
        manifest = opened.manifest
        have = manifest["components"]
        needed = ["transformer", "vae", "text_encoder", "text_encoder_2"]
        missing = [c for c in needed if c not in have]
        if "controlnet" in have:
            raise ValueError(
                f"{ckpt_dir}: a ControlNet; sample a base checkpoint with it: `sd3-jax sample --checkpoint "
                f"BASE --controlnet {ckpt_dir} --control-image IMG`"
            )
        if missing:
            raise ValueError(
                f"{ckpt_dir}: lacks {', '.join(missing)}; sampling needs a full pipeline (transformer, VAE, "
                "CLIP-L and CLIP-G, optionally T5, with tokenizers)"
            )
        t_sh = None
        if mesh is not None:
            from sd3_jax.convert.components import read_config
            from sd3_jax.convert.mmdit import abstract_params
            from sd3_jax.sharding.mesh import tree_shardings

            t_sh = tree_shardings(
                abstract_params(read_config("mmdit", have["transformer"]["config"]), boxed=True), mesh
            )
        t_cfg, t_params = opened.load("transformer", dtype, t_sh)
        t_cfg = t_cfg.replace(dtype=dtype, attention=attention)
        if have["vae"]["kind"] == "identity":
            v_cfg, v_params = config_from_json(IdentityAEConfig, have["vae"]["config"]), None
        else:
            v_cfg, v_params = opened.load("vae", dtype, None)
        text = _load_text(opened, dtype, use_t5, t_cfg.context_dim)
        if mesh is not None:
            # The small models are replicated over the mesh, so every jitted call sees one device set.
            rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            v_params = jax.device_put(v_params, rep)
            for e in (text.clip_l, text.clip_g, text.t5):
                if e is not None:
                    object.__setattr__(e, "params", jax.device_put(e.params, rep))
        name = os.path.basename(os.path.normpath(ckpt_dir))
        pipe = cls(
            (t_cfg, t_params),
            (v_cfg, v_params),
            text,
            manifest.get("scheduler", {}),
            name,
            manifest.get("sampling"),
        )
        pipe.mesh = mesh
        return pipe

    def encode_prompt(self, prompt, negative_prompt=None, **kw):
        """(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled), as diffusers' pipeline."""
        return self.text.encode_prompt(prompt, negative_prompt, **kw)

    def sigmas(self, steps: int, shift: float | None, latent_hw: tuple[int, int]) -> np.ndarray:
        """The flow-matching Euler schedule of the checkpoint's scheduler (with dynamic shift if it asks)."""
        s = self.scheduler
        shift = s.get("shift", 3.0) if shift is None else shift
        mu = None
        if s.get("use_dynamic_shifting"):
            p = self.transformer_config.patch_size
            seq = (latent_hw[0] // p) * (latent_hw[1] // p)
            mu = schedules.calculate_shift(
                seq,
                s.get("base_image_seq_len", 256),
                s.get("max_image_seq_len", 4096),
                s.get("base_shift", 0.5),
                s.get("max_shift", 1.16),
            )
        return schedules.flow_match_sigmas(
            steps, shift, num_train_timesteps=s.get("num_train_timesteps", 1000), mu=mu
        )

    def check_size(self, height: int, width: int) -> None:
        v = self.vae_config.factor
        f = v * self.transformer_config.patch_size
        top = self.transformer_config.max_latent_size * v
        ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (height, width))
        if not ints or height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
        if height > top or width > top:
            raise ValueError(f"{height}x{width} exceeds the position table: the largest size is {top}x{top}")

    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        shift: float | None = None,
        seed: int = 0,
        latents: Any = None,
        sampler: str = "euler",
        num_images_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        clip_skip: int | None = None,
        skip_guidance_layers: Sequence[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_start: float = 0.01,
        skip_layer_guidance_stop: float = 0.2,
        image: Any = None,
        strength: float = 0.6,
        mask_image: Any = None,
        padding_mask_crop: int | None = None,
        output: str = "uint8",
        vae_tile: int | None = None,
        adapters: Sequence[tuple[Any, float]] = (),
        controls: Sequence[Any] = (),
        progress: bool = True,
    ) -> np.ndarray:
        """Samples images for `prompt`.

        Args:
          prompt, negative_prompt: a prompt or a list of them.
          height, width: image size in pixels (multiples of 16, within the position table).
          An empty negative prompt is encoded as "" (diffusers), or as zeros where the checkpoint's sampling
          defaults say `"uncond": "zeros"` (models trained with zeroed text dropout, like the demo's).
          Arguments left None take the checkpoint's sampling defaults (SD3: 1024x1024, 28 steps, CFG 7.0,
          256 T5 tokens).
          steps, guidance_scale, shift: schedule length, CFG scale (<= 1 disables CFG), SD3 shift (None: the
            checkpoint's scheduler's, 3.0 for SD3).
          seed: draws the initial latents (or the img2img noise) unless `latents` is given.
          latents: (N, H/8, W/8, 16) initial noise (H/f, W/f for a VAE of factor f),
            N = prompts x num_images_per_prompt.
          sampler: "euler" or "dpmpp_2m".
          skip_guidance_layers, skip_layer_guidance_*: skip-layer guidance (SD3.5 Medium uses (7, 8, 9)).
          image, strength: img2img from images (N, H, W, 3) uint8 or [0, 1] floats, noised to `strength`.
          mask_image: inpainting (with `image`): where to repaint, white (>= 0.5) repainted and black kept;
            a PIL image, or (H, W), (N, H, W) or (N, H, W, 1) uint8 or [0, 1] floats, N as for `image`. As
            diffusers' StableDiffusion3InpaintPipeline: binarized, taken at every VAE-factor-th pixel, and
            the kept region put back on the image's noising path after every step.
          padding_mask_crop: inpaint only a box around the mask, grown by this many pixels and to the
            aspect ratio height / width, sampled at height x width (None: the checkpoint's default size)
            and pasted back into the image, which keeps its own size (as diffusers'
            StableDiffusion3InpaintPipeline with `padding_mask_crop`: Lanczos resizes, the original laid
            over the result where the mask is black). `image` may then be a PIL image or (N, H, W, 3) of
            any size, `mask_image` one mask of that size; output "uint8" or "float" (the same pixels / 255).
          output: "uint8" (N, H, W, 3), "float" ([0, 1] float32, before quantisation) or "latent".
          vae_tile: decode in tiles of this many latent pixels (bounded memory for large images).
          adapters: LoRA adapters as (sd3_jax.lora.Lora, strength) pairs, applied without merging
            (`sd3_jax.convert.lora.import_lora` reads diffusers, kohya and ComfyUI files).
          controls: ControlNets steering the run, `sd3_jax.controlnet.Control`s (several: their residuals
            are summed, as diffusers' SD3MultiControlNetModel does).
        """
        d = self.defaults
        height = d["height"] if height is None else height
        width = d["width"] if width is None else width
        steps = d["steps"] if steps is None else steps
        guidance_scale = d["guidance_scale"] if guidance_scale is None else guidance_scale
        max_sequence_length = d["max_sequence_length"] if max_sequence_length is None else max_sequence_length
        shift = d.get("shift") if shift is None else shift
        _check_numbers(
            steps=(steps, 1, None, int),
            num_images_per_prompt=(num_images_per_prompt, 1, None, int),
            max_sequence_length=(max_sequence_length, 0, 512, int),  # T5 tokens; diffusers caps at 512
            guidance_scale=(guidance_scale, 0.0, None, float),
            shift=(shift, 0.0, None, float),
            strength=(strength, 0.0, 1.0, float),
            skip_layer_guidance_scale=(skip_layer_guidance_scale, None, None, float),
        )
        if shift is not None and shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if sampler not in smp.SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(smp.SAMPLERS)}, got {sampler!r}")
        if output not in ("uint8", "float", "latent"):
            raise ValueError(f"output must be uint8, float or latent, got {output!r}")
        prompts = _as_prompts(prompt)
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs image: the picture whose masked region is repainted")
        if hasattr(image, "convert"):  # a PIL image
            image = np.asarray(image.convert("RGB"))[None]
        if image is not None:
            image = np.asarray(image)
            if image.ndim != 4 or image.shape[-1] != 3:
                raise ValueError(f"image must be (N, H, W, 3), got shape {image.shape}")
        crop = None
        if padding_mask_crop is not None:
            crop, image, mask_image = self._crop_to_mask(
                image, mask_image, padding_mask_crop, output, (height, width)
            )
        if image is not None:
            height, width = image.shape[1:3]
        self.check_size(height, width)
        n = len(prompts) * num_images_per_prompt
        lh, lw = height // self.vae_config.factor, width // self.vae_config.factor
        use_cfg = guidance_scale > 1.0
        embeds, neg_embeds, pooled, neg_pooled = self.encode_prompt(
            prompts,
            negative_prompt if use_cfg else None,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=use_cfg,
            clip_skip=clip_skip,
            max_sequence_length=max_sequence_length,
        )
        if use_cfg and d.get("uncond") == "zeros" and not negative_prompt:
            # Models trained with dropped (zeroed) text sample best against that unconditional input.
            neg_embeds, neg_pooled = jnp.zeros_like(neg_embeds), jnp.zeros_like(neg_pooled)
        dtype = self.transformer_config.dtype or jax.tree.leaves(self.transformer_params)[0].dtype
        shape = (n, lh, lw, self.transformer_config.in_channels)
        if latents is None:
            latents = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != shape:
            raise ValueError(f"latents must be {shape}, got {tuple(latents.shape)}")
        sigmas = self.sigmas(steps, shift, (lh, lw))
        inpaint = None
        if image is not None:
            imgs = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
            if imgs.shape[0] != n:
                if n % imgs.shape[0]:
                    raise ValueError(f"cannot repeat {imgs.shape[0]} images for {n} prompts x images")
                imgs = np.repeat(imgs, n // imgs.shape[0], axis=0)
            x0 = encode(self.vae_params, jnp.asarray(imgs), config=self.vae_config)
            sigmas = schedules.img2img_sigmas(sigmas, strength)
            if mask_image is not None:
                mask = latent_mask(mask_image, n, (height, width), self.vae_config.factor)
                inpaint = (x0, latents, jnp.asarray(mask))
            latents = schedules.scale_noise(x0, latents, sigmas[0])
        cond = {"context": embeds.astype(dtype), "pooled": pooled.astype(dtype)}
        uncond = (
            {"context": neg_embeds.astype(dtype), "pooled": neg_pooled.astype(dtype)} if use_cfg else None
        )
        net_args, nets, net_inpaint = None, (), ()
        if controls:
            from sd3_jax.controlnet import control_latents, scale_table

            for c in controls:
                c.net.config.check_base(self.transformer_config)
            enc = functools.partial(encode, self.vae_params, config=self.vae_config)
            latent = tuple(
                control_latents(c, n, (height, width), enc, self.vae_config).astype(dtype) for c in controls
            )
            cond["control"] = latent
            if uncond is not None:
                uncond["control"] = latent
            net_args = (
                tuple(c.net.params for c in controls),
                jnp.asarray(scale_table(controls, len(sigmas) - 1)),
            )
            nets = tuple(c.net.config.replace(dtype=self.transformer_config.dtype) for c in controls)
            net_inpaint = tuple(c.mask is not None for c in controls)
        slg = tuple(int(i) for i in skip_guidance_layers) if skip_guidance_layers and use_cfg else ()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(sigmas) - 1, desc="sample", unit="step", dynamic_ncols=True)
            _BAR[:] = [bar]
        if self.mesh is not None:
            rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            latents, cond, uncond, inpaint = jax.device_put((latents, cond, uncond, inpaint), rep)
        try:
            z = denoise(
                self.transformer_params,
                latents.astype(dtype),
                jnp.asarray(sigmas),
                cond,
                uncond,
                jnp.float32(guidance_scale),
                tuple((a, jnp.float32(w)) for a, w in adapters),
                inpaint,
                net_args,
                config=self.transformer_config,
                sampler=sampler,
                use_cfg=use_cfg,
                control_nets=nets,
                control_inpaint=net_inpaint,
                slg_layers=slg,
                slg_scale=float(skip_layer_guidance_scale) if slg else 0.0,
                slg_start=float(skip_layer_guidance_start),
                slg_stop=float(skip_layer_guidance_stop),
            )
            z = jax.block_until_ready(z)
        finally:
            _BAR.clear()
            if bar is not None:
                bar.close()
        if output == "latent":
            return np.asarray(z.astype(jnp.float32))
        images = np.asarray(decode(self.vae_params, z, config=self.vae_config, tile=vae_tile))
        if crop is not None:
            box, originals, mask = crop
            k = len(images) // len(originals)
            images = np.stack([overlay(mask, originals[i // k], im, box) for i, im in enumerate(images)])
            return images if output == "uint8" else images.astype(np.float32) / 255.0
        if output == "float":
            return images
        return (images * 255).round().astype(np.uint8)

    def _crop_to_mask(self, image: Any, mask: Any, pad: Any, output: str, size: tuple[int, int]) -> tuple:
        """`padding_mask_crop`: ((box, originals, mask), the box of every image and of the mask resized to
        height x width as diffusers does). Raises one line for input it cannot take."""
        if mask is None or image is None:
            raise ValueError("padding_mask_crop needs image and mask_image (it crops around the mask)")
        _check_numbers(padding_mask_crop=(pad, 0, None, int))
        if output == "latent":
            raise ValueError("padding_mask_crop pastes decoded pixels back: output must be uint8 or float")
        m = np.asarray(mask.convert("L")) if hasattr(mask, "convert") else np.asarray(mask)
        if m.ndim == 4 and m.shape[-1] == 1:
            m = m[..., 0]
        if m.ndim == 3 and m.shape[0] == 1:
            m = m[0]
        if m.ndim != 2 or m.shape != image.shape[1:3]:
            raise ValueError(
                f"padding_mask_crop takes one mask the size of the image, {image.shape[1]}x{image.shape[2]}; "
                f"got {m.shape}"
            )
        self.check_size(*size)
        height, width = size
        box = crop_region(m, width, height, pad)
        crops = np.stack([crop_and_fill(im, box, width, height, "RGB") for im in image])
        return (box, list(image), m), crops, crop_and_fill(m, box, width, height, "L")


def _check_numbers(**checks: tuple[Any, float | None, float | None, type]) -> None:
    """Raises one ValueError line for the first argument that is not a finite number in [low, high]."""
    for name, (v, low, high, kind) in checks.items():
        if v is None and name == "shift":
            continue
        ok = isinstance(v, (int, np.integer)) if kind is int else isinstance(v, (int, float, np.number))
        ok = ok and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (low is not None and v < low) or (high is not None and v > high):
            bounds = f" in [{low}, {high}]" if high is not None else f" >= {low}" if low is not None else ""
            what = "an integer" if kind is int else "a finite number"
            raise ValueError(f"{name} must be {what}{bounds}, got {v!r}")


def _load_text(opened: Any, dtype: Any, use_t5: bool, joint: int) -> Any:
    """The text encoders and tokenizers of an opened source (`sd3_jax.convert.opened`)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    from sd3_jax.text import Encoder, TextEncoders

    have = opened.manifest["components"]

    def enc(component, tokenizer_dir, tok_cls):
        folder = os.path.join(opened.tokenizers or "", tokenizer_dir)
        if not opened.tokenizers or not os.path.isdir(folder):
            raise ValueError(f"{opened.tokenizers}: has {component} but no {tokenizer_dir}/")
        cfg, params = opened.load(component, dtype, None)
        return Encoder(tok_cls.from_pretrained(folder), cfg, params)

    clip_l = enc("text_encoder", "tokenizer", CLIPTokenizer)
    clip_g = enc("text_encoder_2", "tokenizer_2", CLIPTokenizer)
    t5 = (
        enc("text_encoder_3", "tokenizer_3", T5TokenizerFast) if use_t5 and "text_encoder_3" in have else None
    )
    return TextEncoders(clip_l, clip_g, t5, joint_attention_dim=joint, dtype=dtype)
