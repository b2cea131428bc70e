"""LoRA: identity at init, strengths, exact merge/unmerge, diffusers and kohya/ComfyUI parity, training."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_MMDIT as TINY
from conftest import assert_close_rel, randomize_, torch_state_dict_numpy
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from sd3_jax.convert.lora import export_lora_diffusers, import_lora, lora_to_diffusers
from sd3_jax.convert.mapping import CheckpointError
from sd3_jax.convert.mmdit import abstract_params, export_mmdit, load_mmdit
from sd3_jax.lora import (
    DEFAULT_TARGETS,
    Lora,
    LoraConfig,
    adapter_modules,
    apply_lora,
    init_lora,
    lora_logical_names,
    lora_mask,
    lora_targets,
    merge,
    unmerge,
)
from sd3_jax.nn.mmdit import MMDiT, MMDiTConfig
from sd3_jax.sharding.mesh import logical_to_spec, make_mesh
from sd3_jax.train.config import OptimConfig, TrainConfig
from sd3_jax.train.lora import create_lora_state, lora_train_step
from sd3_jax.train.state import make_optimizer

SD35_STYLE = dict(TINY, qk_norm="rms_norm", dual_attention_layers=(0, 1))
PEFT_TARGETS = [  # diffusers' SD3 LoRA scripts target these, plus the MLPs
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]  # fmt: skip
EVERY_LINEAR = DEFAULT_TARGETS + ("linear", "context_embedder", "proj_out", "timestep_1", "text_2")


def reference(config: dict, seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**config).eval()
    randomize_(model, seed)
    return model


def torch_velocity(model, x, t, ctx, pooled):
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(x).permute(0, 3, 1, 2),
            encoder_hidden_states=torch.from_numpy(ctx),
            pooled_projections=torch.from_numpy(pooled),
            timestep=torch.from_numpy(t) * 1000,
        ).sample
    return out.permute(0, 2, 3, 1).numpy()


def inputs(batch=2, h=8, w=6, seed=1):
    r = np.random.default_rng(seed)
    x = r.standard_normal((batch, h, w, 4)).astype(np.float32)
    t = np.linspace(0.1, 0.9, batch).astype(np.float32)
    return (
        x,
        t,
        r.standard_normal((batch, 5, 24)).astype(np.float32),
        r.standard_normal((batch, 20)).astype(np.float32),
    )


@functools.cache
def _forward(cfg: MMDiTConfig):
    return jax.jit(lambda p, *a: MMDiT(cfg).apply({"params": p}, *a))


def ours_velocity(cfg, params, adapters, x, t, ctx, pooled):
    return np.asarray(_forward(cfg)(apply_lora(params, adapters), x, t, ctx, pooled))


def random_lora(params, cfg: LoraConfig, seed: int, scale: float = 0.05) -> Lora:
    """An adapter with random a and b (b is zero at init, which would hide layout mistakes)."""
    lora = jax.eval_shape(lambda k: init_lora(k, params, cfg), jax.random.key(seed))
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(r.standard_normal(x.shape).astype(np.float32) * scale), lora)


@pytest.fixture(scope="module")
def tiny():
    """MMDiTConfig.tiny() with random N(0, 0.05^2) params (compiling the flax init would cost seconds)."""
    cfg = MMDiTConfig.tiny()
    r = np.random.default_rng(0)
    return cfg, jax.tree.map(
        lambda s: (r.standard_normal(s.shape) * 0.05).astype(s.dtype), abstract_params(cfg)
    )


# ---------------------------------------------------------------------------------------------------------
# The adapter tree and applying it.


def test_targets_and_shapes(tiny):
    cfg, params = tiny
    lora = jax.eval_shape(lambda k: init_lora(k, params, LoraConfig(rank=3)), jax.random.key(1))
    mods = {p: ab for p, ab in adapter_modules(lora.params)}
    # Blocks 0-1 are one segment (stacked, 2 layers); block 2 is the context-pre-only one (no to_add_out).
    assert ("blocks_0", "attn", "to_add_out") in mods and ("blocks_1", "attn", "to_add_out") not in mods
    assert ("blocks_1", "ff_context", "fc1") not in mods and ("blocks_1", "ff", "fc1") in mods
    assert mods[("blocks_0", "attn", "to_q")]["a"].shape == (2, 32, 3)
    assert mods[("blocks_0", "attn", "to_q")]["b"].shape == (2, 3, 2, 16)
    assert mods[("blocks_0", "attn", "to_out")]["a"].shape == (2, 2, 16, 3)
    assert mods[("blocks_0", "attn", "to_out")]["b"].shape == (2, 3, 32)
    assert lora.scaling == 16.0 / 3
    assert ("norm_out", "linear") in lora_targets(params, ["norm_out/linear"])
    with pytest.raises(ValueError, match=r"\['to_qq'\] match no dense module.*attn/to_q"):
        lora_targets(params, ["to_qq"])
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)


def test_zero_b_leaves_outputs_unchanged(tiny):
    """B = 0 at init: params and MMDiT outputs are unchanged, bit for bit."""
    cfg, params = tiny
    lora = init_lora(jax.random.key(1), params, LoraConfig(rank=4, alpha=8, targets=EVERY_LINEAR))
    ab = list(adapter_modules(lora.params))
    assert all(float(jnp.abs(x["b"]).max()) == 0 < float(jnp.abs(x["a"]).max()) for _, x in ab)
    bound = 1 / np.sqrt(32)  # peft's kaiming-uniform lora_A: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    a_q = np.asarray(lora.params["blocks_0"]["attn"]["to_q"]["a"])
    assert np.abs(a_q).max() <= bound and np.abs(a_q).max() > 0.8 * bound
    eff = apply_lora(params, [(lora, 1.0)])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(eff)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x, t, ctx, pooled = inputs()
    base = np.asarray(_forward(cfg)(params, x, t, ctx, pooled))
    np.testing.assert_array_equal(ours_velocity(cfg, params, [(lora, 1.0)], x, t, ctx, pooled), base)


def test_two_adapters_at_strengths_equal_the_manual_sum(tiny):
    cfg, params = tiny
    l1 = random_lora(params, LoraConfig(rank=4, alpha=8), 1)
    l2 = random_lora(params, LoraConfig(rank=2, alpha=1, targets=("to_q", "fc2", "proj_out")), 2)
    s1, s2 = 0.7, -1.3
    eff = jax.jit(lambda p, a, b, s, u: apply_lora(p, [(a, s), (b, u)]))(params, l1, l2, s1, s2)
    touched = set(l1.modules()) | set(l2.modules())
    for path in touched:
        w = np.asarray(functools.reduce(lambda d, k: d[k], path, params)["kernel"], np.float64)
        want = w.copy()
        for lora, s in ((l1, s1), (l2, s2)):
            for p, ab in adapter_modules(lora.params):
                if p == path:
                    a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
                    lead = 1 if path[0].startswith("blocks_") else 0
                    d = (
                        np.stack([np.tensordot(a[j], b[j], 1) for j in range(a.shape[0])])
                        if lead
                        else np.tensordot(a, b, 1)
                    )
                    want += s * lora.scaling * d
        got = functools.reduce(lambda d, k: d[k], path, eff)["kernel"]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6, err_msg="/".join(path))
    # Outside jit, untouched params are the base's own arrays (nothing copied).
    assert apply_lora(params, [(l2, s2)])["pos_embed"] is params["pos_embed"]


@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_merge_then_unmerge_restores_params_exactly(tiny, dtype):
    cfg, params = tiny
    base = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
    # A sizeable update (|D| ~ |W| / 3), so that plain subtraction often misses W.
    lora = random_lora(params, LoraConfig(rank=4, alpha=4, targets=EVERY_LINEAR), 3, scale=0.1)
    merged, residual = merge(base, lora, strength=0.8)
    eff = apply_lora(base, [(lora, 0.8)])
    # merge (numpy, float64 delta) and apply (jax) agree to rounding: fp32 to ~1e-6, bf16 to one ulp.
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=2**-7, atol=2**-7)
    for m, e in zip(jax.tree.leaves(merged), jax.tree.leaves(eff)):
        np.testing.assert_allclose(np.asarray(m, np.float32), np.asarray(e, np.float32), **tol)
    back = unmerge(merged, lora, strength=0.8, residual=residual)
    leaves = jax.tree_util.tree_leaves_with_path(base)
    for (path, w), v in zip(leaves, jax.tree.leaves(back)):
        assert v.dtype == w.dtype
        assert np.array_equal(np.asarray(v).view(np.uint8), w.view(np.uint8)), jax.tree_util.keystr(path)
    plain = unmerge(merged, lora, strength=0.8)
    inexact = sum(int(np.sum(a != b)) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(base)))
    stored = sum(len(i) for i, _ in residual.values())
    assert inexact == stored > 0  # the residual holds exactly the entries plain subtraction gets wrong
    total = sum(np.size(functools.reduce(lambda d, k: d[k], p, base)["kernel"]) for p in residual)
    assert stored < 0.5 * total


# ---------------------------------------------------------------------------------------------------------
# diffusers / peft layout.


def _pipeline(transformer) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


@pytest.mark.parametrize("style", [TINY, SD35_STYLE], ids=["sd3", "sd35"])
def test_export_loads_in_diffusers_with_the_same_output(style, tmp_path):
    """Ours with the adapter vs diffusers after `load_lora_weights` of our export: fp32, <= 1e-5 max|ref|."""
    ref = reference(style)
    cfg, params = load_mmdit(torch_state_dict_numpy(ref), num_heads=2)
    lora = random_lora(params, LoraConfig(rank=4, alpha=8, targets=EVERY_LINEAR), 4)
    file = export_lora_diffusers(lora, cfg, tmp_path)
    assert file.endswith("pytorch_lora_weights.safetensors")
    pipe = _pipeline(ref)
    pipe.load_lora_weights(str(tmp_path))
    x, t, ctx, pooled = inputs()
    want = torch_velocity(pipe.transformer, x, t, ctx, pooled)
    base = np.asarray(_forward(cfg)(params, x, t, ctx, pooled))
    assert np.abs(want - base).max() > 1e-2 * np.abs(base).max()  # the adapter does something
    assert_close_rel(ours_velocity(cfg, params, [(lora, 1.0)], x, t, ctx, pooled), want, 1e-5, "export")
    # Re-importing our own export gives the same effective params.
    eff_a, eff_b = apply_lora(params, [(lora, 1.0)]), apply_lora(params, [(import_lora(tmp_path, cfg), 1.0)])
    for a, b in zip(jax.tree.leaves(eff_a), jax.tree.leaves(eff_b)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_diffusers_saved_adapter_loads_into_ours(tmp_path):
    """peft on the torch model (alpha != r, read from diffusers' metadata), saved by diffusers, read by us."""
    from peft import LoraConfig as PeftConfig
    from peft.utils import get_peft_model_state_dict

    ref = reference(TINY)
    cfg, params = load_mmdit(torch_state_dict_numpy(ref), num_heads=2)
    peft_cfg = PeftConfig(
        r=4, lora_alpha=6, target_modules=PEFT_TARGETS + ["norm1.linear"], init_lora_weights="gaussian",
        rank_pattern={"ff.net.2": 2}, alpha_pattern={"ff.net.2": 5},
    )  # fmt: skip
    ref.add_adapter(peft_cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(ref),
        transformer_lora_adapter_metadata=ref.peft_config["default"].to_dict(),
    )
    lora = import_lora(tmp_path, cfg)
    assert lora.scaling == 1.0 and ("blocks_0", "norm1", "linear") in lora.modules()
    x, t, ctx, pooled = inputs()
    want = torch_velocity(ref, x, t, ctx, pooled)
    assert_close_rel(
        ours_velocity(cfg, params, [(lora, 1.0)], x, t, ctx, pooled), want, 1e-5, "diffusers->ours"
    )
    # The same adapter as a bare peft state dict of torch tensors (no metadata: alpha = r), at strength 0.5.
    sd = get_peft_model_state_dict(ref)
    lora2 = import_lora(sd, cfg)
    ref.set_adapters(["default"], weights=[0.5])
    for m in ref.modules():  # peft scaling = weight * alpha / r; the bare dict implies alpha = r
        if hasattr(m, "scaling") and isinstance(m.scaling, dict) and "default" in m.scaling:
            m.scaling["default"] = 0.5
    want2 = torch_velocity(ref, x, t, ctx, pooled)
    assert_close_rel(ours_velocity(cfg, params, [(lora2, 0.5)], x, t, ctx, pooled), want2, 1e-5, "bare")


# ---------------------------------------------------------------------------------------------------------
# kohya / ComfyUI layout (Stability names, fused qkv).


def _stability_lora(sai: dict[str, np.ndarray], seed: int, rank: int = 3) -> dict[str, tuple]:
    """(down (r, in), up (out, r), alpha) on every Stability Linear (fused qkv included), by weight name."""
    r = np.random.default_rng(seed)
    out = {}
    for k, w in sai.items():
        if k.endswith(".weight") and w.ndim == 2:
            down = (r.standard_normal((rank, w.shape[1])) * 0.2).astype(np.float32)
            up = (r.standard_normal((w.shape[0], rank)) * 0.2).astype(np.float32)
            out[k] = (down, up, np.asarray(r.uniform(0.5, 4.0), np.float32))
    return out


def _named(lora: dict[str, tuple], naming: str) -> dict[str, np.ndarray]:
    """kohya: lora_unet_<name with underscores>.lora_down/up; ComfyUI: diffusion_model.<name>.lora_A/B."""
    out = {}
    for k, (down, up, alpha) in lora.items():
        name = k[len("model.diffusion_model.") : -len(".weight")]
        if naming == "kohya":
            base, a, b = "lora_unet_" + name.replace(".", "_"), "lora_down", "lora_up"
        else:
            base, a, b = "diffusion_model." + name, "lora_A", "lora_B"
        out.update({f"{base}.{a}.weight": down, f"{base}.{b}.weight": up, f"{base}.alpha": alpha})
    return out


@pytest.mark.parametrize("naming", ["kohya", "comfy"])
def test_kohya_layout_matches_diffusers_conversion_of_the_merged_weights(naming):
    """Ours with an imported kohya/ComfyUI LoRA vs diffusers' Stability converter on kohya's merge of it.

    kohya merges W + (alpha / r) up @ down into the Stability-named weights (fused qkv, swapped adaLN halves
    of the last context block and final layer); diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`
    turns that into its model. fp32, <= 1e-5 x max|ref|.
    """
    ref = reference(SD35_STYLE)
    cfg, params = load_mmdit(torch_state_dict_numpy(ref), num_heads=2)
    sai = export_mmdit(params, cfg, "sai")
    lora = _stability_lora(sai, seed=6)
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in lora
    merged = dict(sai)
    for k, (down, up, alpha) in lora.items():
        merged[k] = (sai[k] + float(alpha) / down.shape[0] * up.astype(np.float64) @ down).astype(np.float32)
    oracle = SD3Transformer2DModel(**SD35_STYLE).eval()
    oracle.load_state_dict(
        convert_sd3_transformer_checkpoint_to_diffusers({k: torch.from_numpy(v) for k, v in merged.items()})
    )
    files = _named(lora, naming)
    assert ("lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight" in files) == (naming == "kohya")
    ours = import_lora(files, cfg)
    x, t, ctx, pooled = inputs()
    want = torch_velocity(oracle, x, t, ctx, pooled)
    assert_close_rel(ours_velocity(cfg, params, [(ours, 1.0)], x, t, ctx, pooled), want, 1e-5, naming)


def test_import_errors_name_the_keys(tiny):
    cfg, params = tiny
    lora = random_lora(params, LoraConfig(rank=2, targets=("to_q",)), 7)
    sd = lora_to_diffusers(lora, cfg)
    bad = dict(
        sd, **{"transformer.transformer_blocks.0.attn.to_zz.lora_A.weight": np.ones((2, 32), np.float32)}
    )
    with pytest.raises(CheckpointError, match=r"name no MMDiT linear layer: .*to_zz\.lora_A\.weight"):
        import_lora(bad, cfg)
    bad = dict(sd)
    del bad["transformer.transformer_blocks.1.attn.to_q.lora_B.weight"]
    with pytest.raises(
        CheckpointError, match=r"without both factors: transformer\.transformer_blocks\.1\.attn\.to_q"
    ):
        import_lora(bad, cfg)
    te = dict(
        sd, **{"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.ones((2, 4), np.float32)}
    )
    with pytest.raises(CheckpointError, match="ignore_text_encoders=True"):
        import_lora(te, cfg)
    assert import_lora(te, cfg, ignore_text_encoders=True).modules() == lora.modules()
    bad = dict(sd)
    bad["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = np.ones((31, 2), np.float32)
    with pytest.raises(
        CheckpointError, match=r"transformer_blocks\.0\.attn\.to_q: lora_A \(2, 32\), lora_B \(31, 2\)"
    ):
        import_lora(bad, cfg)


# ---------------------------------------------------------------------------------------------------------
# Training with the base frozen.


def _train_cfg(**kw) -> TrainConfig:
    base = dict(compute_dtype="float32", ema_decay=0.0, text_dropout=0.0, batch_size=2)
    return TrainConfig(optim=OptimConfig(lr=1e-2), **{**base, **kw})


def test_optimizer_state_holds_only_adapters(tiny):
    cfg, params = tiny
    tcfg = _train_cfg()
    lcfg = LoraConfig(rank=4)
    tx = make_optimizer(tcfg.optim, 10)
    mesh = make_mesh(tcfg.mesh)
    state = jax.eval_shape(lambda k: create_lora_state(tcfg, lcfg, tx, mesh, k), jax.random.key(0))
    adapter = sorted(x.shape for x in jax.tree.leaves(state.params))
    moments = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == sorted(adapter * 2)  # Adam's mu and nu, of the adapter only
    # The mask route: one tree of frozen base and adapter through make_optimizer's multi_transform.
    tree = {"base": params, "lora": state.params}
    mtx = make_optimizer(tcfg.optim, 10, mask=lora_mask(tree))
    n_state = sum(x.size for x in jax.tree.leaves(jax.eval_shape(mtx.init, tree)) if x.ndim > 0)
    assert n_state == 2 * sum(x.size for x in jax.tree.leaves(state.params))


def test_adapters_are_named_like_their_base_kernels(tiny):
    cfg, _ = tiny
    lora = jax.eval_shape(lambda k: init_lora(k, abstract_params(cfg), LoraConfig(rank=4)), jax.random.key(0))
    boxed = lora_logical_names(lora, abstract_params(cfg, boxed=True))
    q, o = boxed.params["blocks_0"]["attn"]["to_q"], boxed.params["blocks_0"]["attn"]["to_out"]
    assert q["a"].names == ("layers", "embed", None) and q["b"].names == ("layers", None, "heads", "kv")
    assert o["a"].names == ("layers", "heads", "kv", None) and o["b"].names == ("layers", None, "embed")

    class Mesh:  # logical_to_spec reads axis sizes only
        shape = {"data": 1, "fsdp": 2, "tensor": 2}

    spec = lambda x: tuple(logical_to_spec(x.names, x.value.shape, Mesh()))
    assert spec(q["a"]) == (None, "fsdp", None) and spec(q["b"]) == (None, None, "tensor", None)


MESH_WORKER = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from sd3_jax.lora import LoraConfig, apply_lora
from sd3_jax.train.lora import create_lora_state, lora_train_step
from sd3_jax.convert.mmdit import abstract_params
from sd3_jax.nn.mmdit import MMDiTConfig
from sd3_jax.sharding.mesh import MeshConfig, make_mesh, tree_shardings
from sd3_jax.train.config import OptimConfig, TrainConfig
from sd3_jax.train.loop import global_batch, mesh_context
from sd3_jax.train.state import make_optimizer
from sd3_jax.train.step import batch_loss

model = MMDiTConfig.tiny(depth=2, num_heads=4, head_dim=8)
r = np.random.default_rng(0)
f = lambda *s: r.standard_normal(s).astype(np.float32)
batch = dict(latents=f(4, 4, 4, 4), clip_l=f(4, 3, 8), clip_g=f(4, 3, 8), t5=f(4, 3, 24),
             pooled_l=f(4, 8), pooled_g=f(4, 12))
cfg = TrainConfig(model=model, mesh=MeshConfig(fsdp=2, tensor=2), optim=OptimConfig(lr=1e-2),
                  compute_dtype="float32", ema_decay=0.0, text_dropout=0.0, batch_size=4)
mesh = make_mesh(cfg.mesh)
tx = make_optimizer(cfg.optim, 4)
spec = lambda x: [s if s is None or isinstance(s, str) else list(s) for s in x.sharding.spec] + [None] * (
    x.ndim - len(x.sharding.spec))
with mesh_context(mesh):
    base = jax.tree.map(lambda s: (r.standard_normal(s.shape) * 0.15).astype(s.dtype), abstract_params(model))
    base = jax.device_put(base, tree_shardings(abstract_params(model, boxed=True), mesh))
    state = create_lora_state(cfg, LoraConfig(rank=4), tx, mesh, jax.random.key(1))
    step = jax.jit(lambda s, b, k, p: lora_train_step(cfg, tx, s, b, k, p), donate_argnums=0)
    gb = global_batch(mesh, batch)
    t, noise = jnp.asarray([0.2, 0.4, 0.6, 0.8]), jax.random.normal(jax.random.key(3), (4, 4, 4, 4))
    loss = lambda lora: jnp.mean(batch_loss(cfg, apply_lora(base, [(lora, 1.0)]), gb, t, noise, None))
    fixed = jax.jit(loss)
    before = float(fixed(state.params))
    for _ in range(8):
        state, m = step(state, gb, jax.random.key(2), base)
    after = float(fixed(state.params))
q = state.params.params["blocks_0"]["attn"]["to_q"]
mu = [x for x in jax.tree.leaves(state.opt_state) if x.shape == q["b"].shape]
res = dict(loss=float(m["loss"]), before=before, after=after, step=int(state.step), a=spec(q["a"]),
           b=spec(q["b"]), mu=[spec(x) for x in mu], base_q=spec(base["blocks_0"]["attn"]["to_q"]["kernel"]),
           n=len(q["b"].sharding.device_set))
json.dump(res, open(sys.argv[1], "w"))
"""


def test_adapters_train_sharded_like_the_base(tmp_path):
    """fsdp=2 x tensor=2 on 4 virtual CPU devices: adapters and their moments shard as the base kernels,
    and 8 steps of `lora_train_step` on a fixed batch lower its loss (fixed t and noise) by over 10%."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = tmp_path / "res.json"
    run = subprocess.run(
        [sys.executable, "-c", MESH_WORKER, str(out)], cwd=root, env=env, capture_output=True
    )
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    res = __import__("json").loads(out.read_text())
    assert np.isfinite(res["loss"]) and res["n"] == 4 and res["step"] == 8
    assert res["after"] < 0.9 * res["before"], (res["before"], res["after"])
    assert res["base_q"] == [None, "fsdp", "tensor", None]  # (layers, embed, heads, kv)
    assert res["a"] == [None, "fsdp", None]  # (layers, embed, rank)
    assert res["b"] == [None, None, "tensor", None]  # (layers, rank, heads, kv)
    assert res["mu"] and all(m == res["b"] for m in res["mu"])  # Adam's moments shard as their adapter


def test_images_match_diffusers_on_the_tiny_pipeline(tmp_path):
    """The done criterion, on the tiny pipeline (CFG 7, 4 Euler steps), max |diff| on [0, 1] pixels <= 0.005.

    An adapter trained by `lora_train_step`, exported, loaded by diffusers' `load_lora_weights`, samples
    the image sd3-jax samples with it applied; an adapter made by peft and saved by diffusers, imported,
    samples the image diffusers samples with it.
    """
    from peft import LoraConfig as PeftConfig
    from peft.utils import get_peft_model_state_dict
    from tiny_components import DIMS, make_tiny_sd3_pipeline

    from sd3_jax.cli import main
    from sd3_jax.pipeline import SD3Pipeline

    dif = make_tiny_sd3_pipeline(tmp_path / "dif", seed=0)
    args = [
        "convert",
        str(tmp_path / "dif"),
        "--out",
        str(tmp_path / "ckpt"),
        "--dtype",
        "fp32",
        "--no-progress",
    ]
    assert main(args) == 0
    pipe = SD3Pipeline.load(str(tmp_path / "ckpt"))
    cfg, base = pipe.transformer_config, pipe.transformer_params
    prompts = ["a photo of a cat", "an astronaut riding a horse on the moon"]
    lat = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(height=8, width=8, guidance_scale=7.0)

    def diffusers_images():
        return dif(prompts, num_inference_steps=4, latents=lat.clone(), output_type="np", **kw).images

    def our_images(adapters):
        # Adapters applied inside the jitted sampler, at their strengths, without merging.
        x = lat.permute(0, 2, 3, 1).numpy()
        return pipe.generate(
            prompts, steps=4, latents=x, output="float", progress=False, adapters=adapters, **kw
        )

    # Train an adapter in sd3-jax (zero B at init), export it, load it in diffusers.
    tcfg = TrainConfig(
        model=cfg, optim=OptimConfig(lr=2e-2), compute_dtype="float32", ema_decay=0.0, text_dropout=0.0
    )
    r = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(r.standard_normal(s).astype(np.float32))
    batch = dict(
        latents=f(2, 8, 8, 4), clip_l=f(2, 3, DIMS["clip_l"]), clip_g=f(2, 3, DIMS["clip_g"]),
        t5=f(2, 3, DIMS["t5"]), pooled_l=f(2, DIMS["clip_l"]), pooled_g=f(2, DIMS["clip_g"]),
    )  # fmt: skip
    tx = make_optimizer(tcfg.optim, 5)
    state = create_lora_state(tcfg, LoraConfig(rank=4, alpha=8), tx, make_mesh(tcfg.mesh), jax.random.key(0))
    step = jax.jit(functools.partial(lora_train_step, tcfg, tx))
    for _ in range(5):
        state, _ = step(state, batch, jax.random.key(1), base)
    plain = diffusers_images()
    export_lora_diffusers(state.params, cfg, tmp_path / "ours")
    dif.load_lora_weights(str(tmp_path / "ours"))
    want = diffusers_images()
    # The adapter's own effect on the image is at least 50 times the tolerance of the match.
    assert np.abs(want - plain).max() > 0.05, np.abs(want - plain).max()
    assert np.abs(our_images([(state.params, 1.0)]) - want).max() <= 1e-3

    # An adapter saved by diffusers (peft on its transformer, alpha != r), loaded into sd3-jax.
    dif.unload_lora_weights()
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    dif.transformer.add_adapter(PeftConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS[:8]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in dif.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "theirs",
        transformer_lora_layers=get_peft_model_state_dict(dif.transformer),
        transformer_lora_adapter_metadata=dif.transformer.peft_config["default"].to_dict(),
    )
    want = diffusers_images()
    assert np.abs(want - plain).max() > 0.05, np.abs(want - plain).max()
    theirs = import_lora(tmp_path / "theirs", cfg)
    assert np.abs(our_images([(theirs, 1.0)]) - want).max() <= 1e-3
