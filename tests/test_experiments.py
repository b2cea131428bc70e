"""The demo and the three studies run end to end in their smoke modes (a few steps each)."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))


def test_demo_smoke_and_sample_cli(tmp_path, capsys):
    from PIL import Image

    from sd3_jax import demo
    from sd3_jax.cli import main

    out = tmp_path / "demo_out"
    demo.main(["--out", str(out), "--steps", "2", "--examples", "64"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("adherence seen=") and " held_out=" in last
    for f in ("samples.png", "loss.png", "metrics.jsonl", "adherence.json", "checkpoint/sd3_jax.json"):
        assert (out / f).exists(), f
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
    # Preference tuning of that checkpoint through the trainer runs end to end too, with both kinds of pairs.
    import dpo

    for kind in ("colour", "judged"):
        args = ["--checkpoint", str(out / "checkpoint"), "--out", str(tmp_path / kind), "--pairs", kind]
        res = dpo.main(args + ["--steps", "1", "--n", "8", "--batch-size", "4"])
        assert set(res["before"]) == set(res["after"]) == {"seen", "held_out"}
        assert res["pair_counts"]["pairs"] >= 4 and res["log"][0]["step"] == 1
        assert (tmp_path / kind / "results.json").exists()
        assert (tmp_path / kind / "work" / "train" / "lora" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("study", ["formulations", "scaling", "sampling"])
def test_study_smoke(study, tmp_path):
    module = __import__(study)
    results = module.main(["--smoke", "--out", str(tmp_path / study)])
    assert results
    assert (tmp_path / study / "results.json").exists()
    assert any(p.endswith(".png") for p in os.listdir(tmp_path / study))
