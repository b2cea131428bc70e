#!/usr/bin/env bash
# `run_all.sh --device gpu` cut to one GPU lease (about 9 minutes of a 15-minute lease on an H200):
#
#   bench/gpu_lease.sh [SECONDS]   (default 540; each stage is capped, the last ones get what is left)
#
# A smoke check of the cuDNN attention at SD3 Medium's 1024 px shape against XLA's (the backend falls back
# to xla for the run if it fails), the matmul rate, sampling (batches 1 and 4; 3 forward and 2 loop
# repeats), one training sweep (256 px, no remat, batches 32 and 48), the compile times and a profile of
# the forward and the gradient by op kind (bench/profile_gpu.py), as far as the time goes. Conversion
# (disk-bound, measured on the CPU host) is left out. Results land in bench/results/*-gpu.json, each
# written as soon as a row is measured, and are copied to $OUT when set.
#
# On the lent H200 (jax 0.11, flax, optax, torch, transformers installed) carry as wheels: diffusers,
# importlib_metadata, grain, array_record and portpicker (2026-12-04: 11 MB together), installed with
# `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and PYTHONPATH=/tmp/site.
set -u
cd "$(dirname "$0")/.."
deadline=$((SECONDS + ${1:-540}))
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

stage() {  # stage CAP_SECONDS CMD...: runs CMD for at most CAP seconds or what is left of the deadline
  local cap=$1 t=$((deadline - SECONDS))
  shift
  ((t < cap)) && cap=$t
  if ((cap < 30)); then echo "== skipped, no time left: $*"; return 1; fi
  echo "== [${SECONDS}s] $* (at most ${cap}s)"
  timeout --signal=INT --kill-after=15 "$cap" "$@"
  local rc=$?
  echo "== [${SECONDS}s] rc=$rc"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c "import jax, flax, optax, torch, diffusers; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__, jax.devices())"

ATT=auto
stage 60 $PY - <<'PY' || ATT=xla
import jax, jax.numpy as jnp, numpy as np
from sd3_jax.nn.attention import attention
q, k, v = (jax.random.normal(jax.random.key(i), (2, 4429, 24, 64), jnp.bfloat16) for i in range(3))
a = jax.jit(lambda q, k, v: attention(q, k, v, backend="cudnn"))(q, k, v).astype(jnp.float32)
b = jax.jit(lambda q, k, v: attention(q, k, v, backend="xla"))(q, k, v).astype(jnp.float32)
err = float(jnp.max(jnp.abs(a - b)))
print(f"cudnn vs xla attention, (2, 4429, 24, 64) bf16: max abs diff {err:.3g}")
assert np.isfinite(err) and err < 5e-2, err
PY
echo "attention backend for this run: $ATT"

stage 100 $PY bench/matmul.py --device gpu
stage 330 $PY bench/sampling.py --device gpu --attention "$ATT" --forward-repeats 3 --loop-repeats 2
stage 150 $PY bench/training.py --device gpu --attention "$ATT" --sizes 256 --remat none --batches 32,48
stage 120 env JAX_PLATFORMS=cuda $PY bench/compile.py --out bench/results/compile-gpu.json
stage 90 $PY bench/profile_gpu.py --device gpu
if [[ -n "${OUT:-}" ]]; then cp bench/results/*-gpu.json "$OUT"/ 2>/dev/null; ls -la "$OUT"; fi
