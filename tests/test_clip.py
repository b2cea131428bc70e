"""CLIP text encoder: parity with transformers at tiny configs (fp32, tolerance 1e-5 x max|ref|), every
checkpoint layout load_clip reads, exports, and the full presets' shapes and parameter counts at no memory."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from conftest import assert_close_rel, randomize_, torch_state_dict_numpy
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd3_jax.convert.mapping import CheckpointError, open_tensors, source_shapes
from sd3_jax.convert.safetensors_io import write_safetensors
from sd3_jax.convert.text_encoders import (
    clip_abstract,
    clip_config_from,
    clip_rules,
    count_params,
    export_clip,
    load_clip,
)
from sd3_jax.nn.clip import CLIPConfig, CLIPTextEncoder

EOS = 98


def hf_config(cfg: CLIPConfig) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_length,
        hidden_act=cfg.act,
        projection_dim=cfg.projection_dim or cfg.width,
        layer_norm_eps=cfg.eps,
        eos_token_id=cfg.eos_token_id,
        bos_token_id=0,
        pad_token_id=1,
    )


def make_hf(cfg: CLIPConfig, seed: int = 0):
    cls = CLIPTextModelWithProjection if cfg.projection_dim is not None else CLIPTextModel
    model = cls(hf_config(cfg)).eval()
    randomize_(model, seed=seed)
    return model


def padded_batch(cfg: CLIPConfig, length: int = 12):
    """Three right-padded prompts of different lengths, EOS at the end of each (pad is EOS in the first)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(2, cfg.vocab_size - 2, (3, length))
    mask = np.ones_like(ids)
    for b, n in enumerate((5, 9, length - 1)):
        ids[b, n] = cfg.eos_token_id
        ids[b, n + 1 :] = cfg.eos_token_id if b == 0 else 1
        mask[b, n + 1 :] = 0
    return ids, mask


def run_ours(cfg, params, ids, mask=None):
    fn = jax.jit(lambda p, i, m: CLIPTextEncoder(cfg).apply({"params": p}, i, m))
    return fn(params, ids, mask)


@pytest.mark.parametrize("act,projection", [("quick_gelu", 24), ("gelu", 24), ("gelu", None)])
def test_parity_with_transformers(act, projection):
    """last_hidden_state, pooled, text_embeds and every hidden state vs transformers, padded batch."""
    cfg = CLIPConfig.tiny(act=act, projection_dim=projection, eos_token_id=EOS)
    model = make_hf(cfg)
    _, params = load_clip(torch_state_dict_numpy(model), config=cfg)
    ids, mask = padded_batch(cfg)
    text = model.text_model if projection else model
    with torch.no_grad():
        ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
        pooled = text(torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output
    out = run_ours(cfg, params, ids, mask)
    assert_close_rel(out.last_hidden_state, ref.last_hidden_state.numpy(), what="last_hidden_state")
    assert_close_rel(out.pooled, pooled.numpy(), what="pooled")
    assert_close_rel(out.hidden_states, torch.stack(ref.hidden_states).numpy(), what="hidden_states")
    assert out.hidden_states.shape[0] == cfg.layers + 1
    if projection:
        assert_close_rel(out.text_embeds, ref.text_embeds.numpy(), what="text_embeds")
    else:
        assert out.text_embeds is None


def test_legacy_eos_argmax():
    """eos_token_id == 2 pools at the largest id, as transformers keeps for old configs."""
    cfg = CLIPConfig.tiny(eos_token_id=2)
    model = make_hf(cfg, seed=1)
    _, params = load_clip(torch_state_dict_numpy(model), config=cfg)
    ids = np.random.default_rng(3).integers(3, cfg.vocab_size - 1, (2, 10))
    ids[0, 4], ids[1, 7] = cfg.vocab_size - 1, cfg.vocab_size - 1
    with torch.no_grad():
        ref = model.text_model(torch.tensor(ids)).pooler_output.numpy()
    assert_close_rel(run_ours(cfg, params, ids).pooled, ref, what="pooled (argmax)")


def test_bf16_runs_close():
    cfg = CLIPConfig.tiny(eos_token_id=EOS)
    _, params = load_clip(torch_state_dict_numpy(make_hf(cfg)), config=cfg)
    ids, mask = padded_batch(cfg)
    ref = run_ours(cfg, params, ids, mask).hidden_states
    bf = jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), params)
    out = jax.jit(lambda p: CLIPTextEncoder(cfg, dtype=jax.numpy.bfloat16).apply({"params": p}, ids, mask))(
        bf
    )
    assert out.hidden_states.dtype == jax.numpy.bfloat16
    assert np.isfinite(np.asarray(out.hidden_states, np.float32)).all()
    assert_close_rel(np.asarray(out.hidden_states, np.float32), np.asarray(ref), rtol=3e-2, what="bf16")


# ---------------------------------------------------------------------------------------------------------
# Layouts. Sizes: width 128 so that the shape rule heads = width / 64 holds without a config.json.

FILE_CFG = CLIPConfig.tiny(width=128, heads=2, mlp_dim=160, projection_dim=128, eos_token_id=EOS)


def assert_same_params(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


def test_transformers_folders(tmp_path):
    """save_pretrained folders, also under a diffusers root (text_encoder/, text_encoder_2/); config wins."""
    cfg_l = CLIPConfig.tiny(eos_token_id=EOS)  # 4 heads on width 32: only config.json can say so
    cfg_g = CLIPConfig.tiny(act="gelu", layers=3, eos_token_id=EOS)
    hf_l, hf_g = make_hf(cfg_l, 0), make_hf(cfg_g, 1)
    hf_l.save_pretrained(tmp_path / "text_encoder")
    hf_g.save_pretrained(tmp_path / "text_encoder_2")
    for folder, which, cfg, hf in [
        ("text_encoder", "clip_l", cfg_l, hf_l),
        ("text_encoder_2", "clip_g", cfg_g, hf_g),
    ]:
        got_cfg, params = load_clip(tmp_path / folder)
        assert got_cfg == cfg
        got_cfg, params_root = load_clip(tmp_path, which=which)
        assert got_cfg == cfg
        assert_same_params(params, params_root)
        exported = export_clip(params, cfg)
        ref = torch_state_dict_numpy(hf)
        assert set(exported) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(exported[k], ref[k], err_msg=k)


def test_flattened_clip_text_model(tmp_path):
    """transformers >= 5.6 saves CLIPTextModel without the text_model. prefix; both read the same."""
    cfg = CLIPConfig.tiny(projection_dim=None, eos_token_id=EOS)
    hf = make_hf(cfg)
    hf.save_pretrained(tmp_path)
    got, params = load_clip(tmp_path)
    assert got == cfg
    ids, mask = padded_batch(cfg)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    assert_close_rel(run_ours(cfg, params, ids, mask).last_hidden_state, ref, what="flattened")
    assert set(export_clip(params, cfg, prefix="")) == set(torch_state_dict_numpy(hf))


def stability_clip(cfg: CLIPConfig, seed: int, projection: bool) -> dict[str, np.ndarray]:
    """Keys as in Stability's clip_l/clip_g files: `text_model.*`, clip_g adds `text_projection.weight`."""
    sd = torch_state_dict_numpy(make_hf(dataclasses.replace(cfg, projection_dim=cfg.width), seed))
    if not projection:
        del sd["text_projection.weight"]
    return sd


def test_separate_files(tmp_path):
    """clip_l.safetensors (with the old position_ids buffer) and clip_g.safetensors (with logit_scale)."""
    sd_l = stability_clip(FILE_CFG, 0, projection=False)
    sd_l["text_model.embeddings.position_ids"] = np.arange(FILE_CFG.max_length, dtype=np.int64)[None]
    sd_g = stability_clip(FILE_CFG, 1, projection=True)
    sd_g["logit_scale"] = np.array([4.6], np.float32)  # write_safetensors cannot store 0-d arrays yet
    write_safetensors(tmp_path / "clip_l.safetensors", sd_l)
    write_safetensors(tmp_path / "clip_g.safetensors", sd_g)
    cfg_l, params_l = load_clip(tmp_path / "clip_l.safetensors")
    cfg_g, params_g = load_clip(tmp_path / "clip_g.safetensors", which="clip_g")
    assert cfg_l == dataclasses.replace(FILE_CFG, projection_dim=None, eos_token_id=49407)
    assert cfg_g == dataclasses.replace(FILE_CFG, eos_token_id=49407)
    assert "text_projection" not in params_l
    for params, cfg, sd in [(params_l, cfg_l, sd_l), (params_g, cfg_g, sd_g)]:
        exported = export_clip(params, cfg)
        assert set(sd) - set(exported) <= {"text_model.embeddings.position_ids", "logit_scale"}
        for k, v in exported.items():
            np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_bundled_single_file(tmp_path):
    """Stability's single file: text_encoders.{clip_l,clip_g,t5xxl}.transformer.* next to the MMDiT."""
    from test_t5 import make_hf_t5

    from sd3_jax.convert.text_encoders import export_t5, load_t5
    from sd3_jax.nn.t5 import T5Config

    sd_l, sd_g = stability_clip(FILE_CFG, 0, False), stability_clip(FILE_CFG, 1, True)
    t5 = torch_state_dict_numpy(make_hf_t5(T5Config.tiny(d_model=128, heads=2, d_kv=64, max_distance=128)))
    bundle = {"model.diffusion_model.x_embedder.proj.weight": np.ones((4, 4), np.float32)}
    for name, sd in [("clip_l", sd_l), ("clip_g", sd_g), ("t5xxl", t5)]:
        bundle.update({f"text_encoders.{name}.transformer.{k}": v for k, v in sd.items()})
    path = tmp_path / "sd3_medium_incl_clips_t5xxlfp16.safetensors"
    write_safetensors(path, bundle)
    cfg_l, params_l = load_clip(path, which="clip_l")
    cfg_g, params_g = load_clip(path, which="clip_g")
    assert cfg_l.projection_dim is None and cfg_g.projection_dim == FILE_CFG.width
    for cfg_x, params_x, sd_x in ((cfg_l, params_l, sd_l), (cfg_g, params_g, sd_g)):
        exported = export_clip(params_x, cfg_x)
        assert exported.keys() == sd_x.keys()
        for k, v in exported.items():  # values, not only names: each tensor comes back bit for bit
            np.testing.assert_array_equal(v, sd_x[k], err_msg=k)
    cfg_t5, params_t5 = load_t5(path)
    assert cfg_t5.layers == 2 and cfg_t5.heads == 2 and cfg_t5.d_kv == 64
    for k, v in export_t5(params_t5, cfg_t5).items():
        np.testing.assert_array_equal(v, t5[k], err_msg=k)
    # A bundle without one encoder names what it holds.
    del_g = {k: v for k, v in bundle.items() if ".clip_g." not in k}
    write_safetensors(tmp_path / "no_g.safetensors", del_g)
    with pytest.raises(CheckpointError, match=r"no clip_g.*\['clip_l', 't5xxl'\]"):
        load_clip(tmp_path / "no_g.safetensors", which="clip_g")


def test_errors_name_missing_and_unexpected_keys():
    sd = stability_clip(FILE_CFG, 0, projection=True)
    missing = {k: v for k, v in sd.items() if k != "text_model.encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(
        CheckpointError, match=r"missing 1 tensors: text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"
    ):
        load_clip(missing)
    extra = {**sd, "text_model.encoder.layers.0.self_attn.lora_up.weight": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensors: .*lora_up\.weight"):
        load_clip(extra)
    bad = {**sd, "text_model.encoder.layers.0.mlp.fc1.bias": np.zeros(7, np.float32)}
    with pytest.raises(CheckpointError, match=r"shape mismatch.*fc1\.bias"):
        load_clip(bad)


# ---------------------------------------------------------------------------------------------------------
# Full presets, no memory.


@pytest.mark.parametrize("preset", ["clip_l", "clip_g"])
def test_presets_match_transformers(preset):
    """Parameter counts, tensor names and shapes of the full presets equal transformers' (meta device)."""
    cfg = getattr(CLIPConfig, preset)()
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(hf_config(cfg))
    abstract = clip_abstract(cfg)
    assert count_params(abstract) == sum(p.numel() for p in model.parameters())
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert source_shapes(clip_rules(cfg), abstract) == want
    inferred, prefix = clip_config_from(open_tensors(model.state_dict()))
    assert prefix == "text_model." and inferred == cfg


@pytest.mark.parametrize("preset", ["clip_l", "clip_g"])
def test_hf_config_roundtrip(tmp_path, preset):
    """Our config -> config.json (`hf_clip_config`) -> transformers' model -> its tensors and that JSON
    read back (`clip_config_from`) gives the same config, every field; the model has our tensor shapes."""
    from sd3_jax.convert.text_encoders import hf_clip_config

    cfg = getattr(CLIPConfig, preset)()
    (tmp_path / "config.json").write_text(json.dumps(hf_clip_config(cfg)))
    hf = CLIPTextConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(hf)
    back, prefix = clip_config_from(
        open_tensors(model.state_dict()), json.loads((tmp_path / "config.json").read_text())
    )
    assert back == cfg and prefix == "text_model."
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert source_shapes(clip_rules(cfg), clip_abstract(cfg)) == want
