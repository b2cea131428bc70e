"""BENCHMARKS.md from every bench/results/*.json (the CPU/GPU comparisons, conversion, compile, TPU fit).

python bench/render.py [--results bench/results] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    CONVERT_COLS,
    FORWARD_COLS,
    LOOP_COLS,
    MATMUL_COLS,
    RESULTS,
    TRAIN_COLS,
    cores_used,
    load_result,
    table,
)

LIMITS = {
    "matmul": (
        "Square matmuls, jitted (jax) or eager (torch), timed over repeated calls after warmup; the best "
        "size "
        "is the MFU denominator. On CPU the rate depends on the libraries' kernels (XLA:CPU's Eigen/oneDNN, "
        "torch's oneDNN/BLAS) and on how many of the shared cores are free at that moment. "
        "torch fp32 on GPU is true fp32 (TF32 off, its default); jax fp32 on GPU uses XLA's default "
        "precision."
    ),
    "sampling": (
        "Text encoders and the VAE decode are excluded from both sides: both start from the same random "
        "prompt embeddings and initial latents. sd3_jax runs the whole 28-step Euler loop with CFG as one "
        "jitted function (`sample_euler` over `cfg` over the MMDiT); diffusers runs "
        "`StableDiffusion3Pipeline(prompt_embeds=..., output_type='latent')` with only the transformer and "
        "its "
        "FlowMatchEulerDiscreteScheduler (shift 3), eager PyTorch with its default attention (SDPA). The "
        "forward rows are one CFG step (batch 2 x images). Compile time is excluded (warmup). 'max rel diff' "
        "is max|sd3_jax - diffusers| / max|diffusers| of the outputs, confirming both did the same work."
    ),
    "training": (
        "One optimizer step: forward, backward, global-norm clip 1.0, AdamW, EMA update. sd3_jax: "
        "`sd3_jax.train.step.train_step`, jitted with the state donated, fp32 master weights and the "
        "configured compute dtype; diffusers: the same step written in PyTorch (MSE on the velocity eps - "
        "x0, "
        "logit-normal t, `clip_grad_norm_`, `torch.optim.AdamW`, `_foreach_lerp_` EMA; autocast for bf16). "
        "MFU counts 3 x the forward FLOPs (rematerialised recomputation is not counted)."
    ),
    "conversion": (
        "bench/conversion.py: a synthesized full-size MMDiT single file (random weights in Stability's "
        "layout) is copied on the same disk (the yardstick), converted to a bf16 sd3-jax checkpoint by "
        "`sd3-jax convert`'s converter, the checkpoint's files read once (the second yardstick), and its "
        "transformer loaded into device arrays as `SD3Pipeline.load` does; each in a child process whose "
        "peak resident memory is read from wait4 (ru_maxrss), with the page cache evicted "
        "(posix_fadvise DONTNEED) before every step. Copy and conversion end with their bytes fsync'ed."
    ),
    "cpu_mfu": (
        "On the shared CPU host, MFU against the measured matmul rate is indicative only: the rate comes "
        "from "
        "bench/matmul.py run minutes apart under a different load (a value above 100% means the cores were "
        "busier during the matmul run than during this one). The GPU figures do not have this problem."
    ),
    "compile": (
        "bench/compile.py: lower and compile of the MMDiT forward (one CFG step, batch 2, 1024 px, 333 "
        "tokens) on abstract shapes, one process, cold jax compilation cache."
    ),
}


NO_GPU = "**GPU: not measured (no GPU result file; the lease-sized `bench/gpu_lease.sh` leaves it out).**"


def _machine_line(meta: dict[str, Any]) -> str:
    dev = meta.get("device_kind", meta.get("device", "?"))
    parts = [f"device `{dev}`"]
    if meta.get("cpu_model"):
        parts.append(f"host {meta['cpu_model']}, {meta.get('cpu_cores')} cores, {meta.get('ram_gb')} GB RAM")
    libs = [f"{k} {meta[k]}" for k in ("jax", "flax", "torch", "diffusers") if meta.get(k)]
    if libs:
        parts.append(", ".join(libs))
    if meta.get("torch_threads") is not None:
        parts.append(f"torch threads {meta['torch_threads']}")
    if meta.get("load_avg_1m_start") is not None:
        parts.append(f"load average {meta['load_avg_1m_start']} -> {meta.get('load_avg_1m_end')}")
    if meta.get("date"):
        parts.append(meta["date"])
    return "; ".join(parts)


def variants(results_dir: str, name: str, device: str) -> list[tuple[str, dict[str, Any]]]:
    """(title, result) for NAME-<device>.json and each NAME-<device>-<N>thread.json, in that order."""
    paths = [os.path.join(results_dir, f"{name}-{device}.json")]
    paths += sorted(glob.glob(os.path.join(results_dir, f"{name}-{device}-*thread.json")))
    out = []
    for path in paths:
        res = load_result(path)
        if res is None:
            continue
        n = res["meta"].get("threads")
        title = device.upper() + (f", both frameworks on {n} core{'s' if n > 1 else ''}" if n else "")
        out.append((title, res))
    return out


def _section(results_dir: str, name: str, title: str, cols, header_of=None) -> list[str]:
    out = [f"## {title}", ""]
    found = False
    for device in ("gpu", "cpu"):
        found_here = variants(results_dir, name, device)
        if not found_here and device == "gpu":
            out += [
                NO_GPU,
                "",
            ]
        for sub, res in found_here:
            found = True
            out += _variant(sub, res, cols, header_of)
    if not found:
        out += ["(no results yet)", ""]
    out += [f"What limits these figures: {LIMITS[name]}", ""]
    if name in ("sampling", "training") and variants(results_dir, name, "cpu"):
        out += [LIMITS["cpu_mfu"], ""]
    return out


def _variant(sub: str, res: dict[str, Any], cols, header_of=None) -> list[str]:
    out = [f"### {sub}", "", f"Machine: {_machine_line(res['meta'])}.", ""]
    if header_of is not None:
        out += [header_of(res), ""]
    out += [table(res["results"], cols, markdown=True), ""]
    out += [f"- {note}" for note in res.get("notes", [])]
    return out + ([""] if res.get("notes") else [])


def _sampling_header(res: dict[str, Any]) -> str:
    c = res["config"]
    return (
        f"Model: {c['model']}, {c['size']}x{c['size']} px ({c['latent']}x{c['latent']} latents), "
        f"{c['text_len']} "
        f"text tokens, {c['steps']} steps, CFG scale {c['guidance']}, {c['dtype']}; "
        f"{c['gflop_per_forward']:.1f} GFLOP per single-image forward."
    )


def _training_header(res: dict[str, Any]) -> str:
    c = res["config"]
    return f"Model: {c['model']}, {c['text_len']} text tokens, {c['dtype']} compute, fp32 master weights."


def _conversion_header(res: dict[str, Any]) -> str:
    return f"Cases: {res['config']['cases']}."


def render_markdown(results_dir: str = RESULTS) -> str:
    """BENCHMARKS.md from every bench/results/*-<device>.json."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/run_all.sh` (`python bench/render.py`) from `bench/results/*.json`; "
        "edit the scripts, not this file. How each figure is taken: `bench/README.md`.",
        "",
        "Targets (project issue): GPU (H100, SD3 Medium, 1024x1024, 28 steps, CFG): at least 1.3x diffusers' "
        "throughput and MFU of the denoising loop >= 55%; GPU training step (SD3 Medium, 256x256): MFU >= "
        "45%; "
        "CPU: sd3_jax no slower than diffusers on the same small config.",
        "",
    ]
    lines += _targets(results_dir)
    lines += _section(results_dir, "matmul", "Matmul rate (MFU denominator)", MATMUL_COLS)
    lines += _section(
        results_dir, "sampling", "Sampling: MMDiT forward (one CFG step)", FORWARD_COLS, _sampling_header
    )
    # The loop rows live in the same file under "loop".
    lines += _loop_section(results_dir)
    lines += _section(results_dir, "training", "Training step", TRAIN_COLS, _training_header)
    lines += _profile_section(results_dir)
    lines += _section(
        results_dir,
        "conversion",
        "Conversion and loading of full-size single files",
        CONVERT_COLS,
        _conversion_header,
    )
    lines += _compile_section(results_dir)
    import tpu_fit

    lines += tpu_fit.render(results_dir)
    return "\n".join(lines).rstrip() + "\n"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _targets(results_dir: str) -> list[str]:
    """One line per target: the measured figure and whether it is met, or that it was not measured."""
    out = ["## Against the targets", ""]
    samp = {"gpu": load_result(os.path.join(results_dir, "sampling-gpu.json"))}
    train = {"gpu": load_result(os.path.join(results_dir, "training-gpu.json"))}
    if samp["gpu"] is None:
        out.append(
            "- GPU sampling (>= 1.3x diffusers, loop MFU >= 55%): not measured in this session: no GPU "
            "was lent."
        )
    else:
        dev = samp["gpu"]["meta"]["device_kind"]
        for r in samp["gpu"]["loop"]:
            ok = r["ratio"] >= 1.3 and (r.get("jax_mfu_peak") or 0) >= 0.55
            out.append(
                f"- GPU sampling on {dev}, {r['images']} image(s): {r['ratio']:.2f}x diffusers, loop MFU "
                f"{_pct(r.get('jax_mfu_peak'))} of the datasheet peak ({_pct(r.get('jax_mfu_matmul'))} of "
                "the "
                f"measured matmul rate): {'met' if ok else 'not met'}."
            )
    if train["gpu"] is None:
        out.append(
            "- GPU training step at 256 px (MFU >= 45%): not measured in this session: no GPU was lent."
        )
    else:
        ok_rows = [
            r
            for r in train["gpu"]["results"]
            if r["status"] == "ok" and r["framework"] == "sd3_jax" and r["size"] == 256
        ]
        best = max(ok_rows, key=lambda r: r["images_per_s"], default=None)
        if best is None:
            out.append("- GPU training step at 256 px: no batch size ran.")
        else:
            mfu = best.get("mfu_peak") or 0
            out.append(
                f"- GPU training step at 256 px on {train['gpu']['meta']['device_kind']}: best MFU "
                f"{_pct(mfu)} (batch {best['batch']}, remat {best['remat']}): "
                f"{'met' if mfu >= 0.45 else 'not met'}."
            )
    for sub, res in variants(results_dir, "sampling", "cpu"):
        for r in res["loop"]:
            verdict = "met" if r["ratio"] >= 1.0 else "not met"
            out.append(
                f"- {sub} sampling loop, {r['images']} image(s): diffusers takes {r['ratio']:.2f}x sd3_jax's "
                f"time (minima: {r['ratio_min']:.2f}x): {verdict} (noisy: shared cores)."
            )
    for sub, res in variants(results_dir, "training", "cpu"):
        rows = res["results"]
        for j, t in zip(rows[::2], rows[1::2]):
            ratio = t["step_s"] / j["step_s"]
            verdict = "sd3_jax faster" if ratio >= 1.0 else "sd3_jax slower"
            out.append(
                f"- {sub} training step, batch {j['batch']} (a reference comparison, no stated target): "
                "PyTorch "
                f"takes {ratio:.2f}x sd3_jax's time (minima: {t['min_s'] / j['min_s']:.2f}x): {verdict} "
                "(noisy: shared cores)."
            )
    return out + [""]


def _loop_section(results_dir: str) -> list[str]:
    out = ["## Sampling: the whole denoising loop (28 steps, CFG)", ""]
    for device in ("gpu", "cpu"):
        found = variants(results_dir, "sampling", device)
        if not found and device == "gpu":
            out += [
                NO_GPU,
                "",
            ]
        for sub, res in found:
            out += [f"### {sub}", "", _sampling_header(res), ""]
            out += [table(res["loop"], LOOP_COLS, markdown=True), ""]
    return out + [f"What limits these figures: {LIMITS['sampling']}", ""]


def _profile_section(results_dir: str) -> list[str]:
    """The CPU backward profile of bench/profile_train.py: variants tried, then time by op kind."""
    out = ["## Training step on CPU: where the backward's time goes", ""]
    found = sorted(glob.glob(os.path.join(results_dir, "profile-train-cpu*.json")))
    if not found:
        return out + ["(no results yet: `python bench/profile_train.py --threads 1`)", ""]
    res = load_result(found[-1])
    cols = [(k, k) for k in ("variant", "forward_s", "grad_s", "grad_over_forward")]
    out += [f"Machine: {_machine_line(res['meta'])}.", ""]
    out += [
        f"The small network, batch {res['batch']}, fp32, on {cores_used(res['meta'])}: `jax.grad` of an "
        "MSE loss against the forward (minimum of repeats), for each variant tried:",
        "",
        table(res["results"], cols, markdown=True),
        "",
        "One profiler trace of the default gradient, XLA's thunks summed by op kind (ms per call, all its "
        "worker threads together):",
        "",
        table(res["op_kinds"], [(k, k) for k in ("op kind", "ms / call", "share")], markdown=True),
        "",
    ]
    return out


def _compile_section(results_dir: str) -> list[str]:
    out = ["## Compile time of the sampling step (full presets, abstract shapes)", ""]
    cols = [("preset", "preset"), ("lower_s", "lower s"), ("compile_s", "compile s")]
    for device in ("gpu", "cpu"):
        res = load_result(os.path.join(results_dir, f"compile-{device}.json"))
        if res is None:
            if device == "gpu":
                out += [
                    NO_GPU,
                    "",
                ]
            continue
        meta = res["meta"]
        rows = [dict(preset=k, **v) for k, v in res["results"].items()]
        out += [f"### {device.upper()}", "", f"Machine: {_machine_line(meta)}.", ""]
        out += [table(rows, cols, markdown=True), ""]
    return out + [f"What limits these figures: {LIMITS['compile']}", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=RESULTS, metavar="RESULTS_DIR")
    ap.add_argument("--out", default=None, help="write here instead of stdout")
    a = ap.parse_args()
    text = render_markdown(a.results)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
