"""Preference tuning of the demo model: Diffusion-DPO through LoRA on pairs whose preferred image matches
the prompt's colour and whose rejected image has another colour (same shape and position).

    python experiments/dpo.py --checkpoint demo_out/checkpoint --out experiments/results/dpo [--steps 300]

Reports the checker's adherence before and after on the same held-out and seen prompts and seeds.
Result: see experiments/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os

import common
import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax import demo
from sd3_jax.data import shapes
from sd3_jax.lora import LoraConfig, create_lora_state
from sd3_jax.pipeline import SD3Pipeline
from sd3_jax.sharding.mesh import make_mesh
from sd3_jax.train.dpo import dpo_train_step
from sd3_jax.train.state import make_optimizer


def pairs(text, n: int, seed: int) -> dict[str, np.ndarray]:
    """n (prompt, right colour, wrong colour) pairs rendered from seen combinations."""
    rng = np.random.default_rng(seed)
    caps = shapes.prompts("seen", n, seed=seed)
    colors = list(shapes.COLORS)
    good, bad = [], []
    for c in caps:
        (spec,) = shapes.parse_caption(c)
        other = dataclasses.replace(spec, color=colors[(colors.index(spec.color) + 1 + rng.integers(3)) % 4])
        s = int(rng.integers(1 << 30))
        good.append(shapes.render([spec], demo.SIZE, seed=s))
        bad.append(shapes.render([other], demo.SIZE, seed=s))
    enc = demo.encode_examples(text, np.stack(good), caps)
    out = {k: np.stack([e[k] for e in enc]).astype(np.float32) for k in enc[0] if k != "latents"}
    out["latents_w"] = np.stack(good).astype(np.float32) / 127.5 - 1
    out["latents_l"] = np.stack(bad).astype(np.float32) / 127.5 - 1
    return out


def adherence(pipe, adapters=()) -> dict[str, float]:
    res = {}
    for split in ("seen", "held_out"):
        caps = shapes.prompts(split, 64, seed=4321)
        res[split] = shapes.adherence(pipe.generate(caps, seed=4321, progress=False, adapters=adapters), caps)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="demo_out/checkpoint")
    ap.add_argument("--out", default="experiments/results/dpo")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--beta", type=float, default=2000.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    a = ap.parse_args(argv)
    pipe = SD3Pipeline.load(a.checkpoint)
    base = pipe.transformer_params
    before = adherence(pipe)
    data = pairs(pipe.text, a.pairs, 0)
    cfg = dataclasses.replace(
        demo.train_config(a.steps, ""),
        model=pipe.transformer_config,
        ema_decay=0.0,
        optim=dataclasses.replace(demo.train_config(1, "").optim, lr=a.lr, warmup_steps=20),
    )
    tx = make_optimizer(cfg.optim, a.steps)
    state = create_lora_state(cfg, LoraConfig(rank=8, alpha=8.0), tx, make_mesh(cfg.mesh), jax.random.key(0))
    step = jax.jit(functools.partial(dpo_train_step, cfg, tx, beta=a.beta), donate_argnums=0)
    rng, log = jax.random.key(1), []
    order = np.random.default_rng(0)
    for i in range(a.steps):
        idx = order.integers(0, a.pairs, 16)
        state, m = step(state, {k: jnp.asarray(v[idx]) for k, v in data.items()}, rng, base)
        if i % 50 == 0 or i == a.steps - 1:
            log.append({k: float(v) for k, v in m.items()} | {"step": i + 1})
            print(log[-1], flush=True)
    after = adherence(pipe, [(state.params, 1.0)])
    res = {"before": before, "after": after, "steps": a.steps, "beta": a.beta, "lr": a.lr, "log": log}
    common.save_json(os.path.join(a.out, "results.json"), res)
    print(
        f"adherence before seen={before['seen']:.2f} held_out={before['held_out']:.2f}; "
        f"after seen={after['seen']:.2f} held_out={after['held_out']:.2f}"
    )
    return res


if __name__ == "__main__":
    main()
