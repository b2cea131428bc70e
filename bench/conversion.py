"""Conversion speed and memory: a full-size SD3 Medium single file into an sd3-jax (Orbax) checkpoint.

    python bench/conversion.py [--device cpu] [--workdir /tmp] [--keep] [--converter auto|pipeline|streaming]
        [--out bench/results/conversion-<device>.json]

1. Synthesizes `sd3_medium.safetensors` in Stability's layout (`model.diffusion_model.*`, 491 tensors, bf16,
   ~4.2 GB) from the shapes of the table (`sai_rules` run backwards over `abstract_params`); each tensor is a
   rotated slice of one 16M-value random pool, streamed to disk by `write_safetensors(shapes=...)`, so the
   generator holds one tensor at a time.
2. Times reading every tensor once (`SafetensorsFile.read`), cold and then warm in the page cache.
3. Times building every param through the table with nothing written (`iter_params` alone), cold.
4. Times the conversion, cold: the project's converter `sd3_jax.convert.pipeline_io.convert` (what
   `sd3-jax convert` runs) where it exists (`--converter pipeline`), else the streaming path it is built
   on (`--converter streaming`): `iter_params` over the Stability table into
   `orbax_io.save_params_streaming`, one param at a time.
Each measurement runs in a child process; its peak resident memory comes from wait4 (ru_maxrss), and its
peak anonymous memory (excluding the memory-mapped file's pages) from sampling /proc/self/status.
Everything is written under --workdir and deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

POOL = 1 << 24


# ---------------------------------------------------------------------------------------------------------
# The file.


def synthesize(path: str, seed: int = 0) -> dict:
    """Writes a random SD3 Medium MMDiT in Stability's single-file layout; returns its size facts."""
    import ml_dtypes
    import numpy as np

    from sd3_jax.convert.mapping import source_shapes
    from sd3_jax.convert.mmdit import SAI_PREFIX, abstract_params, sai_rules
    from sd3_jax.convert.safetensors_io import write_safetensors
    from sd3_jax.nn.mmdit import MMDiTConfig

    cfg = MMDiTConfig.sd3_medium()
    bf16 = np.dtype(ml_dtypes.bfloat16)
    shapes = {
        SAI_PREFIX + k: (v, bf16) for k, v in source_shapes(sai_rules(cfg), abstract_params(cfg)).items()
    }
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(POOL, dtype=np.float32) * 0.02).astype(bf16)

    def tensors():
        for name, (shape, _) in shapes.items():
            n = int(np.prod(shape))
            start = int(rng.integers(POOL))
            yield name, np.resize(np.roll(pool, -start), n).reshape(shape)

    write_safetensors(path, tensors(), metadata={"format": "pt"}, shapes=shapes)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())  # written pages clean, so evict() can drop them
    n = sum(int(np.prod(s)) for s, _ in shapes.values())
    return {"tensors": len(shapes), "params": n, "bytes": os.path.getsize(path), "dtype": "bfloat16"}


def evict(path: str) -> None:
    """Drops `path`'s pages from the page cache (this file only), so the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# The measured work, run in a child process.


def read_all(src: str) -> int:
    from sd3_jax.convert.safetensors_io import SafetensorsFile

    total = 0
    with SafetensorsFile(src) as f:
        for name in f.keys():
            a = f.read(name)
            total += a.nbytes
            del a
    return total


def _pipeline_convert():
    """The project's converter (`sd3-jax convert`), or None where this tree does not have it yet."""
    import importlib

    for module in ("sd3_jax.convert.pipeline_io", "sd3_jax.convert.pipeline"):
        try:
            return importlib.import_module(module).convert
        except (ImportError, AttributeError):
            continue
    return None


def convert_pipeline(src: str, dst: str) -> None:
    """`sd3-jax convert SRC --out DST`, keeping bf16: the whole converter (plans, atomic dir, manifest)."""
    _pipeline_convert()([src], dst, dtype="bf16", progress=False)


def convert_streaming(src: str, dst: str) -> None:
    """The MMDiT part of a conversion: Stability table -> params, streamed leaf by leaf into Orbax."""
    from sd3_jax.convert.mapping import iter_params, open_tensors
    from sd3_jax.convert.mmdit import abstract_params, detect_layout, infer_config, sai_rules
    from sd3_jax.convert.orbax_io import save_params_streaming

    layout, tensors = detect_layout(open_tensors(src))
    cfg = infer_config(tensors, layout)
    leaves = iter_params(tensors, sai_rules(cfg), abstract_params(cfg), f"MMDiT ({layout})")
    save_params_streaming(os.path.join(os.path.abspath(dst), "transformer"), leaves)


def converter_name(choice: str) -> str:
    if choice != "auto":
        return choice
    return "streaming" if _pipeline_convert() is None else "pipeline"


def iterate_only(src: str, dst: str) -> None:
    """The conversion's reading and table work alone: every param built, nothing written."""
    from sd3_jax.convert.mapping import iter_params, open_tensors
    from sd3_jax.convert.mmdit import abstract_params, detect_layout, infer_config, sai_rules

    layout, tensors = detect_layout(open_tensors(src))
    cfg = infer_config(tensors, layout)
    for _, value in iter_params(tensors, sai_rules(cfg), abstract_params(cfg), f"MMDiT ({layout})"):
        del value


CONVERTERS = {"pipeline": convert_pipeline, "streaming": convert_streaming, "iterate": iterate_only}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(what: str, src: str, dst: str, converter: str) -> None:
    """Runs one measurement and prints {"seconds", "peak_anon_gb", ...} as the last line of stdout."""
    peak = {"anon": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak["anon"] = max(peak["anon"], _status_kb("RssAnon"))
            done.wait(0.02)

    base_anon = _status_kb("RssAnon")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    out = {}
    if what == "read":
        out["bytes"] = read_all(src)
    else:
        CONVERTERS[converter](src, dst)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    out.update(seconds=seconds, peak_anon_gb=peak["anon"] / 2**20, start_anon_gb=base_anon / 2**20)
    print(json.dumps(out))


def run_child(args: list[str]) -> dict:
    """Runs this script as a child; returns its JSON line plus its peak RSS from wait4."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed with exit code {p.returncode}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["peak_rss_gb"] = usage.ru_maxrss / 2**20  # KiB on Linux
    return res


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(ap, "conversion")
    ap.add_argument("--workdir", default="/tmp", help="where the synthesized file and the output go")
    ap.add_argument("--keep", action="store_true", help="keep the file and the converted checkpoint")
    ap.add_argument("--converter", choices=("auto", "pipeline", "streaming"), default="auto")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    common.setup_platform(a.device, a.threads)
    if a.child:
        what, src, dst, converter = a.child
        child(what, src, dst, converter)
        return

    converter = converter_name(a.converter)
    work = os.path.join(a.workdir, f"sd3jax-bench-conversion-{os.getpid()}")
    need = 2 * 4.3e9 + 1e9
    free = shutil.disk_usage(a.workdir).free
    if free < need:
        raise SystemExit(f"{a.workdir}: {free / 1e9:.1f} GB free, the benchmark needs {need / 1e9:.1f} GB")
    os.makedirs(work)
    src, dst = os.path.join(work, "sd3_medium.safetensors"), os.path.join(work, "converted")
    meta = common.machine_info(with_torch=False, threads=a.threads)
    rows = []
    try:
        t0 = time.perf_counter()
        facts = synthesize(src)
        gen_s = time.perf_counter() - t0
        gb = facts["bytes"] / 1e9
        print(f"synthesized {facts['tensors']} tensors, {gb:.2f} GB in {gen_s:.1f} s", flush=True)

        evict(src)
        cold = run_child(["read", src, "-", converter])
        warm = run_child(["read", src, "-", converter])
        evict(src)
        table_only = run_child(["convert", src, "-", "iterate"])
        evict(src)
        conv = run_child(["convert", src, dst, converter])
        out_gb = dir_bytes(dst) / 1e9
        for what, r in (
            ("read every tensor once (cold)", cold),
            ("read every tensor once (warm page cache)", warm),
            ("build every param, write nothing (cold)", table_only),
            (f"convert to Orbax ({converter}, cold)", conv),
        ):
            rows.append(
                dict(
                    what=what,
                    seconds=r["seconds"],
                    gb_per_s=gb / r["seconds"],
                    peak_rss_gb=r["peak_rss_gb"],
                    peak_anon_gb=r["peak_anon_gb"],
                    ratio_to_read=r["seconds"] / cold["seconds"],
                    raw=r,
                )
            )
        print(common.table(rows, common.CONVERT_COLS))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    config = dict(facts, gb=gb, converter=converter, synthesize_s=gen_s, output_gb=out_gb, workdir=a.workdir)
    notes = [
        f"Synthesizing the file took {gen_s:.1f} s; the converted checkpoint is {out_gb:.2f} GB on disk.",
        f"{meta['cpu_cores']} cores shared with other jobs (load average {meta['load_avg_1m_start']} at the "
        "start); the disk is the host's virtual disk, so the cold read is bounded by it.",
        "Peak RSS includes the memory-mapped file's pages the process touched (reclaimable page cache); peak "
        "anon is what the process allocated itself, starting from the interpreter and jax imports "
        "(`start_anon_gb` in the JSON).",
    ]
    common.write_result(common.out_path(a, "conversion"), meta, rows, config=config, notes=notes)


if __name__ == "__main__":
    main()
