"""`make demo`: train a small SD3-architecture model from scratch on captioned shapes, then sample it.

    python -m sd3_jax.demo --out demo_out [--steps N] [--examples N]

The same code path as full SD3: the MMDiT, the rectified-flow loss with logit-normal timesteps (shifted
by 2) and per-encoder text dropout, the sharded trainer with Orbax checkpoints, prepared ArrayRecord data,
and the jitted sampler. Scaled down: 16x16 images in pixel space (an identity autoencoder, recorded in the
checkpoint), two small frozen random CLIP text encoders (no T5) over a tokenizer built from the caption
vocabulary. Writes demo_out/: samples.png (held-out prompts), loss.png, metrics, and checkpoint/, which
`sd3-jax sample --checkpoint demo_out/checkpoint --prompt "a red square in the top left"` uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.data import shapes
from sd3_jax.data.records import write_records
from sd3_jax.data.tokenizer import make_clip_tokenizer
from sd3_jax.nn.clip import CLIPConfig, CLIPTextEncoder
from sd3_jax.nn.mmdit import MMDiTConfig
from sd3_jax.sharding.mesh import MeshConfig
from sd3_jax.text import Encoder, TextEncoders, _clip_apply
from sd3_jax.train.config import DataConfig, OptimConfig, TrainConfig

SIZE = 16  # image side in pixels
PATCH = 2  # pixels per patch side: 64 image tokens
TEXT_LEN = 12  # CLIP tokens: "a red circle in the top left" is 9 with BOS and EOS
WIDTH = 64  # width of each CLIP
SHIFT = 2.0  # timestep shift, in training and sampling: more time at high noise, where layout is decided
# No classifier-free guidance: on these flat-coloured pixel images any scale above 1 pushes values past the
# colours and frays the edges (adherence 0.98 / 0.97 at scale 1, 0.81 / 0.64 at 2, 0.67 / 0.53 at 4, for the
# same 1000-step model; experiments/README.md).
SAMPLING = dict(height=SIZE, width=SIZE, steps=25, guidance_scale=1.0, max_sequence_length=0, shift=SHIFT)


def words() -> list[str]:
    vocab = {"a", "in", "the", "and"}
    for group in (shapes.COLORS, shapes.SHAPES, shapes.POSITIONS, shapes.SIZES):
        for phrase in group:
            vocab.update(phrase.split())
    return sorted(vocab)


def model_config() -> MMDiTConfig:
    return MMDiTConfig(
        depth=4,
        num_heads=2,
        head_dim=64,
        patch_size=PATCH,
        in_channels=3,
        out_channels=3,
        context_dim=2 * WIDTH,
        pooled_dim=2 * WIDTH,
        sample_size=SIZE,
        pos_embed_max_size=SIZE // PATCH,
    )


def train_config(steps: int, data_prefix: str) -> TrainConfig:
    return TrainConfig(
        model=model_config(),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optim=OptimConfig(lr=1e-3, warmup_steps=100, schedule="cosine", weight_decay=0.01, clip_norm=1.0),
        data=DataConfig(kind="prepared", path=data_prefix),
        shift=SHIFT,
        text_dropout=0.1,  # per encoder; the paper's 46.4% costs a model this small too much of its budget
        batch_size=32,
        steps=steps,
        ema_decay=0.995,
        compute_dtype="float32",  # bf16 is emulated (slow) on CPUs
        checkpoint_every=max(steps // 2, 1),
        keep_checkpoints=2,
        log_every=50,
        eval_every=max(steps // 5, 1),
    )


def sampler(text: TextEncoders, cfg: TrainConfig) -> Callable[[object], np.ndarray]:
    """The trainer's `sample_fn`: the demo's text encoders and identity autoencoder around given MMDiT
    params, sampling the config's prompts as `evaluate` does."""
    from sd3_jax.nn.vae import IdentityAEConfig
    from sd3_jax.pipeline import SD3Pipeline

    def sample(params):
        with jax.set_mesh(None):  # outside the trainer's mesh context, as the pipeline places its arrays
            scheduler = {"shift": SHIFT, "num_train_timesteps": 1000}
            pipe = SD3Pipeline(
                (cfg.model, params), (IdentityAEConfig(), None), text, scheduler, "demo", SAMPLING
            )
            caps = list(cfg.sample_prompts)
            return pipe.generate(
                caps, num_images_per_prompt=cfg.sample_images, seed=cfg.sample_seed, progress=False
            )

    return sample


def text_encoders(tok_dir: str, seed: int = 0) -> TextEncoders:
    """Two small frozen CLIPs (quick_gelu with a projection as CLIP-L, gelu as CLIP-G), random weights."""
    encs = []
    for i, (name, act) in enumerate((("tokenizer", "quick_gelu"), ("tokenizer_2", "gelu"))):
        tok = make_clip_tokenizer(os.path.join(tok_dir, name), words(), model_max_length=TEXT_LEN)
        cfg = CLIPConfig(
            vocab_size=len(tok),
            width=WIDTH,
            layers=2,
            heads=1,
            mlp_dim=2 * WIDTH,
            max_length=TEXT_LEN,
            act=act,
            projection_dim=WIDTH,
            eos_token_id=len(tok) - 1,
        )
        ids = jnp.zeros((1, TEXT_LEN), jnp.int32)
        params = nn.meta.unbox(CLIPTextEncoder(cfg).init(jax.random.key(seed + i), ids)["params"])
        encs.append(Encoder(tok, cfg, params))
    return TextEncoders(encs[0], encs[1], None, joint_attention_dim=2 * WIDTH)


def encode_examples(
    text: TextEncoders, images: np.ndarray, captions: list[str]
) -> list[dict[str, np.ndarray]]:
    """Per-example training arrays: pixels in [-1, 1] as latents and each CLIP's states and pooled vector."""
    out = {}
    for which in ("clip_l", "clip_g"):
        enc = getattr(text, which)
        ids = text._tokenize(which, enc.tokenizer, captions, TEXT_LEN)
        hidden, pooled = _clip_apply(enc.params, jnp.asarray(ids), config=enc.config, dtype=None, skip=0)
        out[which], out["pooled_" + which[-1]] = np.asarray(hidden), np.asarray(pooled)
    lat = images.astype(np.float32) / 127.5 - 1.0
    return [
        {
            "latents": lat[i].astype(np.float16),
            "clip_l": out["clip_l"][i].astype(np.float16),
            "clip_g": out["clip_g"][i].astype(np.float16),
            "pooled_l": out["pooled_l"][i].astype(np.float16),
            "pooled_g": out["pooled_g"][i].astype(np.float16),
        }
        for i in range(len(captions))
    ]


def prepare(
    text: TextEncoders, prefix: str, n: int, seed: int, relabel: Callable[[int, str], str] | None = None
) -> None:
    """n shapes examples encoded into ArrayRecords at prefix; `relabel(i, caption)` replaces the caption
    item i is trained with (the image stays)."""
    ds = shapes.ShapesDataset(seed=seed, size=SIZE, length=n, two_objects_prob=0.0, size_word_prob=0.0)

    def gen():
        for start in range(0, n, 512):
            items = [ds[i] for i in range(start, min(start + 512, n))]
            caps = [x["caption"] for x in items]
            if relabel is not None:
                caps = [relabel(start + j, c) for j, c in enumerate(caps)]
            yield from encode_examples(text, np.stack([x["image"] for x in items]), caps)

    write_records(prefix, gen(), num_shards=1)


def write_checkpoint(
    out: str, params, text: TextEncoders, tok_dir: str, model_cfg: MMDiTConfig | None = None
) -> None:
    """An sd3-jax checkpoint: transformer, two CLIPs, tokenizers, identity autoencoder, sampling defaults."""
    from sd3_jax.convert.orbax_io import (
        atomic_directory,
        config_to_json,
        save_params_streaming,
        write_manifest,
    )
    from sd3_jax.nn.vae import IdentityAEConfig

    def leaves(tree):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            yield tuple(k.key for k in path), np.asarray(leaf)

    comps = {}
    with atomic_directory(out) as tmp:
        for name, kind, cfg, p in (
            ("transformer", "mmdit", model_cfg or model_config(), params),
            ("text_encoder", "clip", text.clip_l.config, text.clip_l.params),
            ("text_encoder_2", "clip", text.clip_g.config, text.clip_g.params),
        ):
            n = save_params_streaming(os.path.join(tmp, name), leaves(p))
            comps[name] = {"kind": kind, "config": config_to_json(cfg), "params": n, "dtype": "float32"}
        comps["vae"] = {"kind": "identity", "config": config_to_json(IdentityAEConfig()), "params": 0}
        for t in ("tokenizer", "tokenizer_2"):
            shutil.copytree(os.path.join(tok_dir, t), os.path.join(tmp, t))
        write_manifest(
            tmp,
            {
                "components": comps,
                "scheduler": {"shift": SHIFT, "num_train_timesteps": 1000},
                "sampling": SAMPLING,
                "dtype": "fp32",
            },
        )


def plot_losses(metrics: list[dict], path: str) -> None:
    """A loss curve (training loss, smoothed, and validation loss) drawn with PIL."""
    from PIL import Image, ImageDraw

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("kind") == "eval"]
    w, h, pad = 640, 360, 48
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    steps = np.array([s for s, _ in train])
    loss = np.array([v for _, v in train])
    smooth = np.convolve(loss, np.ones(25) / 25, mode="valid") if len(loss) > 25 else loss
    lo, hi = (
        float(min(loss.min(), min((v for _, v in val), default=loss.min()))),
        float(np.percentile(loss, 99)),
    )
    xs = lambda s: pad + (w - 2 * pad) * (s - steps[0]) / max(steps[-1] - steps[0], 1)
    ys = lambda v: h - pad - (h - 2 * pad) * (min(v, hi) - lo) / max(hi - lo, 1e-9)
    d.line([(pad, pad), (pad, h - pad), (w - pad, h - pad)], fill="black")
    d.line([(xs(s), ys(v)) for s, v in zip(steps, loss)], fill=(200, 200, 255))
    d.line([(xs(s), ys(v)) for s, v in zip(steps[len(steps) - len(smooth) :], smooth)], fill="blue", width=2)
    for s, v in val:
        d.ellipse([xs(s) - 3, ys(v) - 3, xs(s) + 3, ys(v) + 3], fill="red")
    d.text(
        (pad, 10),
        f"training loss (blue, smoothed) and validation loss (red); steps 1-{steps[-1]}",
        fill="black",
    )
    d.text((4, pad - 12), f"{hi:.3f}", fill="black")
    d.text((4, h - pad - 6), f"{lo:.3f}", fill="black")
    img.save(path)


def grid(images: np.ndarray, captions: list[str], path: str, cols: int = 8, scale: int = 6) -> None:
    """The images in a grid, each over its caption in two lines ('yellow square' / 'bottom left')."""
    from PIL import Image, ImageDraw

    n = len(images)
    rows = (n + cols - 1) // cols
    cell, label, gap = SIZE * scale, 26, 4
    img = Image.new("RGB", (cols * (cell + gap), rows * (cell + label)), "white")
    d = ImageDraw.Draw(img)
    for i, (im, cap) in enumerate(zip(images, captions)):
        r, c = divmod(i, cols)
        x, y = c * (cell + gap), r * (cell + label)
        img.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (x, y))
        what, _, where = cap.removeprefix("a ").partition(" in the ")
        d.text((x + 2, y + cell + 1), what, fill="black")
        d.text((x + 2, y + cell + 13), where, fill="black")
    img.save(path)


def evaluate(pipe, n: int = 64, seed: int = 1234, adapters=()) -> dict[str, float]:
    """The checker's prompt adherence on n seen and n held-out prompts (fixed seeds), with `adapters`
    ((Lora, strength) pairs) applied while sampling."""
    out = {}
    for split in ("seen", "held_out"):
        caps = shapes.prompts(split, n, seed=seed)
        imgs = pipe.generate(caps, seed=seed, progress=False, adapters=adapters)
        out[split] = shapes.adherence(imgs, caps)
        out[split + "_images"] = (imgs, caps)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--examples", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t0 = time.time()
    from sd3_jax.train.loop import train
    from sd3_jax.train.report import read_metrics

    if os.path.exists(os.path.join(a.out, "checkpoint")):
        shutil.rmtree(a.out)
    os.makedirs(a.out, exist_ok=True)
    work = os.path.join(a.out, "work")
    tok_dir = os.path.join(work, "tokenizers")
    text = text_encoders(tok_dir, a.seed)
    prefix = os.path.join(work, "data", "shapes")
    if not os.path.exists(prefix + ".json"):
        prepare(text, prefix, a.examples, a.seed)
        prepare(text, prefix + "-val", 256, a.seed + 10**6)
    print(f"[demo] data ready: {a.examples} examples ({time.time() - t0:.0f} s)", flush=True)
    cfg = dataclasses.replace(
        train_config(a.steps, prefix),
        sample_every=max(a.steps // 5, 1),  # grids in TensorBoard and demo_out/work/train/samples/
        sample_prompts=tuple(shapes.prompts("held_out", 4, seed=7)),
        sample_images=4,
        sample_steps=SAMPLING["steps"],
    )
    state = train(cfg, os.path.join(work, "train"), sample_fn=sampler(text, cfg))
    metrics = read_metrics(os.path.join(work, "train"))
    print(f"[demo] trained {a.steps} steps ({time.time() - t0:.0f} s)", flush=True)
    ckpt = os.path.join(a.out, "checkpoint")
    write_checkpoint(ckpt, jax.device_get(state.ema_params), text, tok_dir)
    plot_losses(metrics, os.path.join(a.out, "loss.png"))
    shutil.copy(os.path.join(work, "train", "metrics.jsonl"), os.path.join(a.out, "metrics.jsonl"))

    from sd3_jax.pipeline import SD3Pipeline

    pipe = SD3Pipeline.load(ckpt)
    res = evaluate(pipe)
    grid(*res["held_out_images"], os.path.join(a.out, "samples.png"))
    grid(*res["seen_images"], os.path.join(a.out, "samples_seen.png"))
    summary = {
        "seen": res["seen"],
        "held_out": res["held_out"],
        "steps": a.steps,
        "examples": a.examples,
        "seconds": round(time.time() - t0, 1),
        "sampling": SAMPLING,
    }
    with open(os.path.join(a.out, "adherence.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"[demo] wrote {a.out}/samples.png, loss.png, checkpoint/ ({time.time() - t0:.0f} s)")
    print(f"adherence seen={res['seen']:.2f} held_out={res['held_out']:.2f}")


if __name__ == "__main__":
    main()
