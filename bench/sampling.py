"""Sampling speed: the MMDiT forward and the whole 28-step CFG denoising loop, sd3_jax against diffusers.

    python bench/sampling.py --device cpu|gpu [--batches 1,4] [--out bench/results/sampling-<device>.json]

Both sides run the same random network (diffusers' SD3Transformer2DModel, its weights loaded into ours with
`load_mmdit`), in the same dtype on the same device in the same process, from the same random prompt
embeddings and initial latents. Text encoders and the VAE decode are excluded from both.

  sd3_jax:   one jitted function: `sample_euler(cfg(MMDiT), x, flow_match_sigmas(28, 3.0))`
  diffusers: `StableDiffusion3Pipeline(transformer, FlowMatchEulerDiscreteScheduler(shift=3.0))` called with
             prompt_embeds / pooled_prompt_embeds (and the negative ones) and output_type="latent"

cpu: a small network (depth 4, width 256, 4 heads of 64, SD3's text widths), 256 px, 154 text tokens, fp32.
gpu: SD3 Medium, 1024 px, 333 text tokens, bf16; diffusers with its default attention (SDPA).
"""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

GUIDANCE = 7.0
SHIFT = 3.0


def jax_functions(cfg, steps: int):
    """Jitted forward(params, x, t, ctx, pooled) and loop(params, x, ctx, pooled, neg_ctx, neg_pooled)."""
    import jax

    from sd3_jax.flow.samplers import cfg as guidance
    from sd3_jax.flow.samplers import sample_euler
    from sd3_jax.flow.schedules import flow_match_sigmas
    from sd3_jax.nn.mmdit import MMDiT

    model = MMDiT(cfg)
    sigmas = flow_match_sigmas(steps, SHIFT)

    def forward(params, x, t, ctx, pooled):
        return model.apply({"params": params}, x, t, ctx, pooled)

    def loop(params, x, ctx, pooled, neg_ctx, neg_pooled):
        def model_fn(x, sigma, context, pooled):
            return model.apply({"params": params}, x, sigma, context, pooled)

        v = guidance(
            model_fn, GUIDANCE, dict(context=ctx, pooled=pooled), dict(context=neg_ctx, pooled=neg_pooled)
        )
        return sample_euler(v, x, sigmas)

    return jax.jit(forward), jax.jit(loop)


def diffusers_pipeline(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    none = dict.fromkeys(
        ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), **none
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare_row(st: dict, best: int, flops: float, device: str, dtype: str, meta: dict, **fields) -> dict:
    """One table row from `time_interleaved` stats: sd3_jax against diffusers at `best` threads."""
    tj, tt = st["jax"], st[f"torch@{best}"]
    mj = common.mfu_fields(flops, tj["median_s"], device, dtype, meta["device_kind"], meta.get("threads"))
    mt = common.mfu_fields(flops, tt["median_s"], device, dtype, meta["device_kind"], meta.get("threads"))
    return dict(
        fields,
        jax_s=tj["median_s"],
        torch_s=tt["median_s"],
        ratio=tt["median_s"] / tj["median_s"],
        jax_min_s=tj["min_s"],
        torch_min_s=tt["min_s"],
        ratio_min=tt["min_s"] / tj["min_s"],
        torch_threads=best if device == "cpu" else None,
        jax_compile_and_first_s=tj["first_s"],
        timings=st,
        **{f"jax_{k}": v for k, v in mj.items()},
        **{f"torch_{k}": v for k, v in mt.items()},
    )


def rel_diff(ours, ref) -> float:
    import numpy as np

    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def bench_batch(s: SimpleNamespace, b: int, rng) -> tuple[dict, dict]:
    """Times one CFG forward (batch 2b) and the whole loop for b images; returns their two table rows."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from sd3_jax.flops import mmdit_forward_flops

    a, pre, meta, cfg, params, ref, pipe = s.a, s.pre, s.meta, s.cfg, s.params, s.ref, s.pipe
    forward, loop, steps, threads, dev, sync = s.forward, s.loop, s.steps, s.threads, s.dev, s.sync
    jdtype, tdtype, lat, c = s.jdtype, s.tdtype, pre.latent, cfg.in_channels
    x = rng.standard_normal((b, lat, lat, c), dtype=np.float32)
    ctx, pooled = common.text_inputs(rng, b, pre.text_len, cfg)
    nctx, npooled = common.text_inputs(rng, b, pre.text_len, cfg)
    j = lambda a: jax.device_put(jnp.asarray(a, jdtype))
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev, tdtype)
    jx, jctx, jpool, jnctx, jnpool = map(j, (x, ctx, pooled, nctx, npooled))
    tx_nchw = tt(x.transpose(0, 3, 1, 2))

    # One CFG step: the forward at batch 2b.
    x2, ctx2, pooled2 = (
        np.concatenate([x, x]),
        np.concatenate([ctx, nctx]),
        np.concatenate([pooled, npooled]),
    )
    sig = np.full((2 * b,), 0.7, np.float32)
    jargs = (j(x2), jnp.asarray(sig), j(ctx2), j(pooled2))
    targs = dict(
        hidden_states=tt(x2.transpose(0, 3, 1, 2)),
        timestep=torch.from_numpy(sig * 1000).to(dev),
        encoder_hidden_states=tt(ctx2),
        pooled_projections=tt(pooled2),
        return_dict=False,
    )
    out = {}

    def jax_fwd():
        out["jax_fwd"] = forward(params, *jargs).block_until_ready()

    def torch_fwd(threads):
        def run():
            torch.set_num_threads(threads)
            with torch.inference_mode():
                out["torch_fwd"] = ref(**targs)[0]
            sync()

        return run

    fns = {"jax": jax_fwd, **{f"torch@{n}": torch_fwd(n) for n in threads}}
    st = common.time_interleaved(fns, warmup=2, repeats=a.forward_repeats)
    best = min(threads, key=lambda n: st[f"torch@{n}"]["median_s"])
    flops = mmdit_forward_flops(cfg, lat, lat, pre.text_len, 2 * b)
    fwd_row = compare_row(st, best, flops, a.device, pre.dtype, meta, batch=2 * b, gflop=flops / 1e9)
    fwd_row["rel_diff"] = rel_diff(
        out["jax_fwd"].astype(jnp.float32), out["torch_fwd"].float().permute(0, 2, 3, 1).cpu().numpy()
    )
    print(common.table([fwd_row], common.FORWARD_COLS), flush=True)

    # The whole loop; diffusers with the thread count that gave its fastest forward.
    def jax_loop():
        out["jax_loop"] = loop(params, jx, jctx, jpool, jnctx, jnpool).block_until_ready()

    def torch_loop():
        torch.set_num_threads(best)
        out["torch_loop"] = pipe(
            prompt_embeds=tt(ctx),
            pooled_prompt_embeds=tt(pooled),
            negative_prompt_embeds=tt(nctx),
            negative_pooled_prompt_embeds=tt(npooled),
            latents=tx_nchw,
            height=pre.size,
            width=pre.size,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            output_type="latent",
            return_dict=False,
        )[0]
        sync()

    st = common.time_interleaved(
        {"jax": jax_loop, f"torch@{best}": torch_loop}, warmup=1, repeats=a.loop_repeats
    )
    flops = steps * mmdit_forward_flops(cfg, lat, lat, pre.text_len, 2 * b)
    loop_row = compare_row(st, best, flops, a.device, pre.dtype, meta, images=b)
    loop_row.update(
        jax_s_per_image=loop_row["jax_s"] / b,
        torch_s_per_image=loop_row["torch_s"] / b,
        rel_diff=rel_diff(
            out["jax_loop"].astype(jnp.float32),
            out["torch_loop"].float().permute(0, 2, 3, 1).cpu().numpy(),
        ),
    )
    print(common.table([loop_row], common.LOOP_COLS), flush=True)
    return fwd_row, loop_row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(ap, "sampling")
    ap.add_argument("--batches", default=None, help="images per batch, comma-separated (default: preset)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 28)")
    ap.add_argument("--attention", default="auto", help="sd3_jax attention backend (nn/attention.py)")
    ap.add_argument("--forward-repeats", type=int, default=None, help="default: 5 on cpu, 10 on gpu")
    ap.add_argument("--loop-repeats", type=int, default=None, help="default: 2 on cpu, 3 on gpu")
    ap.add_argument(
        "--torch-threads",
        default=None,
        help="CPU: torch thread counts to try, comma-separated; the fastest forward is reported and used for "
        "the loop (default: torch's default and 1)",
    )
    a = ap.parse_args()
    common.setup_platform(a.device, a.threads)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from sd3_jax.flops import mmdit_forward_flops
    from sd3_jax.nn.attention import select_backend

    pre = common.preset(a.device)
    a.forward_repeats = a.forward_repeats or (5 if a.device == "cpu" else 10)
    a.loop_repeats = a.loop_repeats or (2 if a.device == "cpu" else 3)
    steps = a.steps or pre.steps
    batches = tuple(int(b) for b in a.batches.split(",")) if a.batches else pre.batches
    meta = common.machine_info(threads=a.threads)
    dev = common.torch_device(a.device)
    tdtype, jdtype = getattr(torch, pre.dtype), jnp.dtype(pre.dtype)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    default_threads = torch.get_num_threads()
    if a.threads:
        threads = [a.threads]
    elif a.torch_threads:
        threads = [default_threads if n == "default" else int(n) for n in a.torch_threads.split(",")]
    else:
        threads = [default_threads] + ([1] if a.device == "cpu" and default_threads > 1 else [])

    ref, cfg, params = common.model_pair(pre.model)
    cfg = cfg.replace(dtype=jdtype, attention=a.attention)
    ref = ref.to(dev) if tdtype == torch.float32 else ref.to(dev, tdtype)
    params = jax.device_put(jax.tree.map(lambda p: jnp.asarray(p, jdtype), params))
    pipe = diffusers_pipeline(ref)
    forward, loop = jax_functions(cfg, steps)
    lat = pre.latent
    f1 = mmdit_forward_flops(cfg, lat, lat, pre.text_len, 1)
    print(
        f"{pre.name}: {pre.size} px, {pre.text_len} tokens, {steps} steps, {pre.dtype}, "
        f"{f1 / 1e9:.1f} GFLOP per image forward; {meta['device_kind']}",
        flush=True,
    )

    s = SimpleNamespace(
        a=a, pre=pre, meta=meta, cfg=cfg, params=params, ref=ref, pipe=pipe, forward=forward, loop=loop,
        steps=steps, threads=threads, dev=dev, sync=sync, jdtype=jdtype, tdtype=tdtype,
    )  # fmt: skip
    fwd_rows, loop_rows = [], []
    rng = np.random.default_rng(0)

    config = dict(
        model=pre.name,
        mmdit=dict(depth=cfg.depth, num_heads=cfg.num_heads, head_dim=cfg.head_dim, width=cfg.width),
        size=pre.size,
        latent=lat,
        text_len=pre.text_len,
        steps=steps,
        guidance=GUIDANCE,
        shift=SHIFT,
        dtype=pre.dtype,
        gflop_per_forward=f1 / 1e9,
        jax_attention=select_backend(jdtype) if cfg.attention == "auto" else cfg.attention,
        torch_attention="diffusers default (JointAttnProcessor2_0, F.scaled_dot_product_attention)",
    )
    notes = [
        "Seconds are medians over interleaved repeats (sd3_jax, diffusers, sd3_jax, ...); the JSON also has "
        "the minima (`ratio_min`) and every repeat. Compile and first-call time are excluded "
        "(`jax_compile_and_first_s` in the JSON).",
    ]
    if a.device == "cpu":
        notes.append(
            f"fp32 on {common.cores_used(meta)} (load average "
            f"{meta['load_avg_1m_start']} at the start). diffusers was timed with torch threads {threads} "
            "and "
            "is reported at the setting of its fastest forward (median; `torch_threads`): torch's OpenMP "
            "pool "
            "slows down many-fold when another process holds a core. XLA's CPU client uses its own thread "
            "pool over the cores it may use."
        )
    for b in batches:  # written after each batch: a run stopped early keeps what it measured
        fwd_row, loop_row = bench_batch(s, b, rng)
        fwd_rows.append(fwd_row)
        loop_rows.append(loop_row)
        common.write_result(
            common.out_path(a, "sampling"), meta, fwd_rows, loop=loop_rows, config=config, notes=notes
        )
    print("\nforward (one CFG step)\n" + common.table(fwd_rows, common.FORWARD_COLS))
    print(f"\ndenoising loop ({steps} steps, CFG {GUIDANCE})\n" + common.table(loop_rows, common.LOOP_COLS))


if __name__ == "__main__":
    main()
