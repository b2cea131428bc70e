"""`sd3-jax train` as a fine-tuner: LoRA adapters on a frozen checkpoint and Diffusion-DPO on pairs."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest
from PIL import Image

from sd3_jax import demo
from sd3_jax.cli import main
from sd3_jax.convert.lora import import_lora
from sd3_jax.convert.mapping import CheckpointError
from sd3_jax.data import shapes
from sd3_jax.lora import LoraConfig, apply_lora
from sd3_jax.train.config import DataConfig, OptimConfig, TrainConfig, apply_overrides, check_finetune
from sd3_jax.train.loop import train
from sd3_jax.train.report import read_metrics
from sd3_jax.train.state import init_params

MODEL = demo.model_config().replace(depth=1, num_heads=1, head_dim=32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A demo-style sd3-jax checkpoint (depth-1 MMDiT, two tiny CLIPs, identity AE) and prepared shapes."""
    root = tmp_path_factory.mktemp("base")
    text = demo.text_encoders(str(root / "tok"))
    params = jax.device_get(init_params(MODEL, jax.random.key(0)))
    # Non-zero adaLN and output layers (flax init leaves them zero), so the base depends on its input.
    r = np.random.default_rng(0)
    params = jax.tree.map(lambda a: a + 0.02 * r.standard_normal(a.shape).astype(a.dtype), params)
    demo.write_checkpoint(str(root / "ckpt"), params, text, str(root / "tok"), MODEL)
    demo.prepare(text, str(root / "shapes"), 64, 0)
    demo.prepare(text, str(root / "shapes-val"), 16, 1)
    return root, params


def lora_cfg(root, steps: int) -> TrainConfig:
    return TrainConfig(
        model=MODEL,
        data=DataConfig(kind="prepared", path=str(root / "shapes")),
        optim=OptimConfig(lr=1e-2),
        batch_size=8,
        steps=steps,
        ema_decay=0.5,
        compute_dtype="float32",
        checkpoint_every=2,
        log_every=1,
        eval_every=2,
        init_from=str(root / "ckpt"),
        adapter="lora",
        lora=LoraConfig(rank=2, alpha=4.0, targets=("to_q", "to_v", "fc1")),
    )


def test_lora_run_trains_only_the_adapter_resumes_and_exports(base, tmp_path):
    root, params = base
    straight = tmp_path / "straight"
    state = train(lora_cfg(root, 4), str(straight), progress=False)
    losses = [m["loss"] for m in read_metrics(str(straight)) if "loss" in m]
    assert len(losses) == 4 and all(map(math.isfinite, losses))
    assert [m["step"] for m in read_metrics(str(straight)) if m.get("kind") == "eval"] == [2, 4]
    # The state is the adapter alone: factors a (in, r) and b (r, out) on the targets, nothing of the base.
    leaves = jax.tree_util.tree_leaves_with_path(state.params.params)
    names = {str(p[-1].key) for p, _ in leaves}
    modules = {tuple(k.key for k in p[:-1]) for p, _ in leaves}
    assert names == {"a", "b"} and {m[-1] for m in modules} == {"to_q", "to_v", "fc1"}
    # Adam's two moments per adapter leaf, of its shape; all else in the optimizer state is a scalar count.
    moments = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moments == sorted(2 * [x.shape for _, x in leaves])
    b = [leaf for p, leaf in leaves if p[-1].key == "b"]
    assert all(float(np.abs(x).max()) > 0 for x in b)  # the adapter moved off its zero init

    # Resume through the CLI: 2 steps, then on to 4 in the same workdir, equals the straight run.
    cfg_file = tmp_path / "lora.py"
    cfg_file.write_text(
        f"import pathlib, sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_finetune import lora_cfg\n"
        f"def get_config():\n    return lora_cfg(pathlib.Path({str(root)!r}), 4)\n"
    )
    wd = tmp_path / "resumed"
    run = ["train", "--config", str(cfg_file), "--workdir", str(wd), "--no-progress"]
    assert main(run + ["--set", "steps=2"]) == 0
    assert main(run) == 0
    resumed = [m["loss"] for m in read_metrics(str(wd)) if "loss" in m]
    np.testing.assert_allclose(resumed, losses, rtol=1e-6)

    # The exported adapter is the EMA adapter, in diffusers' layout (which folds alpha / r into the factors).
    got = apply_lora(params, [(import_lora(str(straight / "lora"), MODEL), 1.0)])
    want = apply_lora(params, [(jax.device_get(state.ema_params), 1.0)])
    for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7, err_msg=str(p))
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(params)))

    # The workdir itself is the adapter at any checkpointed step; `export WORKDIR --step` writes it.
    at4 = import_lora(str(straight), MODEL)  # the latest: the EMA adapter of the state at the end
    jax.tree.map(np.testing.assert_array_equal, at4, jax.device_get(state.ema_params))
    assert at4.scaling == state.ema_params.scaling == 2.0
    at2 = import_lora(str(straight), MODEL, step=2)
    assert jax.tree.structure(at2) == jax.tree.structure(at4)
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(at2), jax.tree.leaves(at4)))
    out = tmp_path / "x"
    assert main(["export", str(straight), "--format", "diffusers", "--out", str(out), "--step", "4"]) == 0
    name = "pytorch_lora_weights.safetensors"
    assert (out / name).read_bytes() == (straight / "lora" / name).read_bytes()
    with pytest.raises(ValueError, match="no checkpoint at step 3 \\(have 2, 4\\)"):
        import_lora(str(straight), MODEL, step=3)
    with pytest.raises(CheckpointError, match="its LoRA is for another model"):
        import_lora(str(straight), MODEL.replace(head_dim=64))


def write_pairs(folder, n: int = 8) -> str:
    """A JSONL of (caption, chosen = right colour, rejected = another colour) PNGs, captions encoded later."""
    folder.mkdir()
    caps = shapes.prompts("seen", n, seed=3)
    rows = []
    for i, c in enumerate(caps):
        (spec,) = shapes.parse_caption(c)
        other = dataclasses.replace(spec, color="blue" if spec.color != "blue" else "red")
        Image.fromarray(shapes.render([spec], demo.SIZE, seed=i)).save(folder / f"w{i}.png")
        Image.fromarray(shapes.render([other], demo.SIZE, seed=i)).save(folder / f"l{i}.png")
        rows.append({"caption": c, "chosen": f"w{i}.png", "rejected": f"l{i}.png"})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dpo_run_starts_at_log2_and_raises_the_margin(base, tmp_path):
    """`sd3-jax train`'s DPO path with the SFT anchor: the closed-form first step, then a rising margin."""
    root, _ = base
    pairs = write_pairs(tmp_path / "pairs")
    cfg = dataclasses.replace(
        lora_cfg(root, 6),
        data=DataConfig(kind="pairs", path=pairs),
        objective="dpo",
        dpo_beta=500.0,
        dpo_sft_weight=0.5,
        eval_every=0,
        ema_decay=0.0,
        optim=OptimConfig(lr=3e-3),
    )
    wd = tmp_path / "dpo"
    train(cfg, str(wd), progress=False)
    logs = [m for m in read_metrics(str(wd)) if m.get("kind") == "log"]
    losses = [m["loss"] for m in read_metrics(str(wd)) if "loss" in m]
    # B = 0 at init, so the first step's policy is the reference: margin 0, DPO loss -log sigmoid(0) = log 2,
    # plus the SFT anchor 0.5 e_theta^w.
    assert abs(logs[0]["reward_margin"]) < 1e-3
    np.testing.assert_allclose(logs[0]["dpo_loss"], math.log(2), rtol=1e-4)
    np.testing.assert_allclose(losses[0], math.log(2) + 0.5 * logs[0]["model_err_w"], rtol=1e-4)
    assert logs[-1]["reward_margin"] > 0 and logs[-1]["dpo_loss"] < math.log(2)
    assert os.path.exists(wd / "lora" / "pytorch_lora_weights.safetensors")


def test_finetune_settings_that_do_not_go_together_raise(base):
    root, _ = base
    cfg = lora_cfg(root, 1)
    with pytest.raises(ValueError, match="adapter='lora' needs init_from"):
        check_finetune(dataclasses.replace(cfg, init_from=""))
    with pytest.raises(ValueError, match="objective='dpo' trains through a LoRA adapter"):
        check_finetune(dataclasses.replace(cfg, adapter="", objective="dpo"))
    with pytest.raises(ValueError, match="set data.kind='pairs', not 'prepared'"):
        check_finetune(dataclasses.replace(cfg, objective="dpo"))
    with pytest.raises(ValueError, match="data.kind='pairs' is for objective='dpo'"):
        check_finetune(dataclasses.replace(cfg, data=DataConfig(kind="pairs", path="x.jsonl")))
    with pytest.raises(ValueError, match=r"dpo_sft_weight \(-1.0\) must be >= 0"):
        apply_overrides(cfg, ["dpo_sft_weight=-1"])
    with pytest.raises(ValueError, match="adapter 'lorax' unknown"):
        apply_overrides(cfg, ["adapter=lorax"])
    assert apply_overrides(cfg, ["lora.rank=8", "lora.targets=to_q,fc2"]).lora == LoraConfig(
        rank=8, alpha=4.0, targets=("to_q", "fc2")
    )


def test_pairs_read_from_many_threads_equal_sequential_reads(base, tmp_path):
    """grain reads examples from a thread pool; encoding captions and images must not race."""
    from concurrent.futures import ThreadPoolExecutor

    from sd3_jax.train.data import make_source

    root, _ = base
    pairs = write_pairs(tmp_path / "pairs", n=24)
    cfg = dataclasses.replace(lora_cfg(root, 1), data=DataConfig(kind="pairs", path=pairs), objective="dpo")
    src = make_source(cfg)
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(src.__getitem__, range(len(src))))
    for i, got in enumerate(parallel):
        want = src[i]
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"item {i} {k}")
