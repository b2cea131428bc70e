"""Training a LoRA adapter on a frozen MMDiT: its sharded TrainState and its train step.

The adapter itself (init, apply, merge) is `sd3_jax.lora`, which depends on nothing in `train/`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sd3_jax.lora import Lora, LoraConfig, apply_lora, init_lora, lora_logical_names
from sd3_jax.sharding.mesh import tree_shardings
from sd3_jax.train.state import TrainState, shardings_like_params
from sd3_jax.train.step import apply_gradients, batch_loss, step_draws


def _abstract_base(model_cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(abstract params, the same boxed with their logical names), from one eval_shape."""
    from sd3_jax.convert.mmdit import abstract_params

    boxed = abstract_params(model_cfg, boxed=True)
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    return jax.tree.map(lambda x: x.value if is_box(x) else x, boxed, is_leaf=is_box), boxed


def lora_state_shardings(
    cfg: Any, lora_cfg: LoraConfig, tx: optax.GradientTransformation, mesh: Any, base: Any = None
) -> Any:
    """NamedShardings of a LoRA TrainState: adapters by their logical names, optimizer moments likewise.

    `base` is (abstract params, boxed abstract params) of cfg.model when the caller has them.
    """

    abstract, boxed = base or _abstract_base(cfg.model)
    abstract_lora = jax.eval_shape(lambda k: init_lora(k, abstract, lora_cfg), jax.random.key(0))
    p_sh = tree_shardings(lora_logical_names(abstract_lora, boxed), mesh)
    return shardings_like_params(abstract_lora, p_sh, tx, mesh)


def create_lora_state(
    cfg: Any,
    lora_cfg: LoraConfig,
    tx: optax.GradientTransformation,
    mesh: Any,
    key: jax.Array,
    lora: Lora | None = None,
) -> Any:
    """A TrainState whose params are a fresh (or the given) adapter, created directly sharded."""
    base = _abstract_base(cfg.model)
    shardings = lora_state_shardings(cfg, lora_cfg, tx, mesh, base)

    def make(key, lora):
        p = init_lora(key, base[0], lora_cfg) if lora is None else lora
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), ema_params=p)

    return jax.jit(make, out_shardings=shardings)(key, lora)


def lora_train_step(
    cfg: Any,
    tx: optax.GradientTransformation,
    state: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    base_params: Any,
) -> tuple[Any, dict[str, jax.Array]]:
    """`sd3_jax.train.step.train_step` with `state.params` an adapter on the frozen `base_params`.

    The loss is `batch_loss` at params apply_lora(base, [(lora, 1)]); gradients flow to the adapter only.
    """
    t, noise, k_drop = step_draws(cfg, rng, state.step, batch)
    base = jax.lax.stop_gradient(base_params)

    def loss_fn(lora):
        return jnp.mean(batch_loss(cfg, apply_lora(base, [(lora, 1.0)]), batch, t, noise, k_drop))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return apply_gradients(cfg, tx, state, grads), {"loss": loss, "grad_norm": optax.tree.norm(grads)}
