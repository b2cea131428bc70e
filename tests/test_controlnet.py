"""ControlNet parity with diffusers' SD3ControlNetModel (both styles, multi-ControlNet), its residuals in the
MMDiT, both checkpoint layouts, parameter counts and bad files."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from conftest import TINY_MMDIT, assert_close_rel, randomize_, torch_state_dict_numpy
from diffusers import SD3ControlNetModel, SD3Transformer2DModel
from diffusers.models.controlnets.controlnet_sd3 import SD3MultiControlNetModel

from sd3_jax.convert.controlnet import export_controlnet, read_controlnet
from sd3_jax.convert.mapping import CheckpointError
from sd3_jax.convert.mmdit import load_mmdit
from sd3_jax.nn.controlnet import ControlNet
from sd3_jax.nn.mmdit import MMDiT

# The SD3 Medium style (InstantX / alimama: own position table, joint blocks, here with qk-norm, an MMDiT-X
# block and the inpainting mask channel) and the SD3.5 Large style (single-stream, the MMDiT's pos_embed).
JOINT = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20,
    pos_embed_max_size=12, extra_conditioning_channels=1, qk_norm="rms_norm", dual_attention_layers=(0,),
)  # fmt: skip
SINGLE = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=None, caption_projection_dim=32, pooled_projection_dim=20,
    pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False,
    force_zeros_for_pooled_projection=False,
)  # fmt: skip
BASE = dict(TINY_MMDIT, num_layers=4)  # 4 blocks: residuals spread over them unevenly for 3 nets' blocks


def make(cls, config, seed):
    torch.manual_seed(seed)
    model = cls(**config).eval()
    randomize_(model, seed)  # controlnet_blocks and pos_embed_input too: zero-init would hide mapping bugs
    return model


def inputs(batch=2, h=10, w=6, extra=1, seed=1):
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)
    return dict(
        x=f(batch, h, w, 4),
        cond=f(batch, h, w, 4 + extra),
        t=np.linspace(0.1, 0.9, batch).astype(np.float32),
        ctx=f(batch, 7, 24),
        pooled=f(batch, 20),
    )


def nchw(a):
    return torch.from_numpy(a).permute(0, 3, 1, 2)


def reference_residuals(net, base, a, scale):
    """diffusers' residuals, the single-stream net fed the transformer's pos_embed as its pipeline does."""
    with torch.no_grad():
        joint = net.config.joint_attention_dim is not None
        x = nchw(a["x"]) if joint else base.pos_embed(nchw(a["x"]))
        out = net(
            hidden_states=x,
            controlnet_cond=nchw(a["cond"]),
            conditioning_scale=scale,
            encoder_hidden_states=torch.from_numpy(a["ctx"]) if joint else None,
            pooled_projections=torch.from_numpy(a["pooled"]),
            timestep=torch.from_numpy(a["t"]) * 1000,
            return_dict=False,
        )[0]
    return np.stack([o.numpy() for o in out])


def ours_residuals(cfg, params, base_cfg, base_params, a, scale):
    from sd3_jax.nn.embeddings import PatchEmbed

    x = a["x"]
    if not cfg.own_pos_embed:
        p = base_cfg.patch_size
        embed = PatchEmbed(p, base_cfg.width, base_cfg.pos_embed_max_size, base_cfg.sample_size // p)
        x = embed.apply({"params": base_params["pos_embed"]}, x)
    ctx = a["ctx"] if cfg.joint else None
    return ControlNet(cfg).apply({"params": params}, x, a["cond"], a["t"], a["pooled"], ctx, scale)


@pytest.mark.parametrize("style", ["joint", "single"])
def test_residuals_and_controlled_velocity_match_diffusers(style):
    """Residuals of one net, then the MMDiT's velocity with them: <= 1e-5 x max|reference|, fp32."""
    conf = JOINT if style == "joint" else SINGLE
    net, base = make(SD3ControlNetModel, conf, 1), make(SD3Transformer2DModel, BASE, 2)
    cfg, params = read_controlnet(torch_state_dict_numpy(net), num_heads=2)
    base_cfg, base_params = load_mmdit(torch_state_dict_numpy(base), num_heads=2)
    assert cfg.joint == (style == "joint") and cfg.own_pos_embed == (style == "joint")
    a = inputs(extra=1 if style == "joint" else 0)
    ref = reference_residuals(net, base, a, 0.7)
    ours = ours_residuals(cfg, params, base_cfg, base_params, a, 0.7)
    assert_close_rel(ours, ref, 1e-5, "residuals")

    with torch.no_grad():
        v_ref = (
            base(
                hidden_states=nchw(a["x"]),
                encoder_hidden_states=torch.from_numpy(a["ctx"]),
                pooled_projections=torch.from_numpy(a["pooled"]),
                timestep=torch.from_numpy(a["t"]) * 1000,
                block_controlnet_hidden_states=[torch.from_numpy(r) for r in ref],
            )
            .sample.permute(0, 2, 3, 1)
            .numpy()
        )
    v = MMDiT(base_cfg).apply({"params": base_params}, a["x"], a["t"], a["ctx"], a["pooled"], controls=ours)
    v_plain = MMDiT(base_cfg).apply({"params": base_params}, a["x"], a["t"], a["ctx"], a["pooled"])
    assert np.abs(np.asarray(v) - np.asarray(v_plain)).max() > 1e-2 * np.abs(v_ref).max()  # they steer
    assert_close_rel(v, v_ref, 1e-5, "velocity with residuals")


def test_multi_controlnet_sums_scaled_residuals_as_diffusers():
    nets = [make(SD3ControlNetModel, dict(JOINT, extra_conditioning_channels=0), s) for s in (3, 4)]
    base = make(SD3Transformer2DModel, BASE, 2)
    base_cfg, base_params = load_mmdit(torch_state_dict_numpy(base), num_heads=2)
    a = inputs(extra=0)
    conds = [a["cond"], inputs(extra=0, seed=5)["cond"]]
    scales = [0.6, 1.3]
    with torch.no_grad():
        ref = SD3MultiControlNetModel(nets)(
            hidden_states=nchw(a["x"]),
            controlnet_cond=[nchw(c) for c in conds],
            conditioning_scale=scales,
            pooled_projections=torch.from_numpy(a["pooled"]),
            encoder_hidden_states=torch.from_numpy(a["ctx"]),
            timestep=torch.from_numpy(a["t"]) * 1000,
            return_dict=False,
        )[0]
    ref = np.stack([r.numpy() for r in ref])
    ours = 0
    for net, cond, scale in zip(nets, conds, scales):
        cfg, params = read_controlnet(torch_state_dict_numpy(net), num_heads=2)
        ours = ours + ours_residuals(cfg, params, base_cfg, base_params, dict(a, cond=cond), scale)
    assert_close_rel(ours, ref, 1e-5, "summed residuals")


def test_stability_layout_loads_to_the_diffusers_params_and_exports_back_bitwise():
    """A file in Stability's layout, built from diffusers' names by inverting diffusers' conversion script
    (fused qkv, attn.proj, mlp.fc1/fc2, adaLN_modulation.1), loads to the same params as the diffusers
    state dict; both export back bit for bit."""
    net = make(SD3ControlNetModel, SINGLE, 6)
    sd = torch_state_dict_numpy(net)
    sai = {}
    for k, v in sd.items():
        m = k.split(".")
        if m[0] == "transformer_blocks" and m[2] == "attn" and m[3] in ("to_q", "to_k", "to_v"):
            if m[3] == "to_q":
                p = ".".join(m[:3])
                parts = [sd[f"{p}.{n}.{m[-1]}"] for n in ("to_q", "to_k", "to_v")]
                sai[f"{p}.qkv.{m[-1]}"] = np.concatenate(parts)
            continue
        k = k.replace(".attn.to_out.0.", ".attn.proj.").replace(".ff.net.0.proj.", ".mlp.fc1.")
        k = k.replace(".ff.net.2.", ".mlp.fc2.").replace(".norm1.linear.", ".adaLN_modulation.1.")
        sai[k] = v
    cfg_d, params_d = read_controlnet(sd, num_heads=2)
    cfg_s, params_s = read_controlnet(sai, num_heads=2)
    assert cfg_d == cfg_s
    jax.tree.map(np.testing.assert_array_equal, params_d, params_s)
    for layout, src in (("diffusers", sd), ("sai", sai)):
        back = export_controlnet(params_d, cfg_d, layout)
        assert sorted(back) == sorted(src)
        for k in src:
            assert back[k].dtype == src[k].dtype and np.array_equal(back[k], src[k]), k


@pytest.mark.parametrize(
    "preset, conf",
    [
        ("sd35_large", dict(SINGLE, num_layers=19, num_attention_heads=38, attention_head_dim=64,
                            pooled_projection_dim=2048, in_channels=16, out_channels=16)),
        ("sd3_medium", dict(JOINT, num_layers=12, num_attention_heads=24, attention_head_dim=64,
                            joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                            in_channels=16, out_channels=16, sample_size=128, pos_embed_max_size=192,
                            extra_conditioning_channels=0, qk_norm=None, dual_attention_layers=())),
    ],
)  # fmt: skip
def test_released_shapes_have_diffusers_parameter_counts(preset, conf):
    from sd3_jax.convert.controlnet import abstract_params
    from sd3_jax.nn.controlnet import ControlNetConfig

    with torch.device("meta"):
        ref = SD3ControlNetModel(**conf)
    n_ref = sum(p.numel() for p in ref.parameters())
    n_ref += sum(b.numel() for n, b in ref.named_buffers() if n.endswith("pos_embed"))  # the table is a param
    ours = sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(getattr(ControlNetConfig, preset)()))
    )
    assert ours == n_ref


def test_bad_controlnet_files_are_named():
    net = make(SD3ControlNetModel, SINGLE, 6)
    sd = torch_state_dict_numpy(net)
    with pytest.raises(CheckpointError, match="not an SD3 ControlNet"):
        read_controlnet({k: v for k, v in sd.items() if not k.startswith("controlnet_blocks.0.")})
    missing = {k: v for k, v in sd.items() if k != "transformer_blocks.1.attn.to_k.bias"}
    with pytest.raises(CheckpointError, match="transformer_blocks.1.attn.to_k.bias"):
        read_controlnet(missing, num_heads=2)
    bad = dict(sd, **{"controlnet_blocks.2.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(CheckpointError, match="controlnet_blocks.2.weight"):
        read_controlnet(bad, num_heads=2)


# ---------------------------------------------------------------------------------------------------------
# The ControlNet pipelines against diffusers', on a tiny SD3 pipeline with a 3-block transformer.

PROMPT = ["a photo of a cat", "an astronaut riding a horse on the moon"]
SIZE = 8
TINY_NET = dict(
    sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=40,
    pos_embed_max_size=8,
)  # fmt: skip
TINY_SINGLE = dict(TINY_NET, joint_attention_dim=None, pos_embed_max_size=None, pos_embed_type=None,
                   use_pos_embed=False, force_zeros_for_pooled_projection=False, num_layers=3)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_cn(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline
    from tiny_components import make_tiny_sd3_components

    from sd3_jax.cli import main

    root = tmp_path_factory.mktemp("tiny_cn")
    components = make_tiny_sd3_components(seed=0)
    base = dict(components["transformer"].config)
    base = {k: v for k, v in base.items() if not k.startswith("_")}
    components["transformer"] = make(SD3Transformer2DModel, dict(base, num_layers=3), 7)
    pipe = StableDiffusion3Pipeline(**components)
    pipe.save_pretrained(root / "diffusers")
    assert main(["convert", str(root / "diffusers"), "--out", str(root / "ckpt"), "--dtype", "fp32",
                 "--no-progress"]) == 0  # fmt: skip
    nets = {
        "joint": make(SD3ControlNetModel, TINY_NET, 8),
        "joint2": make(SD3ControlNetModel, TINY_NET, 11),
        "single": make(SD3ControlNetModel, TINY_SINGLE, 9),
        "inpaint": make(SD3ControlNetModel, dict(TINY_NET, extra_conditioning_channels=1), 10),
    }
    for name, net in nets.items():
        net.save_pretrained(root / name)
    return root, pipe, nets


@pytest.fixture
def mean_encode(monkeypatch):
    """diffusers' ControlNet pipelines sample the VAE posterior; sd3-jax encodes its mean."""
    from diffusers.models.autoencoders import vae as vae_mod

    monkeypatch.setattr(
        vae_mod.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode()
    )


def _decode(pipe, z):
    with torch.no_grad():
        x = pipe.vae.decode(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    return pipe.image_processor.postprocess(x, output_type="np")


@pytest.mark.parametrize("which", ["single", "multi"])  # multi: two joint nets
def test_controlnet_pipeline_matches_diffusers(tiny_cn, mean_encode, which):
    from diffusers import StableDiffusion3ControlNetPipeline

    from sd3_jax.controlnet import Control, load_controlnet
    from sd3_jax.pipeline import SD3Pipeline

    root, pipe, nets = tiny_cn
    rng = np.random.default_rng(3)
    names = ["joint", "joint2"] if which == "multi" else [which]  # diffusers' multi takes one kind of net
    images = [rng.uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32) for _ in names]
    scales, starts, ends = [0.8, 1.2][: len(names)], [0.0, 0.25][: len(names)], [1.0, 0.75][: len(names)]
    lat = torch.randn((2, 4, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    comps = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    ref_pipe = StableDiffusion3ControlNetPipeline(**comps, controlnet=[nets[n] for n in names])
    kw = dict(num_inference_steps=4, guidance_scale=4.0, height=SIZE, width=SIZE)
    z = ref_pipe(
        PROMPT,
        control_image=[torch.from_numpy(i).permute(2, 0, 1)[None] * 2 - 1 for i in images],
        controlnet_conditioning_scale=scales,
        control_guidance_start=starts,
        control_guidance_end=ends,
        latents=lat.clone(),
        output_type="latent",
        **kw,
    ).images
    ref = _decode(pipe, z)

    ours = SD3Pipeline.load(str(root / "ckpt"))
    controls = [
        Control(load_controlnet(str(root / n)), i, s, a, b)
        for n, i, s, a, b in zip(names, images, scales, starts, ends)
    ]
    args = dict(prompt=PROMPT, steps=4, guidance_scale=4.0, height=SIZE, width=SIZE, output="float",
                progress=False, latents=lat.permute(0, 2, 3, 1).numpy())  # fmt: skip
    got = ours.generate(controls=controls, **args)
    err = np.abs(got - ref).max()
    assert err <= 5e-3, err
    plain = ours.generate(**args)
    assert np.abs(plain - ref).max() > 0.02  # the controls matter


def test_controlnet_inpainting_pipeline_matches_diffusers(tiny_cn, mean_encode):
    from diffusers import StableDiffusion3ControlNetInpaintingPipeline
    from PIL import Image

    from sd3_jax.controlnet import Control, load_controlnet
    from sd3_jax.pipeline import SD3Pipeline

    root, pipe, nets = tiny_cn
    rng = np.random.default_rng(4)
    image = rng.uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32)
    mask = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))  # greys: binarized at 0.5
    lat = torch.randn((2, 4, SIZE, SIZE), generator=torch.Generator().manual_seed(1))
    comps = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    ref_pipe = StableDiffusion3ControlNetInpaintingPipeline(**comps, controlnet=nets["inpaint"])
    z = ref_pipe(
        PROMPT,
        control_image=torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1,
        control_mask=mask,
        controlnet_conditioning_scale=0.9,
        num_inference_steps=4,
        guidance_scale=4.0,
        height=SIZE,
        width=SIZE,
        latents=lat.clone(),
        output_type="latent",
    ).images
    ref = _decode(pipe, z)
    ours = SD3Pipeline.load(str(root / "ckpt"))
    got = ours.generate(
        prompt=PROMPT, steps=4, guidance_scale=4.0, height=SIZE, width=SIZE, output="float", progress=False,
        latents=lat.permute(0, 2, 3, 1).numpy(),
        controls=[Control(load_controlnet(str(root / "inpaint")), image, 0.9, mask=mask)],
    )  # fmt: skip
    err = np.abs(got - ref).max()
    assert err <= 5e-3, err


def test_convert_export_round_trips_and_diffusers_loads_the_export(tiny_cn, tmp_path, capsys):
    """diffusers folder and Stability file -> `sd3-jax convert` (Orbax) -> `sd3-jax export` in the same
    layout: every tensor bit for bit, and diffusers' `SD3ControlNetModel.from_pretrained` loads the export
    (config included) to the same weights; a joint net refuses Stability's layout in one line."""
    from safetensors.numpy import load_file, save_file

    from sd3_jax.cli import main

    root, _, nets = tiny_cn
    for name in ("joint", "single", "inpaint"):
        ckpt = tmp_path / f"{name}_ckpt"
        assert (
            main(["convert", str(root / name), "--out", str(ckpt), "--dtype", "fp32", "--no-progress"]) == 0
        )
        out = tmp_path / f"{name}_export"
        assert main(["export", str(ckpt), "--format", "diffusers", "--out", str(out)]) == 0
        src = load_file(root / name / "diffusion_pytorch_model.safetensors")
        back = load_file(out / "diffusion_pytorch_model.safetensors")
        assert sorted(back) == sorted(src)
        assert all(back[k].dtype == src[k].dtype and np.array_equal(back[k], src[k]) for k in src)
        reloaded = SD3ControlNetModel.from_pretrained(out).eval()
        assert (
            reloaded.config.force_zeros_for_pooled_projection
            == nets[name].config.force_zeros_for_pooled_projection
        )
        assert reloaded.config.extra_conditioning_channels == nets[name].config.extra_conditioning_channels
        got = torch_state_dict_numpy(reloaded)
        assert sorted(got) == sorted(src) and all(np.array_equal(got[k], src[k]) for k in src)
    # Stability's layout (single-stream nets): a file named and laid out as sd3.5_large_controlnet_*.
    sai = tmp_path / "sd3.5_tiny_controlnet_canny.safetensors"
    assert main(["export", str(tmp_path / "single_ckpt"), "--format", "sai", "--out", str(sai)]) == 0
    stab = load_file(sai)
    assert any(k.endswith(".attn.qkv.weight") for k in stab) and not any(".to_q." in k for k in stab)
    ckpt2 = tmp_path / "from_sai"  # the head width (8 here, 64 in released nets) rides in the metadata
    assert main(["convert", str(sai), "--out", str(ckpt2), "--dtype", "fp32", "--no-progress"]) == 0
    out2 = tmp_path / "sai_again.safetensors"
    assert main(["export", str(ckpt2), "--format", "sai", "--out", str(out2)]) == 0
    again = load_file(out2)
    assert sorted(again) == sorted(stab) and all(np.array_equal(again[k], stab[k]) for k in stab)
    save_file(stab, tmp_path / "plain.safetensors")  # without sd3-jax's metadata: shapes and num_heads
    cfg_a, p_a = read_controlnet(str(root / "single"))
    cfg_b, p_b = read_controlnet(str(tmp_path / "plain.safetensors"), num_heads=2)
    assert cfg_a == cfg_b.replace(sample_size=8)  # no table of its own: the sample size is only config
    jax.tree.map(np.testing.assert_array_equal, p_a, p_b)
    capsys.readouterr()
    assert (
        main(["export", str(tmp_path / "joint_ckpt"), "--format", "sai", "--out", str(tmp_path / "x.sft")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "single-stream" in err[0], err
    assert not (tmp_path / "x.sft").exists()


def test_sample_cli_with_controlnets(tiny_cn, tmp_path, capsys):
    """`sd3-jax sample --controlnet PATH:SCALE --control-image IMG` (twice) writes the image the API samples
    with the same Controls; mismatched flags are one error line, exit 2, nothing written."""
    from PIL import Image

    from sd3_jax.cli import main
    from sd3_jax.controlnet import Control, load_controlnet
    from sd3_jax.pipeline import SD3Pipeline

    root, _, _ = tiny_cn
    rng = np.random.default_rng(7)
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"control{k}.png")
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "cn.png"
    args = ["sample", "--checkpoint", str(root / "ckpt"), "--prompt", PROMPT[0], "--steps", "3", "--cfg", "3",
            "--controlnet", f"{root / 'joint'}:0.7", "--control-image", str(paths[0]),
            "--controlnet", str(root / "joint2"), "--control-image", str(paths[1]),
            "--control-start", "0", "--control-end", "1", "--control-end", "0.5",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    got = np.asarray(Image.open(out))
    pipe = SD3Pipeline.load(str(root / "ckpt"))
    controls = [
        Control(load_controlnet(str(root / "joint")), Image.open(paths[0]), 0.7, 0.0, 1.0),
        Control(load_controlnet(str(root / "joint2")), Image.open(paths[1]), 1.0, 0.0, 0.5),
    ]
    want = pipe.generate(PROMPT[0], steps=3, guidance_scale=3.0, height=SIZE, width=SIZE, controls=controls,
                         progress=False)[0]  # fmt: skip
    np.testing.assert_array_equal(got, want)
    capsys.readouterr()
    for bad, msg in [
        (["--controlnet", str(root / "joint")], "one --control-image per --controlnet"),
        (["--control-image", str(paths[0])], "one --control-image per --controlnet"),
        (["--controlnet", f"{root / 'joint'}:x", "--control-image", str(paths[0])], "PATH[:SCALE]"),
        (["--controlnet", str(root / "inpaint"), "--control-image", str(paths[0])], "give mask="),
        (["--controlnet", str(root / "joint"), "--control-image", str(paths[0]), "--control-end", "2"],
         "start <= end <= 1"),
    ]:  # fmt: skip
        bad_out = tmp_path / "bad.png"
        base = ["sample", "--checkpoint", str(root / "ckpt"), "--prompt", "x", "--steps", "2"]
        assert main(base + bad + ["--out", str(bad_out), "--no-progress"]) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (bad, err)
        assert not bad_out.exists()


# ---------------------------------------------------------------------------------------------------------
# Training a ControlNet with `sd3-jax train --set adapter=controlnet`.


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory):
    """A demo-style checkpoint (3-block MMDiT, two tiny CLIPs, identity AE) and prepared shapes records with
    a "control" array (the image's silhouette, pixels in [-1, 1])."""
    from sd3_jax import demo
    from sd3_jax.data import shapes
    from sd3_jax.data.records import write_records
    from sd3_jax.train.state import init_params

    root = tmp_path_factory.mktemp("cn_base")
    model = demo.model_config().replace(depth=3, num_heads=1, head_dim=32)
    text = demo.text_encoders(str(root / "tok"))
    params = jax.device_get(init_params(model, jax.random.key(0)))
    r = np.random.default_rng(0)  # non-zero adaLN and output layers (flax inits them at zero)
    params = jax.tree.map(lambda a: a + 0.02 * r.standard_normal(a.shape).astype(a.dtype), params)
    demo.write_checkpoint(str(root / "ckpt"), params, text, str(root / "tok"), model)
    for name, n, seed in (("shapes", 32, 0), ("shapes-val", 8, 1)):
        ds = shapes.ShapesDataset(
            seed=seed, size=demo.SIZE, length=n, two_objects_prob=0.0, size_word_prob=0.0
        )
        items = [ds[i] for i in range(n)]
        images = np.stack([x["image"] for x in items])
        examples = demo.encode_examples(text, images, [x["caption"] for x in items])
        masks = (images.max(-1, keepdims=True) > 40).repeat(3, -1).astype(np.float16) * 2 - 1
        write_records(str(root / name), [{**e, "control": m} for e, m in zip(examples, masks)], num_shards=1)
    return root, model, params


def cn_cfg(root, model, steps: int):
    """test_finetune's LoRA run, training a 2-block ControlNet instead."""
    from test_finetune import lora_cfg

    return dataclasses.replace(lora_cfg(root, steps), model=model, adapter="controlnet", controlnet_layers=2)


def test_controlnet_run_inits_as_diffusers_trains_only_the_net_and_exports(demo_base, tmp_path, capsys):
    """The fresh state is diffusers' `SD3ControlNetModel.from_transformer(base, num_layers=2)` bit for bit
    (the base's patch embedding, embedders and first two blocks; zero controlnet blocks and input
    embedding). A 2-step run (`--set adapter=controlnet`): the state is the ControlNet alone (its Adam
    moments, no base param); WORKDIR/controlnet/ is the EMA net in diffusers' layout, which diffusers loads
    and which steers sampling; the workdir itself loads as that net at its step, and `sd3-jax export
    WORKDIR --step 2` writes the same tensors. Then `check_prepare_with_controls` on the same checkpoint."""
    from sd3_jax.controlnet import Control, load_controlnet
    from sd3_jax.convert.mmdit import config_to_diffusers, export_mmdit
    from sd3_jax.pipeline import SD3Pipeline
    from sd3_jax.sharding.mesh import MeshConfig, make_mesh
    from sd3_jax.train.config import apply_overrides
    from sd3_jax.train.controlnet import create_controlnet_state
    from sd3_jax.train.loop import train
    from sd3_jax.train.report import read_metrics
    from sd3_jax.train.state import make_optimizer

    root, model, params = demo_base
    cfg = apply_overrides(dataclasses.replace(cn_cfg(root, model, 2), adapter=""), ["adapter=controlnet"])
    conf = {k: v for k, v in config_to_diffusers(model).items() if not k.startswith("_")}
    base = SD3Transformer2DModel(**conf)
    base.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in export_mmdit(params, model).items()})
    ref = SD3ControlNetModel.from_transformer(base, num_layers=2, num_extra_conditioning_channels=0)
    _, want = read_controlnet(torch_state_dict_numpy(ref), num_heads=1)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    fresh = create_controlnet_state(cfg, make_optimizer(cfg.optim, 1), mesh, jax.random.key(3), params)
    got = jax.device_get(fresh.params)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert not np.abs(got["blocks_0"]["controlnet_block"]["kernel"]).any()

    wd = tmp_path / "run"
    state = train(cfg, str(wd), progress=False)
    losses = [m["loss"] for m in read_metrics(str(wd)) if "loss" in m]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert [m["step"] for m in read_metrics(str(wd)) if m.get("kind") == "eval"] == [2]
    assert set(state.params) == {
        "pos_embed",
        "pos_embed_input",
        "time_text_embed",
        "context_embedder",
        "blocks_0",
    }
    table = "['pos_embed']['pos_embed']"  # the frozen position table has no moments
    trained = [
        x for p, x in jax.tree_util.tree_leaves_with_path(state.params) if jax.tree_util.keystr(p) != table
    ]
    moments = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moments == sorted(2 * [x.shape for x in trained])
    assert np.abs(jax.device_get(state.params["blocks_0"]["controlnet_block"]["kernel"])).max() > 0

    net = load_controlnet(str(wd / "controlnet"))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(net.params), jax.device_get(state.ema_params))
    assert SD3ControlNetModel.from_pretrained(wd / "controlnet").config.num_layers == 2
    from_run = load_controlnet(str(wd), step=2)  # the workdir itself: the EMA net of a step's checkpoint
    assert from_run.config == net.config
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_run.params), jax.device_get(net.params))
    with pytest.raises(ValueError, match="no checkpoint at step 1 \\(have 2\\)"):
        load_controlnet(str(wd), step=1)
    with pytest.raises(ValueError, match="a ControlNet; sample a base checkpoint with it"):
        SD3Pipeline.load(str(wd))
    from safetensors.numpy import load_file

    from sd3_jax.cli import main

    assert (
        main(["export", str(wd), "--format", "diffusers", "--out", str(tmp_path / "at2"), "--step", "2"]) == 0
    )
    name = "diffusion_pytorch_model.safetensors"
    want_t, got_t = load_file(wd / "controlnet" / name), load_file(tmp_path / "at2" / name)
    assert want_t.keys() == got_t.keys()
    for k in want_t:
        np.testing.assert_array_equal(got_t[k], want_t[k])
    pipe = SD3Pipeline.load(str(root / "ckpt"))
    ctrl = np.zeros((16, 16, 3), np.uint8)
    ctrl[:8, :8] = 255
    kw = dict(steps=3, progress=False, output="float")
    with_net = pipe.generate("a red circle", controls=[Control(net, ctrl)], **kw)
    assert np.abs(with_net - pipe.generate("a red circle", **kw)).max() > 1e-3
    check_prepare_with_controls(root, tmp_path, capsys)  # here: the fixture is built once


def check_prepare_with_controls(root, tmp_path, capsys):
    """`sd3-jax prepare` on a JSONL with "control" images: each record's `control` is the control image
    resized to the target's size, cropped with it, and encoded as the pipeline encodes it for a trained net
    (here the identity autoencoder: pixels in [-1, 1]); a line without one is left out and counted; a random
    bucket crop takes both images at the same offset."""
    from PIL import Image

    from sd3_jax.cli import main
    from sd3_jax.data.pipeline import BucketResizeCrop
    from sd3_jax.data.records import PreparedSource

    rng = np.random.default_rng(5)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / f"c{i}.png")
        rows.append({"image": f"im{i}.png", "caption": "a red circle", "control": f"c{i}.png"})
    rows.append({"image": "im0.png", "caption": "a blue square"})  # no control: left out
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rec"
    args = ["prepare", str(tmp_path / "d.jsonl"), "--checkpoint", str(root / "ckpt"), "--out", str(out)]
    args += ["--size", "16", "--batch-size", "2", "--max-sequence-length", "0", "--val-fraction", "0"]
    assert main(args) == 0
    recs = PreparedSource(str(out))
    assert len(recs) == 4
    for i in range(4):
        control = np.asarray(Image.open(tmp_path / f"c{i}.png").resize((24, 20), Image.BICUBIC))
        want = BucketResizeCrop([(16, 16)]).random_map({"image": control}, np.random.default_rng(0))["image"]
        np.testing.assert_allclose(np.asarray(recs[i]["control"], np.float32), want / 127.5 - 1, atol=2e-3)
    assert "'missing_control': 1" in capsys.readouterr().out
    image = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
    got = BucketResizeCrop([(32, 32)], random_crop=True).random_map(
        {"image": image, "control": image.copy()}, np.random.default_rng(9)
    )
    np.testing.assert_array_equal(got["image"], got["control"])
