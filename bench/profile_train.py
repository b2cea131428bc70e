"""Where the time of a training step's backward goes: JAX profiler trace of the jitted gradient, by op kind.

    python bench/profile_train.py [--device cpu] [--threads 1] [--out bench/results/profile-train-cpu.json]

The small CPU network (bench/common.py: depth 4, width 256, 256 px, 154 text tokens, batch 4, fp32): the
forward and `jax.grad` of an MSE loss are timed (minimum of repeats) for each variant: the default
(segments under `nn.scan`), `nn.scan` unrolled, and the remat policies. Then one profiler trace of the
default gradient, with XLA's per-thunk TraceMe events on, is summed by op kind (the HLO name without its
numeric suffix): what is left after the dot kernels is the price of the backward's bookkeeping.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

VARIANTS = (
    ("scan (default)", dict(unroll=1, remat="none")),
    ("scan unrolled", dict(unroll=8, remat="none")),
    ("remat dots", dict(unroll=1, remat="dots")),
    ("remat full", dict(unroll=1, remat="full")),
)


def build(unroll: int, remat: str, batch: int):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from sd3_jax.nn import mmdit
    from sd3_jax.train.state import init_params

    cfg = common.small_config(remat=remat)
    params = init_params(cfg, jax.random.key(0))
    lat = 32
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (batch, lat, lat, cfg.in_channels))
    t = jnp.full((batch,), 0.5)
    ctx = jax.random.normal(keys[1], (batch, 154, cfg.context_dim))
    pooled = jax.random.normal(keys[2], (batch, cfg.pooled_dim))
    scan = nn.scan
    mmdit.nn.scan = lambda *a, **k: scan(*a, unroll=unroll, **k)  # read when the module is applied
    try:
        model = mmdit.MMDiT(cfg)
        fwd = jax.jit(lambda p: model.apply({"params": p}, x, t, ctx, pooled))
        loss = lambda p: jnp.mean((model.apply({"params": p}, x, t, ctx, pooled) - x) ** 2)
        grad = jax.jit(jax.grad(loss))
        jax.block_until_ready(fwd(params))
        jax.block_until_ready(grad(params))
    finally:
        mmdit.nn.scan = scan
    return params, fwd, grad


def best_of(fn, params, repeats: int) -> float:
    import jax

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params))
        times.append(time.perf_counter() - t0)
    return min(times)


def op_kinds(grad, params, calls: int = 3) -> dict[str, float]:
    """Milliseconds per call by op kind, summed over XLA's worker threads, from one profiler trace."""
    import jax
    from jax._src.lib import _profile_data

    folder = tempfile.mkdtemp(prefix="sd3_jax_trace_")
    jax.profiler.start_trace(folder)
    for _ in range(calls):
        jax.block_until_ready(grad(params))
    jax.profiler.stop_trace()
    path = max(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True))
    kinds: collections.Counter = collections.Counter()
    for plane in _profile_data.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            for ev in line.events:
                if not ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                    kinds[re.sub(r"[._]\d+$", "", ev.name)] += ev.duration_ns
    return {k: v / 1e6 / calls for k, v in kinds.most_common()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu",), default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_enable_xprof_traceme=true").strip()
    common.setup_platform(a.device, a.threads)
    meta = common.machine_info(with_torch=False, threads=a.threads)
    rows, profile = [], None
    for name, kw in VARIANTS:
        params, fwd, grad = build(batch=a.batch, **kw)
        f, g = best_of(fwd, params, a.repeats), best_of(grad, params, a.repeats)
        rows.append({"variant": name, **kw, "forward_s": f, "grad_s": g, "grad_over_forward": g / f})
        print(common.table(rows[-1:], [(k, k) for k in rows[-1]]), flush=True)
        if profile is None:
            profile = op_kinds(grad, params)
    total = sum(profile.values())
    kinds = [{"op kind": k, "ms / call": v, "share": v / total} for k, v in list(profile.items())[:15]]
    print(common.table(kinds, [(k, k) for k in kinds[0]]))
    common.write_result(common.out_path(a, "profile-train"), meta, rows, op_kinds=kinds, batch=a.batch)


if __name__ == "__main__":
    main()
