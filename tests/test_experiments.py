"""The demo and the studies run end to end in their smoke modes (a few steps each)."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import shown_warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))


def test_demo_smoke_and_sample_cli(tmp_path, capfd):
    """The demo runs end to end with nothing on stderr but its training progress bar and no warning (as a
    normal run shows them), and its last line is the adherence line."""
    from PIL import Image

    from sd3_jax import demo
    from sd3_jax.cli import main

    out = tmp_path / "demo_out"
    with shown_warnings() as caught:
        demo.main(["--out", str(out), "--steps", "2", "--examples", "64"])
    std = capfd.readouterr()
    assert not caught, [str(w.message) for w in caught]
    noise = [
        ln for ln in std.err.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("train:")
    ]
    assert not noise, noise
    last = std.out.strip().splitlines()[-1]
    assert last.startswith("adherence seen=") and " held_out=" in last
    for f in ("samples.png", "loss.png", "metrics.jsonl", "adherence.json", "checkpoint/sd3_jax.json"):
        assert (out / f).exists(), f
    grid = Image.open(out / "work" / "train" / "samples" / "step_000002.png")  # 4 prompts x 4 images
    assert grid.size == (4 * demo.SIZE, 4 * demo.SIZE)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "work" / "train" / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Images("samples")] == [1, 2]
    assert [e.step for e in tb.Scalars("train/loss")] == [1, 2]
    res = json.loads((out / "adherence.json").read_text())
    assert 0 <= res["seen"] <= 1 and 0 <= res["held_out"] <= 1
    png = tmp_path / "red.png"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(out / "checkpoint"),
                "--prompt",
                "a red square in the top left",
                "--out",
                str(png),
                "--no-progress",
            ]
        )
        == 0
    )
    assert Image.open(png).size == (demo.SIZE, demo.SIZE)
    # Preference tuning of that checkpoint through the trainer runs end to end too, on judged on-policy
    # pairs (colour pairs: test_dpo_mislabelled_base).
    import dpo

    for kind in ("judged",):
        args = ["--checkpoint", str(out / "checkpoint"), "--out", str(tmp_path / kind), "--pairs", kind]
        res = dpo.main(args + ["--steps", "1", "--n", "8", "--batch-size", "4"])
        assert (
            set(res["before"]) == set(res["after"]) == {"seen", "held_out", "colour_seen", "colour_held_out"}
        )
        assert res["pair_counts"]["pairs"] >= 4 and res["log"][0]["step"] == 1
        assert (tmp_path / kind / "results.json").exists()
        assert (tmp_path / kind / "work" / "train" / "lora" / "pytorch_lora_weights.safetensors").exists()
    # So does a ControlNet on it, and its diffusers export samples what sd3-jax samples.
    import controlnet

    args = ["--checkpoint", str(out / "checkpoint"), "--out", str(tmp_path / "cn"), "--steps", "2"]
    res = controlnet.main(args + ["--examples", "64", "--n", "4", "--batch-size", "4"])
    assert set(res["before"]) == set(res["after"]) == {"position", "adherence"}
    assert res["diffusers_max_abs_diff"] < 1e-5 and res["log"][0]["step"] == 1
    assert (tmp_path / "cn" / "grid.png").exists() and (tmp_path / "cn" / "results.json").exists()


def test_dpo_mislabelled_base(tmp_path):
    """Captions mislabelled at rate p change only the colour, never to a held-out combination; the
    --mislabel study trains such a base and tunes it."""
    import dpo
    import numpy as np

    from sd3_jax.data import shapes

    held, n, p = shapes.holdout_combos(), 4000, 0.3
    caps = shapes.prompts("seen", n, seed=3)
    out = [dpo.mislabel(c, p, np.random.default_rng((7, i))) for i, c in enumerate(caps)]
    swapped = 0
    for c, m in zip(caps, out):
        (a,), (b,) = shapes.parse_caption(c), shapes.parse_caption(m)
        assert (b.shape, b.position) == (a.shape, a.position) and b.combo not in held
        swapped += a.color != b.color
    assert abs(swapped / n - p) < 4 * np.sqrt(p * (1 - p) / n)
    assert dpo.mislabel(caps[0], 0.0, np.random.default_rng(0)) == caps[0]
    # McNemar's exact test: 10 fixed, 2 broken of 12 discordant prompts is 2 (1 + 12 + 66) / 2^12.
    m = dpo.mcnemar([False] * 10 + [True] * 2 + [True] * 5, [True] * 10 + [False] * 2 + [True] * 5)
    assert (m["fixed"], m["broken"]) == (10, 2) and m["p_value"] == pytest.approx(158 / 4096)
    assert dpo.mcnemar([True, False], [True, False])["p_value"] == 1.0

    args = ["--mislabel", "0.5", "--base-steps", "2", "--base-examples", "64", "--out", str(tmp_path / "m")]
    res = dpo.main(args + ["--steps", "1", "--n", "8", "--batch-size", "4"])
    assert (
        res["base"]["mislabel"] == 0.5
        and (tmp_path / "work" / "base_mislabel0.5_2steps_64" / "checkpoint").exists()
    )
    assert res["log"][0]["step"] == 1 and set(res["paired"]) == {"seen", "held_out"}
    assert (tmp_path / "m" / "samples_before.png").exists() and (
        tmp_path / "m" / "samples_after.png"
    ).exists()


@pytest.mark.parametrize("study", ["formulations", "scaling", "sampling"])
def test_study_smoke(study, tmp_path):
    module = __import__(study)
    results = module.main(["--smoke", "--out", str(tmp_path / study)])
    assert results
    assert (tmp_path / study / "results.json").exists()
    assert any(p.endswith(".png") for p in os.listdir(tmp_path / study))
