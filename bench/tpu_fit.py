"""The TPU fit table: `sd3_jax.plan` (what `sd3-jax plan` runs) over models, slices, sampling and training.

    python bench/tpu_fit.py --task sample [--out bench/results/tpu-fit-sample.json]
    python bench/tpu_fit.py --task train [--out bench/results/tpu-fit-train.json]
    python bench/tpu_fit.py --task bucket [--out bench/results/tpu-fit-bucket.json]
    python bench/tpu_fit.py --task max-batch [--max-batch-on v5p:2x2x2,v5e:4x8]
    python bench/tpu_fit.py --task fsdp [--out bench/results/tpu-fit-fsdp.json]

Every row is compiled for its TPU slice on this host (libtpu, `jax.experimental.topologies`); the figures
are the compiler's static per-chip allocation (`memory_analysis`). Rows are appended to the JSON as they are
done and skipped when present, so an interrupted run resumes. Sampling: 1024x1024, 28 Euler steps with CFG,
333 text tokens, bf16, batch 1 and 4, the MMDiT sharded over fsdp and the text encoders and VAE replicated
(as `SD3Pipeline.load` places them); the encoders' and VAE's programs do not depend on the MMDiT and are
compiled once per slice and batch. Training: one image per chip at 256, 512 and 1024 px, 333 text tokens,
bf16 compute with fp32 params, Adam and EMA, fsdp over the slice. The largest batch per chip for a remat
policy: the peak fitted as affine in batch x tokens over every compile of that model, slice and policy (1
and 2 images per chip to start, or the same model and policy's fit on another slice of as many chips until
this one has two compiles), the predicted largest batch compiled to confirm it (after a refusal, the next
probe 5% below it, the step doubling with each refusal in a row); a resolution where a smaller one does
not fit one image per chip is 0 without a compile. fsdp: SD3 Medium's train
step on 4 v5p chips (fsdp=4, 256 px, 4 images per chip): compiled arguments per chip against
(fp32 params + Adam moments + EMA) / 4 plus the batch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from sd3_jax import plan  # noqa: E402

MODELS = ("sd3_medium", "sd35_medium", "sd35_large")
SLICES = ("v5e:2x4", "v5p:2x2x2", "v6e:2x4")  # 8 chips each
LARGE_SLICE = ("sd35_large", "v5e:4x8")  # 32 chips: SD3.5 Large training does not fit 8 v5e chips
MAX_BATCH_REMAT = ("none", "full", "dots")


def _versions() -> dict:
    import importlib.metadata as md

    import jax

    return {
        "jax": jax.__version__,
        "libtpu": md.version("libtpu"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def _load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"meta": _versions(), "results": []}


def _save(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def _figures(programs, device) -> dict:
    peak, hbm = plan.peak_bytes(programs), plan.chip_hbm(device)
    return {
        "peak_gib": round(peak / plan.GIB, 2),
        "hbm_gib": round(hbm / plan.GIB),
        "fits": peak <= hbm and not any(p.oom for p in programs),
        "compile_s": round(sum(p.compile_s for p in programs), 1),
        "programs": [
            {
                "name": p.name,
                "args_gib": round(p.argument / plan.GIB, 2),
                "temp_gib": round(p.temp / plan.GIB, 2),
                "total_gib": round(p.total / plan.GIB, 2),
                "collectives": p.collectives,
                "kernel_calls": p.custom_calls,
                **({"oom": p.oom} if p.oom else {}),
            }
            for p in programs
        ],
    }


def _train_cfg(model: str, res: int, per_chip: int, chips: int, remat: str = "none"):
    from sd3_jax.nn.mmdit import MMDiTConfig
    from sd3_jax.sharding.mesh import MeshConfig
    from sd3_jax.train.config import DataConfig, TrainConfig

    return TrainConfig(
        model=getattr(MMDiTConfig, model)(attention="pallas", remat=remat),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(latent_size=res // 8),
        batch_size=per_chip * chips,
        compute_dtype="bfloat16",
    )


def _train_peak(model, res, per_chip, devices, remat) -> tuple[list, int]:
    """The programs and their peak; a program the compiler refuses counts as larger than the chip."""
    progs = plan.train_programs(_train_cfg(model, res, per_chip, len(devices), remat), devices, 333)
    peak = plan.peak_bytes(progs)
    return progs, max(peak, plan.chip_hbm(devices[0]) + 1) if any(p.oom for p in progs) else peak


def _tokens(res: int, text_tokens: int = 333) -> int:
    """The joint sequence of a res x res image: (res / 8 latent / 2 patch)^2 image tokens plus the text."""
    return (res // 16) ** 2 + text_tokens


def _affine(points: list[tuple[int, int, int]]) -> tuple[float, float] | None:
    """Least squares of peak = fixed + per_token_image * (batch * tokens) over (batch, tokens, peak) points
    that compiled; None while fewer than two distinct batch * tokens are known."""
    import numpy as np

    x = np.array([b * t for b, t, _ in points], float)
    if len(set(x)) < 2:
        return None
    y = np.array([p for _, _, p in points], float)
    slope, fixed = np.polyfit(x, y, 1)
    return fixed, max(slope, 1.0)


def max_batch(model: str, res: int, devices, remat: str, points: list, first=None, prior=None) -> dict:
    """Largest images per chip that fit at `res`. The peak is taken as affine in batch x tokens (the flash
    kernel keeps attention linear in the sequence), fitted on every compile of this model, slice and
    policy so far (`points`, extended here); the predicted largest batch is compiled to confirm it, and
    after a refusal the search steps down from the smallest batch refused, 5% and doubling (rows found
    before 2026-12-04 15:40 bisected instead: their `checked` lists say so).
    Until this slice's compiles span 1.5x in batch x tokens, `prior` (fixed, per token-image bytes: the same
    model and policy fitted on another slice with as many chips) stands in for the fit, its fixed part moved
    to pass through this slice's latest compile when there is one; without a prior, two compiles start the
    fit (1 and 2 per chip). The peak at 1 per chip, where the fit table has it (`first`), is a free point."""
    hbm, tok = plan.chip_hbm(devices[0]), _tokens(res)
    checked = []

    def compile_at(n: int) -> bool:
        t0 = time.perf_counter()
        peak = first if (n == 1 and first is not None) else _train_peak(model, res, n, devices, remat)[1]
        ok = peak <= hbm
        checked.append(
            [n, round(peak / plan.GIB, 2) if ok else "does not fit", round(time.perf_counter() - t0)]
        )
        if ok:
            points.append((n, tok, peak))
        return ok

    def fit() -> tuple[float, float] | None:
        own = _affine(points)
        xs = [b * t for b, t, _ in points]
        if prior is None or (own is not None and max(xs) >= 1.5 * min(xs)):
            return own  # compiles near the largest batch all have about the same batch x tokens: their
        # slope alone is noise, so the prior's slope is kept until this slice's compiles span 1.5x
        fixed, slope = prior
        if points:
            b, t, p = points[-1]
            fixed = p - slope * b * t
        return fixed, slope

    fresh = not any(t == tok for _, t, _ in points)
    if fresh and first is not None and not compile_at(1):  # costs no compile
        return {"max_per_chip": 0, "checked": checked}
    if fit() is None:
        if not points and not compile_at(1):
            return {"max_per_chip": 0, "checked": checked}
        if _affine(points) is None and not compile_at(2):
            return {"max_per_chip": 1, "checked": checked}
    # lo fits, hi does not: the fit's prediction is compiled; after a refusal the next probe is 5% below
    # it, and the step doubles with every refusal in a row (the fit is usually within a tenth, and the
    # compiler's peak is not quite monotonic in the batch, so the fit alone can circle).
    lo, hi, refused, drop = max((b for b, t, _ in points if t == tok), default=0), 257, False, 0.05
    while hi - lo > 1 and lo < 256:
        fixed, slope = fit()
        pred = int((hbm - fixed) // (slope * tok))
        if not refused and pred <= lo:
            if lo:
                break  # the fit says one more does not fit
            pred = 1  # nothing compiled at this length: one per chip is compiled, never extrapolated to 0
        n = max(lo + 1, min(int(hi * (1 - drop)) if refused else pred, hi - 1, 256))
        if compile_at(n):
            lo, refused = n, False
        else:
            hi, drop, refused = n, (min(2 * drop, 0.5) if refused else 0.05), True
    n = lo
    if n == 0:
        return {"max_per_chip": 0, "checked": checked}
    fixed, slope = fit()
    return {
        "max_per_chip": n,
        "checked": checked,
        "gib_per_image": round(float(slope * tok) / plan.GIB, 3),
        "predicted_next_gib": round(float(fixed + slope * (n + 1) * tok) / plan.GIB, 2),
    }


def run_sample(out: str) -> None:
    from sd3_jax.nn.mmdit import MMDiTConfig

    doc = _load(out)
    done = {(r["model"], r["topology"], r["batch"]) for r in doc["results"]}
    for topology in SLICES:
        devices = plan.topology_devices(topology)
        for batch in (1, 4):
            others = None
            for model in MODELS:
                if (model, topology, batch) in done:
                    continue
                cfg = getattr(MMDiTConfig, model)(attention="pallas")
                spec = plan.SampleSpec(batch=batch)
                if others is None:
                    progs = plan.sample_programs(cfg, spec, devices)
                    others = [p for p in progs if p.name != "MMDiT loop"]
                else:  # the text encoders and the VAE are the same for every model
                    progs = plan.sample_programs(cfg, spec, devices, only_denoiser=True) + others
                row = {"model": model, "topology": topology, "chips": len(devices), "batch": batch}
                row.update(_figures(progs, devices[0]))
                doc["results"].append(row)
                _save(out, doc)
                print(f"{model:12s} {topology:10s} batch {batch}: {row['peak_gib']:6.2f} GiB "
                      f"({'fits' if row['fits'] else 'does not fit'})", flush=True)  # fmt: skip


def run_train(out: str) -> None:
    doc = _load(out)
    done = {(r["model"], r["topology"], r["res"]) for r in doc["results"]}
    jobs = [(m, t, r) for t in SLICES for m in MODELS for r in (256, 512, 1024)]
    jobs += [(LARGE_SLICE[0], LARGE_SLICE[1], r) for r in (256, 512, 1024)]
    jobs.sort(key=lambda j: j[1] == "v6e:2x4")  # v6e last: its rows come after the larger slice's
    devices_of = {}
    for model, topology, res in jobs:
        if (model, topology, res) in done:
            continue
        devices = devices_of.setdefault(topology, plan.topology_devices(topology))
        progs, _ = _train_peak(model, res, 1, devices, "none")
        row = {"model": model, "topology": topology, "chips": len(devices), "res": res, "per_chip": 1}
        row.update(_figures(progs, devices[0]))
        doc["results"].append(row)
        _save(out, doc)
        print(f"{model:12s} {topology:10s} {res:5d} px: {row['peak_gib']:6.2f} GiB "
              f"({'fits' if row['fits'] else 'does not fit'})", flush=True)  # fmt: skip


def _points(doc: dict, train: dict, key: tuple) -> list:
    """The (batch, tokens, peak bytes) compiles already recorded for (model, topology, remat)."""
    points = []
    for r in doc["results"]:
        if (r["model"], r["topology"], r["remat"]) != key:
            continue
        tok = _tokens(r["res"])
        for c in r["checked"]:
            if isinstance(c, list) and c[1] != "does not fit":
                points.append((c[0], tok, c[1] * plan.GIB))
        if r["checked"] and not isinstance(r["checked"][0], list):  # first format: 1 and 2, then the slope
            p1 = train[(r["model"], r["topology"], r["res"])]["peak_gib"] * plan.GIB
            points += [(1, tok, p1), (2, tok, p1 + r["gib_per_image"] * plan.GIB)]
    return points


def _prior(doc: dict, train: dict, model: str, topology: str, remat: str, chips: dict):
    """The affine fit of `model` under `remat` on the slice with as many chips as `topology` that has the
    most compiles, or None."""
    best = max(
        (
            _points(doc, train, (model, t, remat))
            for t in chips
            if t != topology and chips[t] == chips[topology]
        ),
        key=len,
        default=[],
    )
    return _affine(best)


def run_max_batch(
    train_json: str, out: str, topologies: tuple[str, ...], models=MODELS, remats=MAX_BATCH_REMAT
) -> None:
    """The largest batch per chip under each remat policy for the training rows of `topologies` (in their
    own file, so that it can run beside `--task train`), one model, slice and policy at a time so that
    each search starts from the fit of the resolutions before it."""
    train = {(r["model"], r["topology"], r["res"]): r for r in _load(train_json)["results"]}
    doc = _load(out)
    done = {(r["model"], r["topology"], r["res"], r["remat"]) for r in doc["results"]}
    chips = {r["topology"]: r["chips"] for r in train.values()}
    for topology in topologies:
        devices = None
        for model in models:
            for remat in remats:
                points = _points(doc, train, (model, topology, remat))
                prior = _prior(doc, train, model, topology, remat, chips)
                for res in (256, 512, 1024):
                    row = train.get((model, topology, res))
                    if row is None or (model, topology, res, remat) in done:
                        continue
                    devices = devices or plan.topology_devices(topology)
                    first = None
                    if remat == "none":
                        first = row["peak_gib"] * plan.GIB if row["fits"] else plan.chip_hbm(devices[0]) + 1
                    smaller = [r for r in doc["results"] if (r["model"], r["topology"], r["remat"]) == (
                        model, topology, remat) and r["res"] < res and r["max_per_chip"] == 0]  # fmt: skip
                    if smaller and first is None:  # more tokens take more memory: no compile needed
                        found = {
                            "max_per_chip": 0,
                            "checked": [[1, "does not fit", 0, f"{smaller[0]['res']} px"]],
                        }
                    else:
                        found = max_batch(model, res, devices, remat, points, first, prior)
                    doc["results"].append(
                        {"model": model, "topology": topology, "res": res, "remat": remat, **found}
                    )
                    _save(out, doc)
                    print(f"{model:12s} {topology:10s} {res:5d} px remat {remat}: {found}", flush=True)


def run_bucket(out: str, topology: str = "v5p:2x2x2", size=(1216, 832), text_tokens: int = 154) -> None:
    """Each model at a non-square bucket and 154 text tokens (77 CLIP + 77 T5): the train step (one image
    per chip) and the sampling loop (one image, CFG), to show the padded kernel takes those lengths too."""
    from sd3_jax.nn.mmdit import MMDiTConfig

    doc = _load(out)
    done = {(r["model"], r["task"]) for r in doc["results"]}
    devices = plan.topology_devices(topology)
    w, h = size
    for model in MODELS:
        for task in ("train", "sample"):
            if (model, task) in done:
                continue
            if task == "train":
                cfg = _train_cfg(model, h, 1, len(devices))  # latents: the bucket below
                progs = plan.train_programs(cfg, devices, text_tokens, (h // 8, w // 8))
            else:
                cfg = getattr(MMDiTConfig, model)(attention="pallas")
                spec = plan.SampleSpec(height=h, width=w, t5_tokens=text_tokens - plan.CLIP_TOKENS)
                progs = plan.sample_programs(cfg, spec, devices, only_denoiser=True)
            row = {
                "model": model,
                "task": task,
                "topology": topology,
                "size": f"{w}x{h}",
                "tokens": text_tokens,
            }
            row.update(_figures(progs, devices[0]))
            doc["results"].append(row)
            _save(out, doc)
            print(f"{model:12s} {task:6s} {w}x{h}: {row['peak_gib']:6.2f} GiB, kernel calls "
                  f"{[p['kernel_calls'] for p in row['programs']]}", flush=True)  # fmt: skip


NAMES = {"sd3_medium": "SD3 Medium", "sd35_medium": "SD3.5 Medium", "sd35_large": "SD3.5 Large"}


def run_fsdp(out: str) -> None:
    """SD3 Medium's train step on v5p:2x2x1 with fsdp=4: memory_analysis arguments per chip vs the sharded
    state plus the batch (the issue's figure; it was 15.3 GiB with the adaLN kernels replicated)."""
    import dataclasses

    import jax

    from sd3_jax.convert.mmdit import abstract_params
    from sd3_jax.nn.mmdit import MMDiTConfig
    from sd3_jax.sharding.mesh import MeshConfig
    from sd3_jax.train.config import TrainConfig

    devices = plan.topology_devices("v5p:2x2x1")
    cfg = TrainConfig(
        model=MMDiTConfig.sd3_medium(attention="pallas"), mesh=MeshConfig(fsdp=4), batch_size=16,
        compute_dtype="bfloat16",
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, latent_size=32))
    (prog,) = plan.train_programs(cfg, devices)
    sizes = {
        jax.tree_util.keystr(p): x.size
        for p, x in jax.tree_util.tree_leaves_with_path(abstract_params(cfg.model))
    }
    n_all = sum(sizes.values())
    n_frozen = sum(v for k, v in sizes.items() if k.endswith("['pos_embed']['pos_embed']"))
    state = 4 * (2 * n_all + 2 * (n_all - n_frozen))
    batch = 16 * 4 * (32 * 32 * 16 + 77 * (768 + 1280) + 256 * 4096 + 2048)
    row = {
        "model": "sd3_medium", "topology": "v5p:2x2x1", "fsdp": 4, "res": 256, "per_chip": 4,
        "argument_gib": prog.argument / plan.GIB, "expected_gib": (state + batch) / 4 / plan.GIB,
        "compile_s": round(prog.compile_s, 1),
    }  # fmt: skip
    row["ratio"] = row["argument_gib"] / row["expected_gib"]
    doc = _load(out)
    doc["results"] = [row]
    _save(out, doc)
    print(json.dumps(row), flush=True)


def _fit(r: dict) -> str:
    return f"{r['peak_gib']:.1f} of {r['hbm_gib']} ({'fits' if r['fits'] else '**does not fit**'})"


def render(results_dir: str) -> list[str]:
    """The BENCHMARKS.md section: sampling and training fit tables and the non-square bucket compiles."""
    docs = {
        k: _load_if(os.path.join(results_dir, f"tpu-fit-{k}.json"))
        for k in ("sample", "train", "bucket", "max-batch", "fsdp")
    }
    import tpu_attention

    out = ["## TPU: what fits, compiled from this host (`sd3-jax plan`)", ""]
    if not any(docs[k] for k in ("sample", "train", "bucket")):
        out += ["Not generated yet: `python bench/tpu_fit.py --task sample|train|bucket|max-batch`.", ""]
        return out + tpu_attention.render(results_dir)
    meta = next(d["meta"] for d in docs.values() if d)  # one jax and libtpu for every file
    out += [
        f"`bench/tpu_fit.py` through `sd3_jax.plan`, {meta['date']}, jax {meta['jax']}, "
        f"libtpu {meta['libtpu']}, on the 2-core CPU host (no TPU): each row is the TPU compiler's static "
        "per-chip allocation "
        "(`compiled.memory_analysis()`: arguments + outputs - donated + temporaries + code), not a runtime "
        "measurement (no allocator fragmentation, no host memory). MMDiT attention is the splash kernel "
        '(`attention="pallas"`), fsdp over the whole slice, bf16 compute. Chip HBM: v5e 16 GiB, v5p 95, '
        "v6e 32. Peak per chip in GiB.",
        "",
    ]
    if docs["sample"]:
        out += [
            "### Sampling at 1024x1024 (28 Euler steps, CFG, 333 text tokens, bf16)",
            "",
            "Peak = the weights of CLIP-L, CLIP-G, T5-XXL (replicated, as `SD3Pipeline.load` places them) "
            "and of the MMDiT (sharded) together, plus the largest working set of any one program (text "
            "encoders, the denoising loop, the VAE decode).",
            "",
            "| model | slice | batch | peak per chip (GiB of HBM) | denoising loop temporaries | compile s |",
            "|---|---|---|---|---|---|",
        ]
        for r in docs["sample"]["results"]:
            loop = next(p for p in r["programs"] if p["name"] == "MMDiT loop")
            cells = [NAMES[r["model"]], r["topology"], r["batch"], _fit(r), f"{loop['temp_gib']:.2f}"]
            out.append("| " + " | ".join(str(c) for c in cells) + f" | {r['compile_s']} |")
        out.append("")
    if docs["train"]:
        out += [
            "### Training step (fp32 params, Adam and EMA; bf16 compute; 333 text tokens)",
            "",
            "One image per chip, no remat; a row that does not fit shows the arguments plus the temporaries "
            "the compiler asked for before it stopped. Largest images per chip under each remat policy "
            "(`--task max-batch`): the peak is fitted as affine in batch x tokens over every compile of "
            "that model, slice and policy (the splash kernel keeps attention linear in the sequence; until a "
            "slice's compiles span 1.5x in batch x tokens, the slope of the same model and policy on another "
            "8-chip slice stands in); the "
            "predicted largest batch is compiled to confirm it fits (after a refusal, the next probe is 5% "
            "below it, the step doubling with each refusal in a row; the compiler's peak is not quite "
            "monotonic in the batch), and one more is predicted not to or was refused; 256 is the search's "
            "cap, 0 means one image does not fit (not compiled where a smaller resolution already does "
            "not), - not measured yet (each search is 1-13 compiles of minutes on this host).",
            "",
            "| model | slice | px | peak per chip at 1 image/chip (GiB of HBM) | largest batch per chip: "
            "none / full / dots | compile s |",
            "|---|---|---|---|---|---|",
        ]
        found = {}
        for m in docs["max-batch"]["results"] if docs["max-batch"] else []:
            found.setdefault((m["model"], m["topology"], m["res"]), {})[m["remat"]] = m
        for r in docs["train"]["results"]:
            mb = found.get((r["model"], r["topology"], r["res"]), {})
            best = " / ".join(str(mb[k]["max_per_chip"]) if k in mb else "-" for k in MAX_BATCH_REMAT)
            out.append(
                f"| {NAMES[r['model']]} | {r['topology']} ({r['chips']} chips) | {r['res']} | {_fit(r)} | "
                f"{best} | {r['compile_s']} |"
            )
        out.append("")
    if docs["bucket"]:
        out += [
            "### A non-square bucket with 154 text tokens (77 CLIP + 77 T5)",
            "",
            "| model | program | slice | size | peak per chip (GiB of HBM) | splash kernel calls |",
            "|---|---|---|---|---|---|",
        ]
        for r in docs["bucket"]["results"]:
            calls = sum(p["kernel_calls"] for p in r["programs"])
            what = "train step, 1 image/chip" if r["task"] == "train" else "sampling loop, 1 image, CFG"
            out.append(
                f"| {NAMES[r['model']]} | {what} | {r['topology']} | {r['size']} | {_fit(r)} | {calls} |"
            )
        out.append("")
    if docs["fsdp"]:
        r = docs["fsdp"]["results"][0]
        out += [
            "### Every weight split over fsdp",
            "",
            f"SD3 Medium's train step on {r['topology']} (fsdp={r['fsdp']}, {r['res']} px, {r['per_chip']} "
            f"images per chip): {r['argument_gib']:.2f} GiB of arguments per chip in `memory_analysis`, "
            f"against (fp32 params + Adam moments + EMA) / {r['fsdp']} plus the batch = "
            f"{r['expected_gib']:.2f} GiB (ratio {r['ratio']:.3f}; it was 15.3 GiB with the adaLN "
            f"kernels replicated). Compile {r['compile_s']} s.",
            "",
        ]
    return out + tpu_attention.render(results_dir)


def _load_if(path: str) -> dict | None:
    return _load(path) if os.path.exists(path) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=["sample", "train", "bucket", "max-batch", "fsdp"])
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--max-batch-on",
        default="v5p:2x2x2,v5e:4x8",
        help="max-batch: the slices whose training rows get the largest batch per remat policy",
    )
    ap.add_argument("--models", default=",".join(MODELS), help="max-batch: the models searched, in order")
    ap.add_argument("--remat", default=",".join(MAX_BATCH_REMAT), help="max-batch: the policies searched")
    a = ap.parse_args()
    out = a.out or f"bench/results/tpu-fit-{a.task}.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if a.task == "sample":
        run_sample(out)
    elif a.task == "bucket":
        run_bucket(out)
    elif a.task == "train":
        run_train(out)
    elif a.task == "fsdp":
        run_fsdp(out)
    else:
        train_json = os.path.join(os.path.dirname(out), "tpu-fit-train.json")
        models = tuple(m for m in a.models.split(",") if m)
        remats = tuple(r for r in a.remat.split(",") if r)
        run_max_batch(train_json, out, tuple(s for s in a.max_batch_on.split(",") if s), models, remats)


if __name__ == "__main__":
    main()
