"""Measured matmul rate of the device (large square matmuls, jax and torch): the MFU denominator.

    python bench/matmul.py --device cpu|gpu [--out bench/results/matmul-<device>.json]

Next to sd3_jax/flops.py's datasheet peak, this is what the device sustains on the dense matmuls the MMDiT
is made of; bench/sampling.py and bench/training.py report MFU against both.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

SIZES = {
    "cpu": {"float32": (1024, 2048), "bfloat16": (1024,)},
    "gpu": {"float32": (4096, 8192), "bfloat16": (4096, 8192, 16384)},
}


def jax_matmul(n: int, dtype: str, calls: int) -> float:
    """Seconds per (n, n) @ (n, n) matmul, dispatched `calls` times back to back."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(jnp.matmul)

    def run():
        out = None
        for _ in range(calls):
            out = mm(a, b)
        out.block_until_ready()

    t = common.time_it(run, warmup=2, repeats=5)
    return t["median_s"] / calls


def torch_matmul(n: int, dtype: str, calls: int, device: str) -> float:
    import torch

    dt = getattr(torch, dtype)
    dev = common.torch_device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn((n, n), generator=g, device=dev).to(dt)
    b = torch.randn((n, n), generator=g, device=dev).to(dt)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode():
            for _ in range(calls):
                torch.matmul(a, b)
        sync()

    t = common.time_it(run, warmup=2, repeats=5)
    return t["median_s"] / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(ap, "matmul")
    ap.add_argument("--no-torch", action="store_true", help="jax only")
    a = ap.parse_args()
    common.setup_platform(a.device, a.threads)
    from sd3_jax.flops import peak_flops

    meta = common.machine_info(with_torch=not a.no_torch, threads=a.threads)
    peak = peak_flops(meta["device_kind"])
    rows = []
    frameworks = ["jax"] + ([] if a.no_torch else ["torch"])
    for fw in frameworks:
        for dtype, sizes in SIZES[a.device].items():
            for n in sizes:
                flops = 2.0 * n**3
                # Enough calls that one repeat is ~0.1 s on a GPU; one call per repeat on a CPU.
                calls = max(1, int(2e14 // flops)) if a.device == "gpu" else 1
                try:
                    s = (
                        jax_matmul(n, dtype, calls)
                        if fw == "jax"
                        else torch_matmul(n, dtype, calls, a.device)
                    )
                except Exception as e:  # noqa: BLE001 - an OOM at the largest size is a result, not a crash
                    if not common.is_oom(e):
                        raise
                    rows.append(dict(framework=fw, dtype=dtype, n=n, status="OOM"))
                    continue
                row = dict(
                    framework=fw,
                    dtype=dtype,
                    n=n,
                    seconds=s,
                    flops_per_s=flops / s,
                    tflops=flops / s / 1e12,
                    peak_tflops=peak / 1e12 if (peak and dtype == "bfloat16") else None,
                )
                rows.append(row)
                print(f"{fw:5s} {dtype:8s} n={n:5d}  {row['tflops']:8.3f} TFLOP/s", flush=True)
    print(common.table(rows, common.MATMUL_COLS))
    notes = []
    if a.device == "cpu":
        bf16 = "has AVX512-BF16 dot instructions" if meta["cpu_bf16"] else "has no native bf16 arithmetic"
        pools = (
            f"the process pinned to {a.threads} core(s), torch to as many threads"
            if a.threads
            else f"torch uses {meta.get('torch_threads')} threads, XLA's CPU client a pool over all cores"
        )
        notes.append(f"This CPU {bf16}; {pools}.")
    common.write_result(common.out_path(a, "matmul"), meta, rows, notes=notes)


if __name__ == "__main__":
    main()
