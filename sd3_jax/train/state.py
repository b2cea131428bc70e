"""TrainState, the optimizer, and creating or restoring state directly sharded on a mesh."""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sd3_jax.convert.mmdit import abstract_params
from sd3_jax.nn.mmdit import MMDiT, MMDiTConfig
from sd3_jax.sharding.mesh import tree_shardings
from sd3_jax.train.config import OptimConfig, TrainConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any


def learning_rate(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then constant or cosine decay to 0 at `total_steps`."""
    warm = max(cfg.warmup_steps, 0)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warm, 1), max(total_steps, warm + 1), 0.0)
    if warm == 0:
        return optax.constant_schedule(cfg.lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, warm), optax.constant_schedule(cfg.lr)], [warm]
    )


def make_optimizer(cfg: OptimConfig, total_steps: int, mask: Any = None) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; `mask` (a bool tree like params, or a function of params giving one)
    limits training to some params. The position table is always frozen. Frozen params have no optimizer
    state and get zero updates."""
    chain = []
    if cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(
        optax.adamw(learning_rate(cfg, total_steps), cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay)
    )
    tx = optax.chain(*chain)

    def labels(params):
        keep = mask(params) if callable(mask) else mask
        if keep is None:
            keep = jax.tree.map(lambda _: True, params)
        return jax.tree_util.tree_map_with_path(lambda path, k: bool(k) and not _frozen(path), keep)

    return optax.multi_transform({True: tx, False: optax.set_to_zero()}, labels)


def _frozen(path) -> bool:
    """Params never trained: the MMDiT's sin-cos position table (a fixed buffer in both references)."""
    keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
    return keys[-2:] == ("pos_embed", "pos_embed")


def init_params(model_cfg: MMDiTConfig, key: jax.Array) -> Any:
    """Fresh fp32 MMDiT params (unboxed)."""
    s = model_cfg.patch_size
    x = jnp.zeros((1, s, s, model_cfg.in_channels))
    args = (
        x,
        jnp.zeros((1,)),
        jnp.zeros((1, 1, model_cfg.context_dim)),
        jnp.zeros((1, model_cfg.pooled_dim)),
    )
    return nn.meta.unbox(MMDiT(model_cfg).init(key, *args)["params"])


def state_shardings(
    cfg: TrainConfig, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> TrainState:
    """NamedShardings of every TrainState leaf: params by their logical names, optimizer moments likewise."""
    p_sh = tree_shardings(abstract_params(cfg.model, boxed=True), mesh)
    return shardings_like_params(abstract_params(cfg.model), p_sh, tx, mesh)


def shardings_like_params(
    abstract: Any, p_sh: Any, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> TrainState:
    """A TrainState's shardings given its params' (`p_sh`, a tree like `abstract`): the EMA as the params,
    each optimizer moment as the param with its path suffix and shape, the rest replicated."""
    opt_abstract = jax.eval_shape(tx.init, abstract)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    flat_p = {
        tuple(str(k) for k in path): (leaf, sh)
        for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(p_sh))
    }

    def opt_sharding(path, leaf):
        keys = tuple(str(k) for k in path)
        for n in range(len(keys)):
            hit = flat_p.get(keys[n:])
            if hit is not None and hit[0].shape == leaf.shape:
                return hit[1]
        return replicated

    o_sh = jax.tree_util.tree_map_with_path(opt_sharding, opt_abstract)
    return TrainState(step=replicated, params=p_sh, opt_state=o_sh, ema_params=p_sh)


def abstract_state(cfg: TrainConfig, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> TrainState:
    """The TrainState of a fresh run as sharded ShapeDtypeStructs (no memory): for restoring and compiling."""
    shardings = state_shardings(cfg, tx, mesh)
    shapes = jax.eval_shape(functools.partial(_make_state, cfg, tx), jax.random.key(0), None)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _make_state(
    cfg: TrainConfig, tx: optax.GradientTransformation, key: jax.Array, params: Any
) -> TrainState:
    p = (
        init_params(cfg.model, key)
        if params is None
        else jax.tree.map(lambda a: a.astype(jnp.float32), params)
    )
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), ema_params=p)


def create_state(
    cfg: TrainConfig,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    key: jax.Array,
    params: Any = None,
) -> TrainState:
    """A fresh TrainState created directly sharded (jit with out_shardings); `params` to fine-tune from."""
    make = functools.partial(_make_state, cfg, tx)
    return jax.jit(make, out_shardings=state_shardings(cfg, tx, mesh))(key, params)
