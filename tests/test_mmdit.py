"""MMDiT parity with diffusers' SD3Transformer2DModel, layouts, parameter counts and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_MMDIT as TINY
from conftest import assert_close_rel, randomize_, torch_state_dict_numpy
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from sd3_jax.convert.mapping import CheckpointError
from sd3_jax.convert.mmdit import abstract_params, export_mmdit, load_mmdit
from sd3_jax.convert.safetensors_io import SafetensorsFile, write_safetensors
from sd3_jax.nn.embeddings import sincos_2d_table
from sd3_jax.nn.mmdit import MMDiT, MMDiTConfig

SD3_STYLE = dict(TINY)
SD35_STYLE = dict(TINY, qk_norm="rms_norm", dual_attention_layers=(0, 1))


def make_reference(config: dict, seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**config).eval()
    randomize_(model, seed)
    return model


def reference_velocity(model, x, t, ctx, pooled, skip_layers=None):
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(x).permute(0, 3, 1, 2),
            encoder_hidden_states=torch.from_numpy(ctx),
            pooled_projections=torch.from_numpy(pooled),
            timestep=torch.from_numpy(t) * 1000,
            skip_layers=skip_layers,
        ).sample
    return out.permute(0, 2, 3, 1).numpy()


def inputs(batch=3, h=10, w=6, seed=1):
    r = np.random.default_rng(seed)
    x = r.standard_normal((batch, h, w, 4)).astype(np.float32)
    t = np.linspace(0.05, 0.97, batch).astype(np.float32)
    ctx = r.standard_normal((batch, 7, 24)).astype(np.float32)
    pooled = r.standard_normal((batch, 20)).astype(np.float32)
    return x, t, ctx, pooled


@pytest.mark.parametrize("style", [SD3_STYLE, SD35_STYLE], ids=["sd3", "sd35"])
@pytest.mark.parametrize("skip", [None, (1,), (0, 2)], ids=["noskip", "skip1", "skip02"])
def test_parity_with_diffusers(style, skip):
    """fp32 velocity vs diffusers, batch 3, non-square 10x6 latents, three timesteps: <= 1e-5 x max|ref|."""
    ref = make_reference(style)
    cfg, params = load_mmdit(torch_state_dict_numpy(ref), num_heads=2)
    assert cfg.qk_norm == ("qk_norm" in style) and cfg.dual_attention_layers == style.get(
        "dual_attention_layers", ()
    )
    x, t, ctx, pooled = inputs()
    ours = jax.jit(lambda p, *a: MMDiT(cfg).apply({"params": p}, *a, skip_layers=skip or ()))(
        params, x, t, ctx, pooled
    )
    assert_close_rel(ours, reference_velocity(ref, x, t, ctx, pooled, list(skip) if skip else None), 1e-5)


def test_position_table_matches_diffusers_buffer():
    ref = make_reference(SD35_STYLE)
    ours = sincos_2d_table(32, 12, base_size=8 // 2)
    np.testing.assert_allclose(ours, ref.pos_embed.pos_embed.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("style", [SD3_STYLE, SD35_STYLE], ids=["sd3", "sd35"])
def test_sai_export_round_trips_through_diffusers_converter(style):
    """Our Stability-layout export maps back, through diffusers' own converter, to the exact state dict."""
    ref = make_reference(style)
    sd = torch_state_dict_numpy(ref)
    cfg, params = load_mmdit(sd, num_heads=2)
    sai = export_mmdit(params, cfg, "sai")
    assert all(k.startswith("model.diffusion_model.") for k in sai)
    back = convert_sd3_transformer_checkpoint_to_diffusers({k: torch.from_numpy(v) for k, v in sai.items()})
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k].numpy(), v, err_msg=k)
    # Both layouts, with and without the prefix, load to identical params.
    for source in (sai, {k.removeprefix("model.diffusion_model."): v for k, v in sai.items()}):
        cfg2, params2 = load_mmdit(source, num_heads=2)
        assert cfg2 == cfg
        jax.tree.map(np.testing.assert_array_equal, params2, params)
    # And the diffusers export is the original state dict.
    dif = export_mmdit(params, cfg, "diffusers")
    assert sorted(dif) == sorted(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(dif[k], v, err_msg=k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_safetensors_read_without_torch(tmp_path, dtype):
    from safetensors.torch import save_file

    ref = make_reference(SD3_STYLE).to(dtype)
    path = tmp_path / "sd3.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in convert_sai(ref).items()}, str(path))
    with SafetensorsFile(path) as f:
        for k in f.keys()[:5]:
            want = convert_sai(ref)[k.removeprefix("model.diffusion_model.")]
            got = f.read(k)
            assert got.dtype.itemsize == want.element_size()
            np.testing.assert_array_equal(got.astype(np.float32), want.float().numpy())
    cfg, params = load_mmdit(path, num_heads=2)
    leaves = jax.tree.leaves(params)
    np_dtype = {torch.bfloat16: jnp.bfloat16, torch.float16: np.float16, torch.float32: np.float32}[dtype]
    assert all(leaf.dtype == np_dtype for leaf in leaves)
    _, params32 = load_mmdit(path, dtype=np.float32, num_heads=2)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params32))
    x, t, ctx, pooled = inputs(batch=1)
    out = MMDiT(cfg).apply({"params": params}, *(jnp.asarray(a, np_dtype) for a in (x, t, ctx, pooled)))
    assert out.dtype == np_dtype


def test_fp16_file_loaded_as_bf16_equals_torchs_cast(tmp_path):
    """The cast rides on the layout copy (tiled where the weight is transposed): an fp16 file loaded as
    bf16 is bit for bit the file torch casts to bf16, loaded as it is."""
    from safetensors.torch import save_file

    from sd3_jax.convert.mapping import _copy

    w = torch.randn(700, 300, dtype=torch.float16) * 3  # big enough for tiles, not a multiple of them
    dst = np.empty((300, 700), jnp.bfloat16)
    _copy(dst, w.numpy().T)
    np.testing.assert_array_equal(
        dst.view(np.uint16), w.T.contiguous().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    )
    sd = {"model.diffusion_model." + k: v for k, v in convert_sai(make_reference(SD3_STYLE).half()).items()}
    save_file(sd, str(tmp_path / "fp16.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(tmp_path / "bf16.safetensors"))
    _, cast = load_mmdit(tmp_path / "fp16.safetensors", dtype=jnp.bfloat16, num_heads=2)
    _, kept = load_mmdit(tmp_path / "bf16.safetensors", num_heads=2)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(cast), jax.tree.leaves(kept)):
        assert a.dtype == b.dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16), str(path))


def convert_sai(ref) -> dict:
    """Stability-layout torch tensors of a diffusers model, via our exporter (dtype kept)."""
    sd = {k: v.float().numpy() for k, v in ref.state_dict().items()}
    cfg, params = load_mmdit(sd, num_heads=2)
    dtype = next(iter(ref.state_dict().values())).dtype
    return {k: torch.from_numpy(v).to(dtype) for k, v in export_mmdit(params, cfg, "sai", prefix="").items()}


def test_diffusers_folder_and_config_json(tmp_path):
    ref = make_reference(SD35_STYLE)
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    cfg, params = load_mmdit(tmp_path)  # model folder: finds transformer/ and its config.json
    assert cfg.sample_size == 8 and cfg.pos_embed_max_size == 12 and cfg.num_heads == 2 and cfg.head_dim == 16
    x, t, ctx, pooled = inputs(batch=2, h=8, w=12)
    ours = MMDiT(cfg).apply({"params": params}, x, t, ctx, pooled)
    assert_close_rel(ours, reference_velocity(ref, x, t, ctx, pooled), 1e-5)


FULL = {
    "sd3_medium": (
        MMDiTConfig.sd3_medium,
        2_028_328_000,
        dict(num_layers=24, num_attention_heads=24, pos_embed_max_size=192),
    ),
    "sd35_medium": (
        MMDiTConfig.sd35_medium,
        2_243_171_520,
        dict(
            num_layers=24,
            num_attention_heads=24,
            pos_embed_max_size=384,
            qk_norm="rms_norm",
            dual_attention_layers=tuple(range(13)),
        ),
    ),
    "sd35_large": (
        MMDiTConfig.sd35_large,
        8_056_627_520,
        dict(num_layers=38, num_attention_heads=38, pos_embed_max_size=192, qk_norm="rms_norm"),
    ),
}


@pytest.mark.parametrize("name", FULL)
def test_full_preset_parameter_counts(name):
    """eval_shape of the presets gives diffusers' counts (position table excluded, a buffer there)."""
    preset, expected, dif_cfg = FULL[name]
    tree = abstract_params(preset())
    n = sum(
        int(np.prod(leaf.shape))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if jax.tree_util.keystr(path) != "['pos_embed']['pos_embed']"
    )
    assert n == expected
    with torch.device("meta"):
        dif = SD3Transformer2DModel(
            **dict(dif_cfg, caption_projection_dim=64 * dif_cfg["num_attention_heads"])
        )
    assert sum(p.numel() for p in dif.parameters()) == expected


def test_missing_and_unexpected_keys_are_named():
    sd = torch_state_dict_numpy(make_reference(SD3_STYLE))
    bad = dict(sd)
    del bad["transformer_blocks.1.attn.to_k.weight"]
    bad["transformer_blocks.1.attn.extra.weight"] = np.ones(3, np.float32)
    with pytest.raises(
        CheckpointError,
        match=r"missing 1 tensors: transformer_blocks\.1\.attn\.to_k\.weight.*"
        r"unexpected 1 tensors: transformer_blocks\.1\.attn\.extra\.weight",
    ):
        load_mmdit(bad, num_heads=2)


def test_shape_mismatch_names_tensor_and_both_shapes():
    sd = torch_state_dict_numpy(make_reference(SD3_STYLE))
    sd["transformer_blocks.0.ff.net.2.weight"] = np.ones((32, 100), np.float32)
    with pytest.raises(
        CheckpointError,
        match=r"transformer_blocks\.0\.ff\.net\.2\.weight \(32, 100\).*"
        r"expects transformer_blocks\.0\.ff\.net\.2\.weight \(32, 128\)",
    ):
        load_mmdit(sd, num_heads=2)


def test_not_an_mmdit_checkpoint():
    with pytest.raises(CheckpointError, match="not an SD3 MMDiT checkpoint"):
        load_mmdit({"encoder.conv_in.weight": np.ones((2, 2), np.float32)})


@pytest.mark.parametrize(
    "shape, msg",
    [
        ((1, 7, 8, 4), "multiples of the patch size 2"),
        ((1, 26, 8, 4), "largest allowed is 24x24"),
        ((1, 8, 8, 3), r"must be \(B, H, W, 4\)"),
    ],
)
def test_bad_latent_sizes(shape, msg):
    cfg = MMDiTConfig.tiny()
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(cfg))
    with pytest.raises(ValueError, match=msg):
        MMDiT(cfg).apply(
            {"params": params}, jnp.zeros(shape), jnp.zeros((1,)), jnp.zeros((1, 3, 24)), jnp.zeros((1, 20))
        )


def test_truncated_safetensors_is_reported(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": np.arange(100, dtype=np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(ValueError, match=r"x\.safetensors: truncated file: tensor 'a'"):
        load_mmdit(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        load_mmdit(path)
