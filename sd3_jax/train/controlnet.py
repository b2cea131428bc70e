"""Training a ControlNet on a frozen MMDiT (`adapter="controlnet"`): its sharded TrainState, initialised from
the base's first blocks as diffusers' `SD3ControlNetModel.from_transformer` does (or fresh), its train step,
and its export in diffusers' layout.

Only the ControlNet is in the optimizer state and the checkpoints; the base transformer stays beside them,
frozen and sharded by the same rules. The data records carry "control": the control image's latents, as
the pipeline makes them (`sd3_jax.controlnet.control_latents`), beside the target's.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sd3_jax.convert.controlnet import abstract_params, example_inputs
from sd3_jax.nn.controlnet import ControlNetConfig
from sd3_jax.nn.mmdit import MMDiTConfig
from sd3_jax.sharding.mesh import tree_shardings
from sd3_jax.train.state import TrainState, shardings_like_params
from sd3_jax.train.step import apply_gradients, batch_loss, eval_loss, step_draws


def net_config(cfg: Any) -> ControlNetConfig:
    """The ControlNet a run trains: shaped like the base, `controlnet_layers` blocks (0: half the base's)."""
    depth = cfg.controlnet_layers or max(1, cfg.model.depth // 2)
    return ControlNetConfig.from_transformer(cfg.model, depth, extra_channels=cfg.controlnet_extra_channels)


def controlnet_state_shardings(cfg: Any, tx: optax.GradientTransformation, mesh: Any) -> TrainState:
    ncfg = net_config(cfg)
    p_sh = tree_shardings(abstract_params(ncfg, boxed=True), mesh)
    return shardings_like_params(abstract_params(ncfg), p_sh, tx, mesh)


def abstract_controlnet_state(cfg: Any, tx: optax.GradientTransformation, mesh: Any) -> TrainState:
    """A fresh ControlNet run's TrainState as sharded ShapeDtypeStructs (no memory): for compiling."""
    params = abstract_params(net_config(cfg))
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
        ema_params=params,
    )
    shardings = controlnet_state_shardings(cfg, tx, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _base_block(base_cfg: MMDiTConfig, base: Any, i: int) -> Any:
    from sd3_jax.convert.mmdit import _block_location

    seg, j = _block_location(base_cfg, i)
    return jax.tree.map(lambda a: a[j], base[seg])


def from_base(ncfg: ControlNetConfig, base_cfg: MMDiTConfig, base: Any, fresh: Any) -> Any:
    """ControlNet params copying the base's patch embedding, conditioning embedders, context embedder and
    first `ncfg.depth` blocks; `pos_embed_input` and the `controlnet_block`s stay as in `fresh` (zeros)."""
    if ncfg.depth >= base_cfg.depth:  # the base's last block is context-pre-only: another shape
        raise ValueError(
            f"controlnet_layers={ncfg.depth}: a ControlNet initialised from the base takes at most "
            f"{base_cfg.depth - 1} of its {base_cfg.depth} blocks"
        )
    out = dict(fresh)
    for name in ("pos_embed", "time_text_embed", "context_embedder"):
        out[name] = base[name]
    for k, (start, stop, _) in enumerate(ncfg.segments()):
        blocks = [_base_block(base_cfg, base, i) for i in range(start, stop)]
        out[f"blocks_{k}"] = {**fresh[f"blocks_{k}"], "block": jax.tree.map(lambda *a: jnp.stack(a), *blocks)}
    return out


def create_controlnet_state(
    cfg: Any, tx: optax.GradientTransformation, mesh: Any, key: jax.Array, base: Any
) -> TrainState:
    """A fresh ControlNet TrainState, created sharded; from the base unless controlnet_init='fresh'."""
    import flax.linen as nn

    from sd3_jax.nn.controlnet import ControlNet

    ncfg = net_config(cfg)

    def make(key, base):
        args = [jnp.zeros(a.shape, a.dtype) for a in example_inputs(ncfg)]
        p = nn.meta.unbox(ControlNet(ncfg).init(key, *args)["params"])
        if cfg.controlnet_init == "base":
            p = from_base(ncfg, cfg.model, base, p)
        p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), ema_params=p)

    return jax.jit(make, out_shardings=controlnet_state_shardings(cfg, tx, mesh))(key, base)


def controlnet_train_step(
    cfg: Any,
    tx: optax.GradientTransformation,
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    base_params: Any,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """`sd3_jax.train.step.train_step` with `state.params` a ControlNet steering the frozen `base_params`."""
    t, noise, k_drop = step_draws(cfg, rng, state.step, batch)
    base = jax.lax.stop_gradient(base_params)
    ncfg = net_config(cfg)

    def loss_fn(net):
        return jnp.mean(batch_loss(cfg, base, batch, t, noise, k_drop, (ncfg, net)))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return apply_gradients(cfg, tx, state, grads), {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def controlnet_eval(cfg: Any) -> Any:
    """eval(net, batch, ts, key, base): the validation loss of the base steered by the ControlNet."""
    ncfg = net_config(cfg)
    return lambda net, batch, ts, key, base: eval_loss(cfg, base, batch, ts, key, (ncfg, net))


def export_controlnet_diffusers(cfg: Any, net: Any, workdir: str) -> str | None:
    """Writes the trained (EMA) ControlNet to WORKDIR/controlnet/ as diffusers saves an SD3ControlNetModel
    (process 0); returns the folder."""
    import json

    import numpy as np
    from jax.experimental import multihost_utils

    from sd3_jax.convert.controlnet import config_to_diffusers, export_controlnet
    from sd3_jax.convert.safetensors_io import write_safetensors

    host = multihost_utils.process_allgather(net) if jax.process_count() > 1 else jax.device_get(net)
    if jax.process_index() != 0:
        return None
    ncfg = net_config(cfg)
    out = os.path.join(workdir, "controlnet")
    os.makedirs(out, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in export_controlnet(host, ncfg).items()}
    write_safetensors(os.path.join(out, "diffusion_pytorch_model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config_to_diffusers(ncfg), f, indent=1)
    return out


__all__ = [
    "abstract_controlnet_state",
    "controlnet_eval",
    "controlnet_state_shardings",
    "controlnet_train_step",
    "create_controlnet_state",
    "export_controlnet_diffusers",
    "from_base",
    "net_config",
]
