"""A ControlNet for the demo model, trained with `sd3-jax train`'s trainer (`adapter="controlnet"`).

    python experiments/controlnet.py --steps 600
    python experiments/controlnet.py --checkpoint demo_out/checkpoint --steps 600

The control image is the object's silhouette (white where the shape is drawn, black elsewhere), and the
captions the ControlNet is trained with leave the position out ("a red circle"): where the object goes
can only come from the control. The base is the demo recipe (`sd3_jax.demo`, trained here unless
`--checkpoint` gives one), frozen; the ControlNet copies its first 2 of 4 blocks (`controlnet_layers=2`,
initialised from the base as diffusers' `from_transformer` does).

Reported, on the same prompts without position, seeds and initial noise, before (the base alone) and after
(the base steered by the trained ControlNet): the checker's position accuracy (the object matched to the
prompt lies in the control's quadrant) and its full adherence against the caption with the control's
position (colour, shape, position, nothing extra), per prompt fixed and broken with McNemar's exact p;
and a grid (control | before | after). The exported ControlNet (WORKDIR/controlnet/, diffusers' layout)
is then loaded by diffusers' `SD3ControlNetModel` beside the base exported to `SD3Transformer2DModel`,
and diffusers' FlowMatchEulerDiscreteScheduler loop samples the same prompts from the same noise: the
largest pixel difference to sd3-jax's images is reported. Results: experiments/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import common
import dpo
import numpy as np

from sd3_jax import demo
from sd3_jax.controlnet import Control, load_controlnet
from sd3_jax.data import shapes
from sd3_jax.data.records import write_records
from sd3_jax.pipeline import SD3Pipeline
from sd3_jax.train.config import OptimConfig
from sd3_jax.train.loop import train
from sd3_jax.train.report import read_metrics

EVAL_SEED = 2468


def silhouette(image: np.ndarray) -> np.ndarray:
    """The control image of a shapes render: white where an object is drawn, black elsewhere (uint8)."""
    return np.repeat((image.max(-1, keepdims=True) > 40).astype(np.uint8) * 255, 3, axis=-1)


def without_position(caption: str) -> str:
    (spec,) = shapes.parse_caption(caption)
    return f"a {spec.color} {spec.shape}"


def prepare(text, prefix: str, n: int, seed: int) -> None:
    """n one-object shapes examples: the render as latents (pixels), the caption without its position, and
    the silhouette as "control" (the identity autoencoder's latents: pixels in [-1, 1])."""
    ds = shapes.ShapesDataset(seed=seed, size=demo.SIZE, length=n, two_objects_prob=0.0, size_word_prob=0.0)

    def gen():
        for start in range(0, n, 512):
            items = [ds[i] for i in range(start, min(start + 512, n))]
            images = np.stack([x["image"] for x in items])
            caps = [without_position(x["caption"]) for x in items]
            for x, ex in zip(images, demo.encode_examples(text, images, caps)):
                yield {**ex, "control": (silhouette(x).astype(np.float32) / 127.5 - 1.0).astype(np.float16)}

    write_records(prefix, gen(), num_shards=1)


def eval_set(n: int, seed: int = EVAL_SEED) -> tuple[list[shapes.ShapeSpec], np.ndarray]:
    """n objects (any colour, shape and quadrant) and their silhouettes, from their own seeds."""
    specs, controls = [], []
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        spec = shapes.ShapeSpec(
            list(shapes.COLORS)[rng.integers(4)],
            shapes.SHAPES[rng.integers(3)],
            shapes.POSITIONS[rng.integers(4)],
        )
        specs.append(spec)
        controls.append(silhouette(shapes.render([spec], demo.SIZE, rng)))
    return specs, np.stack(controls)


def judge(images: np.ndarray, specs: list[shapes.ShapeSpec]) -> dict[str, list[bool]]:
    """Per image: whether the object matched to the prompt lies in the control's quadrant, and the full check
    against the caption with the control's position."""
    reports = [shapes.check_details(im, [s]) for im, s in zip(images, specs)]
    return {"position": [r.objects[0].position for r in reports], "adherence": [r.ok for r in reports]}


def diffusers_images(pipe: SD3Pipeline, net_dir: str, prompts: list[str], controls: np.ndarray, noise):
    """The same sampling in diffusers: the exported ControlNet and the base in diffusers' classes, its Euler
    scheduler, the text conditioning sd3-jax encodes, the identity decode. (N, H, W, 3) in [0, 1]."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3ControlNetModel, SD3Transformer2DModel

    from sd3_jax.convert.mmdit import config_to_diffusers, export_mmdit

    conf = {k: v for k, v in config_to_diffusers(pipe.transformer_config).items() if not k.startswith("_")}
    base = SD3Transformer2DModel(**conf).eval()
    sd = {
        k: torch.from_numpy(np.array(v, np.float32))
        for k, v in export_mmdit(pipe.transformer_params, pipe.transformer_config).items()
    }
    base.load_state_dict(sd)
    net = SD3ControlNetModel.from_pretrained(net_dir).eval()
    n_t5 = demo.SAMPLING["max_sequence_length"]
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, None, do_classifier_free_guidance=False, max_sequence_length=n_t5
    )
    ctx = torch.from_numpy(np.array(embeds, np.float32))  # copies: torch wants writable arrays
    pooled = torch.from_numpy(np.array(pooled, np.float32))
    cond = torch.from_numpy(controls.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    sched = FlowMatchEulerDiscreteScheduler(shift=demo.SHIFT)
    sched.set_timesteps(demo.SAMPLING["steps"])
    x = torch.from_numpy(np.asarray(noise, np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        for t in sched.timesteps:
            ts = t.expand(x.shape[0])
            res = net(hidden_states=x, controlnet_cond=cond, conditioning_scale=1.0,
                      encoder_hidden_states=ctx, pooled_projections=torch.zeros_like(pooled), timestep=ts,
                      return_dict=False)[0]  # fmt: skip
            v = base(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=ts,
                     block_controlnet_hidden_states=res).sample  # fmt: skip
            x = sched.step(v, t, x).prev_sample
    return np.clip(x.permute(0, 2, 3, 1).numpy() / 2 + 0.5, 0.0, 1.0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="", help="the base (default: the demo recipe, trained here)")
    ap.add_argument("--base-steps", type=int, default=1500)
    ap.add_argument("--base-examples", type=int, default=16384)
    ap.add_argument("--out", default=os.path.join("experiments", "results", "controlnet"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--examples", type=int, default=8192, help="ControlNet training examples")
    ap.add_argument("--n", type=int, default=256, help="evaluation prompts")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2, help="ControlNet blocks (the base has 4)")
    a = ap.parse_args(argv)
    out = a.out
    ckpt = a.checkpoint
    if not ckpt:  # the demo recipe: dpo's base with no caption mislabelled
        name = f"base_{a.base_steps}steps_{a.base_examples}"
        ckpt = dpo.mislabelled_base(os.path.join(out, "work", name), 0.0, a.base_steps, a.base_examples)
    pipe = SD3Pipeline.load(ckpt)
    os.makedirs(out, exist_ok=True)

    text = pipe.text  # the base's own frozen text encoders
    prefix = os.path.join(out, "work", "data", f"controls_{a.examples}")
    if not os.path.exists(prefix + ".json"):
        prepare(text, prefix, a.examples, 0)
        prepare(text, prefix + "-val", 256, 10**6)
    cfg = dataclasses.replace(
        demo.train_config(a.steps, prefix),
        model=pipe.transformer_config,
        optim=OptimConfig(lr=a.lr, warmup_steps=min(50, a.steps // 5), schedule="cosine", clip_norm=1.0),
        batch_size=a.batch_size,
        init_from=ckpt,
        adapter="controlnet",
        controlnet_layers=a.layers,
        ema_decay=0.99 if a.steps >= 100 else 0.0,
    )
    workdir = os.path.join(out, "work", "train")
    train(cfg, workdir, progress=False)
    net_dir = os.path.join(workdir, "controlnet")
    net = load_controlnet(net_dir)

    specs, controls = eval_set(a.n)
    prompts = [f"a {s.color} {s.shape}" for s in specs]
    noise = (
        np.random.default_rng(EVAL_SEED).standard_normal((a.n, demo.SIZE, demo.SIZE, 3)).astype(np.float32)
    )
    kw = dict(latents=noise, progress=False)
    before = pipe.generate(prompts, **kw)
    after = pipe.generate(prompts, controls=[Control(net, controls)], **kw)
    jb, ja = judge(before, specs), judge(after, specs)
    k = min(a.n, 16)
    ours = pipe.generate(
        prompts[:k], controls=[Control(net, controls[:k])], output="float", latents=noise[:k], progress=False
    )
    theirs = diffusers_images(pipe, net_dir, prompts[:k], controls[:k], noise[:k])
    rows, caps = [], []
    for i in range(0, min(a.n, 24), 8):  # per 8 prompts: the controls, then before, then after
        sl = slice(i, min(i + 8, a.n))
        rows += [controls[sl], before[sl], after[sl]]
        caps += [shapes.caption([s]) for s in specs[sl]]
        caps += [f"before: {p[2:]}" for p in prompts[sl]] + [f"after: {p[2:]}" for p in prompts[sl]]
    demo.grid(np.concatenate(rows), caps, os.path.join(out, "grid.png"), cols=8)
    res = {
        "base": ckpt,
        "before": {m: float(np.mean(v)) for m, v in jb.items()},
        "after": {m: float(np.mean(v)) for m, v in ja.items()},
        "paired": {m: dpo.mcnemar(jb[m], ja[m]) for m in jb},
        "diffusers_max_abs_diff": float(np.abs(ours - theirs).max()),
        "diffusers_images": k,
        "n": a.n,
        "steps": a.steps,
        "examples": a.examples,
        "layers": a.layers,
        "lr": a.lr,
        "batch_size": a.batch_size,
        "log": [m for m in read_metrics(workdir) if m.get("kind") in ("log", "eval")],
    }
    common.save_json(os.path.join(out, "results.json"), res)
    for what in ("before", "after"):
        r = res[what]
        print(f"[controlnet] {what}: position accuracy {r['position']:.2f}, adherence {r['adherence']:.2f}")
    m = res["paired"]["position"]
    print(f"[controlnet] position: {m['fixed']} prompts fixed, {m['broken']} broken, p={m['p_value']:.2g}")
    print(f"[controlnet] diffusers vs sd3-jax on {k} images: max |diff| {res['diffusers_max_abs_diff']:.2e}")
    return res


if __name__ == "__main__":
    main()
