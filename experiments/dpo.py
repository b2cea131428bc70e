"""Preference tuning of the demo model: Diffusion-DPO through LoRA with `sd3-jax train`'s trainer.

    python experiments/dpo.py --mislabel 0.3 --pairs colour --beta 100 --sft 1 --steps 600
    python experiments/dpo.py --checkpoint demo_out/checkpoint --pairs colour|judged

Two kinds of preference pairs, written as PNGs and a JSONL (`data.kind="pairs"`, captions encoded by the
checkpoint's own text encoders):
  colour  the preferred image is a clean render of the prompt, the rejected one the same shape and place in
          another colour (the issue's pairs);
  judged  on-policy pairs labelled by the shapes checker, as Diffusion-DPO is used: the demo model samples
          each prompt K times; the rejected image is a sample the checker rejects, the preferred one a
          sample it accepts (a clean render when none of the K passes).
The demo model never draws a wrong colour, so `--mislabel P` first trains the demo recipe on captions whose
colour word is wrong with probability P: a base with colour errors for the colour pairs to fix.
Reports the checker's adherence and colour accuracy before and after, on the same 128 seen and 128 held-out
prompts and seeds (not the prompts the pairs were made from), and per prompt how many were fixed and broken
(McNemar's exact p). Results: experiments/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os

import common
import jax
import numpy as np
from PIL import Image

from sd3_jax import demo
from sd3_jax.convert.lora import import_lora
from sd3_jax.data import shapes
from sd3_jax.lora import LoraConfig
from sd3_jax.pipeline import SD3Pipeline
from sd3_jax.train.config import DataConfig, OptimConfig, TrainConfig
from sd3_jax.train.loop import train
from sd3_jax.train.report import read_metrics

EVAL_SEED = 4321
EVAL_PROMPTS = 128  # per split


def mislabel(caption: str, p: float, rng: np.random.Generator) -> str:
    """With probability p, the caption with its colour word swapped for another colour (uniformly among
    those that keep the combination a seen one, so no held-out combination enters training)."""
    (spec,) = shapes.parse_caption(caption)
    if rng.random() >= p:
        return caption
    held = shapes.holdout_combos()
    others = [c for c in shapes.COLORS if c != spec.color and (c, spec.shape, spec.position) not in held]
    return shapes.caption([dataclasses.replace(spec, color=others[rng.integers(len(others))])])


def mislabelled_base(out: str, p: float, steps: int, examples: int = 16384, seed: int = 0) -> str:
    """The demo recipe (`sd3_jax.demo`) trained on captions whose colour is wrong with probability p, as web
    captions are noisy: a base that draws the wrong colour about p of the time. Returns its checkpoint."""
    ckpt = os.path.join(out, "checkpoint")
    if os.path.exists(ckpt):
        return ckpt
    tok_dir, prefix = os.path.join(out, "tokenizers"), os.path.join(out, "data", "shapes")
    text = demo.text_encoders(tok_dir, seed)
    relabel = lambda i, c: mislabel(c, p, np.random.default_rng((seed, i, 1)))
    demo.prepare(text, prefix, examples, seed, relabel)
    demo.prepare(text, prefix + "-val", 256, seed + 10**6)  # validation on true captions
    state = train(demo.train_config(steps, prefix), os.path.join(out, "train"), progress=False)
    demo.write_checkpoint(ckpt, jax.device_get(state.ema_params), text, tok_dir)
    return ckpt


def adherence(pipe, adapters=(), grid: str = "") -> tuple[dict[str, float], dict[str, list[bool]]]:
    """The checker's adherence and the colour accuracy alone on the seen and held-out eval prompts, and
    each split's per-prompt pass/fail; `grid`: a PNG of the first 32 samples of each split."""
    res = demo.evaluate(pipe, EVAL_PROMPTS, EVAL_SEED, adapters)
    if grid:
        imgs, caps = (
            sum((list(res[s + "_images"][i][:32]) for s in ("seen", "held_out")), []) for i in (0, 1)
        )
        demo.grid(np.stack(imgs), caps, grid)
    out, passed = {}, {}
    for split in ("seen", "held_out"):
        reports = [shapes.check_details(im, c) for im, c in zip(*res[split + "_images"])]
        passed[split] = [r.ok for r in reports]
        out[split] = res[split]
        # Every caption object matched by a component of its colour.
        out[f"colour_{split}"] = float(np.mean([all(o.color for o in r.objects) for r in reports]))
    return out, passed


def mcnemar(before: list[bool], after: list[bool]) -> dict[str, float]:
    """Prompts fixed and broken between two runs on the same prompts and seeds, and the exact two-sided
    McNemar p-value (a binomial test of the discordant prompts at 1/2)."""
    fixed = sum(not b and a for b, a in zip(before, after))
    broken = sum(b and not a for b, a in zip(before, after))
    n, k = fixed + broken, min(fixed, broken)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"fixed": fixed, "broken": broken, "p_value": p}


def colour_pairs(n: int, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(caption, right colour, wrong colour) renders of seen prompts, same shape, place and jitter."""
    rng = np.random.default_rng(seed)
    colors = list(shapes.COLORS)
    out = []
    for c in shapes.prompts("seen", n, seed=seed):
        (spec,) = shapes.parse_caption(c)
        other = dataclasses.replace(spec, color=colors[(colors.index(spec.color) + 1 + rng.integers(3)) % 4])
        s = int(rng.integers(1 << 30))
        out.append((c, shapes.render([spec], demo.SIZE, seed=s), shapes.render([other], demo.SIZE, seed=s)))
    return out


def judged_pairs(pipe, n: int, seed: int, k: int = 4) -> tuple[list, dict[str, int]]:
    """On-policy pairs: per seen prompt, K samples judged by the checker; (accepted or render, rejected)."""
    caps = shapes.prompts("seen", n, seed=seed)
    samples = [pipe.generate(caps, seed=seed + 1 + j, progress=False) for j in range(k)]
    out, counts = [], {"prompts": n, "on_policy_preferred": 0, "rendered_preferred": 0, "no_failure": 0}
    for i, c in enumerate(caps):
        ok = [shapes.check(s[i], c) for s in samples]
        bad = [s[i] for s, good in zip(samples, ok) if not good]
        if not bad:
            counts["no_failure"] += 1
            continue
        good = [s[i] for s, g in zip(samples, ok) if g]
        if good:
            counts["on_policy_preferred"] += 1
            preferred = good[0]
        else:
            counts["rendered_preferred"] += 1
            preferred = shapes.render(shapes.parse_caption(c), demo.SIZE, seed=seed + i)
        out.append((c, preferred, bad[0]))
    return out, counts


def write_pairs(pairs, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i, (c, w, lo) in enumerate(pairs):
        Image.fromarray(w).save(os.path.join(folder, f"w{i}.png"))
        Image.fromarray(lo).save(os.path.join(folder, f"l{i}.png"))
        rows.append({"caption": c, "chosen": f"w{i}.png", "rejected": f"l{i}.png"})
    path = os.path.join(folder, "pairs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="demo_out/checkpoint")
    ap.add_argument(
        "--mislabel",
        type=float,
        default=0.0,
        help="instead of --checkpoint, first train the demo recipe on captions whose colour is wrong with "
        "this probability (into OUT/../work/base_mislabel..., reused by later runs)",
    )
    ap.add_argument("--base-steps", type=int, default=1500, help="training steps of the --mislabel base")
    ap.add_argument(
        "--base-examples", type=int, default=16384, help="training examples of the --mislabel base"
    )
    ap.add_argument("--pairs", choices=("colour", "judged"), default="colour")
    ap.add_argument(
        "--out",
        default="",
        help="default: experiments/results/dpo/<pairs>[_mislabelP][_betaB][_sftW][_steps]",
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n", type=int, default=1024, help="prompts to make pairs from")
    ap.add_argument("--beta", type=float, default=2000.0)
    ap.add_argument(
        "--sft", type=float, default=0.0, help="dpo_sft_weight: SFT anchor on the preferred images"
    )
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args(argv)
    name = a.pairs + (f"_mislabel{round(100 * a.mislabel)}" if a.mislabel else "")
    name += f"_beta{a.beta:g}" if a.beta != ap.get_default("beta") else ""
    name += (f"_sft{a.sft:g}" if a.sft else "") + (
        f"_{a.steps}" if a.steps != ap.get_default("steps") else ""
    )
    out = a.out or os.path.join("experiments", "results", "dpo", name)
    ckpt = a.checkpoint
    if a.mislabel:
        # Shared by the runs beside OUT, as the base depends only on these three settings.
        base = f"base_mislabel{a.mislabel:g}_{a.base_steps}steps_{a.base_examples}"
        base = os.path.join(os.path.dirname(os.path.abspath(out)), "work", base)
        ckpt = mislabelled_base(base, a.mislabel, a.base_steps, a.base_examples)
    pipe = SD3Pipeline.load(ckpt)
    os.makedirs(out, exist_ok=True)
    before, passed_before = adherence(pipe, grid=os.path.join(out, "samples_before.png"))
    if a.pairs == "colour":
        pairs, counts = colour_pairs(a.n, 0), {"prompts": a.n}
    else:
        pairs, counts = judged_pairs(pipe, a.n, 0)
    if len(pairs) < a.batch_size:
        raise SystemExit(f"only {len(pairs)} pairs, fewer than a batch of {a.batch_size}")
    jsonl = write_pairs(pairs, os.path.join(out, "work", "pairs"))
    cfg = TrainConfig(
        model=pipe.transformer_config,
        data=DataConfig(kind="pairs", path=jsonl),
        optim=OptimConfig(lr=a.lr, warmup_steps=min(20, a.steps // 5)),
        batch_size=a.batch_size,
        steps=a.steps,
        ema_decay=0.0,
        compute_dtype="float32",
        checkpoint_every=a.steps,
        log_every=max(a.steps // 10, 1),
        eval_every=0,
        init_from=ckpt,
        adapter="lora",
        lora=LoraConfig(rank=8, alpha=8.0),
        objective="dpo",
        dpo_beta=a.beta,
        dpo_sft_weight=a.sft,
    )
    workdir = os.path.join(out, "work", "train")
    train(cfg, workdir, progress=False)
    lora = import_lora(os.path.join(workdir, "lora"), pipe.transformer_config)
    after, passed_after = adherence(pipe, [(lora, 1.0)], grid=os.path.join(out, "samples_after.png"))
    log = [m for m in read_metrics(workdir) if m.get("kind") == "log"]
    res = {
        "pairs": a.pairs,
        "base": {"checkpoint": ckpt, "mislabel": a.mislabel, "steps": a.base_steps} if a.mislabel else ckpt,
        "pair_counts": {**counts, "pairs": len(pairs)},
        "before": before,
        "after": after,
        "paired": {split: mcnemar(passed_before[split], passed_after[split]) for split in passed_before},
        "steps": a.steps,
        "beta": a.beta,
        "sft_weight": a.sft,
        "lr": a.lr,
        "batch_size": a.batch_size,
        "log": log,
    }
    common.save_json(os.path.join(out, "results.json"), res)
    for what, r in (("before", before), ("after", after)):
        print(
            f"[{a.pairs} pairs] {what}: adherence seen={r['seen']:.2f} held_out={r['held_out']:.2f}, "
            f"colour seen={r['colour_seen']:.2f} held_out={r['colour_held_out']:.2f}"
        )
    for split, m in res["paired"].items():
        fixed, broken, p = m["fixed"], m["broken"], m["p_value"]
        print(f"[{a.pairs} pairs] {split}: {fixed} prompts fixed, {broken} broken, p={p:.2g}")
    return res


if __name__ == "__main__":
    main()
