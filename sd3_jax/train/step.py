"""The pure train step `(state, batch, rng) -> (state, metrics)` and the validation loss."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sd3_jax.flow import conditioning, losses, schedules
from sd3_jax.nn.mmdit import MMDiT
from sd3_jax.train.config import TrainConfig
from sd3_jax.train.state import TrainState

FORMULATIONS = {
    "rectified_flow": losses.RectifiedFlow,
    "ldm_linear": losses.LDMLinear,
    "cosine": losses.Cosine,
    "edm": losses.EDM,
}


def formulation(cfg: TrainConfig) -> Any:
    return FORMULATIONS[cfg.formulation]()


def sample_t(cfg: TrainConfig, key: jax.Array, n: int) -> jax.Array:
    """Training timesteps from the configured density, then the resolution shift (sec. 5.3.2)."""
    if cfg.timesteps == "uniform":
        t = schedules.uniform(key, n)
    elif cfg.timesteps == "logit_normal":
        t = schedules.logit_normal(key, n, cfg.logit_m, cfg.logit_s)
    elif cfg.timesteps == "mode":
        t = schedules.mode(key, n, cfg.mode_s)
    else:
        t = schedules.cosmap(key, n)
    return schedules.shift_sigmas(t, cfg.shift) if cfg.shift != 1.0 else t


def text_condition(
    batch: dict[str, jax.Array], key: jax.Array | None, p: float, context_dim: int
) -> tuple[jax.Array, jax.Array]:
    """Context and pooled vectors from per-encoder pieces, with per-encoder dropout when `key` is given.

    A batch without "t5" trains with no T5 tokens (its (B, 0, context_dim) part is empty).
    """
    b = batch["clip_l"].shape[0]
    t5 = batch["t5"] if "t5" in batch else jnp.zeros((b, 0, context_dim), batch["clip_l"].dtype)
    pieces = [batch["clip_l"], batch["clip_g"], t5, batch["pooled_l"], batch["pooled_g"]]
    if key is None or p == 0.0:
        return conditioning.join_context(*pieces[:3]), conditioning.join_pooled(*pieces[3:])
    context, pooled, _ = conditioning.drop_and_join(key, *pieces, p=p)
    return context, pooled


def batch_loss(
    cfg: TrainConfig,
    params: Any,
    batch: dict[str, jax.Array],
    t: jax.Array,
    noise: jax.Array,
    drop_key: jax.Array | None,
    control: tuple[Any, Any] | None = None,
) -> jax.Array:
    """Per-example loss of the configured formulation (eq. of each in `sd3_jax.flow.losses`).

    `control`, (ControlNetConfig, its params), adds that ControlNet's residuals, from the batch's "control"
    latents, to the MMDiT (`params` then being the frozen base)."""
    form = formulation(cfg)
    dtype = jnp.dtype(cfg.compute_dtype)
    model = MMDiT(cfg.model.replace(dtype=dtype))
    x0 = batch["latents"].astype(jnp.float32)
    batch = {k: v.astype(jnp.float32) for k, v in batch.items()}
    context, pooled = text_condition(batch, drop_key, cfg.text_dropout, cfg.model.context_dim)
    z = form.noise(x0, noise, t)
    net_x, net_t = form.net_input(z, t)
    cast = lambda tree: jax.tree.map(lambda a: a.astype(dtype), tree)
    net_x, context, pooled = cast((net_x, context, pooled))
    residuals = None
    if control is not None:
        from sd3_jax.nn.controlnet import ControlNet

        net_cfg, net_params = control
        net_pooled = jnp.zeros_like(pooled) if net_cfg.force_zeros_for_pooled else pooled
        residuals = ControlNet(net_cfg.replace(dtype=dtype)).apply(
            {"params": cast(net_params)}, net_x, cast(batch["control"]), net_t, net_pooled, context
        )
    out = model.apply({"params": cast(params)}, net_x, net_t, context, pooled, controls=residuals)
    return form.loss(out.astype(jnp.float32), x0, noise, t)


def step_draws(
    cfg: TrainConfig, rng: jax.Array, step: jax.Array, batch: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The step's timesteps, noise (sharded as the batch) and text-dropout key, from fold_in(rng, step)."""
    k_t, k_noise, k_drop = jax.random.split(jax.random.fold_in(rng, step), 3)
    t = sample_t(cfg, k_t, batch["latents"].shape[0])
    noise = jax.random.normal(k_noise, batch["latents"].shape, jnp.float32)
    return t, nn.with_logical_constraint(noise, ("batch", None, None, None)), k_drop


def train_step(
    cfg: TrainConfig,
    tx: optax.GradientTransformation,
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; the step's key is fold_in(rng, step) (big_vision `update_fn`)."""
    t, noise, k_drop = step_draws(cfg, rng, state.step, batch)

    def loss_fn(params):
        return jnp.mean(batch_loss(cfg, params, batch, t, noise, k_drop))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return apply_gradients(cfg, tx, state, grads), metrics


def apply_gradients(
    cfg: TrainConfig, tx: optax.GradientTransformation, state: TrainState, grads: Any
) -> TrainState:
    """The optimizer update of `state.params` by `grads`, then the EMA of the params (0: no EMA)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = cfg.ema_decay
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema_params, params) if d > 0 else params
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def eval_loss(
    cfg: TrainConfig,
    params: Any,
    batch: dict[str, jax.Array],
    ts: jax.Array,
    key: jax.Array,
    control: tuple[Any, Any] | None = None,
) -> jax.Array:
    """Validation loss: the mean over fixed timesteps `ts` with fixed noise, no text dropout (sec. 5.1)."""
    b = batch["latents"].shape[0]
    total = 0.0
    for i in range(ts.shape[0]):
        noise = jax.random.normal(jax.random.fold_in(key, i), batch["latents"].shape, jnp.float32)
        t = jnp.full((b,), ts[i])
        total = total + jnp.mean(batch_loss(cfg, params, batch, t, noise, None, control))
    return total / ts.shape[0]
