"""End to end: a tiny diffusers StableDiffusion3Pipeline, converted with `sd3-jax convert`, samples the
same images as diffusers from the same initial latents; conversion round trips; bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from tiny_components import make_tiny_sd3_pipeline

from sd3_jax.cli import main
from sd3_jax.pipeline import SD3Pipeline

PROMPT = ["a photo of a cat", "an astronaut riding a horse on the moon"]
SIZE = 8  # pixels: the tiny VAE has factor 1, the tiny transformer patch 1 and an 8x8 table


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    pipes = {}
    for with_t5 in (True, False):
        dif = root / f"diffusers_t5{int(with_t5)}"
        pipes[with_t5] = make_tiny_sd3_pipeline(dif, seed=0, with_t5=with_t5)
        assert (
            main(
                [
                    "convert",
                    str(dif),
                    "--out",
                    str(root / f"ckpt_t5{int(with_t5)}"),
                    "--dtype",
                    "fp32",
                    "--no-progress",
                ]
            )
            == 0
        )
    return root, pipes


def noise(n, seed=0, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 4, size, size), generator=g)


def ours(root, with_t5, **kw):
    pipe = SD3Pipeline.load(str(root / f"ckpt_t5{int(with_t5)}"))
    return pipe, pipe.generate(height=SIZE, width=SIZE, output="float", progress=False, **kw)


@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no_t5"])
@pytest.mark.parametrize("steps", [2, 4])
@pytest.mark.parametrize("guidance", [7.0, 1.0], ids=["cfg", "nocfg"])
def test_txt2img_matches_diffusers(tiny, with_t5, steps, guidance):
    root, pipes = tiny
    lat = noise(2)
    ref = pipes[with_t5](
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=lat.clone(),
        height=SIZE,
        width=SIZE,
        output_type="np",
    ).images
    _, got = ours(
        root,
        with_t5,
        prompt=PROMPT,
        steps=steps,
        guidance_scale=guidance,
        latents=lat.permute(0, 2, 3, 1).numpy(),
    )
    assert got.shape == ref.shape == (2, SIZE, SIZE, 3)
    assert np.abs(got - ref).max() <= 1e-3
    assert np.abs(ref - ref.mean()).max() > 0.01  # not a flat image


def test_skip_layer_guidance_matches_diffusers(tiny):
    root, pipes = tiny
    lat = noise(2, seed=3)
    kw = dict(skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.9)
    ref = pipes[True](
        PROMPT,
        num_inference_steps=4,
        guidance_scale=5.0,
        latents=lat.clone(),
        height=SIZE,
        width=SIZE,
        output_type="np",
        skip_guidance_layers=[0],
        **kw,
    ).images
    plain = pipes[True](
        PROMPT,
        num_inference_steps=4,
        guidance_scale=5.0,
        latents=lat.clone(),
        height=SIZE,
        width=SIZE,
        output_type="np",
    ).images
    _, got = ours(
        root,
        True,
        prompt=PROMPT,
        steps=4,
        guidance_scale=5.0,
        latents=lat.permute(0, 2, 3, 1).numpy(),
        skip_guidance_layers=[0],
        **kw,
    )
    assert np.abs(ref - plain).max() > 1e-3  # the guidance changes the image
    assert np.abs(got - ref).max() <= 1e-3


def test_img2img_matches_diffusers(tiny, monkeypatch):
    from diffusers import StableDiffusion3Img2ImgPipeline
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_img2img as mod

    root, pipes = tiny
    # sd3-jax encodes deterministically (the posterior mean); make diffusers do the same.
    orig = mod.retrieve_latents
    monkeypatch.setattr(
        mod,
        "retrieve_latents",
        lambda enc, generator=None, sample_mode="sample": orig(enc, generator, sample_mode="argmax"),
    )
    img2img = StableDiffusion3Img2ImgPipeline(**pipes[True].components)
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    g = torch.Generator().manual_seed(5)
    ref = img2img(
        PROMPT,
        image=torch.from_numpy(image).permute(0, 3, 1, 2),  # [0, 1]: diffusers maps it to [-1, 1]
        strength=0.6,
        num_inference_steps=5,
        guidance_scale=4.0,
        generator=g,
        output_type="np",
    ).images
    eps = torch.randn((2, 4, SIZE, SIZE), generator=torch.Generator().manual_seed(5))
    _, got = ours(
        root,
        True,
        prompt=PROMPT,
        steps=5,
        guidance_scale=4.0,
        image=image,
        strength=0.6,
        latents=eps.permute(0, 2, 3, 1).numpy(),
    )
    assert np.abs(got - ref).max() <= 1e-3


def _diffusers_inpaint(pipes, monkeypatch):
    """StableDiffusion3InpaintPipeline over the tiny components, encoding the posterior mean as sd3-jax
    does."""
    from diffusers import StableDiffusion3InpaintPipeline
    from diffusers.configuration_utils import FrozenDict
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_inpaint as mod

    orig = mod.retrieve_latents
    monkeypatch.setattr(
        mod,
        "retrieve_latents",
        lambda enc, generator=None, sample_mode="sample": orig(enc, generator, sample_mode="argmax"),
    )
    inpaint = StableDiffusion3InpaintPipeline(**pipes[True].components)
    # It takes 16 (or 33) channels for SD3's VAE; the tiny VAE has 4, which nothing but this check reads.
    cfg = inpaint.transformer._internal_dict
    monkeypatch.setattr(inpaint.transformer, "_internal_dict", FrozenDict({**cfg, "in_channels": 16}))
    return inpaint


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpaint_matches_diffusers(tiny, monkeypatch, strength):
    """`generate(image=, mask_image=)` against StableDiffusion3InpaintPipeline on the same noise. diffusers'
    inpaint pipeline decodes without adding the VAE's shift_factor back (its txt2img and img2img pipelines
    add it), so its latents are taken and decoded as those pipelines decode."""
    from PIL import Image

    root, pipes = tiny
    inpaint = _diffusers_inpaint(pipes, monkeypatch)
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    mask = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))  # greys: binarized at 0.5
    kw = dict(num_inference_steps=5, guidance_scale=4.0, strength=strength)
    z = inpaint(
        PROMPT,
        image=torch.from_numpy(image).permute(0, 3, 1, 2),
        mask_image=mask,
        generator=torch.Generator().manual_seed(5),
        output_type="latent",
        **kw,
    ).images
    vae = pipes[True].vae
    with torch.no_grad():
        ref = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
    ref = pipes[True].image_processor.postprocess(ref, output_type="np")
    eps = torch.randn((2, 4, SIZE, SIZE), generator=torch.Generator().manual_seed(5))
    args = dict(prompt=PROMPT, steps=5, guidance_scale=4.0, image=image, strength=strength)
    args["latents"] = eps.permute(0, 2, 3, 1).numpy()
    pipe, got = ours(root, True, mask_image=mask, **args)
    assert np.abs(got - ref).max() <= 5e-3, np.abs(got - ref).max()
    plain = pipe.generate(height=SIZE, width=SIZE, output="float", progress=False, **args)
    assert np.abs(plain - ref).max() > 0.02  # the mask matters


def test_padding_mask_crop_matches_diffusers(tiny, monkeypatch):
    """`generate(image=, mask_image=, padding_mask_crop=)` against StableDiffusion3InpaintPipeline with
    `padding_mask_crop` on the same noise: a 24x14 picture, a grey-edged blob in it, the box around it sampled
    at 8x8 and pasted back. diffusers' decode gets the VAE's shift_factor back, as its txt2img pipeline
    decodes (see test_inpaint_matches_diffusers)."""
    from PIL import Image

    root, pipes = tiny
    inpaint = _diffusers_inpaint(pipes, monkeypatch)
    vae = inpaint.vae
    dec = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z, **kw: dec(z + vae.config.shift_factor, **kw))
    rng = np.random.default_rng(3)
    picture = rng.integers(0, 256, (14, 24, 3), dtype=np.uint8)
    m = np.zeros((14, 24), np.uint8)
    m[4:9, 13:17] = 255
    m[3, 13:17] = m[4:9, 12] = 100  # greys: blended in the paste, binarized for the latents
    kw = dict(num_inference_steps=4, guidance_scale=4.0, strength=0.9, height=SIZE, width=SIZE)
    ref = inpaint(
        PROMPT,
        image=Image.fromarray(picture),
        mask_image=Image.fromarray(m),
        padding_mask_crop=2,
        generator=torch.Generator().manual_seed(7),
        **kw,
    ).images
    ref = np.stack([np.asarray(r) for r in ref])
    eps = torch.randn((2, 4, SIZE, SIZE), generator=torch.Generator().manual_seed(7))
    pipe = SD3Pipeline.load(str(root / "ckpt_t51"))
    args = dict(steps=4, guidance_scale=4.0, strength=0.9, height=SIZE, width=SIZE, progress=False)
    args["latents"] = eps.permute(0, 2, 3, 1).numpy()
    got = pipe.generate(PROMPT, image=Image.fromarray(picture), mask_image=m, padding_mask_crop=2, **args)
    assert got.shape == ref.shape == (2, 14, 24, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - ref).max() <= 1, np.abs(got.astype(int) - ref).max()
    np.testing.assert_array_equal(got[:, m == 0], np.broadcast_to(picture[m == 0], got[:, m == 0].shape))
    assert np.abs(got.astype(int) - picture)[:, m == 255].mean() > 20  # the box was repainted
    flt = pipe.generate(
        PROMPT, image=picture[None], mask_image=m / 255.0, padding_mask_crop=2, output="float", **args
    )
    np.testing.assert_array_equal(flt, got / np.float32(255))


def test_crop_region_is_diffusers(monkeypatch):
    """`crop_region` equals diffusers' `get_crop_region` on random blobs, pads and aspect ratios, and
    `crop_and_fill` its `preprocess(crops_coords=, resize_mode="fill")`, bit for bit."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from sd3_jax.images import crop_and_fill, crop_region

    rng = np.random.default_rng(0)
    proc = VaeImageProcessor(vae_scale_factor=8, do_normalize=False)
    for _ in range(60):
        h, w = rng.integers(8, 60, 2)
        m = np.zeros((h, w), np.uint8)
        y, x = rng.integers(0, h), rng.integers(0, w)
        m[y : y + rng.integers(1, h), x : x + rng.integers(1, w)] = rng.integers(1, 256)
        size = tuple(int(v) for v in rng.choice([8, 16, 24, 40], 2))
        pad = int(rng.integers(0, 12))
        box = VaeImageProcessor.get_crop_region(Image.fromarray(m), size[1], size[0], pad=pad)
        assert crop_region(m, size[1], size[0], pad) == box, (m.shape, size, pad)
        picture = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = proc.preprocess(
            Image.fromarray(picture), height=size[0], width=size[1], crops_coords=box, resize_mode="fill"
        )
        got = crop_and_fill(picture, box, size[1], size[0], "RGB")
        np.testing.assert_array_equal(got, (want[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    with pytest.raises(ValueError, match="all black"):
        crop_region(np.zeros((8, 8), np.uint8), 8, 8, 2)


def test_latent_mask_is_diffusers_mask_processing():
    """Binarized at 0.5 and nearest-resized to the latents as diffusers' mask processor and
    `F.interpolate` do, for a VAE of factor 8."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from sd3_jax.pipeline import latent_mask

    m = np.random.default_rng(2).integers(0, 256, (48, 32), dtype=np.uint8)
    proc = VaeImageProcessor(
        vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
    want = proc.preprocess(Image.fromarray(m), height=48, width=32)
    want = torch.nn.functional.interpolate(want, size=(6, 4)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(latent_mask(Image.fromarray(m), 3, (48, 32), 8), np.repeat(want, 3, axis=0))
    np.testing.assert_array_equal(latent_mask(m / 255.0, 1, (48, 32), 8), want)
    with pytest.raises(ValueError, match="must be 48x32"):
        latent_mask(m[:40], 1, (48, 32), 8)
    with pytest.raises(ValueError, match="cannot repeat 2 masks for 3"):
        latent_mask(np.stack([m, m]), 3, (48, 32), 8)


def test_generate_uint8_batches_and_dpmpp(tiny):
    root, _ = tiny
    pipe, img = ours(root, True, prompt="a photo of a cat", steps=3, num_images_per_prompt=3, seed=1)
    out = pipe.generate(
        "a photo of a cat", height=SIZE, width=SIZE, steps=3, num_images_per_prompt=3, seed=1, progress=False
    )
    assert out.dtype == np.uint8 and out.shape == (3, SIZE, SIZE, 3)
    np.testing.assert_array_equal(out, (img * 255).round().astype(np.uint8))
    assert not np.array_equal(out[0], out[1])  # different noise per image


def test_dpmpp_2m_matches_stability_sampler_on_diffusers_components(tiny):
    """sampler="dpmpp_2m" with CFG equals Stability's sd3_impls `sample_dpmpp_2m` (transcribed in
    test_samplers) driving diffusers' own transformer with CFG over the pipeline's sigmas, decoded by
    diffusers' VAE: within 1e-3 on [0, 1] pixels."""
    from test_samplers import _sai_sample_dpmpp_2m

    root, pipes = tiny
    ref_pipe, steps, scale = pipes[True], 4, 5.0
    lat = noise(2, seed=3)
    pipe, got = ours(
        root, True, prompt=PROMPT, steps=steps, guidance_scale=scale, sampler="dpmpp_2m",
        latents=lat.permute(0, 2, 3, 1).numpy(),
    )  # fmt: skip
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = ref_pipe.encode_prompt(
            PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=True
        )
        ctx, pool = torch.cat([neg, emb]), torch.cat([neg_pooled, pooled])

        def denoiser(x, sigma):
            v = ref_pipe.transformer(
                hidden_states=torch.cat([x, x]), timestep=torch.cat([sigma, sigma]) * 1000,
                encoder_hidden_states=ctx, pooled_projections=pool,
            ).sample  # fmt: skip
            v_neg, v_pos = v.chunk(2)
            return x - sigma.reshape(-1, 1, 1, 1) * (v_neg + scale * (v_pos - v_neg))

        sigmas = torch.from_numpy(np.asarray(pipe.sigmas(steps, None, (SIZE, SIZE)), np.float32))
        z = _sai_sample_dpmpp_2m(denoiser, lat.clone(), sigmas)
        vae = ref_pipe.vae
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        ref = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - ref).max() <= 1e-3
    assert np.abs(ref - ref.mean()).max() > 0.01  # not a flat image


def _tensors(folder):
    from safetensors.numpy import load_file

    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".safetensors"):
                rel = os.path.relpath(dirpath, folder)
                out.update({f"{rel}/{k}": v for k, v in load_file(os.path.join(dirpath, f)).items()})
    return out


def test_convert_export_round_trip_bitwise(tiny, tmp_path):
    """convert -> export diffusers reproduces every parameter tensor bit for bit (fp32 in, fp32 out);
    export sai -> convert -> export diffusers likewise."""
    root, _ = tiny
    src = _tensors(root / "diffusers_t51")
    out = tmp_path / "exported"
    assert main(["export", str(root / "ckpt_t51"), "--format", "diffusers", "--out", str(out)]) == 0
    back = _tensors(out)
    params = {k: v for k, v in src.items() if not k.endswith(("position_ids", "encoder.embed_tokens.weight"))}
    assert sorted(back) == sorted(params)
    for k, v in params.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    sai = tmp_path / "sd3_tiny.safetensors"
    assert main(["export", str(root / "ckpt_t51"), "--format", "sai", "--out", str(sai)]) == 0
    ck2 = tmp_path / "ckpt2"
    assert (
        main(
            [
                "convert",
                str(sai),
                "--tokenizers",
                str(root / "diffusers_t51"),
                "--out",
                str(ck2),
                "--dtype",
                "fp32",
                "--no-progress",
            ]
        )
        == 0
    )
    out2 = tmp_path / "exported2"
    assert main(["export", str(ck2), "--format", "diffusers", "--out", str(out2)]) == 0
    for k, v in _tensors(out2).items():
        assert np.array_equal(v, back[k]), k
    # The diffusers export loads in diffusers.
    from diffusers import StableDiffusion3Pipeline

    StableDiffusion3Pipeline.from_pretrained(str(out))


def test_load_logs_no_warnings(tiny, caplog):
    """Loading a converted checkpoint logs nothing at WARNING: orbax's reader used to warn that each
    component's `state/_CHECKPOINT_METADATA` did not exist (the writer keeps it one level up)."""
    import logging

    root, _ = tiny
    with caplog.at_level(logging.WARNING):
        SD3Pipeline.load(str(root / "ckpt_t51"))
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_load_from_a_relative_path(tiny, monkeypatch):
    """A checkpoint named relative to the working directory loads the same params (orbax alone finds no
    metadata under a relative path)."""
    import jax

    root, _ = tiny
    absolute = SD3Pipeline.load(str(root / "ckpt_t51"))
    monkeypatch.chdir(root)
    relative = SD3Pipeline.load("ckpt_t51")
    for a, b in zip(
        jax.tree.leaves(absolute.transformer_params), jax.tree.leaves(relative.transformer_params)
    ):
        assert np.array_equal(a, b)


def test_bad_input(tiny, tmp_path, capsys):
    root, _ = tiny
    # Corrupt / truncated file.
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 7)
    assert main(["convert", str(bad), "--out", str(tmp_path / "o1"), "--no-progress"]) == 2
    assert "not a safetensors file" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    # Unsupported architecture.
    from sd3_jax.convert.safetensors_io import write_safetensors

    other = tmp_path / "unet.safetensors"
    write_safetensors(other, {"down_blocks.0.resnets.0.conv1.weight": np.ones((4, 4, 3, 3), np.float32)})
    assert main(["convert", str(other), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "unsupported architecture" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    # A diffusers-layout transformer file with one tensor removed: one line naming it, nothing written.
    assert (
        main(["export", str(root / "ckpt_t51"), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    )
    from sd3_jax.convert.safetensors_io import SafetensorsFile

    holed = tmp_path / "d" / "transformer" / "diffusion_pytorch_model.safetensors"
    gone = "transformer_blocks.0.attn.add_k_proj.bias"
    with SafetensorsFile(holed) as f:
        tensors = {k: f.read(k) for k in f.keys() if k != gone}
    write_safetensors(holed, tensors)
    assert main(["convert", str(tmp_path / "d"), "--out", str(tmp_path / "o4"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and gone in err and not (tmp_path / "o4").exists(), err
    # Full pipeline without tokenizers.
    sai = tmp_path / "full.safetensors"
    assert main(["export", str(root / "ckpt_t51"), "--format", "sai", "--out", str(sai)]) == 0
    assert main(["convert", str(sai), "--out", str(tmp_path / "o3"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--tokenizers" in err and "tokenizer/" in err and not (tmp_path / "o3").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".o")]  # no scratch left behind
    # A missing component: a transformer-only checkpoint cannot sample.
    t_only = tmp_path / "transformer.safetensors"
    with SafetensorsFile(sai) as f:
        write_safetensors(
            t_only,
            {
                k[len("model.diffusion_model.") :]: f.read(k)
                for k in f.keys()
                if k.startswith("model.diffusion_model.")
            },
            metadata=f.metadata,
        )
    assert main(["convert", str(t_only), "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(tmp_path / "t"),
                "--prompt",
                "a cat",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "lacks vae" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    # Sizes and prompts.
    pipe = SD3Pipeline.load(str(root / "ckpt_t51"))
    with pytest.raises(ValueError, match="largest size is 8x8"):
        pipe.generate("a cat", height=16, width=8)
    with pytest.raises(ValueError, match="prompt list is empty"):
        pipe.generate([], height=8, width=8)
    # Existing output is never overwritten.
    assert (
        main(["convert", str(root / "diffusers_t51"), "--out", str(root / "ckpt_t51"), "--no-progress"]) == 2
    )
    assert "already exists" in capsys.readouterr().err


def _fake_hub(tmp_path, monkeypatch, folder, repo="org/tiny-sd3", rev="0123abcd"):
    """A Hugging Face cache laid out as huggingface_hub lays it (models--org--name/snapshots/REV with
    refs/main), holding `folder`, and the Hub switched off: nothing here touches a network."""
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, repo_dir / "snapshots" / rev)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def _listing(*dirs):
    return sorted(os.path.join(d, f) for top in dirs for d, _, fs in os.walk(top) for f in fs)


def test_pytorch_layouts_load_straight_into_the_pipeline(tiny, tmp_path, monkeypatch, capsys):
    """A diffusers folder, a Stability single file (tokenizers from a folder) and a model id from the
    Hugging Face cache each sample, converted in memory, the very images of the converted checkpoint
    (fp32, bitwise), and write nothing: no Orbax copy anywhere."""
    root, _ = tiny
    single = tmp_path / "sd3_tiny.safetensors"
    assert main(["export", str(root / "ckpt_t51"), "--format", "sai", "--out", str(single)]) == 0
    repo = _fake_hub(tmp_path, monkeypatch, root / "diffusers_t51")
    kw = dict(prompt=PROMPT, steps=3, guidance_scale=3.0, seed=2, height=SIZE, width=SIZE, output="float")
    want = SD3Pipeline.load(str(root / "ckpt_t51")).generate(**kw, progress=False)
    before = _listing(tmp_path, root)
    for source, extra in [
        (str(root / "diffusers_t51"), {}),
        (str(single), {"tokenizers": str(root / "diffusers_t51")}),
        (repo, {}),
    ]:
        got = SD3Pipeline.load(source, **extra).generate(**kw, progress=False)
        np.testing.assert_array_equal(got, want, err_msg=source)
    assert _listing(tmp_path, root) == before
    # What is fetched of a real repository's files: the diffusers folder, not the single files beside it.
    from huggingface_hub.utils import filter_repo_objects

    from sd3_jax.convert.hub import DIFFUSERS_FILES

    files = ["model_index.json", "scheduler/scheduler_config.json", "sd3.5_medium.safetensors", "README.md"]
    files += ["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json"]
    files += [
        "text_encoder_3/model-00001-of-00002.safetensors",
        "text_encoder_3/model.safetensors.index.json",
    ]
    files += [
        "text_encoders/t5xxl_fp8_e4m3fn.safetensors",
        "text_encoders/clip_g.safetensors",
        "sd3.5_medium.png",
    ]
    files += ["tokenizer_3/spiece.model", "vae/diffusion_pytorch_model.safetensors"]
    skipped = {"sd3.5_medium.safetensors", "README.md", "sd3.5_medium.png"} | {
        f for f in files if "encoders/" in f
    }
    assert sorted(filter_repo_objects(files, allow_patterns=DIFFUSERS_FILES)) == sorted(set(files) - skipped)
    # Through the CLI: sample and convert take the id; a model not in the cache while offline, and a gated
    # one, are one line and exit 2.
    out = tmp_path / "id.png"
    args = ["sample", "--checkpoint", repo, "--prompt", PROMPT[0], "--steps", "2", "--size", "8x8"]
    assert main(args + ["--out", str(out), "--no-progress"]) == 0 and out.exists()
    assert (
        main(["convert", repo, "--out", str(tmp_path / "from_id"), "--dtype", "fp32", "--no-progress"]) == 0
    )
    assert (tmp_path / "from_id" / "sd3_jax.json").exists()
    capsys.readouterr()
    bad = tmp_path / "bad.png"
    assert main(["sample", "--checkpoint", "org/absent", "--prompt", "a", "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("sd3-jax: error: org/absent is not in the Hugging Face cache")
        and "HF_HUB_OFFLINE" in err
    )
    assert len(err.splitlines()) == 1
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*a, **k):  # what the Hub answers without an accepted licence
        import httpx2

        url = "https://huggingface.co/api/models/stabilityai/stable-diffusion-3.5-large"
        response = httpx2.Response(403, request=httpx2.Request("GET", url))
        raise GatedRepoError("403 Client Error: Cannot access gated repo", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                "stabilityai/stable-diffusion-3.5-large",
                "--prompt",
                "a",
                "--out",
                str(bad),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert (
        "is gated: accept its licence at https://huggingface.co/stabilityai/stable-diffusion-3.5-large" in err
    )
    assert len(err.splitlines()) == 1 and not bad.exists()


def test_sample_cli_writes_png_with_metadata(tiny, tmp_path):
    from PIL import Image

    root, _ = tiny
    out = tmp_path / "cat.png"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(root / "ckpt_t51"),
                "--prompt",
                "a photo of a cat",
                "--steps",
                "2",
                "--size",
                "8x8",
                "--seed",
                "3",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    img = Image.open(out)
    assert img.size == (8, 8)
    assert img.text["prompt"] == "a photo of a cat" and img.text["seed"] == "3" and img.text["steps"] == "2"
    assert img.text["sampler"] == "euler" and img.text["cfg"] == "7.0" and img.text["model"] == "ckpt_t51"


def test_sample_cli_inpaints(tiny, tmp_path, capsys):
    """`sd3-jax sample --image --mask --strength [--padding-mask-crop]` writes what `generate(image=,
    mask_image=, padding_mask_crop=)` gives; a mask without an image, a mask of another size, an unreadable
    image, a crop without a mask or around a black mask are one line, exit 2, nothing written."""
    from PIL import Image

    root, _ = tiny
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2 :] = 255
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(mask[:4]).save(tmp_path / "small.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    args = [
        "sample",
        "--checkpoint",
        str(root / "ckpt_t51"),
        "--prompt",
        "a cat",
        "--steps",
        "3",
        "--seed",
        "1",
    ]
    args += ["--no-progress", "--image", str(tmp_path / "in.png"), "--strength", "0.8"]
    assert main(args + ["--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "out.png")]) == 0
    pipe = SD3Pipeline.load(str(root / "ckpt_t51"))
    want = pipe.generate(
        "a cat", steps=3, seed=1, image=image[None], mask_image=mask, strength=0.8, progress=False
    )
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), want[0])
    big, blob = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8), np.zeros((12, 20), np.uint8)
    blob[3:6, 11:15] = 255
    Image.fromarray(big).save(tmp_path / "big.png")
    Image.fromarray(blob).save(tmp_path / "blob.png")
    crop = [a.replace("in.png", "big.png") for a in args] + ["--mask", str(tmp_path / "blob.png")]
    crop += ["--padding-mask-crop", "1", "--size", f"{SIZE}x{SIZE}"]
    assert main(crop + ["--out", str(tmp_path / "crop.png")]) == 0
    want = pipe.generate(
        "a cat", height=SIZE, width=SIZE, steps=3, seed=1, image=big[None], mask_image=blob, strength=0.8,
        padding_mask_crop=1, progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "crop.png")), want[0])
    assert want.shape == (1, 12, 20, 3)
    Image.fromarray(blob * 0).save(tmp_path / "black.png")
    capsys.readouterr()
    bad = {
        "no image": [a for a in args if a not in ("--image", str(tmp_path / "in.png"))]
        + ["--mask", str(tmp_path / "mask.png")],
        "mask size": args + ["--mask", str(tmp_path / "small.png")],
        "unreadable": [a.replace("in.png", "bad.png") for a in args],
        "crop without mask": args + ["--padding-mask-crop", "2"],
        "crop of a black mask": [a.replace("blob.png", "black.png") for a in crop],
        "negative crop": crop[:-3] + ["-1"] + crop[-2:],
    }
    for name, argv in bad.items():
        assert main(argv + ["--out", str(tmp_path / "x.png")]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("sd3-jax: error:"), (name, err)
    assert not (tmp_path / "x.png").exists()


def test_prepare_finetune_sample_export(tiny, tmp_path, capsys):
    """A new user's path through the CLI: `prepare` encodes a folder with the checkpoint's VAE and text
    encoders (skipping bad records, holding out a validation split); `train` fine-tunes the converted
    transformer on it (reporting val_loss); `sample --checkpoint WORKDIR` samples its EMA params with the
    checkpoint's VAE and encoders; `export WORKDIR` writes a diffusers folder that diffusers samples the
    same images from."""
    from PIL import Image

    from sd3_jax.data.records import PreparedSource
    from sd3_jax.pipeline import encode
    from sd3_jax.train.report import read_metrics

    root, _ = tiny
    ckpt = root / "ckpt_t51"
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(PROMPT[i % 2])
    (data / "5.png").write_bytes(b"not a png")
    (data / "5.txt").write_text("a cat")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "6.png")  # no caption
    prefix = tmp_path / "prepared" / "tiny"
    assert (
        main(
            [
                "prepare",
                str(data),
                "--checkpoint",
                str(ckpt),
                "--out",
                str(prefix),
                "--size",
                "8",
                "--batch-size",
                "2",
                "--val-fraction",
                "0.25",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    src, val = PreparedSource(prefix), PreparedSource(f"{prefix}-val")
    assert (len(src), len(val)) == (4, 1)  # of 0-5 (6 has no caption): 3 held out, 5 corrupt
    ex = src[0]
    assert ex["latents"].shape == (8, 8, 4) and ex["clip_l"].shape == (77, 16) and ex["t5"].shape == (256, 64)
    pipe = SD3Pipeline.load(str(ckpt))
    from sd3_jax.data.pipeline import crop, resize_to_cover

    img = crop(resize_to_cover(np.asarray(Image.open(data / "0.png").convert("RGB")), 8, 8), 8, 8)
    want = encode(pipe.vae_params, jnp_f32(img / 255.0)[None], config=pipe.vae_config)[0]
    np.testing.assert_allclose(ex["latents"], np.asarray(want), atol=1e-5)
    # Fine-tune the converted transformer on those records: the model comes from the checkpoint.
    import json as _json

    (tmp_path / "val").mkdir()
    wd = tmp_path / "ft"
    cfg = tmp_path / "ft.py"
    cfg.write_text(
        "from sd3_jax.train.config import TrainConfig, DataConfig, OptimConfig\n"
        f"def get_config():\n    return TrainConfig(data=DataConfig(kind='prepared', path={str(prefix)!r}),\n"
        "        optim=OptimConfig(lr=1e-2, warmup_steps=0), batch_size=2, steps=3, checkpoint_every=3,\n"
        f"        eval_every=3, compute_dtype='float32', ema_decay=0.5, init_from={str(ckpt)!r},\n"
        f"        log_every=1, sample_every=3, sample_prompts=({PROMPT[0]!r},), sample_images=2,\n"
        "        sample_steps=2, sample_size=8)\n"
    )
    assert main(["train", "--config", str(cfg), "--workdir", str(wd), "--no-progress"]) == 0
    losses = [m["loss"] for m in read_metrics(str(wd)) if "loss" in m]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert _json.loads((wd / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    assert [m["step"] for m in read_metrics(str(wd)) if "val_loss" in m] == [3]
    # The workdir is a checkpoint: its EMA params (as Orbax restores the whole state) with the base's rest.
    import jax
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(os.path.abspath(wd / "checkpoints" / "3" / "state"))
    ema = jax.tree.leaves(state["ema_params"])
    tuned = SD3Pipeline.load(str(wd))
    for a, b in zip(ema, jax.tree.leaves(tuned.transformer_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(ema, jax.tree.leaves(pipe.transformer_params))
    ]
    assert max(moved) > 1e-4  # fine-tuned, not the base
    for a, b in zip(jax.tree.leaves(tuned.vae_params), jax.tree.leaves(pipe.vae_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # What it reported: the same scalars in TensorBoard (read back by TensorBoard's own reader) and the
    # EMA samples as a PNG grid and a TensorBoard image.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(wd / "tensorboard"))
    tb.Reload()
    metrics = read_metrics(str(wd))
    for tag, key, kind in [
        ("train/loss", "loss", None),
        ("train/lr", "lr", "log"),
        ("eval/val_loss", "val_loss", "eval"),
    ]:
        want = sorted(
            {(m["step"], np.float32(m[key])) for m in metrics if key in m and m.get("kind") == kind}
        )
        assert [(e.step, np.float32(e.value)) for e in tb.Scalars(tag)] == want, tag
    assert {"train/grad_norm", "train/steps_per_s", "train/images_per_s"} <= set(tb.Tags()["scalars"])
    grid = np.asarray(Image.open(wd / "samples" / "step_000003.png"))
    shots = tuned.generate(
        [PROMPT[0]], steps=2, seed=0, num_images_per_prompt=2, height=8, width=8, progress=False
    )
    np.testing.assert_array_equal(grid, np.concatenate(list(shots), axis=1))  # one row: the prompt's 2 images
    (image,) = tb.Images("samples")
    assert (image.step, image.width, image.height) == (3, 16, 8)
    out = tmp_path / "tuned.png"
    cli = ["sample", "--checkpoint", str(wd), "--prompt", PROMPT[0], "--steps", "2", "--size", "8x8"]
    assert main(cli + ["--seed", "4", "--out", str(out), "--no-progress"]) == 0
    want = tuned.generate(PROMPT[0], steps=2, height=8, width=8, seed=4, progress=False)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), want[0])
    assert main(["export", str(wd), "--format", "diffusers", "--out", str(tmp_path / "exported")]) == 0
    from diffusers import StableDiffusion3Pipeline

    dif = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "exported"))
    lat = noise(2, seed=6)
    kw = dict(height=SIZE, width=SIZE)
    ref = dif(PROMPT, num_inference_steps=3, guidance_scale=3.0, latents=lat.clone(), output_type="np", **kw)
    latents = lat.permute(0, 2, 3, 1).numpy()
    got = tuned.generate(
        PROMPT, steps=3, guidance_scale=3.0, latents=latents, output="float", progress=False, **kw
    )
    assert np.abs(got - ref.images).max() <= 1e-3


def jnp_f32(x):
    import jax.numpy as jnp

    return jnp.asarray(x, jnp.float32)


def test_sizes_must_be_multiples_of_16_within_the_table():
    """SD3 Medium geometry (VAE factor 8, patch 2, 192-patch table): 16-pixel steps, at most 3072 px."""
    from sd3_jax.nn.mmdit import MMDiTConfig
    from sd3_jax.nn.vae import VAEConfig

    pipe = SD3Pipeline((MMDiTConfig.sd3_medium(), None), (VAEConfig.sd3(), None), None, {})
    pipe.check_size(1024, 1344)
    with pytest.raises(ValueError, match="positive multiples of 16, got 1000x1024"):
        pipe.check_size(1000, 1024)
    with pytest.raises(ValueError, match="largest size is 3072x3072"):
        pipe.check_size(3088, 1024)


def test_load_sharded_on_a_mesh(tiny, tmp_path):
    """SD3Pipeline.load(mesh=...) restores the MMDiT sharded by the rules; samples equal one device's."""
    import json as _json
    import subprocess
    import sys

    root, _ = tiny
    lat = noise(1, seed=7).permute(0, 2, 3, 1).numpy()
    np.save(tmp_path / "lat.npy", lat)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        PYTHONPATH=repo,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        TF_CPP_MIN_LOG_LEVEL="3",
        SD3_JAX_CACHE="",
    )
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(repo, "tests", "_mesh_pipeline_worker.py"),
            str(root / "ckpt_t51"),
            str(tmp_path / "lat.npy"),
            str(tmp_path / "out.npy"),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    info = _json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["n"] == 2 and info["devices"] == 2
    assert info["spec"][1] == "fsdp" and info["local"][1] * 2 == info["global"][1]  # (layers, embed, mlp)
    _, want = ours(root, True, prompt=["a photo of a cat"], steps=2, latents=lat)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, atol=1e-5)


def test_released_models_get_their_sampling_defaults():
    """Recognised by shapes: SD3 Medium 28 steps / CFG 7, SD3.5 Medium 40 / 4.5, SD3.5 Large 28 / 3.5, and
    SD3.5 Large Turbo (same network; by flag) 4 steps without CFG. Other networks keep the pipeline's."""
    from sd3_jax.convert.pipeline_io import RELEASED_SAMPLING, released_model
    from sd3_jax.nn.mmdit import MMDiTConfig

    assert released_model(MMDiTConfig.sd3_medium()) == "sd3_medium"
    assert released_model(MMDiTConfig.sd35_medium()) == "sd35_medium"
    assert released_model(MMDiTConfig.sd35_large()) == "sd35_large"
    assert released_model(MMDiTConfig.sd35_large(), turbo=True) == "sd35_large_turbo"
    assert released_model(MMDiTConfig.tiny()) is None
    assert released_model(MMDiTConfig.sd35_large(depth=24)) is None  # close, but not a released shape
    with pytest.raises(ValueError, match="only SD3.5 Large has a Turbo"):
        released_model(MMDiTConfig.sd3_medium(), turbo=True)
    assert RELEASED_SAMPLING["sd35_large"] == dict(steps=28, guidance_scale=3.5)
    assert RELEASED_SAMPLING["sd35_medium"] == dict(steps=40, guidance_scale=4.5)
    assert RELEASED_SAMPLING["sd35_large_turbo"]["steps"] == 4
    assert RELEASED_SAMPLING["sd35_large_turbo"]["guidance_scale"] <= 1.0  # no CFG


def test_converted_checkpoint_samples_with_its_defaults(tiny, tmp_path, monkeypatch):
    """The manifest's sampling entry reaches generate(): a checkpoint recognised as SD3.5 Large Turbo
    samples 4 steps without CFG when steps and guidance are left unset."""
    import json

    from sd3_jax.convert import pipeline_io

    root, _ = tiny
    monkeypatch.setattr(pipeline_io, "released_model", lambda cfg, turbo=False: "sd35_large_turbo")
    out = tmp_path / "ckpt"
    pipeline_io.convert([str(root / "diffusers_t51")], str(out), "fp32", progress=False)
    manifest = json.loads((out / "sd3_jax.json").read_text())
    assert manifest["model"] == "sd35_large_turbo" and manifest["sampling"]["steps"] == 4
    pipe = SD3Pipeline.load(str(out))
    seen = {}
    import sd3_jax.pipeline as pl

    def spy(*args, **kw):
        seen.update(steps=args[2].shape[0] - 1, use_cfg=kw["use_cfg"])
        return original(*args, **kw)

    original = pl.denoise
    monkeypatch.setattr(pl, "denoise", spy)
    pipe.generate("a cat", height=8, width=8, progress=False)
    assert seen == {"steps": 4, "use_cfg": False}


def test_text_encoders_beside_a_single_file_are_found(tiny, tmp_path):
    """Stability ships sd3.5_large.safetensors without text encoders and clip_l / clip_g / t5xxl_fp16 files
    in text_encoders/ beside it: converting the single file picks them up (and prefers fp16 T5 to fp8)."""
    import jax

    from sd3_jax.convert.pipeline_io import load_component
    from sd3_jax.convert.safetensors_io import SafetensorsFile, write_safetensors

    root, _ = tiny
    full = tmp_path / "full.safetensors"
    assert main(["export", str(root / "ckpt_t51"), "--format", "sai", "--out", str(full)]) == 0
    (tmp_path / "release" / "text_encoders").mkdir(parents=True)
    files = {
        "clip_l": "clip_l.safetensors",
        "clip_g": "clip_g.safetensors",
        "t5xxl": "t5xxl_fp16.safetensors",
    }
    with SafetensorsFile(full) as f:
        keys = list(f.keys())
        write_safetensors(
            tmp_path / "release" / "sd3.5_like.safetensors",
            {k: f.read(k) for k in keys if not k.startswith("text_encoders.")},
            metadata=f.metadata,  # the tiny transformer's head width (a real one is inferred)
        )
        for short, name in files.items():
            prefix = f"text_encoders.{short}.transformer."
            tensors = {k[len(prefix) :]: f.read(k) for k in keys if k.startswith(prefix)}
            write_safetensors(tmp_path / "release" / "text_encoders" / name, tensors)
    # An fp8 decoy in name order before the fp16 file: the fp16 one is taken.
    (tmp_path / "release" / "text_encoders" / "t5xxl_a_fp8_e4m3fn.safetensors").write_bytes(b"\0" * 8)
    out = tmp_path / "ckpt"
    args = [str(tmp_path / "release" / "sd3.5_like.safetensors"), "--out", str(out), "--dtype", "fp32"]
    assert main(["convert", *args, "--tokenizers", str(root / "diffusers_t51"), "--no-progress"]) == 0
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        _, ours = load_component(str(out), component)
        _, ref = load_component(str(root / "ckpt_t51"), component)
        # Bare encoder files carry no config: a tiny CLIP's heads read as 1 x 16 where the diffusers config
        # says 2 x 8 (real ones are inferred at 64 per head), the same matrices split differently.
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref)):
            a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
            assert np.array_equal(a, b), (component, jax.tree_util.keystr(path))
