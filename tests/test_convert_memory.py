"""Conversion peak memory: a synthesized full-size SD3 Medium single file converts within 2 GB + its
largest tensor of resident memory (the converter holds one param at a time)."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np

from sd3_jax.convert.mapping import source_shapes
from sd3_jax.convert.mmdit import SAI_PREFIX, abstract_params, sai_rules
from sd3_jax.convert.safetensors_io import write_safetensors
from sd3_jax.nn.mmdit import MMDiTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthesize_sd3_medium(path: str) -> int:
    """Writes SD3 Medium's transformer in Stability's layout, bf16, streamed tensor by tensor.

    Values are a constant 0.01 (memory does not depend on them). Returns the largest tensor's bytes.
    """
    cfg = MMDiTConfig.sd3_medium()
    shapes = source_shapes(sai_rules(cfg), abstract_params(cfg))
    bf16 = np.dtype(ml_dtypes.bfloat16)
    header = {SAI_PREFIX + k: (s, bf16) for k, s in shapes.items()}
    items = ((k, np.full(s, 0.01, bf16)) for k, (s, _) in header.items())
    write_safetensors(path, items, shapes=header)
    return max(int(np.prod(s)) * 2 for s, _ in header.values())


def test_sd3_medium_converts_within_2gb_plus_largest_tensor(tmp_path):
    src = str(tmp_path / "sd3_medium.safetensors")
    largest = synthesize_sd3_medium(src)
    assert os.path.getsize(src) > 4e9  # 2.03 B params in bf16
    out = str(tmp_path / "ckpt")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sd3_jax.cli", "convert", src, "--out", out, "--no-progress"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0, stderr[-3000:]
    peak = usage.ru_maxrss * 1024  # Linux reports KiB
    print(f"peak RSS {peak / 2**30:.2f} GiB, largest tensor {largest / 2**20:.0f} MiB; {stdout.strip()}")
    assert peak < 2 * 2**30 + largest
    assert "transformer" in stdout and os.path.exists(os.path.join(out, "sd3_jax.json"))
