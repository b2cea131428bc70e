"""Preference tuning of the demo model: Diffusion-DPO through LoRA with `sd3-jax train`'s trainer.

    python experiments/dpo.py --checkpoint demo_out/checkpoint --pairs colour [--steps 300] [--n 1024]
    python experiments/dpo.py --checkpoint demo_out/checkpoint --pairs judged

Two kinds of preference pairs, written as PNGs and a JSONL (`data.kind="pairs"`, captions encoded by the
checkpoint's own text encoders):
  colour  the preferred image is a clean render of the prompt, the rejected one the same shape and place in
          another colour (the issue's pairs);
  judged  on-policy pairs labelled by the shapes checker, as Diffusion-DPO is used: the demo model samples
          each prompt K times; the rejected image is a sample the checker rejects, the preferred one a
          sample it accepts (a clean render when none of the K passes).
Reports the checker's adherence before and after, on the same 128 seen and 128 held-out prompts and seeds
(not the prompts the pairs were made from). Result: see experiments/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import common
import numpy as np
from PIL import Image

from sd3_jax import demo
from sd3_jax.convert.lora import import_lora
from sd3_jax.data import shapes
from sd3_jax.lora import LoraConfig
from sd3_jax.pipeline import SD3Pipeline
from sd3_jax.train.config import DataConfig, OptimConfig, TrainConfig
from sd3_jax.train.loop import read_metrics, train

EVAL_SEED = 4321
EVAL_PROMPTS = 128  # per split


def adherence(pipe, adapters=()) -> dict[str, float]:
    res = demo.evaluate(pipe, EVAL_PROMPTS, EVAL_SEED, adapters)
    return {split: res[split] for split in ("seen", "held_out")}


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
    ap.add_argument("--pairs", choices=("colour", "judged"), default="colour")
    ap.add_argument("--out", default="", help="default: experiments/results/dpo/<pairs>")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n", type=int, default=1024, help="prompts to make pairs from")
    ap.add_argument("--beta", type=float, default=2000.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args(argv)
    out = a.out or os.path.join("experiments", "results", "dpo", a.pairs)
    pipe = SD3Pipeline.load(a.checkpoint)
    before = adherence(pipe)
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
        init_from=a.checkpoint,
        adapter="lora",
        lora=LoraConfig(rank=8, alpha=8.0),
        objective="dpo",
        dpo_beta=a.beta,
    )
    workdir = os.path.join(out, "work", "train")
    train(cfg, workdir, progress=False)
    lora = import_lora(os.path.join(workdir, "lora"), pipe.transformer_config)
    after = adherence(pipe, [(lora, 1.0)])
    log = [m for m in read_metrics(workdir) if m.get("kind") == "log"]
    res = {
        "pairs": a.pairs,
        "pair_counts": {**counts, "pairs": len(pairs)},
        "before": before,
        "after": after,
        "steps": a.steps,
        "beta": a.beta,
        "lr": a.lr,
        "batch_size": a.batch_size,
        "log": log,
    }
    common.save_json(os.path.join(out, "results.json"), res)
    print(
        f"[{a.pairs} pairs] adherence before seen={before['seen']:.2f} held_out={before['held_out']:.2f}; "
        f"after seen={after['seen']:.2f} held_out={after['held_out']:.2f}"
    )
    return res


if __name__ == "__main__":
    main()
