"""Prompt encoding: TextEncoders.encode_prompt against diffusers' StableDiffusion3Pipeline.encode_prompt on
a tiny saved pipeline (fp32, tolerance 1e-5 x max|reference| on all four outputs); the truncation warning."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import assert_close_rel
from tiny_components import DIMS, make_tiny_sd3_pipeline

from sd3_jax.text import TextEncoders


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(diffusers pipeline, ours) from the same saved folder, with and without T5."""
    from diffusers import StableDiffusion3Pipeline

    path = tmp_path_factory.mktemp("tiny_sd3")
    pipe = make_tiny_sd3_pipeline(path)
    loaded = StableDiffusion3Pipeline.from_pretrained(path)
    no_t5 = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    return {
        "t5": (loaded, TextEncoders.from_pretrained(path)),
        "no_t5": (no_t5, TextEncoders.from_pretrained(path, use_t5=False)),
    }


def compare(pipe, ours, prompt, **kw):
    ref_kw = {k: v for k, v in kw.items() if k not in ("prompt_2", "prompt_3")}
    with torch.no_grad():
        ref = pipe.encode_prompt(prompt, kw.get("prompt_2"), kw.get("prompt_3"), **ref_kw)
    got = ours.encode_prompt(prompt, **kw)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled", "negative_pooled")
    for name, g, r in zip(names, got, ref):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == np.float32, name
        assert_close_rel(np.asarray(g), r.numpy(), what=name)
    return got


CASES = {
    "default": dict(negative_prompt="a dog"),
    "no_negative": dict(),
    "batch_and_images": dict(negative_prompt=["a dog", ""], num_images_per_prompt=2),
    "clip_skip": dict(negative_prompt="a horse", clip_skip=1),
    "short_t5": dict(negative_prompt="a dog", max_sequence_length=16),
    "no_cfg": dict(do_classifier_free_guidance=False),
    "per_encoder_prompts": dict(prompt_2="an astronaut", prompt_3="the moon", negative_prompt="a dog"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(pipes, case):
    pipe, ours = pipes["t5"]
    kw = CASES[case]
    prompt = (
        ["a photo of a cat", "an astronaut riding a horse"]
        if case == "batch_and_images"
        else "a photo of a cat"
    )
    got = compare(pipe, ours, prompt, **kw)
    n = len(prompt) if isinstance(prompt, list) else 1
    n *= kw.get("num_images_per_prompt", 1)
    assert got[0].shape == (n, 77 + kw.get("max_sequence_length", 256), DIMS["t5"])
    assert got[2].shape == (n, DIMS["pooled"])


def test_without_t5_gives_zeros(pipes):
    pipe, ours = pipes["no_t5"]
    got = compare(pipe, ours, ["a photo of a cat", "a dog"], negative_prompt="", max_sequence_length=32)
    assert got[0].shape == (2, 77 + 32, DIMS["t5"])  # joint_attention_dim from transformer/config.json
    assert not np.asarray(got[0][:, 77:]).any()
    assert not np.asarray(got[0][:, :77, DIMS["clip_l"] + DIMS["clip_g"] :]).any()


def test_truncation_warning_names_encoder_and_count(pipes, caplog):
    """A prompt too long for every encoder: one warning per encoder with the number of dropped tokens."""
    _, ours = pipes["t5"]
    long = " ".join(["a photo of a cat riding a horse on the moon"] * 10)
    short = "a dog"
    n_clip = len(ours.clip_l.tokenizer(long).input_ids)
    n_t5 = len(ours.t5.tokenizer(long).input_ids)
    assert n_clip > 77 and n_t5 > 64
    with caplog.at_level(logging.WARNING, logger="sd3_jax.text"):
        ours.encode_prompt([short, long], do_classifier_free_guidance=False, max_sequence_length=64)
    messages = [r.getMessage() for r in caplog.records if r.name == "sd3_jax.text"]
    assert len(messages) == 3, messages
    clip_l, clip_g, t5 = messages
    assert clip_l.startswith("CLIP-L") and clip_g.startswith("CLIP-G") and t5.startswith("T5")
    assert f"prompt 1 had {n_clip}, so its last {n_clip - 77} were dropped" in clip_l
    assert f"prompt 1 had {n_t5}, so its last {n_t5 - 64} were dropped" in t5
    assert "moon" in t5
