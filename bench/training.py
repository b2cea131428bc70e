"""Training speed: one optimizer step of the MMDiT, sd3_jax's jitted train step against a PyTorch one.

    python bench/training.py --device cpu|gpu [--sizes 256,512] [--batches ...] [--remat none,full]
        [--with-torch] [--out bench/results/training-<device>.json]

sd3_jax: `sd3_jax.train.step.train_step` (rectified flow, logit-normal t, text dropout, clip 1.0, AdamW,
EMA), jitted with the state donated, fp32 master weights, compute in the preset dtype, on a one-device mesh.
PyTorch: the same step on diffusers' SD3Transformer2DModel (MSE on eps - x0, `clip_grad_norm_`,
`torch.optim.AdamW(foreach=True)`, `_foreach_lerp_` EMA; `torch.autocast` for bf16).

cpu: the small network at 256 px, batch 4, fp32, against PyTorch (same random weights).
gpu: SD3 Medium at 256 and 512 px, bf16: for each remat policy, batch sizes upward until one runs out of
memory; PyTorch only with --with-torch (same batches, no gradient checkpointing).
MFU counts 3 x the forward FLOPs (sd3_jax/flops.py); recomputation under remat is not counted.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

DEFAULTS = {
    "cpu": dict(sizes=(256,), batches={256: (4,)}, remat=("none",)),
    "gpu": dict(
        sizes=(256, 512),
        batches={256: (8, 16, 32, 64, 128, 256), 512: (2, 4, 8, 16, 32, 64)},
        remat=("none", "full"),
    ),
}
EMA = 0.999
CLIP_L, CLIP_G = 768, 1280


def make_batch(rng, b: int, latent: int, text_len: int, cfg) -> dict:
    """A batch as sd3_jax.train reads it: latents and the pieces of the text condition (77 CLIP tokens)."""
    import numpy as np

    f = lambda *s: rng.standard_normal(s, dtype=np.float32)
    t5_len = text_len - 77
    return {
        "latents": f(b, latent, latent, cfg.in_channels),
        "clip_l": f(b, 77, CLIP_L),
        "clip_g": f(b, 77, CLIP_G),
        "t5": f(b, t5_len, cfg.context_dim),
        "pooled_l": f(b, CLIP_L),
        "pooled_g": f(b, CLIP_G),
    }


def joined(batch: dict) -> tuple:
    """(context, pooled) joined as the JAX step joins them (CLIPs on channels, zero-padded, then T5)."""
    import numpy as np

    clip = np.concatenate([batch["clip_l"], batch["clip_g"]], -1)
    clip = np.pad(clip, ((0, 0), (0, 0), (0, batch["t5"].shape[-1] - clip.shape[-1])))
    return np.concatenate([clip, batch["t5"]], 1), np.concatenate([batch["pooled_l"], batch["pooled_g"]], -1)


class JaxStep:
    """A fresh sharded TrainState and the jitted, donating step for one (config, batch) setting."""

    def __init__(self, model_cfg, batch: dict, dtype: str, params=None):
        import jax

        from sd3_jax.sharding.mesh import make_mesh
        from sd3_jax.train.config import TrainConfig
        from sd3_jax.train.loop import global_batch, mesh_context
        from sd3_jax.train.state import create_state, make_optimizer, state_shardings
        from sd3_jax.train.step import train_step

        b = batch["latents"].shape[0]
        self.cfg = TrainConfig(model=model_cfg, batch_size=b, compute_dtype=dtype, ema_decay=EMA)
        tx = make_optimizer(self.cfg.optim, 1000)
        self.mesh = make_mesh(self.cfg.mesh)
        self.ctx = functools.partial(mesh_context, self.mesh)
        with self.ctx():
            self.state = create_state(self.cfg, tx, self.mesh, jax.random.key(0), params)
            sh = state_shardings(self.cfg, tx, self.mesh)
            self.step = jax.jit(
                functools.partial(train_step, self.cfg, tx), out_shardings=(sh, None), donate_argnums=0
            )
            self.batch = global_batch(self.mesh, batch)
        self.rng = jax.random.key(1)
        self.loss = None

    def __call__(self) -> None:
        import jax

        with self.ctx():
            self.state, m = self.step(self.state, self.batch, self.rng)
        jax.block_until_ready((self.state, m))
        self.loss = float(m["loss"])


class TorchStep:
    """The same training step in PyTorch on diffusers' model."""

    def __init__(self, model, batch: dict, dtype: str, device: str, threads: int | None = None):
        import numpy as np
        import torch

        dev = common.torch_device(device)
        self.model, self.dev, self.threads = model.to(dev).train(), dev, threads
        self.autocast = dtype == "bfloat16"
        ctx, pooled = joined(batch)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)
        self.x0 = t(batch["latents"].transpose(0, 3, 1, 2))
        self.ctx, self.pooled = t(ctx), t(pooled)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            self.params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=True
        )
        with torch.no_grad():
            self.ema = [p.detach().clone() for p in self.params]
        self.sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        self.loss = None

    def __call__(self) -> None:
        import torch
        import torch.nn.functional as F

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        b = self.x0.shape[0]
        t = torch.sigmoid(torch.randn(b, device=self.dev))
        noise = torch.randn_like(self.x0)
        tb = t.view(-1, 1, 1, 1)
        z = (1 - tb) * self.x0 + tb * noise
        with torch.autocast(self.dev, dtype=torch.bfloat16, enabled=self.autocast):
            v = self.model(
                hidden_states=z,
                timestep=t * 1000,
                encoder_hidden_states=self.ctx,
                pooled_projections=self.pooled,
                return_dict=False,
            )[0]
        loss = F.mse_loss(v.float(), noise - self.x0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1 - EMA)
        self.sync()
        self.loss = float(loss.detach())


def row(
    framework: str,
    size: int,
    b: int,
    remat: str,
    stats: dict | None,
    flops: float,
    a,
    meta,
    pre,
    status: str = "ok",
    **extra,
) -> dict:
    r = dict(framework=framework, size=size, batch=b, remat=remat, status=status, **extra)
    if stats is not None:
        s = stats["median_s"]
        r.update(step_s=s, min_s=stats["min_s"], first_s=stats["first_s"], images_per_s=b / s, timings=stats)
        r.update(
            common.mfu_fields(3 * flops, s, a.device, pre.dtype, meta["device_kind"], meta.get("threads"))
        )
    return r


def run_cpu(a, pre, meta, rows: list, threads: list[int]) -> None:
    import numpy as np

    from sd3_jax.flops import mmdit_forward_flops

    size = a.sizes[0]
    lat = size // 8
    for b in a.batches or DEFAULTS["cpu"]["batches"][size]:
        ref, cfg, params = common.model_pair(pre.model)
        batch = make_batch(np.random.default_rng(0), b, lat, pre.text_len, cfg)
        jstep = JaxStep(cfg.replace(remat=a.remat[0]), batch, pre.dtype, params)
        fns = {"jax": jstep}
        for n in threads:
            # Each thread setting trains its own copy so all start from the same weights.
            m = ref if n == threads[-1] else common.model_pair(pre.model)[0]
            fns[f"torch@{n}"] = TorchStep(m, batch, pre.dtype, a.device, n)
        st = common.time_interleaved(fns, warmup=2, repeats=a.repeats)
        flops = mmdit_forward_flops(cfg, lat, lat, pre.text_len, b)
        best = min(threads, key=lambda n: st[f"torch@{n}"]["median_s"])
        rows.append(row("sd3_jax", size, b, a.remat[0], st["jax"], flops, a, meta, pre, loss=jstep.loss))
        rows.append(
            row(
                "pytorch",
                size,
                b,
                "none",
                st[f"torch@{best}"],
                flops,
                a,
                meta,
                pre,
                torch_threads=best,
                loss=fns[f"torch@{best}"].loss,
                other_threads={k: v for k, v in st.items() if k not in ("jax", f"torch@{best}")},
            )
        )
        rows[-2]["ratio"] = rows[-1]["step_s"] / rows[-2]["step_s"]
        print(common.table(rows[-2:], common.TRAIN_COLS), flush=True)


def run_gpu(a, pre, meta, rows: list, save) -> None:
    import jax
    import numpy as np

    from sd3_jax.flops import mmdit_forward_flops

    cfg = pre.model.replace(attention=a.attention)
    for size in a.sizes:
        lat = size // 8
        batches = a.batches or DEFAULTS["gpu"]["batches"][size]
        for remat in a.remat:
            for b in batches:
                flops = mmdit_forward_flops(cfg, lat, lat, pre.text_len, b)
                batch = make_batch(np.random.default_rng(0), b, lat, pre.text_len, cfg)
                try:
                    step = JaxStep(cfg.replace(remat=remat), batch, pre.dtype)
                    st = common.time_it(step, warmup=2, repeats=a.repeats)
                    rows.append(row("sd3_jax", size, b, remat, st, flops, a, meta, pre, loss=step.loss))
                except Exception as e:  # noqa: BLE001 - running out of memory ends this batch sweep
                    if not common.is_oom(e):
                        raise
                    rows.append(row("sd3_jax", size, b, remat, None, flops, a, meta, pre, status="OOM"))
                step = None
                gc.collect()
                jax.clear_caches()
                print(common.table(rows[-1:], common.TRAIN_COLS), flush=True)
                save()  # after each row: a run stopped early keeps what it measured
                if rows[-1]["status"] == "OOM":
                    break
        if a.with_torch:
            run_torch_gpu(a, pre, meta, rows, size, batches)
            save()


def run_torch_gpu(a, pre, meta, rows: list, size: int, batches) -> None:
    import numpy as np
    import torch
    from diffusers import SD3Transformer2DModel

    from sd3_jax.flops import mmdit_forward_flops

    lat = size // 8
    for b in batches:
        flops = mmdit_forward_flops(pre.model, lat, lat, pre.text_len, b)
        batch = make_batch(np.random.default_rng(0), b, lat, pre.text_len, pre.model)
        try:
            with torch.device(common.torch_device(a.device)):
                model = SD3Transformer2DModel(**common.diffusers_kwargs(pre.model))
            step = TorchStep(model, batch, pre.dtype, a.device)
            rows.append(
                row("pytorch", size, b, "none", common.time_it(step, 2, a.repeats), flops, a, meta, pre)
            )
        except torch.OutOfMemoryError:
            rows.append(row("pytorch", size, b, "none", None, flops, a, meta, pre, status="OOM"))
        step = model = None
        gc.collect()
        torch.cuda.empty_cache()
        print(common.table(rows[-1:], common.TRAIN_COLS), flush=True)
        if rows[-1]["status"] == "OOM":
            break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(ap, "training")
    ap.add_argument("--sizes", default=None, help="image sides in px, comma-separated")
    ap.add_argument("--batches", default=None, help="batch sizes to try, comma-separated (default: preset)")
    ap.add_argument("--remat", default=None, help="remat policies to try: none, full, dots, dots_no_batch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attention", default="auto", help="sd3_jax attention backend (nn/attention.py)")
    ap.add_argument("--with-torch", action="store_true", help="gpu: also time the PyTorch step")
    ap.add_argument(
        "--torch-threads", default=None, help="cpu: torch thread counts to try (default: default,1)"
    )
    a = ap.parse_args()
    common.setup_platform(a.device, a.threads)
    if a.device == "gpu" and not a.with_torch:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    d = DEFAULTS[a.device]
    a.sizes = tuple(int(s) for s in a.sizes.split(",")) if a.sizes else d["sizes"]
    a.batches = tuple(int(b) for b in a.batches.split(",")) if a.batches else None
    a.remat = tuple(a.remat.split(",")) if a.remat else d["remat"]
    pre = common.preset(a.device)
    meta = common.machine_info(threads=a.threads)
    rows: list = []
    threads: list = []  # the torch thread counts tried on CPU, read by save()

    def save() -> None:
        config = dict(
            model=pre.name,
            text_len=pre.text_len,
            dtype=pre.dtype,
            sizes=list(a.sizes),
            remat=list(a.remat),
            ema=EMA,
        )
        notes = ["Seconds per step are medians of the repeats after two warmup steps (the first compiles)."]
        if a.device == "cpu":
            notes.append(
                f"fp32 on {common.cores_used(meta)} (load average "
                f"{meta['load_avg_1m_start']} at the start); sd3_jax and PyTorch repeats interleaved; "
                f"PyTorch timed at torch threads {threads} and reported at the setting with the lowest "
                "median (`torch_threads`)."
            )
        else:
            ok = [r for r in rows if r["status"] == "ok" and r["framework"] == "sd3_jax"]
            for size in a.sizes:
                best = max(
                    (r for r in ok if r["size"] == size), key=lambda r: r["images_per_s"], default=None
                )
                if best:
                    notes.append(
                        f"{size} px: best sd3_jax {best['images_per_s']:.1f} images/s at batch "
                        f"{best['batch']}, remat {best['remat']}."
                    )
        common.write_result(common.out_path(a, "training"), meta, rows, config=config, notes=notes)

    if a.device == "cpu":
        import torch

        n0 = torch.get_num_threads()
        threads = [n0 if n == "default" else int(n) for n in (a.torch_threads or "default,1").split(",")]
        threads = [a.threads] if a.threads else list(dict.fromkeys(threads))
        run_cpu(a, pre, meta, rows, threads)
    else:
        run_gpu(a, pre, meta, rows, save)
    print("\n" + common.table(rows, common.TRAIN_COLS))
    save()


if __name__ == "__main__":
    main()
