"""Lower and compile time of the MMDiT forward for each full preset, on abstract shapes (no weights).

    python bench/compile.py [--presets sd3_medium,sd35_medium,sd35_large] [--size 1024] [--batch 2]
        [--out bench/results/compile.json]

Batch 2 is one classifier-free-guidance step; 333 text tokens (77 CLIP + 256 T5) as the SD3 pipeline uses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from sd3_jax.convert.mmdit import abstract_params
from sd3_jax.nn.mmdit import MMDiT, MMDiTConfig


def compile_time(cfg: MMDiTConfig, size: int, batch: int, dtype=jnp.bfloat16) -> dict:
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), abstract_params(cfg))
    lat = size // 8
    args = (
        jax.ShapeDtypeStruct((batch, lat, lat, cfg.in_channels), dtype),
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch, 333, cfg.context_dim), dtype),
        jax.ShapeDtypeStruct((batch, cfg.pooled_dim), dtype),
    )
    fn = jax.jit(lambda p, *a: MMDiT(cfg).apply({"params": p}, *a))
    t0 = time.perf_counter()
    lowered = fn.lower(params, *args)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="sd3_medium,sd35_medium,sd35_large")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default="bench/results/compile.json")
    a = ap.parse_args()
    rows = {}
    for name in a.presets.split(","):
        rows[name] = compile_time(getattr(MMDiTConfig, name)(), a.size, a.batch)
        print(
            f"{name:12s} lower {rows[name]['lower_s']:7.2f} s  compile {rows[name]['compile_s']:7.2f} s",
            flush=True,
        )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    meta = {
        "device": jax.devices()[0].device_kind,
        "platform": jax.default_backend(),
        "cpu": platform.processor(),
        "jax": jax.__version__,
        "size": a.size,
        "batch": a.batch,
    }
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
