"""Study 2, scaling (paper sec. 5.3): MMDiT depth 2, 4, 6, 8 with width 64 x depth (one 64-wide head per
layer, as the paper's depth-d models have d heads), rectified flow with logit-normal timesteps; validation
loss (fixed timesteps, fixed noise, held-out set) against training FLOPs.

    python experiments/scaling.py --out experiments/results/scaling [--steps 300] [--smoke]

Result: see experiments/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import common

from sd3_jax import demo
from sd3_jax.flops import mmdit_forward_flops


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="experiments/results/scaling")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--depths", default="2,4,6,8")
    ap.add_argument("--examples", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    depths = [int(d) for d in a.depths.split(",")]
    steps, examples, batch = a.steps, a.examples, a.batch_size
    if a.smoke:
        steps, examples, batch, depths = 2, 64, 8, [1, 2]
    text, prefix = common.data(os.path.join(a.out, "work"), examples)
    curves, results = {}, {}
    for depth in depths:
        base = common.study_config(steps, prefix)
        model = base.model.replace(depth=depth, num_heads=depth, head_dim=64)
        cfg = dataclasses.replace(
            base,
            model=model,
            batch_size=batch,
            eval_every=max(steps // 6, 1),
            checkpoint_every=steps,
            optim=dataclasses.replace(base.optim, warmup_steps=max(steps // 10, 1)),
        )
        _, metrics = common.run(cfg, os.path.join(a.out, "work", f"depth{depth}"))
        per_step = 3 * mmdit_forward_flops(model, demo.SIZE, demo.SIZE, demo.TEXT_LEN, batch)
        evals = [(m["step"] * per_step, m["val_loss"]) for m in metrics if m.get("kind") == "eval"]
        curves[f"depth {depth} (width {64 * depth})"] = evals
        results[depth] = {
            "width": 64 * depth,
            "flops_per_step": per_step,
            "val_loss": evals,
            "final_val_loss": evals[-1][1],
        }
        print(f"depth {depth}: final val loss {evals[-1][1]:.4f} at {evals[-1][0]:.3g} FLOPs", flush=True)
    common.save_json(os.path.join(a.out, "results.json"), {"steps": steps, "runs": results})
    common.line_plot(
        curves,
        os.path.join(a.out, "scaling.png"),
        "validation loss vs training FLOPs",
        "training FLOPs",
        "val loss",
        logx=True,
    )
    return results


if __name__ == "__main__":
    main()
