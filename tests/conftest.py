"""Shared fixtures and helpers for the test suite."""

from __future__ import annotations

import contextlib
import os
import warnings

# libtpu is installed (the TPU compile tests): without this jax would look for a TPU at start-up.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI turns on JAX's persistent compilation cache in its process; tests call the CLI in-process, and
# the TPU compiles that follow would then try (and fail, loudly) to read CPU-hosted entries back.
os.environ["SD3_JAX_CACHE"] = ""

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# A tiny diffusers SD3Transformer2DModel config (the parity, layout and LoRA tests share it).
TINY_MMDIT = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20,
    pos_embed_max_size=12,
)  # fmt: skip


def randomize_(module, seed: int = 0, std: float = 0.1) -> None:
    """Overwrites every parameter of a torch module with random, never-zero values (in place).

    Norm scales are drawn around 1 so activations keep their size; everything else around 0.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            if "norm" in name and name.endswith("weight") and p.ndim == 1:
                r = r + 1.0
            p.copy_(r.to(p.dtype))


def torch_state_dict_numpy(module) -> dict[str, np.ndarray]:
    """A torch module's state dict as numpy arrays (fp32 stays fp32)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def assert_close_rel(ours, ref, rtol: float = 1e-5, what: str = "") -> float:
    """max|ours - ref| <= rtol * max|ref|; returns the achieved ratio."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    scale = np.abs(ref).max()
    assert scale > 0, f"{what}: reference is all zeros"
    err = np.abs(ours - ref).max() / scale
    assert err <= rtol, f"{what}: max abs diff {err:.3g} x max|ref| > {rtol}"
    return float(err)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@contextlib.contextmanager
def shown_warnings():
    """Records the warnings a normal run would print (Python's default filters: deprecations, import and
    resource warnings hidden), whatever filters pytest set."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        yield caught
