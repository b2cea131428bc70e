"""Diffusion-DPO for rectified flow: the loss in closed form, training through LoRA, the pairs JSONL."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sd3_jax.convert.mmdit import abstract_params
from sd3_jax.lora import LoraConfig
from sd3_jax.nn.mmdit import MMDiTConfig
from sd3_jax.sharding.mesh import make_mesh
from sd3_jax.train.config import OptimConfig, TrainConfig
from sd3_jax.train.data import make_iterator
from sd3_jax.train.dpo import PairsSource, dpo_loss, dpo_margin, dpo_terms, dpo_train_step
from sd3_jax.train.lora import create_lora_state
from sd3_jax.train.state import make_optimizer


def test_dpo_loss_closed_form():
    """-log sigmoid(-beta/2 [(mw - rw) - (ml - rl)]) at margins 0, ln 3, -ln 3 and a large one."""
    beta = 2.0
    ref_w = jnp.asarray([0.5, 0.5, 0.5, 1.0])
    ref_l = jnp.asarray([0.7, 0.7, 0.7, 1.0])
    # model_w - ref_w - (model_l - ref_l) = 0, -ln 3, +ln 3, -40 so the margin is 0, ln 3, -ln 3, 40.
    model_w = ref_w + jnp.asarray([0.1, -math.log(3), 0.0, -40.0])
    model_l = ref_l + jnp.asarray([0.1, 0.0, -math.log(3), 0.0])
    margin = dpo_margin(model_w, model_l, ref_w, ref_l, beta)
    np.testing.assert_allclose(margin, [0.0, math.log(3), -math.log(3), 40.0], rtol=1e-6, atol=1e-6)
    loss = dpo_loss(model_w, model_l, ref_w, ref_l, beta)
    # sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4, sigmoid(40) = 1 - 4.2e-18.
    np.testing.assert_allclose(loss, [math.log(2), math.log(4 / 3), math.log(4), math.exp(-40)], rtol=1e-5)
    # Swapping the preferred and the rejected image negates the margin.
    np.testing.assert_allclose(dpo_margin(model_l, model_w, ref_l, ref_w, beta), -margin, atol=1e-6)
    # d L / d e_theta^w = (beta / 2) sigmoid(-margin): at margin 0 it is beta / 4.
    g = jax.grad(lambda m: dpo_loss(m, model_l[:1], ref_w[:1], ref_l[:1], beta)[0])(model_w[:1])
    np.testing.assert_allclose(g, [beta / 4], rtol=1e-6)


def _cfg() -> TrainConfig:
    return TrainConfig(
        model=MMDiTConfig.tiny(depth=2),
        optim=OptimConfig(lr=1e-3),
        compute_dtype="float32",
        ema_decay=0.0,
        text_dropout=0.0,
        batch_size=2,
    )


def _pairs(seed=0) -> dict[str, jax.Array]:
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.standard_normal(s).astype(np.float32))
    return {
        "latents_w": f(2, 4, 4, 4),
        "latents_l": f(2, 4, 4, 4),
        "clip_l": f(2, 4, 8),
        "clip_g": f(2, 4, 8),
        "t5": f(2, 4, 24),
        "pooled_l": f(2, 8),
        "pooled_g": f(2, 12),
    }


def test_dpo_steps_increase_the_implicit_reward_margin():
    cfg = _cfg()
    r = np.random.default_rng(0)  # random N(0, 0.15^2) base params (compiling the flax init costs seconds)
    base = jax.tree.map(
        lambda s: (r.standard_normal(s.shape) * 0.15).astype(s.dtype), abstract_params(cfg.model)
    )
    tx = make_optimizer(cfg.optim, 20)
    state = create_lora_state(cfg, LoraConfig(rank=4), tx, make_mesh(cfg.mesh), jax.random.key(1))
    batch = _pairs()
    beta = 50.0
    t = jnp.asarray([0.35, 0.65])
    noise = jax.random.normal(jax.random.key(2), batch["latents_w"].shape)
    terms = jax.jit(lambda lora: dpo_terms(cfg, lora, base, batch, t, noise, beta)[1])
    m0 = terms(state.params)
    # B = 0 at init: the policy is the reference, margin 0 and loss log 2 exactly.
    assert float(m0["reward_margin"]) == 0.0
    np.testing.assert_allclose(float(m0["loss"]), math.log(2), rtol=1e-6)
    step = jax.jit(functools.partial(dpo_train_step, cfg, tx, beta=beta), donate_argnums=0)
    for _ in range(8):
        state, m = step(state, batch, jax.random.key(3), base)
    m1 = terms(state.params)
    assert np.isfinite(float(m["loss"])) and int(state.step) == 8
    assert float(m1["reward_margin"]) > 0.5 and float(m1["loss"]) < math.log(2)
    assert float(m1["implicit_acc"]) == 1.0
    # The reference errors do not move: only the adapter trains.
    np.testing.assert_allclose(float(m1["ref_err_w"]), float(m0["ref_err_w"]), rtol=1e-6)


def test_dpo_sft_anchor():
    """The SFT anchor adds lambda * e_theta^w to the loss; with beta = 0 the DPO term has no gradient and a
    step is SFT alone: the error on the preferred images falls, more than on the rejected ones."""
    cfg = _cfg()
    r = np.random.default_rng(0)
    base = jax.tree.map(
        lambda s: (r.standard_normal(s.shape) * 0.15).astype(s.dtype), abstract_params(cfg.model)
    )
    tx = make_optimizer(cfg.optim, 20)
    state = create_lora_state(cfg, LoraConfig(rank=4), tx, make_mesh(cfg.mesh), jax.random.key(1))
    batch, t = _pairs(), jnp.asarray([0.35, 0.65])
    noise = jax.random.normal(jax.random.key(2), batch["latents_w"].shape)
    loss, m = dpo_terms(cfg, state.params, base, batch, t, noise, 50.0, 0.5)
    # B = 0: policy = reference, so the loss is log 2 + 0.5 * e_ref^w.
    np.testing.assert_allclose(float(loss), math.log(2) + 0.5 * float(m["ref_err_w"]), rtol=1e-6)
    np.testing.assert_allclose(float(m["dpo_loss"]), math.log(2), rtol=1e-6)
    grads = jax.grad(lambda lora: dpo_terms(cfg, lora, base, batch, t, noise, 0.0, 0.0)[0])(state.params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    step = jax.jit(functools.partial(dpo_train_step, cfg, tx, beta=0.0, sft_weight=1.0), donate_argnums=0)
    for _ in range(30):
        state, m = step(state, batch, jax.random.key(3), base)
    _, m1 = dpo_terms(cfg, state.params, base, batch, t, noise, 0.0, 1.0)
    fit_w = float(m1["model_err_w"]) / float(m1["ref_err_w"])
    assert fit_w < 0.98 and fit_w < float(m1["model_err_l"]) / float(m1["ref_err_l"])
    assert float(m1["dpo_loss"]) == pytest.approx(math.log(2))


def test_pairs_source_reads_latents_images_and_text(tmp_path):
    r = np.random.default_rng(0)
    for name in ("w0", "l0", "l1"):
        np.save(tmp_path / f"{name}.npy", r.standard_normal((8, 8, 4)).astype(np.float32))
    text = {k: r.standard_normal(s).astype(np.float32) for k, s in dict(
        clip_l=(4, 8), clip_g=(4, 8), t5=(4, 24), pooled_l=(8,), pooled_g=(12,)
    ).items()}  # fmt: skip
    np.savez(tmp_path / "t0.npz", **text)
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "w1.png")
    rows = [
        {"caption": "a red circle", "chosen": "w0.npy", "rejected": "l0.npy", "text": "t0.npz"},
        {"caption": "a blue square", "chosen": "w1.png", "rejected": "l1.npy"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    seen = []
    encode_text = lambda c: seen.append(c) or {k: v + 1 for k, v in text.items()}
    encode_image = lambda im: np.full((8, 8, 4), im.mean() / 255, np.float32)
    src = PairsSource(path, encode_text=encode_text, encode_image=encode_image)
    assert len(src) == 2
    a, b = src[0], src[1]
    np.testing.assert_array_equal(a["latents_w"], np.load(tmp_path / "w0.npy"))
    np.testing.assert_array_equal(a["t5"], text["t5"])
    np.testing.assert_allclose(b["latents_w"], 200 / 255)
    np.testing.assert_array_equal(b["pooled_g"], text["pooled_g"] + 1)
    assert seen == ["a blue square"]
    batch = next(make_iterator(src, 2, seed=0, shuffle=False))
    assert batch["latents_l"].shape == (2, 8, 8, 4) and batch["clip_l"].shape == (2, 4, 8)

    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: chosen is an image; pass encode_image"):
        PairsSource(path, encode_text=encode_text)
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: no 'text' embeddings file; pass encode_text"):
        PairsSource(path, encode_image=encode_image)
    path.write_text(json.dumps({"caption": "x", "chosen": "w0.npy", "rejected": "gone.npy"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: rejected file .*gone\.npy does not exist"):
        PairsSource(path, encode_text=encode_text)
