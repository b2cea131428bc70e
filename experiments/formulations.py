"""Study 1, formulations (paper sec. 5.1 at toy scale): rectified flow with uniform, logit-normal(0, 1),
mode(1.29) and CosMap timesteps against eps-prediction LDM-linear and cosine schedules and EDM; the same
network (the demo MMDiT), data and step budget for each.

    python experiments/formulations.py --out experiments/results/formulations [--steps 800] [--smoke]

Validation losses are not comparable across formulations, so runs are ranked by prompt adherence (the
shapes checker, 64 seen + 64 held-out prompts, Euler 25 steps, at guidance scales 1 and 4) and by a
Frechet distance between generated and real shape images of the same prompts on pixel statistics (8x8
average-pooled RGB, 192 numbers): a network-free stand-in for FID, chosen because the shapes are flat
colours on black, so low-resolution pixel statistics capture colour, position and area, which is what
differs between runs.

Result: see experiments/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import common

RUNS = {
    "rf/uniform": dict(formulation="rectified_flow", timesteps="uniform"),
    "rf/logit_normal(0,1)": dict(formulation="rectified_flow", timesteps="logit_normal"),
    "rf/mode(1.29)": dict(formulation="rectified_flow", timesteps="mode", mode_s=1.29),
    "rf/cosmap": dict(formulation="rectified_flow", timesteps="cosmap"),
    "eps/linear": dict(formulation="ldm_linear", timesteps="uniform"),
    "eps/cosine": dict(formulation="cosine", timesteps="uniform"),
    "edm": dict(formulation="edm", timesteps="uniform"),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="experiments/results/formulations")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--examples", type=int, default=8192)
    ap.add_argument("--runs", default="", help="semicolon-separated subset of the run names (default: all)")
    ap.add_argument("--cfg", default="1,4", help="comma-separated guidance scales to evaluate each model at")
    ap.add_argument("--smoke", action="store_true", help="a few steps per run, under a minute in all")
    a = ap.parse_args(argv)
    scales = [float(x) for x in a.cfg.split(",")]
    steps, examples, n_eval, runs = a.steps, a.examples, 64, RUNS
    if a.runs:
        runs = {k: RUNS[k] for k in a.runs.split(";")}
    if a.smoke:
        steps, examples, n_eval = 2, 64, 4
        runs = {k: RUNS[k] for k in ("rf/logit_normal(0,1)", "eps/linear", "edm")}
        scales = scales[:1]
    text, prefix = common.data(os.path.join(a.out, "work"), examples)
    results = {}
    for name, kw in runs.items():
        cfg = common.study_config(steps, prefix, eval_every=0, **kw)
        if a.smoke:
            cfg = common.with_model(dataclasses.replace(cfg, batch_size=8, checkpoint_every=steps), depth=1)
        params, metrics = common.run(cfg, os.path.join(a.out, "work", name.replace("/", "_")))
        results[name] = {"final_loss": [m["loss"] for m in metrics if "loss" in m][-1]}
        for scale in scales:
            res = common.evaluate(params, cfg.model, cfg.formulation, text, n=n_eval, cfg_scale=scale)
            results[name][f"cfg {scale:g}"] = res
            print(
                f"{name:22s} cfg {scale:g} seen {res['seen']:.2f} held_out {res['held_out']:.2f} "
                f"fd {res['fd']:.4f}",
                flush=True,
            )
    common.save_json(
        os.path.join(a.out, "results.json"), {"steps": steps, "examples": examples, "runs": results}
    )
    common.line_plot(
        {
            f"{split} adherence, cfg {scale:g}": [
                (i, r[f"cfg {scale:g}"][split]) for i, r in enumerate(results.values())
            ]
            for scale in scales
            for split in ("held_out", "seen")
        },
        os.path.join(a.out, "formulations.png"),
        "adherence per run: " + ", ".join(f"{i}={k}" for i, k in enumerate(results)),
        "run",
        "adherence",
    )
    return results


if __name__ == "__main__":
    main()
