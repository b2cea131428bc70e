"""Subcommands of the CLI other than train: convert, export, sample, prepare."""

from __future__ import annotations

import argparse
import os


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, on by default for the CLI (SD3_JAX_CACHE moves it, "" disables)."""
    import jax

    path = os.environ.get("SD3_JAX_CACHE", os.path.expanduser("~/.cache/sd3_jax/jax"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _convert(a: argparse.Namespace) -> None:
    from sd3_jax.convert.pipeline_io import convert, print_summary

    summary = convert(
        a.sources, a.out, a.dtype, a.tokenizers, progress=not a.no_progress, turbo=a.turbo or None
    )
    print_summary(summary, a.out)


def _export(a: argparse.Namespace) -> None:
    from sd3_jax.convert.export import export

    written = export(a.checkpoint, a.format, a.out, step=a.step)
    print(f"wrote {a.out} ({a.format}: {', '.join(written)})")


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size takes WxH, e.g. 1024x1024, got {text!r}") from None
    return w, h


def _controls(a: argparse.Namespace) -> list:
    """`--controlnet PATH[:SCALE]` with `--control-image` (one each, in order), `--control-start`/`-end` (one
    for all or one each) and `--control-mask` (for inpainting ControlNets)."""
    from PIL import Image

    from sd3_jax.controlnet import Control, load_controlnet

    nets, imgs = a.controlnet or [], a.control_image or []
    if len(nets) != len(imgs):
        raise ValueError(f"give one --control-image per --controlnet: {len(nets)} nets, {len(imgs)} images")
    if (a.control_start or a.control_end or a.control_mask) and not nets:
        raise ValueError("--control-start, --control-end and --control-mask go with --controlnet")

    def per_net(values, default, name):
        values = values or [default]
        if len(values) not in (1, len(nets)):
            raise ValueError(f"--{name}: give one value, or one per --controlnet ({len(nets)})")
        return values * len(nets) if len(values) == 1 else values

    starts = per_net(a.control_start, 0.0, "control-start")
    ends = per_net(a.control_end, 1.0, "control-end")
    mask = None
    if a.control_mask:
        with Image.open(a.control_mask) as im:
            mask = im.convert("L")
    out = []
    for spec, path, start, end in zip(nets, imgs, starts, ends):
        where, _, scale = spec.rpartition(":") if not os.path.exists(spec) else (spec, "", "")
        try:
            scale = float(scale or 1.0)
        except ValueError:
            raise ValueError(f"--controlnet takes PATH[:SCALE], got {spec!r}") from None
        net = load_controlnet(where or spec)
        with Image.open(path) as im:
            image = im.convert("RGB")
        out.append(Control(net, image, scale, start, end, mask if net.config.extra_channels else None))
    return out


def _sample(a: argparse.Namespace) -> None:
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image, PngImagePlugin

    from sd3_jax.pipeline import SD3Pipeline

    enable_compilation_cache()
    width, height = parse_size(a.size) if a.size else (None, None)
    if not a.out.lower().endswith(".png"):
        raise ValueError(f"--out must be a .png file, got {a.out}")
    dtype = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32, None: None}[a.dtype]
    pipe = SD3Pipeline.load(
        a.checkpoint,
        dtype=dtype,
        use_t5=not a.no_t5,
        step=a.step,
        tokenizers=a.tokenizers,
        turbo=True if a.turbo else None,
    )
    adapters = []
    for spec in a.lora or []:
        from sd3_jax.convert.lora import import_lora

        path, _, strength = spec.partition(":") if not os.path.exists(spec) else (spec, "", "")
        adapters.append((import_lora(path, pipe.transformer_config), float(strength or 1.0)))
    image = mask = None
    if a.mask and not a.image:
        raise ValueError("--mask needs --image (the picture whose masked region is repainted)")
    if a.padding_mask_crop is not None and not a.mask:
        raise ValueError("--padding-mask-crop needs --mask (the box is cropped around the mask)")
    if a.image:
        if a.size and a.padding_mask_crop is None:
            raise ValueError("--size does not go with --image: the image's own size is sampled")
        with Image.open(a.image) as im:
            image = np.asarray(im.convert("RGB"))[None]
    if a.mask:
        with Image.open(a.mask) as im:
            mask = np.asarray(im.convert("L"))
    controls = _controls(a)
    if controls and width is None and image is None:  # sampled at the (first) control image's size
        width, height = controls[0].image.size
    images = pipe.generate(
        a.prompt,
        a.negative_prompt,
        height=height,
        width=width,
        steps=a.steps,
        guidance_scale=a.cfg,
        shift=a.shift,
        seed=a.seed,
        sampler=a.sampler,
        num_images_per_prompt=a.num_images,
        skip_guidance_layers=a.skip_layers or None,
        adapters=adapters,
        image=image,
        mask_image=mask,
        padding_mask_crop=a.padding_mask_crop,
        strength=a.strength,
        controls=controls,
        progress=not a.no_progress,
    )
    base, ext = os.path.splitext(a.out)
    for i, img in enumerate(images):
        meta = PngImagePlugin.PngInfo()
        d = pipe.defaults
        info = dict(
            prompt=a.prompt,
            negative_prompt=a.negative_prompt,
            seed=a.seed,
            steps=a.steps or d["steps"],
            sampler=a.sampler,
            cfg=d["guidance_scale"] if a.cfg is None else a.cfg,
            model=pipe.name,
            size=f"{img.shape[1]}x{img.shape[0]}",
            index=i,
        )
        for k, v in info.items():
            meta.add_text(k, str(v))
        path = a.out if len(images) == 1 else f"{base}-{i}{ext}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.png"
        Image.fromarray(img).save(tmp, pnginfo=meta)
        os.replace(tmp, path)
        print(f"wrote {path}")


def _prepare(a: argparse.Namespace) -> None:
    from sd3_jax.prepare import prepare_dataset

    stats = prepare_dataset(
        a.data,
        a.checkpoint,
        a.out,
        size=a.size,
        batch_size=a.batch_size,
        num_shards=a.num_shards,
        max_sequence_length=a.max_sequence_length,
        val_fraction=a.val_fraction,
    )
    val = f" (+ {stats['val_written']} in {a.out}-val)" if "val_written" in stats else ""
    print(
        f"wrote {a.out}: {stats['written']} examples{val}, {stats['skipped']} skipped "
        f"{stats.get('reasons', {})}"
    )


def _plan(a: argparse.Namespace) -> None:
    from sd3_jax import plan
    from sd3_jax.nn.mmdit import MMDiTConfig
    from sd3_jax.train.config import TrainConfig, apply_overrides, load_config

    cfg = load_config(a.config) if a.config else TrainConfig(model=MMDiTConfig.sd3_medium())
    cfg = apply_overrides(cfg, a.set)
    w, h = parse_size(a.size if "x" in a.size.lower() else f"{a.size}x{a.size}")
    sample = None
    if a.task == "sample":
        if a.steps < 1 or a.batch < 1:
            raise ValueError(f"plan: --steps and --batch must be >= 1, got {a.steps} and {a.batch}")
        sample = plan.SampleSpec(
            height=h,
            width=w,
            batch=a.batch,
            steps=a.steps,
            cfg=not a.no_cfg,
            t5_tokens=a.text_tokens - plan.CLIP_TOKENS,
            dtype=cfg.compute_dtype,
        )
    _, lines = plan.run(a.topology, a.task, cfg, (h, w), a.text_tokens, sample)
    print("\n".join(lines))


def add_commands(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert", help="convert PyTorch SD3 checkpoints to an sd3-jax Orbax checkpoint")
    c.add_argument("sources", nargs="+", help="diffusers folder, Stability single files, component files")
    c.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    c.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    c.add_argument("--tokenizers", help="diffusers-style folder with tokenizer/, tokenizer_2/, tokenizer_3/")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument(
        "--turbo",
        action="store_true",
        help="SD3.5 Large Turbo weights (4 steps, no CFG by default); also recognised by 'turbo' in a name",
    )
    c.set_defaults(fn=_convert)

    e = sub.add_parser("export", help="write an sd3-jax checkpoint back to a PyTorch layout")
    e.add_argument("checkpoint")
    e.add_argument("--format", required=True, choices=["diffusers", "sai"])
    e.add_argument("--out", required=True, help="diffusers: a folder; sai: a .safetensors file")
    e.add_argument("--step", type=int, default=None, help="a training workdir's step (default: the latest)")
    e.set_defaults(fn=_export)

    s = sub.add_parser("sample", help="sample images from a checkpoint")
    s.add_argument(
        "--checkpoint",
        required=True,
        help="an sd3-jax checkpoint, a `train` workdir, a diffusers folder, a Stability single file or a "
        "Hugging Face model id (the last three converted in memory)",
    )
    s.add_argument(
        "--tokenizers", help="single files: a folder with tokenizer/ and tokenizer_2/ (tokenizer_3/)"
    )
    s.add_argument("--turbo", action="store_true", help="SD3.5 Large Turbo's defaults (4 steps, no CFG)")
    s.add_argument("--step", type=int, default=None, help="a training workdir's step (default: the latest)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--negative-prompt", default="")
    s.add_argument("--steps", type=int, default=None, help="default: the checkpoint's (SD3: 28)")
    s.add_argument(
        "--cfg", type=float, default=None, help="guidance scale; default: the checkpoint's (SD3: 7)"
    )
    s.add_argument("--shift", type=float, default=None, help="SD3 timestep shift (default: the scheduler's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", default=None, help="WxH in pixels; default: the checkpoint's (SD3: 1024x1024)")
    s.add_argument("--sampler", default="euler", choices=["euler", "dpmpp_2m"])
    s.add_argument("--num-images", type=int, default=1)
    s.add_argument(
        "--skip-layers", type=int, nargs="*", help="skip-layer guidance layers (SD3.5 Medium: 7 8 9)"
    )
    s.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: as stored")
    s.add_argument("--no-t5", action="store_true", help="sample without T5 (zeros in its place)")
    s.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:STRENGTH]",
        help="apply a LoRA (diffusers, kohya or ComfyUI layout) at a strength; repeatable",
    )
    s.add_argument("--image", help="img2img: start from this picture (its size is sampled)")
    s.add_argument("--mask", help="inpainting, with --image: repaint where this picture is white")
    s.add_argument(
        "--padding-mask-crop",
        type=int,
        default=None,
        metavar="PX",
        help="with --mask: sample only the box around the mask grown by PX pixels, at --size (default: the "
        "checkpoint's), and paste it back into the picture at the picture's size",
    )
    s.add_argument(
        "--strength", type=float, default=0.6, help="with --image: how far the picture is noised (0-1]"
    )
    s.add_argument(
        "--controlnet",
        action="append",
        metavar="PATH[:SCALE]",
        help="steer with a ControlNet (sd3-jax checkpoint, diffusers folder or Stability file) at a scale; "
        "repeatable, each with its --control-image",
    )
    s.add_argument("--control-image", action="append", help="the control picture of each --controlnet")
    s.add_argument("--control-start", type=float, action="append", help="fraction of steps (one or each)")
    s.add_argument("--control-end", type=float, action="append", help="fraction of steps (one or each)")
    s.add_argument("--control-mask", help="inpainting ControlNets: repaint where this picture is white")
    s.add_argument("--out", default="sample.png")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=_sample)

    pl = sub.add_parser(
        "plan",
        help="compile train or sample for a TPU slice from this host; per-device HBM and whether it fits",
    )
    pl.add_argument("--topology", required=True, help="TPU slice, e.g. v5e:2x4, v5p:2x2x1, v6e:4x4")
    pl.add_argument("--task", required=True, choices=["train", "sample"])
    pl.add_argument("--config", help="experiments/NAME.py defining get_config() (default: SD3 Medium)")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for train")
    pl.add_argument("--size", default="1024", help="pixels: N (square) or WxH (an aspect-ratio bucket)")
    pl.add_argument("--text-tokens", type=int, default=333, help="77 CLIP + T5 tokens (default 77 + 256)")
    pl.add_argument("--batch", type=int, default=1, help="sample: images per call")
    pl.add_argument("--steps", type=int, default=28, help="sample: denoising steps")
    pl.add_argument("--no-cfg", action="store_true", help="sample: without classifier-free guidance")
    pl.set_defaults(fn=_plan)

    p = sub.add_parser("prepare", help="precompute VAE latents and text embeddings into ArrayRecord shards")
    p.add_argument(
        "data",
        help="image folder with .txt captions, a .jsonl ({image, caption[, control]}), or 'shapes:N' for "
        "synthetic shapes",
    )
    p.add_argument("--checkpoint", required=True, help="sd3-jax checkpoint with the VAE and text encoders")
    p.add_argument("--out", required=True, help="output prefix of the shards")
    p.add_argument("--size", type=int, default=256, help="image side (centre crop)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--max-sequence-length", type=int, default=256)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="held out to PREFIX-val, on which train reports val_loss (0: none; then train eval_every=0)",
    )
    p.set_defaults(fn=_prepare)
