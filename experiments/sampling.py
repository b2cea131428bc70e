"""Study 3, sampling: prompt adherence against the number of Euler steps (1 to 50) and against the timestep
shift, for a rectified-flow model and an eps-prediction LDM-linear model trained on the same budget.

    python experiments/sampling.py --out experiments/results/sampling [--steps 800] [--smoke]

Reuses the models of the formulations study when its work folder is given (--models), else trains both.
Result: see experiments/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import common

STEPS = (1, 2, 4, 8, 16, 25, 50)
SHIFTS = (0.5, 1.0, 2.0, 3.0, 6.0)
SCALES = (1.0, 1.5, 2.0, 4.0, 7.0)  # classifier-free guidance


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="experiments/results/sampling")
    ap.add_argument("--models", default="", help="the formulations study's work folder, to reuse its models")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--examples", type=int, default=8192)
    ap.add_argument("--cfg", type=float, default=1.0, help="guidance scale of the steps and shift sweeps")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    steps, examples, n, step_grid, shift_grid, scale_grid = a.steps, a.examples, 64, STEPS, SHIFTS, SCALES
    if a.smoke:
        steps, examples, n, step_grid, shift_grid, scale_grid = 2, 64, 4, (1, 2), (1.0, 3.0), (1.0, 4.0)
    work = a.models or os.path.join(a.out, "work")
    text, prefix = common.data(work, examples)
    results = {}
    for name, form, density, folder in (
        ("rectified flow", "rectified_flow", "logit_normal", "rf_logit_normal(0,1)"),
        ("eps/linear", "ldm_linear", "uniform", "eps_linear"),
    ):
        cfg = dataclasses.replace(
            common.study_config(steps, prefix), formulation=form, timesteps=density, eval_every=0
        )
        if a.smoke:
            cfg = common.with_model(dataclasses.replace(cfg, batch_size=8, checkpoint_every=steps), depth=1)
        params, _ = common.run(cfg, os.path.join(work, folder))

        def held(p=params, c=cfg.model, f=form, **kw):
            return common.evaluate(p, c, f, text, n=n, **{"cfg_scale": a.cfg, **kw})

        by_steps = {s: held(steps=s) for s in step_grid}
        by_shift = {s: held(shift=s) for s in shift_grid}
        by_cfg = {s: held(cfg_scale=s) for s in scale_grid}
        results[name] = {"steps": by_steps, "shift": by_shift, "cfg": by_cfg}
        print(
            name,
            {s: round(r["held_out"], 2) for s, r in by_steps.items()},
            {s: round(r["held_out"], 2) for s, r in by_shift.items()},
            {s: round(r["held_out"], 2) for s, r in by_cfg.items()},
            flush=True,
        )
    common.save_json(os.path.join(a.out, "results.json"), {"train_steps": steps, "runs": results})
    common.line_plot(
        {f"{k}: held-out": [(s, r["held_out"]) for s, r in v["steps"].items()] for k, v in results.items()}
        | {f"{k}: seen": [(s, r["seen"]) for s, r in v["steps"].items()] for k, v in results.items()},
        os.path.join(a.out, "steps.png"),
        f"adherence vs Euler steps (shift 1, cfg {a.cfg:g})",
        "steps",
        "adherence",
        logx=True,
    )
    common.line_plot(
        {f"{k}: held-out": [(s, r["held_out"]) for s, r in v["shift"].items()] for k, v in results.items()},
        os.path.join(a.out, "shift.png"),
        f"adherence vs timestep shift (25 steps, cfg {a.cfg:g})",
        "shift",
        "adherence",
        logx=True,
    )
    common.line_plot(
        {f"{k}: held-out": [(s, r["held_out"]) for s, r in v["cfg"].items()] for k, v in results.items()}
        | {f"{k}: seen": [(s, r["seen"]) for s, r in v["cfg"].items()] for k, v in results.items()},
        os.path.join(a.out, "cfg.png"),
        "adherence vs classifier-free guidance scale (25 steps, shift 1)",
        "guidance scale",
        "adherence",
    )
    return results


if __name__ == "__main__":
    main()
