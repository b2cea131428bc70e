"""Diffusion-DPO (Wallace et al. 2023) for rectified flow, trained through LoRA on a frozen base.

For a prompt c with preferred latents x^w and rejected x^l, both noised with the same t and eps, Wallace
et al.'s eq. (14) is

    L = -log sigmoid(-beta T w(lambda_t) [ (||eps^w - eps_theta(x_t^w)||^2 - ||eps^w - eps_ref(x_t^w)||^2)
                                          - (||eps^l - eps_theta(x_t^l)||^2 - ||eps^l - eps_ref(x_t^l)||^2) ])

The SD3 paper (Esser et al. 2024) fine-tunes with it through LoRA; for rectified flow the flow-matching
error ||v_theta(z_t) - (eps - x0)||^2 (L_CFM, their sec. 2) takes the place of each eps error. As in
Wallace et al.'s released training code, each error is the mean over latent entries, T w(lambda_t) is
folded into beta, and the constant is written as one half:

    L = -log sigmoid(-beta / 2 * [(e_theta^w - e_ref^w) - (e_theta^l - e_ref^l)])          (DPO-RF)

The argument of the sigmoid is the implicit reward margin: it is 0 when the policy equals the reference,
and grows as the policy fits x^w better (and x^l worse) than the reference does. The policy is the frozen
base with the trained adapter applied; the reference is the frozen base alone.

DPO alone can raise the margin by fitting *both* images worse, the rejected one more. An optional SFT
anchor adds the policy's own error on the preferred images, as RPO (Pang et al. 2024) adds the chosen
answers' NLL to DPO for language models:

    L_total = L + lambda * e_theta^w                                                     (DPO-RF + SFT)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sd3_jax.lora import Lora, apply_lora
from sd3_jax.train.config import TrainConfig
from sd3_jax.train.state import TrainState
from sd3_jax.train.step import apply_gradients, batch_loss, sample_t

TEXT_KEYS = ("clip_l", "clip_g", "t5", "pooled_l", "pooled_g")  # "t5" may be left out (no T5 tokens)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def dpo_margin(
    model_err_w: jax.Array, model_err_l: jax.Array, ref_err_w: jax.Array, ref_err_l: jax.Array, beta: float
) -> jax.Array:
    """The implicit reward margin -beta / 2 [(e_theta^w - e_ref^w) - (e_theta^l - e_ref^l)], (B,) (DPO-RF)."""
    return -0.5 * beta * ((model_err_w - ref_err_w) - (model_err_l - ref_err_l))


def dpo_loss(
    model_err_w: jax.Array, model_err_l: jax.Array, ref_err_w: jax.Array, ref_err_l: jax.Array, beta: float
) -> jax.Array:
    """Per-pair Diffusion-DPO loss -log sigmoid(margin), (B,): eq. (14) of Wallace et al. 2023 as (DPO-RF)."""
    return -jax.nn.log_sigmoid(dpo_margin(model_err_w, model_err_l, ref_err_w, ref_err_l, beta))


def pair_errors(
    cfg: TrainConfig, params: Any, batch: Mapping[str, jax.Array], t: jax.Array, noise: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-pair errors (e^w, e^l) of the configured formulation's loss, both noised with (t, noise).

    One forward over the 2B concatenation; no text dropout (every pair keeps its prompt).
    """
    n = batch["latents_w"].shape[0]
    both = {"latents": jnp.concatenate([batch["latents_w"], batch["latents_l"]])}
    both.update({k: jnp.concatenate([batch[k], batch[k]]) for k in TEXT_KEYS if k in batch})
    err = batch_loss(cfg, params, both, jnp.concatenate([t, t]), jnp.concatenate([noise, noise]), None)
    return err[:n], err[n:]


def dpo_terms(
    cfg: TrainConfig,
    lora: Lora,
    ref_params: Any,
    batch: Mapping[str, jax.Array],
    t: jax.Array,
    noise: jax.Array,
    beta: float,
    sft_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean DPO loss + sft_weight * mean e_theta^w, metrics) of the adapter on the frozen reference at
    fixed (t, noise) (DPO-RF + SFT)."""
    ref = jax.lax.stop_gradient(ref_params)
    ref_w, ref_l = jax.lax.stop_gradient(pair_errors(cfg, ref, batch, t, noise))
    model_w, model_l = pair_errors(cfg, apply_lora(ref, [(lora, 1.0)]), batch, t, noise)
    margin = dpo_margin(model_w, model_l, ref_w, ref_l, beta)
    dpo = jnp.mean(-jax.nn.log_sigmoid(margin))
    loss = dpo + sft_weight * jnp.mean(model_w)
    metrics = {
        "loss": loss,
        "dpo_loss": dpo,
        "reward_margin": jnp.mean(margin),
        "implicit_acc": jnp.mean((margin > 0).astype(jnp.float32)),
        "model_err_w": jnp.mean(model_w),
        "model_err_l": jnp.mean(model_l),
        "ref_err_w": jnp.mean(ref_w),
        "ref_err_l": jnp.mean(ref_l),
    }
    return loss, metrics


def dpo_train_step(
    cfg: TrainConfig,
    tx: optax.GradientTransformation,
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    ref_params: Any,
    beta: float = 5000.0,
    sft_weight: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One DPO step on the adapter `state.params`; `ref_params` is the frozen base (the reference);
    `sft_weight` weighs the SFT anchor (DPO-RF + SFT).

    A pair shares one t (from the configured density) and one noise draw, as in Wallace et al.'s code. The
    step's key is fold_in(rng, step). `beta` defaults to Wallace et al.'s SD1.5 value; jit with it bound.
    """
    key = jax.random.fold_in(rng, state.step)
    k_t, k_noise = jax.random.split(key)
    shape = batch["latents_w"].shape
    t = sample_t(cfg, k_t, shape[0])
    noise = nn.with_logical_constraint(
        jax.random.normal(k_noise, shape, jnp.float32), ("batch", None, None, None)
    )

    def loss_fn(lora):
        return dpo_terms(cfg, lora, ref_params, batch, t, noise, beta, sft_weight)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return apply_gradients(cfg, tx, state, grads), {**metrics, "grad_norm": optax.tree.norm(grads)}


# ---------------------------------------------------------------------------------------------------------
# Data: a JSONL of preference pairs.

TextEncodeFn = Callable[
    [str], Mapping[str, np.ndarray]
]  # caption -> {clip_l, clip_g, t5, pooled_l, pooled_g}
ImageEncodeFn = Callable[[np.ndarray], np.ndarray]  # uint8 (H, W, 3) -> latents (h, w, C)


class PairsSource:
    """Preference pairs from a JSONL file, a grain RandomAccessDataSource of DPO batches' examples.

    Each line is `{"caption": str, "chosen": path, "rejected": path}`, with an optional `"text": path` to a
    `.npz` of precomputed text embeddings (clip_l, clip_g, t5, pooled_l, pooled_g, without batch axis).
    Paths are relative to the JSONL's folder. `chosen`/`rejected` are `.npy` latents (h, w, C), channels
    last and already scaled as the trainer's latents are, or images, which `encode_image` turns into such
    latents. Without a `text` file, `encode_text(caption)` gives the embeddings. Bad lines raise at
    construction, naming the line.

    Item i is {"latents_w", "latents_l", "clip_l", "clip_g", "t5", "pooled_l", "pooled_g"}, float32 (without
    "t5" when the embeddings have none: the trainer then uses no T5 tokens).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        encode_text: TextEncodeFn | None = None,
        encode_image: ImageEncodeFn | None = None,
    ):
        self.path = Path(path)
        self.encode_text, self.encode_image = encode_text, encode_image
        root = self.path.parent
        self.rows: list[dict[str, Any]] = []
        with open(self.path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path}:{n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not JSON ({e})") from None
                if not isinstance(row, dict) or not isinstance(row.get("caption"), str):
                    raise ValueError(f"{where}: needs a string 'caption'")
                for k in ("chosen", "rejected") + (("text",) if "text" in row else ()):
                    if not isinstance(row.get(k), str):
                        raise ValueError(f"{where}: needs a path in '{k}'")
                    p = root / row[k]
                    if not p.exists():
                        raise ValueError(f"{where}: {k} file {p} does not exist")
                    if k != "text" and p.suffix.lower() not in (".npy", *IMAGE_SUFFIXES):
                        raise ValueError(f"{where}: {k} {p} is neither a .npy latent nor an image")
                    if k != "text" and p.suffix.lower() != ".npy" and encode_image is None:
                        raise ValueError(f"{where}: {k} is an image; pass encode_image to encode it")
                    row[k] = p
                if "text" not in row and encode_text is None:
                    raise ValueError(
                        f"{where}: no 'text' embeddings file; pass encode_text to encode the caption"
                    )
                row["where"] = where
                self.rows.append(row)
        if not self.rows:
            raise ValueError(f"{self.path}: no pairs")

    def __len__(self) -> int:
        return len(self.rows)

    def _latents(self, p: Path) -> np.ndarray:
        if p.suffix.lower() == ".npy":
            return np.load(p, allow_pickle=False).astype(np.float32)
        from sd3_jax.data.sources import load_image

        return np.asarray(self.encode_image(load_image(p)), np.float32)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        row = self.rows[int(i)]
        if "text" in row:
            with np.load(row["text"], allow_pickle=False) as z:
                text = {k: z[k] for k in TEXT_KEYS if k in z}
        else:
            text = dict(self.encode_text(row["caption"]))
        missing = [k for k in TEXT_KEYS if k not in text and k != "t5"]
        if missing:
            raise ValueError(f"{row['where']}: text embeddings lack {missing}")
        w, l = self._latents(row["chosen"]), self._latents(row["rejected"])
        if w.shape != l.shape or w.ndim != 3:
            raise ValueError(
                f"{row['where']}: chosen {w.shape} and rejected {l.shape} must be equal (h, w, C)"
            )
        return {
            "latents_w": w,
            "latents_l": l,
            **{k: np.asarray(text[k], np.float32) for k in TEXT_KEYS if k in text},
        }
