"""The training loop: sharded state, grain data, Orbax checkpoints with resume, metrics and validation."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sd3_jax.flops import mmdit_forward_flops, peak_flops
from sd3_jax.sharding.mesh import activation_rules, make_mesh
from sd3_jax.train import data as train_data
from sd3_jax.train.config import TrainConfig, check_finetune
from sd3_jax.train.guard import HeldThreadOutput, Preempted, Preemption, held_thread_output, workdir_lock
from sd3_jax.train.report import MetricsWriter, SampleFn, checkpoint_sampler
from sd3_jax.train.state import TrainState, create_state, learning_rate, make_optimizer, state_shardings
from sd3_jax.train.step import eval_loss, train_step


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous ones are intact."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` when launched as one of several processes (env vars set)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and os.environ.get("JAX_NUM_PROCESSES", "1") != "1":
        # CPU collectives across processes go through gloo (the option only affects the CPU backend).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )


@contextlib.contextmanager
def mesh_context(mesh):
    import flax.linen as nn

    with jax.set_mesh(mesh), nn.logical_axis_rules(activation_rules(mesh)):
        yield


def _batch_sharding(mesh, x: np.ndarray) -> NamedSharding:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    spec = PartitionSpec(("data", "fsdp")) if (x.shape[0] * jax.process_count()) % n == 0 else PartitionSpec()
    return NamedSharding(mesh, spec)


def global_batch(mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's slice of the batch, assembled into global arrays sharded over data and fsdp."""
    return {k: jax.make_array_from_process_local_data(_batch_sharding(mesh, v), v) for k, v in local.items()}


def _with_checkpoint_model(cfg: TrainConfig) -> TrainConfig:
    """The config with its model replaced by the checkpoint's transformer (keeping attention and remat)."""
    import dataclasses

    from sd3_jax.convert.components import read_config
    from sd3_jax.convert.orbax_io import read_manifest

    entry = read_manifest(cfg.init_from)["components"].get("transformer")
    if entry is None:
        raise ValueError(f"{cfg.init_from}: checkpoint has no transformer to fine-tune")
    model = read_config("mmdit", entry["config"]).replace(
        attention=cfg.model.attention, remat=cfg.model.remat
    )
    return dataclasses.replace(cfg, model=model)


def _load_init_params(cfg: TrainConfig, mesh=None) -> Any:
    """The init_from transformer's fp32 params (sharded by the rules on `mesh` when given)."""
    from sd3_jax.convert.mmdit import abstract_params
    from sd3_jax.convert.orbax_io import read_manifest, restore_params

    manifest = read_manifest(cfg.init_from)
    if "transformer" not in manifest["components"]:
        raise ValueError(f"{cfg.init_from}: checkpoint has no transformer to fine-tune")
    shardings = None
    if mesh is not None:
        from sd3_jax.sharding.mesh import tree_shardings

        shardings = tree_shardings(abstract_params(cfg.model, boxed=True), mesh)
    return restore_params(
        os.path.join(cfg.init_from, "transformer"), abstract_params(cfg.model), jnp.float32, shardings
    )


def step_fns(cfg: TrainConfig, tx, shardings, base):
    """(jitted step(state, batch, rng), jitted eval(ema_params, batch, ts, key)) for the configured run."""
    from sd3_jax.lora import apply_lora
    from sd3_jax.train.dpo import dpo_train_step
    from sd3_jax.train.lora import lora_train_step

    jit_step = lambda f: jax.jit(f, out_shardings=(shardings, None), donate_argnums=0)
    if cfg.adapter == "":
        step = jit_step(functools.partial(train_step, cfg, tx))
        return step, jax.jit(functools.partial(eval_loss, cfg))
    if cfg.adapter == "controlnet":
        from sd3_jax.train.controlnet import controlnet_eval, controlnet_train_step

        step = jit_step(functools.partial(controlnet_train_step, cfg, tx))
        evaluate = jax.jit(controlnet_eval(cfg))
        return (
            lambda state, batch, rng: step(state, batch, rng, base),
            lambda net, batch, ts, key: evaluate(net, batch, ts, key, base),
        )
    if cfg.objective == "dpo":
        inner = functools.partial(dpo_train_step, cfg, tx, beta=cfg.dpo_beta, sft_weight=cfg.dpo_sft_weight)
    else:
        inner = functools.partial(lora_train_step, cfg, tx)
    step = jit_step(inner)
    evaluate = jax.jit(
        lambda lora, batch, ts, key, base: eval_loss(cfg, apply_lora(base, [(lora, 1.0)]), batch, ts, key)
    )
    return (
        lambda state, batch, rng: step(state, batch, rng, base),
        lambda lora, batch, ts, key: evaluate(lora, batch, ts, key, base),
    )


def export_adapter(cfg: TrainConfig, lora: Any, workdir: str) -> str | None:
    """Writes the trained adapter to WORKDIR/lora/ in diffusers' layout (process 0); returns the file."""
    from jax.experimental import multihost_utils

    from sd3_jax.convert.lora import export_lora_diffusers

    host = multihost_utils.process_allgather(lora) if jax.process_count() > 1 else jax.device_get(lora)
    if jax.process_index() != 0:
        return None
    return export_lora_diffusers(host, cfg.model, os.path.join(workdir, "lora"))


def train(
    cfg: TrainConfig, workdir: str, progress: bool = True, sample_fn: SampleFn | None = None
) -> TrainState:
    """Trains for cfg.steps steps in `workdir`, resuming from its latest complete checkpoint.

    One run at a time holds the workdir (`guard.workdir_lock`); in a single-process run SIGTERM saves a
    checkpoint at the step in flight and raises `guard.Preempted`. Every `cfg.sample_every` steps the EMA
    params sample `cfg.sample_prompts` through `sample_fn` (default: with the init_from checkpoint's VAE
    and text encoders) into WORKDIR/samples/ and TensorBoard.
    """
    if cfg.sample_every and sample_fn is None and not cfg.init_from:
        raise ValueError(
            "sample_every needs init_from (a checkpoint with the VAE and text encoders to sample with)"
        )
    if cfg.sample_every and sample_fn is None and cfg.adapter == "controlnet":
        raise ValueError(
            "sample_every with adapter='controlnet' needs control images to sample with: pass train() a "
            "sample_fn (experiments/controlnet.py does), or set sample_every=0"
        )
    check_finetune(cfg)
    os.makedirs(workdir, exist_ok=True)
    with (
        workdir_lock(workdir, jax.process_index() == 0),
        Preemption(jax.process_count() == 1) as preemption,
        held_thread_output() as held,
    ):
        return _train(cfg, workdir, progress, preemption, held, sample_fn)


def _train(
    cfg: TrainConfig,
    workdir: str,
    progress: bool,
    preemption: Preemption,
    held: HeldThreadOutput,
    sample_fn: SampleFn | None,
) -> TrainState:
    import orbax.checkpoint as ocp

    from sd3_jax.train.lora import create_lora_state, lora_state_shardings

    if cfg.init_from:
        cfg = _with_checkpoint_model(cfg)
    if jax.process_index() == 0:
        from sd3_jax.convert.workdir import write_run_info

        adapter_config = cfg.lora if cfg.adapter == "lora" else None
        if cfg.adapter == "controlnet":
            from sd3_jax.train.controlnet import net_config

            adapter_config = net_config(cfg)
        write_run_info(workdir, cfg.model, cfg.init_from, cfg.adapter, adapter_config)
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optim, cfg.steps)
    lr_at = learning_rate(cfg.optim, cfg.steps)
    lora, frozen_base = cfg.adapter == "lora", cfg.adapter != ""
    if cfg.adapter == "controlnet":
        from sd3_jax.train.controlnet import controlnet_state_shardings, create_controlnet_state

        shardings = controlnet_state_shardings(cfg, tx, mesh)
    elif lora:
        shardings = lora_state_shardings(cfg, cfg.lora, tx, mesh)
    else:
        shardings = state_shardings(cfg, tx, mesh)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints,
        enable_async_checkpointing=cfg.async_checkpoints,
        cleanup_tmp_directories=True,
    )
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)
    init_key, step_rng = jax.random.split(jax.random.key(cfg.seed))
    it = train_data.make_iterator(train_data.make_source(cfg), cfg.batch_size, cfg.seed, cfg.data.shuffle)
    val_source = None
    if cfg.eval_every:
        try:
            val_source = train_data.make_source(cfg, "val")
        except FileNotFoundError:
            if cfg.data.kind != "prepared":
                raise
            if jax.process_index() == 0:  # one line, then on without it
                print(
                    f"sd3-jax: no validation split {cfg.data.path}-val.json "
                    "(`sd3-jax prepare --val-fraction` writes one): training without val_loss",
                    file=sys.stderr,
                )
    val = train_data.fixed_batches(val_source, cfg.batch_size) if val_source is not None else []

    start = mngr.latest_step()
    with mesh_context(mesh):
        # A LoRA or ControlNet run keeps the init_from transformer frozen beside the state; a full run
        # starts from it.
        base = _load_init_params(cfg, mesh) if frozen_base else None

        def fresh(params=None):
            if cfg.adapter == "controlnet":
                return create_controlnet_state(cfg, tx, mesh, init_key, base)
            if lora:
                return create_lora_state(cfg, cfg.lora, tx, mesh, init_key)
            return create_state(cfg, tx, mesh, init_key, params)

        if start is not None:
            abstract = jax.tree.map(
                lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                jax.eval_shape(fresh),
                shardings,
            )  # (a LoRA state's shapes come from its own init, so not from state.abstract_state)
            restored = mngr.restore(
                start,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
                ),
            )
            state = restored.state
            it.set_state(restored.data["iterator"])
        else:
            start = 0
            state = fresh(_load_init_params(cfg, mesh) if cfg.init_from and not frozen_base else None)
        metrics_out = MetricsWriter(workdir, start, cfg.tensorboard)
        if cfg.sample_every and sample_fn is None:
            sample_fn = checkpoint_sampler(cfg.init_from, cfg, mesh)
        step_fn, eval_fn = step_fns(cfg, tx, shardings, base)
        ts = jnp.asarray(cfg.eval_timesteps, jnp.float32)

        flops = None
        peak = cfg.peak_flops or peak_flops(jax.devices()[0].device_kind)
        bar = None
        if progress and jax.process_index() == 0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

        @contextlib.contextmanager
        def writing(step):
            """Turns a failed checkpoint write (Orbax and TensorStore raise ValueError, OSError...) into one
            CheckpointWriteError line naming the last complete checkpoint, which is kept."""
            held.hold_main = True  # Orbax logs a failed write from the waiting thread too
            try:
                yield
            except Exception as e:  # noqa: BLE001 -- whatever the writer raised, the run cannot go on
                # Orbax's writer threads each printed what they met (held, see guard.HeldThreadOutput), and
                # asyncio would log the writes that failed alongside: the error below says it all.
                held.drop()
                logging.getLogger("asyncio").setLevel(logging.CRITICAL)
                mngr.reload()
                done = mngr.latest_step() or 0
                if cfg.async_checkpoints and started[0] is not None and started[0] > done:
                    step = started[0]  # the write that failed is the one still in flight
                first = (str(e).strip().splitlines() or [""])[0]
                code = re.search(r"([^:]+) \[os_error_code='(\d+)'\]", first)  # TensorStore's OS errors
                why = f"{code[1].strip()}, errno {code[2]}" if code else first[:200]
                raise CheckpointWriteError(
                    f"could not write the checkpoint at step {step} ({why}); last complete checkpoint: step "
                    f"{mngr.latest_step()} in {os.path.join(workdir, 'checkpoints')} (kept): make room and "
                    "run the same command to resume from it"
                ) from None
            finally:
                held.hold_main = False

        started = [None]  # the step of the last checkpoint whose (async) write began

        def finish(step):
            with writing(step):
                mngr.wait_until_finished()
            held.release()

        def check(step, loss):
            value = float(loss)
            if not math.isfinite(value):
                finish(step)
                good = mngr.latest_step()
                raise TrainingDiverged(
                    f"loss is {value} at step {step}; stopped. Last good checkpoint: step {good} in "
                    f"{os.path.join(workdir, 'checkpoints')} (kept)"
                )
            return value

        pending = None  # (step, loss array) fetched one step late, so the host never stalls the device
        t_last, s_last = time.perf_counter(), start
        for step in range(start + 1, cfg.steps + 1):
            batch = global_batch(mesh, next(it))
            if flops is None:
                _, lh, lw, _ = batch["latents" if "latents" in batch else "latents_w"].shape
                text_len = batch["clip_l"].shape[1] + (batch["t5"].shape[1] if "t5" in batch else 0)
                # DPO: forward and backward of the policy and a forward of the reference, on both images.
                per = 8 if cfg.objective == "dpo" else 3
                flops = per * mmdit_forward_flops(cfg.model, lh, lw, text_len, cfg.batch_size)
            state, m = step_fn(state, batch, step_rng)
            if pending is not None:
                metrics_out.write({"step": pending[0], "loss": check(*pending)})
            pending = (step, m["loss"])
            if step % cfg.log_every == 0 or step == cfg.steps:
                loss = check(step, m["loss"])
                now = time.perf_counter()
                sps = (step - s_last) / max(now - t_last, 1e-9)
                t_last, s_last = now, step
                rec = {
                    "step": step,
                    "lr": float(lr_at(step - 1)),  # what this step's update used (optax counts from 0)
                    **{k: float(v) for k, v in m.items() if k != "loss"},
                    "steps_per_s": sps,
                    "images_per_s": sps * cfg.batch_size,
                }
                if peak:
                    rec["mfu"] = flops * sps / (peak * jax.device_count())
                metrics_out.write({"kind": "log", **rec})
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{loss:.4f}",
                        img_s=f"{rec['images_per_s']:.1f}",
                        **({"mfu": f"{rec['mfu']:.2%}"} if peak else {}),
                    )
            if cfg.eval_every and val and (step % cfg.eval_every == 0 or step == cfg.steps):
                vals = [
                    float(eval_fn(state.ema_params, global_batch(mesh, b), ts, jax.random.key(1)))
                    for b in val
                ]
                metrics_out.write({"kind": "eval", "step": step, "val_loss": float(np.mean(vals))})
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
                metrics_out.images(np.asarray(sample_fn(state.ema_params)), step, len(cfg.sample_prompts))
            stop = preemption.requested  # read once: every branch below sees the same answer
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop:
                metrics_out.write({"step": step, "loss": check(step, m["loss"])})
                pending = None
                with writing(step):
                    mngr.save(
                        step,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardSave(state),
                            data=ocp.args.JsonSave(
                                {"iterator": train_data.iterator_state(it), "seed": cfg.seed}
                            ),
                        ),
                    )
                started[0] = step
                held.release()  # the save before this one is complete (Orbax waits for it)
            if bar is not None:
                bar.update(1)
            if stop:
                finish(step)
                if bar is not None:
                    bar.close()
                raise Preempted(
                    f"stopped by SIGTERM at step {step} of {cfg.steps}; checkpoint saved in "
                    f"{os.path.join(workdir, 'checkpoints')}: the same command resumes from it"
                )
        if pending is not None:
            metrics_out.write({"step": pending[0], "loss": check(*pending)})
        finish(cfg.steps)
        metrics_out.close()
        if bar is not None:
            bar.close()
        if lora:
            export_adapter(cfg, state.ema_params, workdir)
        elif cfg.adapter == "controlnet":
            from sd3_jax.train.controlnet import export_controlnet_diffusers

            export_controlnet_diffusers(cfg, state.ema_params, workdir)
    return state
