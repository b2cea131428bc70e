"""Shared pieces of the benchmarks: sizes per device, model pairs, timing, machine facts, JSON and tables.

Each benchmark script is run as `python bench/NAME.py --device cpu|gpu`; it prints a table and writes
`bench/results/NAME-<device>.json` as {"meta": machine facts, "results": [rows]}. `bench/render.py` turns
every such file into the tables of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from sd3_jax.nn.mmdit import MMDiTConfig

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------------------------------------------------
# Sizes per device preset.


@dataclasses.dataclass(frozen=True)
class Preset:
    model: MMDiTConfig  # the network (weights random)
    name: str  # how tables name the model
    size: int  # image side in pixels; latents are size / 8
    text_len: int  # text tokens (CLIP 77 + T5)
    steps: int  # denoising steps
    dtype: str  # compute and weight dtype of both frameworks
    batches: tuple[int, ...]  # images per prompt batch for sampling

    @property
    def latent(self) -> int:
        return self.size // 8


def small_config(**kw: Any) -> MMDiTConfig:
    """The CPU network: SD3 Medium's layout and real text widths, depth 4, width 256 (4 heads of 64)."""
    return MMDiTConfig.sd3_medium(**{**dict(depth=4, num_heads=4, head_dim=64), **kw})


def preset(device: str) -> Preset:
    if device == "cpu":
        # fp32: bf16 matmuls on this CPU are emulated in both frameworks, so bf16 would measure emulation.
        return Preset(small_config(), "small (depth 4, width 256)", 256, 154, 28, "float32", (1, 4))
    if device == "gpu":
        return Preset(MMDiTConfig.sd3_medium(), "SD3 Medium", 1024, 333, 28, "bfloat16", (1, 4))
    raise ValueError(f"--device must be cpu or gpu, got {device!r}")


def add_common_args(ap: argparse.ArgumentParser, name: str) -> None:
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="size preset and platform")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="cpu: pin the process to N cores and both frameworks to N threads; default: each its own",
    )
    ap.add_argument(
        "--out", default=None, help=f"JSON path (default bench/results/{name}-<device>[-<N>thread].json)"
    )


def out_path(args: argparse.Namespace, name: str) -> str:
    suffix = f"-{args.threads}thread" if getattr(args, "threads", None) else ""
    return args.out or os.path.join(RESULTS, f"{name}-{args.device}{suffix}.json")


def setup_platform(device: str, threads: int | None = None) -> None:
    """Pins jax to the platform (and, on CPU, the process to `threads` cores) before a backend initialises.

    XLA's thread flags alone do not pin it: with `intra_op_parallelism_threads=1` and Eigen's pool off, a
    training step still kept both cores of this host busy (CPU time 1.87x wall time), so the process is
    confined to the first `threads` cores with `sched_setaffinity`; torch is set to as many threads.
    """
    import jax

    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cuda" if device == "gpu" else "cpu")
    if threads:
        cores = sorted(os.sched_getaffinity(0))
        if threads > len(cores):
            raise SystemExit(f"--threads {threads}: this process may use only {len(cores)} cores")
        os.sched_setaffinity(0, cores[:threads])
        flags = [f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"]
        flags.append(f"intra_op_parallelism_threads={threads}")
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def cores_used(meta: dict[str, Any]) -> str:
    """'N of the host's M cores', and whether the process was pinned to them (`--threads`) or shared them."""
    n, host = meta.get("cores", meta["cpu_cores"]), meta["cpu_cores"]
    if n == host:
        return f"{n} cores shared with other jobs"
    return f"{n} of the host's {host} cores (the process pinned to {'it' if n == 1 else 'them'})"


def torch_device(device: str) -> str:
    return "cuda" if device == "gpu" else "cpu"


# ---------------------------------------------------------------------------------------------------------
# The same random network in both frameworks.


def diffusers_kwargs(cfg: MMDiTConfig) -> dict[str, Any]:
    from sd3_jax.convert.mmdit import config_to_diffusers

    kw = config_to_diffusers(cfg)
    kw.pop("_class_name")
    if not kw["dual_attention_layers"]:
        kw["dual_attention_layers"] = ()
    return kw


def randomize_(module: Any, seed: int = 0, std: float = 0.02) -> None:
    """Overwrites every parameter of a torch module with random values (norm scales around 1), in place."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            if "norm" in name and name.endswith("weight") and p.ndim == 1:
                r = r + 1.0
            p.copy_(r.to(p.dtype))


def model_pair(cfg: MMDiTConfig, seed: int = 0) -> tuple[Any, MMDiTConfig, dict[str, Any]]:
    """diffusers' SD3Transformer2DModel with random fp32 weights, and the same weights loaded into ours.

    Returns (torch model on the host, our config, numpy fp32 params); cast and move them as needed.
    """
    import torch
    from diffusers import SD3Transformer2DModel

    from sd3_jax.convert.mmdit import load_mmdit

    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**diffusers_kwargs(cfg)).eval()
    randomize_(ref, seed)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    ours_cfg, params = load_mmdit(sd, num_heads=cfg.num_heads)
    if ours_cfg.replace(attention=cfg.attention, remat=cfg.remat, sample_size=cfg.sample_size) != cfg:
        raise RuntimeError(f"loaded config {ours_cfg} differs from {cfg}")
    return ref, cfg, params


def text_inputs(rng: Any, batch: int, text_len: int, cfg: MMDiTConfig) -> tuple[Any, Any]:
    """Random prompt embeddings (B, L, context_dim) and pooled vectors (B, pooled_dim), float32."""
    import numpy as np

    ctx = rng.standard_normal((batch, text_len, cfg.context_dim), dtype=np.float32)
    pooled = rng.standard_normal((batch, cfg.pooled_dim), dtype=np.float32)
    return ctx, pooled


# ---------------------------------------------------------------------------------------------------------
# Timing.


def time_it(fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, Any]:
    """Runs `fn` (which must block until its work is done) warmup + repeats times; seconds of the repeats."""
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "first_s": first,
        "repeats": repeats,
    }


def time_interleaved(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Like `time_it` for several functions, their repeats interleaved (a, b, a, b, ...).

    On a shared host the load drifts; interleaving puts the drift on every side alike. Each function's
    first call (compile, allocator warmup) is timed apart as `first_s`.
    """
    stats: dict[str, dict[str, Any]] = {}
    for name, f in fns.items():
        t0 = time.perf_counter()
        f()
        stats[name] = {"first_s": time.perf_counter() - t0, "times": []}
        for _ in range(warmup - 1):
            f()
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            stats[name]["times"].append(time.perf_counter() - t0)
    for s in stats.values():
        ts = s["times"]
        s.update(median_s=statistics.median(ts), min_s=min(ts), max_s=max(ts), repeats=repeats)
    return stats


def is_oom(e: BaseException) -> bool:
    s = str(e)
    return any(k in s for k in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OutOfMemory"))


# ---------------------------------------------------------------------------------------------------------
# Machine facts.


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


def _ram_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return 0.0


def machine_info(with_torch: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Device, host and library versions, thread settings and the load average (other work on the host)."""
    import jax

    dev = jax.devices()[0]
    info: dict[str, Any] = {
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "num_devices": jax.device_count(),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_bf16": _cpu_has("avx512_bf16") or _cpu_has("amx_bf16"),
        "ram_gb": _ram_gb(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "threads": threads,  # both frameworks pinned to this many threads; None: each its default
        "cores": len(os.sched_getaffinity(0)),  # the cores this process may run on
        "load_avg_1m_start": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    import flax

    info["flax"] = flax.__version__
    if with_torch:
        import diffusers
        import torch

        info["torch"] = torch.__version__
        info["diffusers"] = diffusers.__version__
        if threads:
            torch.set_num_threads(threads)
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name(0)
    return info


def write_result(path: str, meta: dict[str, Any], rows: list[dict[str, Any]], **extra: Any) -> None:
    meta = dict(meta, load_avg_1m_end=round(os.getloadavg()[0], 2))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": rows, **extra}, f, indent=1)
    print(f"wrote {path}")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        if abs(v) >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def table(rows: Sequence[dict[str, Any]], cols: Sequence[tuple[str, str]], markdown: bool = False) -> str:
    """rows as a text (or markdown) table; cols are (key, header)."""
    head = [h for _, h in cols]
    body = [[_fmt(r.get(k)) for k, _ in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


# ---------------------------------------------------------------------------------------------------------
# MFU denominators.


def load_result(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def measured_matmul_rate(
    device: str, dtype: str, threads: int | None = None, results_dir: str = RESULTS
) -> float | None:
    """The jax matmul FLOP/s of bench/matmul.py for this device, dtype and thread pin (best size), or None."""
    suffix = f"-{threads}thread" if threads else ""
    res = load_result(os.path.join(results_dir, f"matmul-{device}{suffix}.json"))
    if res is None:
        return None
    rates = [r["flops_per_s"] for r in res["results"] if r["framework"] == "jax" and r["dtype"] == dtype]
    return max(rates) if rates else None


def mfu_fields(
    flops: float, seconds: float, device: str, dtype: str, device_kind: str, threads: int | None = None
) -> dict[str, Any]:
    """Achieved FLOP/s, MFU against the datasheet bf16 peak and against the measured matmul rate."""
    from sd3_jax.flops import peak_flops

    rate = flops / seconds
    peak = peak_flops(device_kind) if dtype == "bfloat16" else None
    measured = measured_matmul_rate(device, dtype, threads)
    return {
        "tflops_per_s": rate / 1e12,
        "mfu_peak": rate / peak if peak else None,
        "mfu_matmul": rate / measured if measured else None,
    }


# ---------------------------------------------------------------------------------------------------------
# BENCHMARKS.md


MATMUL_COLS = [
    ("framework", "framework"),
    ("dtype", "dtype"),
    ("n", "n"),
    ("seconds", "s / matmul"),
    ("tflops", "TFLOP/s"),
    ("peak_tflops", "datasheet TFLOP/s"),
]
FORWARD_COLS = [
    ("batch", "batch (with CFG)"),
    ("jax_s", "sd3_jax s"),
    ("torch_s", "diffusers s"),
    ("ratio", "diffusers / sd3_jax"),
    ("ratio_min", "same, of minima"),
    ("torch_threads", "torch threads"),
    ("gflop", "GFLOP"),
    ("jax_mfu_matmul", "sd3_jax MFU (measured matmul)"),
    ("jax_mfu_peak", "sd3_jax MFU (datasheet)"),
    ("rel_diff", "max rel diff"),
]
LOOP_COLS = [
    ("images", "images"),
    ("jax_s_per_image", "sd3_jax s / image"),
    ("torch_s_per_image", "diffusers s / image"),
    ("ratio", "diffusers / sd3_jax"),
    ("ratio_min", "same, of minima"),
    ("torch_threads", "torch threads"),
    ("jax_mfu_matmul", "sd3_jax MFU (measured matmul)"),
    ("jax_mfu_peak", "sd3_jax MFU (datasheet)"),
    ("torch_mfu_matmul", "diffusers MFU (measured matmul)"),
    ("rel_diff", "max rel diff of latents"),
]
TRAIN_COLS = [
    ("framework", "framework"),
    ("size", "px"),
    ("batch", "batch"),
    ("remat", "remat"),
    ("step_s", "s / step"),
    ("images_per_s", "images / s"),
    ("mfu_matmul", "MFU (measured matmul)"),
    ("mfu_peak", "MFU (datasheet)"),
    ("status", "status"),
]
CONVERT_COLS = [
    ("what", "what"),
    ("file_gb", "file GB"),
    ("copy_s", "copy s"),
    ("convert_s", "convert s"),
    ("convert_over_copy", "convert / copy"),
    ("convert_peak_rss_gb", "convert peak RSS GiB"),
    ("read_s", "read ckpt s"),
    ("load_s", "load s"),
    ("load_over_read", "load / read"),
    ("load_peak_rss_gb", "load peak RSS GiB"),
]
