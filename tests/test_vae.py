"""The SD3 autoencoder: parity with diffusers' AutoencoderKL, both checkpoint layouts, bad input, the SD3
preset's parameter count, and tiled decode.

Parity is fp32 at a tiny 16-latent-channel config (three levels, so there are two downsamplers, a width
change and a same-width level) with every torch param random: max|ours - diffusers| <= 1e-5 * max|diffusers|.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_rel, randomize_, torch_state_dict_numpy

from sd3_jax.convert.mapping import CheckpointError
from sd3_jax.convert.safetensors_io import write_safetensors
from sd3_jax.convert.vae import SAI_PREFIX, abstract_params, config_from_diffusers, export_vae, load_vae
from sd3_jax.nn.vae import VAE, VAEConfig, scale_latents, tile_plan, unscale_latents

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, latent_channels=16)


@pytest.fixture(scope="module")
def reference():
    """A diffusers AutoencoderKL at the tiny config, every param random, and its numpy state dict."""
    n = len(TINY["block_out_channels"])
    model = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609, **TINY,
    ).eval()  # fmt: skip
    randomize_(model, seed=0, std=0.1)
    return model, torch_state_dict_numpy(model)


@pytest.fixture(scope="module")
def loaded(reference):
    _, sd = reference
    return load_vae(sd, norm_groups=TINY["norm_num_groups"])


def test_parity_encode_decode(reference, loaded):
    model, _ = reference
    cfg, params = loaded
    assert cfg == VAEConfig(block_channels=(32, 64, 64), layers_per_block=2, norm_groups=8)
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 24, 40, 3)).astype(np.float32)  # batch 2, not square
    z = rng.standard_normal((2, 6, 10, 16)).astype(np.float32)
    with torch.no_grad():
        post = model.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
        ref_mean, ref_logvar = (t.numpy().transpose(0, 2, 3, 1) for t in (post.mean, post.logvar))
        ref_images = (
            model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)
        )
    vae = VAE(cfg)
    mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=VAE.encode))(params, images)
    out = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=VAE.decode))(params, z)
    assert mean.shape == (2, 6, 10, 16) and out.shape == (2, 24, 40, 3)
    assert_close_rel(mean, ref_mean, 1e-5, "encode mean")
    assert_close_rel(logvar, ref_logvar, 1e-5, "encode logvar")
    assert_close_rel(out, ref_images, 1e-5, "decode")


def test_scale_latents_roundtrip():
    cfg = VAEConfig.sd3()
    z = jnp.linspace(-3, 3, 7)
    np.testing.assert_allclose(scale_latents(z, cfg), (z - 0.0609) * 1.5305, rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(scale_latents(z, cfg), cfg), z, rtol=1e-6, atol=1e-6)


def test_layouts_roundtrip(reference, loaded, tmp_path):
    model, sd = reference
    cfg, params = loaded
    model.save_pretrained(tmp_path / "pipe" / "vae", safe_serialization=True)
    weights = tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors"
    for source in (tmp_path / "pipe" / "vae", tmp_path / "pipe", weights):  # config.json gives norm_groups
        cfg2, params2 = load_vae(source)
        assert cfg2 == cfg
        jax.tree.map(np.testing.assert_array_equal, params2, params)

    exported = export_vae(params, cfg)
    assert exported.keys() == sd.keys() and all(np.array_equal(exported[k], sd[k]) for k in sd)

    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sai = export_vae(params, cfg, layout="sai")
    assert not any(k.startswith(SAI_PREFIX) for k in sai)
    assert sai["decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    back = convert_ldm_vae_checkpoint(sai, dict(model.config))
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].shape == sd[k].shape and np.array_equal(back[k], sd[k]), k

    prefixed = export_vae(params, cfg, layout="sai", prefix=SAI_PREFIX)
    assert prefixed.keys() == {SAI_PREFIX + k for k in sai}
    single_file = tmp_path / "sd3_like.safetensors"  # other models' tensors beside the VAE, as in sd3_medium
    write_safetensors(
        single_file, {**prefixed, "model.diffusion_model.x_embedder.proj.bias": np.ones(4, np.float32)}
    )
    for source in (sai, prefixed, single_file):
        cfg3, params3 = load_vae(source, norm_groups=8)
        assert cfg3 == cfg
        jax.tree.map(np.testing.assert_array_equal, params3, params)

    _, half = load_vae(sd, dtype=np.float16, norm_groups=8)
    assert all(v.dtype == np.float16 for v in jax.tree.leaves(half))


def test_bad_input(reference, loaded):
    _, sd = reference
    key = "decoder.mid_block.attentions.0.to_q.bias"
    with pytest.raises(
        CheckpointError, match=r"missing 1 tensors: decoder\.mid_block\.attentions\.0\.to_q\.bias"
    ):
        load_vae({k: v for k, v in sd.items() if k != key}, norm_groups=8)
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensors: encoder\.extra\.weight"):
        load_vae({**sd, "encoder.extra.weight": np.zeros(3, np.float32)}, norm_groups=8)
    key = "decoder.mid_block.attentions.0.to_k.weight"
    with pytest.raises(CheckpointError, match=r"to_k\.weight \(64, 65\).*expects .*to_k\.weight \(64, 64\)"):
        load_vae({**sd, key: np.zeros((64, 65), np.float32)}, norm_groups=8)
    sai = export_vae(loaded[1], loaded[0], layout="sai")
    key = "encoder.mid.attn_1.v.weight"
    with pytest.raises(CheckpointError, match=r"v\.weight \(64, 64\).*expects .*v\.weight \(64, 64, 1, 1\)"):
        load_vae({**sai, key: np.zeros((64, 64), np.float32)}, norm_groups=8)
    with pytest.raises(CheckpointError, match="use_quant_conv=True"):
        config_from_diffusers({"use_quant_conv": True})
    with pytest.raises(CheckpointError, match="not an AutoencoderKL checkpoint"):
        load_vae({"foo.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="not divisible by norm_groups"):
        VAEConfig(block_channels=(48, 64), norm_groups=32)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        VAE(VAEConfig(block_channels=(32, 64, 64), norm_groups=8)).init(
            jax.random.key(0), jnp.zeros((1, 6, 8, 3))
        )


def test_sd3_param_count():
    cfg = VAEConfig.sd3()
    boxed = jax.eval_shape(lambda: VAE(cfg).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim for x in leaves)
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(cfg)))
    assert ours == 83_819_683
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
            use_quant_conv=False, use_post_quant_conv=False,
        )  # fmt: skip
    assert sum(p.numel() for p in ref.parameters()) == ours
    assert abstract_params(cfg)["decoder"]["up_0_resnet_2"]["conv2"]["kernel"].shape == (3, 3, 512, 512)
    assert cfg.factor == 8 and VAEConfig.tiny().factor == 2


def test_tile_plan_blends_to_identity():
    rng = np.random.default_rng(0)
    for n, tile, overlap in ((20, 12, 4), (24, 12, 4), (37, 16, 6), (9, 12, 4), (30, 10, 0)):
        starts, weights, total = tile_plan(n, tile, overlap, factor=4)
        t = min(tile, n)
        assert starts[0] == 0 and starts[-1] + t == n and total.min() > 0
        signal = rng.standard_normal(4 * n)
        blended = np.zeros(4 * n)
        for s, w in zip(starts, weights):
            blended[4 * s : 4 * (s + t)] += w * signal[4 * s : 4 * (s + t)]
        np.testing.assert_allclose(blended / total, signal, rtol=1e-6, atol=1e-6)
    starts, _, total = tile_plan(20, 12, 4, factor=4)
    assert starts == [0, 8] and np.allclose(total, 1.0)  # two tiles cross-fade to weight 1 exactly


def test_tiled_decode(reference, loaded):
    """Tiles see their own GroupNorm statistics, attention and zero padding, so tiling approximates the plain
    decode; with random weights nothing is local, so the error is judged against diffusers' own tiled_decode
    at the same tile and overlap on the same weights and latent (measured: ours 0.047, diffusers 0.081 of
    mean|image|): ours must be no worse, and under 8% of mean|image|."""
    model, _ = reference
    cfg, params = loaded
    vae = VAE(cfg)
    z = np.random.default_rng(2).standard_normal((1, 32, 32, 16)).astype(np.float32)
    full = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=VAE.decode))(params, z)
    tiled = jax.jit(lambda p, z: vae.apply({"params": p}, z, 24, 8, method=VAE.decode))(params, z)
    assert tiled.shape == full.shape == (1, 128, 128, 3) and tiled.dtype == full.dtype
    ours = float(jnp.mean(jnp.abs(tiled - full)))
    scale = float(jnp.mean(jnp.abs(full)))

    saved = model.tile_sample_min_size, model.tile_latent_min_size, model.tile_overlap_factor
    model.tile_sample_min_size, model.tile_latent_min_size, model.tile_overlap_factor = 96, 24, 8 / 24
    with torch.no_grad():
        theirs_tiled = model.tiled_decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy()
    model.tile_sample_min_size, model.tile_latent_min_size, model.tile_overlap_factor = saved
    theirs = float(np.mean(np.abs(theirs_tiled.transpose(0, 2, 3, 1) - np.asarray(full))))
    assert ours <= theirs and ours <= 0.08 * scale, (ours / scale, theirs / scale)

    trace = lambda tile: str(
        jax.make_jaxpr(lambda p, z: vae.apply({"params": p}, z, tile, 8, method=VAE.decode))(params, z)
    )
    assert trace(32) == trace(None)  # a tile that covers the latent is the plain decode


def test_tiled_decode_bounds_memory():
    """XLA's own buffer accounting: a 128x128 latent decoded in 32x32 tiles needs far less scratch."""
    cfg = VAEConfig.tiny()
    params, z = abstract_params(cfg), jax.ShapeDtypeStruct((1, 128, 128, 16), jnp.float32)
    temp = {}
    for tile in (None, 32):
        fn = jax.jit(lambda p, z, tile=tile: VAE(cfg).apply({"params": p}, z, tile, 8, method=VAE.decode))
        temp[tile] = fn.lower(params, z).compile().memory_analysis().temp_size_in_bytes
    assert temp[32] * 4 < temp[None], temp


def test_bf16_compute_follows_dtype():
    cfg = VAEConfig.tiny()
    params = nn.meta.unbox(jax.jit(VAE(cfg).init)(jax.random.key(0), jnp.zeros((1, 2, 2, 3))))["params"]
    x = jax.random.uniform(jax.random.key(1), (2, 16, 24, 3), minval=-1, maxval=1)
    ref, _ = jax.jit(lambda p, x: VAE(cfg).apply({"params": p}, x, method=VAE.encode))(params, x)
    bf16 = VAE(cfg, dtype=jnp.bfloat16)
    mean, logvar = jax.jit(lambda p, x: bf16.apply({"params": p}, x, method=VAE.encode))(
        params, x.astype(jnp.bfloat16)
    )
    assert mean.dtype == logvar.dtype == jnp.bfloat16
    assert_close_rel(mean.astype(jnp.float32), ref, 3e-2, "bf16 encode mean")
    z = jnp.zeros((1, 12, 12, 16), jnp.bfloat16)
    out = jax.jit(lambda p, z: bf16.apply({"params": p}, z, 8, 2, method=VAE.decode))(params, z)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 24, 24, 3)
