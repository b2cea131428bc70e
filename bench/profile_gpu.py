"""Where a GPU's time goes in the MMDiT: profiler traces of the sampling forward and the training gradient.

    python bench/profile_gpu.py [--device gpu] [--out bench/results/profile-gpu.json]

gpu: SD3 Medium in bf16, the CFG forward at 1024 px (batch 2, 333 text tokens) and the gradient of an MSE
loss at 256 px (batch 32). cpu: the small bench network at the CPU preset, to check the script on any host.
For each, the wall time per call (minimum of repeats) and one trace of a few calls, summed by HLO op kind
(the device's "XLA Ops" line of the trace; each op's name without its numeric suffix) and by class: matmuls
(cuBLAS / Triton gemm custom calls and dot fusions), attention (cuDNN), other fusions, copies and the rest.
Kernel time under the wall time is the share spent launching, waiting or idle (on CPU the events of
all worker threads are summed, and a `while` holds the ops inside it, so there shares are indicative only).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

CLASSES = (  # (class, pattern over the op name), first match wins
    ("attention", r"cudnn|fmha|flash|dot_product_attention|custom-call"),
    ("matmul", r"gemm|cublas|dot|triton|nvjet|xmma|cutlass"),
    ("copy", r"copy|transpose|bitcast|concatenate|slice|dynamic-update|pad"),
    ("fusion", r"fusion"),
)


def op_class(name: str) -> str:
    for cls, pattern in CLASSES:
        if re.search(pattern, name, re.IGNORECASE):
            return cls
    return "other"


def trace_kinds(fn, calls: int = 3) -> dict[str, float]:
    """Milliseconds per call by op kind: the GPU's "XLA Ops" line (else every line of its planes)."""
    import jax
    from jax._src.lib import _profile_data

    folder = tempfile.mkdtemp(prefix="sd3_jax_trace_")
    jax.profiler.start_trace(folder)
    for _ in range(calls):
        jax.block_until_ready(fn())
    jax.profiler.stop_trace()
    path = max(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True))
    kinds: collections.Counter = collections.Counter()
    planes = list(_profile_data.ProfileData.from_file(path).planes)
    gpu = [p for p in planes if p.name.startswith("/device:GPU")]
    for plane in gpu or planes:
        lines = list(plane.lines)
        ops = [ln for ln in lines if ln.name == "XLA Ops"] if gpu else []
        for line in ops or lines:
            if not gpu and not line.name.startswith("tf_XLAEigen"):
                continue
            for ev in line.events:
                if not ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                    kinds[re.sub(r"[._]\d+$", "", ev.name)] += ev.duration_ns
    return {k: v / 1e6 / calls for k, v in kinds.most_common()}


def programs(device: str):
    """(name, fn, flops) for the forward and the gradient, inputs bound, compiled by the first call."""
    import jax
    import jax.numpy as jnp

    from sd3_jax.flops import mmdit_forward_flops
    from sd3_jax.nn.mmdit import MMDiT
    from sd3_jax.train.state import init_params

    pre = common.preset(device)
    dtype = jnp.dtype(pre.dtype)
    cfg = pre.model.replace(dtype=dtype)
    params = jax.tree.map(lambda p: p.astype(dtype), init_params(cfg, jax.random.key(0)))
    model = MMDiT(cfg)

    def inputs(b, lat, seed):
        k = jax.random.split(jax.random.key(seed), 3)
        return (
            jax.random.normal(k[0], (b, lat, lat, cfg.in_channels), dtype),
            jnp.full((b,), 0.5, jnp.float32),
            jax.random.normal(k[1], (b, pre.text_len, cfg.context_dim), dtype),
            jax.random.normal(k[2], (b, cfg.pooled_dim), dtype),
        )

    b_fwd, lat_fwd = 2, pre.latent
    b_grad, lat_grad = (32, 32) if device == "gpu" else (4, 32)
    xf, xg = inputs(b_fwd, lat_fwd, 1), inputs(b_grad, lat_grad, 2)
    fwd = jax.jit(lambda p, a: model.apply({"params": p}, *a))
    loss = lambda p, a: jnp.mean((model.apply({"params": p}, *a).astype(jnp.float32) - a[0]) ** 2)
    grad = jax.jit(jax.grad(loss))
    t = pre.text_len
    return [
        (f"forward {lat_fwd * 8} px, batch {b_fwd}", lambda: fwd(params, xf),
         mmdit_forward_flops(cfg, lat_fwd, lat_fwd, t, b_fwd)),
        (f"gradient {lat_grad * 8} px, batch {b_grad}", lambda: grad(params, xg),
         3 * mmdit_forward_flops(cfg, lat_grad, lat_grad, t, b_grad)),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.device == "cpu":
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
        ).strip()
    common.setup_platform(a.device)
    meta = common.machine_info(with_torch=False)
    rows, profiles = [], {}
    for name, fn, flops in programs(a.device):
        wall = common.time_it(fn, warmup=1, repeats=a.repeats)["min_s"]
        kinds = trace_kinds(fn)
        kernel = sum(kinds.values()) / 1e3
        by_class: collections.Counter = collections.Counter()
        for k, ms in kinds.items():
            by_class[op_class(k)] += ms
        rows.append(
            {
                "program": name,
                "wall_s": wall,
                "kernel_s": kernel,
                "kernel_over_wall": kernel / wall,
                **common.mfu_fields(
                    flops, wall, a.device, common.preset(a.device).dtype, meta["device_kind"]
                ),
                **{f"{c}_share": ms / 1e3 / wall for c, ms in by_class.items()},
            }
        )
        profiles[name] = [
            {"op kind": k, "ms / call": v, "class": op_class(k)} for k, v in list(kinds.items())[:30]
        ]
        print(common.table(rows[-1:], [(k, k) for k in rows[-1]]), flush=True)
        print(common.table(profiles[name][:15], [(k, k) for k in profiles[name][0]]), flush=True)
    common.write_result(a.out or f"bench/results/profile-{a.device}.json", meta, rows, op_kinds=profiles)


if __name__ == "__main__":
    main()
