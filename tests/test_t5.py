"""T5 encoder: parity with transformers' T5EncoderModel at tiny configs (fp32, tolerance 1e-5 x max|ref|),
relative position buckets, bf16 safety, the layouts load_t5 reads, exports and the XXL preset at no memory."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import assert_close_rel, randomize_, torch_state_dict_numpy
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from sd3_jax.convert.mapping import CheckpointError, open_tensors, source_shapes
from sd3_jax.convert.safetensors_io import write_safetensors
from sd3_jax.convert.text_encoders import (
    count_params,
    export_t5,
    load_t5,
    t5_abstract,
    t5_config_from,
    t5_rules,
)
from sd3_jax.nn.t5 import T5Config, T5Encoder, relative_position_buckets


def hf_config(cfg: T5Config) -> HFT5Config:
    ff = {"gelu_new": "gated-gelu", "relu": "gated-relu"}[cfg.act] if cfg.gated else cfg.act
    return HFT5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.layers,
        num_heads=cfg.heads,
        relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance,
        layer_norm_epsilon=cfg.eps,
        feed_forward_proj=ff,
        dropout_rate=0.0,
    )


def make_hf_t5(cfg: T5Config, seed: int = 0) -> T5EncoderModel:
    model = T5EncoderModel(hf_config(cfg)).eval()
    randomize_(model, seed=seed, std=0.2)
    return model


def batch(cfg: T5Config, length: int = 24):
    ids = np.random.default_rng(1).integers(2, cfg.vocab_size, (3, length))
    mask = np.ones_like(ids)
    mask[1, 15:], mask[2, 4:] = 0, 0
    ids[mask == 0] = 0
    return ids, mask


def run_ours(cfg, params, ids, mask=None, dtype=None, hidden=False):
    fn = jax.jit(
        lambda p: T5Encoder(cfg, dtype=dtype).apply({"params": p}, ids, mask, output_hidden_states=hidden)
    )
    return fn(params)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16), (16, 32)])
def test_relative_position_buckets(num_buckets, max_distance):
    """Our host-side buckets equal transformers' for every query/key pair of a 601-token sequence."""
    pos = torch.arange(601)
    ref = T5Attention._relative_position_bucket(pos[None, :] - pos[:, None], True, num_buckets, max_distance)
    np.testing.assert_array_equal(relative_position_buckets(601, 601, num_buckets, max_distance), ref.numpy())


@pytest.mark.parametrize("masked", [False, True])
def test_parity_with_transformers(masked):
    """Length 24 with 8 buckets and max distance 16, so exact, log-spaced and clipped buckets all occur."""
    cfg = T5Config.tiny()
    model = make_hf_t5(cfg)
    _, params = load_t5(torch_state_dict_numpy(model), config=cfg)
    ids, mask = batch(cfg)
    mask = mask if masked else None
    with torch.no_grad():
        tm = None if mask is None else torch.tensor(mask)
        ref = model(torch.tensor(ids), attention_mask=tm, output_hidden_states=True)
    out = run_ours(cfg, params, ids, mask, hidden=True)
    assert_close_rel(out.last_hidden_state, ref.last_hidden_state.numpy(), what="last_hidden_state")
    assert_close_rel(out.hidden_states, torch.stack(ref.hidden_states).numpy(), what="hidden_states")


def test_parity_ungated_relu():
    cfg = T5Config.tiny(gated=False, act="relu")
    model = make_hf_t5(cfg, seed=2)
    _, params = load_t5(torch_state_dict_numpy(model), config=cfg)
    ids, _ = batch(cfg)
    with torch.no_grad():
        ref = model(torch.tensor(ids)).last_hidden_state.numpy()
    assert_close_rel(run_ours(cfg, params, ids).last_hidden_state, ref, what="relu T5")


def test_bf16_finite_and_close():
    """bf16 weights and compute, `wo` scaled up so the residual stream reaches the hundreds: no inf/nan,
    within 5e-2 x max|fp32| of our fp32 run, and no further from it than transformers' bf16 run (wo fp32)."""
    cfg = T5Config.tiny(layers=4)
    model = T5EncoderModel(hf_config(cfg)).eval()
    randomize_(model, seed=3, std=0.1)
    with torch.no_grad():
        for blk in model.encoder.block:
            blk.layer[1].DenseReluDense.wo.weight.mul_(300.0)
    _, params = load_t5(torch_state_dict_numpy(model), config=cfg)
    ids, mask = batch(cfg)
    ref = np.asarray(run_ours(cfg, params, ids, mask, hidden=True).hidden_states)
    assert np.abs(ref).max() > 100
    bf = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    out = run_ours(cfg, bf, ids, mask, dtype=jnp.bfloat16, hidden=True)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    got = np.asarray(out.hidden_states, np.float32)
    assert np.isfinite(got).all()
    model = model.to(torch.bfloat16)
    for blk in model.encoder.block:
        blk.layer[1].DenseReluDense.wo.float()
    with torch.no_grad():
        hf = model(
            torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True
        ).hidden_states
    hf = torch.stack(hf).float().numpy()
    ours_err = assert_close_rel(got, ref, rtol=5e-2, what="bf16 hidden_states")
    hf_err = np.abs(hf - ref).max() / np.abs(ref).max()
    assert ours_err <= 1.25 * hf_err + 1e-3, (ours_err, hf_err)


# ---------------------------------------------------------------------------------------------------------
# Layouts.


def test_transformers_folder_and_diffusers_root(tmp_path):
    """save_pretrained folder; config.json gives max_distance (not in the shapes); also as text_encoder_3/."""
    cfg = T5Config.tiny()
    model = make_hf_t5(cfg)
    model.save_pretrained(tmp_path / "text_encoder_3")
    got, params = load_t5(tmp_path / "text_encoder_3")
    assert got == cfg
    got_root, params_root = load_t5(tmp_path)
    assert got_root == cfg
    ref = torch_state_dict_numpy(model)
    exported = export_t5(params_root, cfg)
    assert set(ref) - set(exported) == {"encoder.embed_tokens.weight"}
    for k, v in exported.items():
        np.testing.assert_array_equal(v, ref[k], err_msg=k)
    ids, mask = batch(cfg)
    with torch.no_grad():
        want = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    assert_close_rel(run_ours(got, params, ids, mask).last_hidden_state, want, what="loaded folder")


def test_separate_file_with_and_without_tied_copy(tmp_path):
    """t5xxl_fp16.safetensors style: shared.weight and/or encoder.embed_tokens.weight; fp16 kept, or cast."""
    cfg = T5Config.tiny(max_distance=128)
    sd = {k: v.astype(np.float16) for k, v in torch_state_dict_numpy(make_hf_t5(cfg)).items()}
    write_safetensors(tmp_path / "t5xxl_fp16.safetensors", sd)
    got, params = load_t5(tmp_path / "t5xxl_fp16.safetensors")
    assert got == cfg
    assert params["layers"]["wo"]["kernel"].dtype == np.float16
    only_tied = {k: v for k, v in sd.items() if k != "shared.weight"}
    got2, params2 = load_t5(only_tied, dtype=np.float32)
    assert got2 == cfg and params2["shared"]["embedding"].dtype == np.float32
    np.testing.assert_array_equal(params2["shared"]["embedding"], sd["shared.weight"].astype(np.float32))


def test_errors_name_missing_and_unexpected_keys():
    cfg = T5Config.tiny(max_distance=128)
    sd = torch_state_dict_numpy(make_hf_t5(cfg))
    missing = {k: v for k, v in sd.items() if k != "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"}
    with pytest.raises(
        CheckpointError, match=r"missing 1 tensors: encoder\.block\.1\.layer\.1\.DenseReluDense"
    ):
        load_t5(missing)
    extra = {**sd, "decoder.block.0.layer.0.SelfAttention.q.weight": sd["shared.weight"][:4]}
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensors: decoder\.block\.0"):
        load_t5(extra)


def test_xxl_preset_matches_transformers():
    """Parameter count (4.76B), tensor names and shapes of T5 v1.1 XXL equal transformers' (meta device)."""
    cfg = T5Config.t5_xxl()
    with torch.device("meta"):
        model = T5EncoderModel(hf_config(cfg))
    abstract = t5_abstract(cfg)
    assert count_params(abstract) == sum(p.numel() for p in model.parameters()) == 4_762_310_656
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    del want["encoder.embed_tokens.weight"]  # tied to shared.weight
    assert source_shapes(t5_rules(cfg), abstract) == want
    assert t5_config_from(open_tensors(model.state_dict())) == cfg
    assert dataclasses.replace(cfg) == T5Config()


def test_every_param_is_logically_partitioned():
    """T5 XXL and CLIP-G params all carry logical axis names that the sharding table maps to mesh axes."""
    import flax.linen as nn

    from sd3_jax.nn.clip import CLIPConfig, CLIPTextEncoder
    from sd3_jax.sharding.rules import LOGICAL_AXIS_RULES

    boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)
    for model, length in [(T5Encoder(T5Config.t5_xxl()), 8), (CLIPTextEncoder(CLIPConfig.clip_g()), 77)]:
        ids = jnp.zeros((1, length), jnp.int32)
        params = jax.eval_shape(lambda i, m=model: m.init(jax.random.key(0), i), ids)["params"]
        for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=boxed):
            assert boxed(leaf), jax.tree_util.keystr(path)
            assert len(leaf.names) == len(leaf.value.shape), jax.tree_util.keystr(path)
            spec = nn.logical_to_mesh_axes(leaf.names, LOGICAL_AXIS_RULES)
            used = [a for a in spec if a is not None]
            assert len(used) == len(set(used)), (jax.tree_util.keystr(path), spec)
        assert params["layers"]["q"]["kernel"].names == ("layers", "embed", "heads", "kv")


def test_fp8_file_is_upcast_as_torch_does(tmp_path):
    """t5xxl_fp8_e4m3fn.safetensors (what ComfyUI users have): every weight comes back as torch's own
    upcast of the fp8 tensor (`.to(torch.bfloat16)`), bit for bit, whatever dtype is asked; the encoder
    with those weights matches transformers' with the same weights. A scaled fp8 file is refused."""
    cfg = T5Config.tiny(max_distance=128)
    model = make_hf_t5(cfg)
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in model.state_dict().items()}
    sd = {k: v.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn) for k, v in fp8.items()}
    write_safetensors(tmp_path / "t5xxl_fp8_e4m3fn.safetensors", sd)
    got, params = load_t5(tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    assert got == cfg
    upcast = {k: v.to(torch.bfloat16) for k, v in fp8.items()}
    want = upcast["encoder.block.0.layer.1.DenseReluDense.wo.weight"].float().numpy().T
    wo = params["layers"]["wo"]["kernel"]
    assert wo.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(wo[0], np.float32), want)
    _, params32 = load_t5(tmp_path / "t5xxl_fp8_e4m3fn.safetensors", dtype=np.float32)
    model.load_state_dict({k: v.float() for k, v in upcast.items()})
    ids, mask = batch(cfg)
    with torch.no_grad():
        ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    assert_close_rel(run_ours(cfg, params32, ids, mask).last_hidden_state, ref, what="fp8 T5")
    scaled = {**sd, "scaled_fp8": np.zeros(2, ml_dtypes.float8_e4m3fn)}
    with pytest.raises(CheckpointError, match="scaled fp8 file"):
        load_t5(scaled)
