#!/usr/bin/env bash
# Runs the benchmarks of one device preset, then regenerates BENCHMARKS.md from bench/results/*.json.
#
#   bench/run_all.sh [--device cpu|gpu|both] [--full] [--skip-conversion] [--tpu-fit]
#
# cpu (default): the small configs on this host, each script a few minutes at most; sampling and training
#   run twice, each framework with its default threads and then both pinned to one thread.
# gpu: SD3 Medium on the first GPU, cut to one 15-minute lease (bench/gpu_lease.sh, about 9 minutes:
#   matmul, sampling at 1024 px, training at 256 px, compile, profile); with --full the whole sweep
#   (training at 256 and 512 px under two remat policies, conversion: an hour or more).
# both: cpu, then gpu.
# --tpu-fit: also the TPU fit table (bench/tpu_fit.py: hours of TPU compiles on this host, resumable).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cpu
CONVERSION=1
TPU_FIT=0
FULL=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --skip-conversion) CONVERSION=0; shift ;;
    --full) FULL=1; shift ;;
    --tpu-fit) TPU_FIT=1; shift ;;
    *) echo "usage: bench/run_all.sh [--device cpu|gpu|both] [--full] [--skip-conversion] [--tpu-fit]" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in
  cpu) DEVICES=(cpu) ;;
  gpu) DEVICES=(gpu) ;;
  both) DEVICES=(cpu gpu) ;;
  *) echo "--device must be cpu, gpu or both" >&2; exit 2 ;;
esac

if [[ -f .venv/bin/activate ]]; then . .venv/bin/activate; fi

for d in "${DEVICES[@]}"; do
  if [[ "$d" == gpu && "$FULL" == 0 ]]; then
    echo "== gpu: the lease-sized run (bench/gpu_lease.sh; --full for the whole sweep)"
    bash bench/gpu_lease.sh
    continue
  fi
  if [[ "$d" == gpu ]]; then platform=cuda; else platform=cpu; fi
  echo "== $d: matmul rate"
  python bench/matmul.py --device "$d"
  echo "== $d: sampling (forward and 28-step CFG loop)"
  python bench/sampling.py --device "$d"
  echo "== $d: training step"
  python bench/training.py --device "$d"
  if [[ "$CONVERSION" == 1 ]]; then
    echo "== $d: conversion and loading of full-size single files (SD3 Medium fp16 and bf16, SD3.5 Large)"
    python bench/conversion.py --device "$d"
  fi
  if [[ "$d" == cpu ]]; then
    # The same comparisons with both frameworks pinned to one thread: on a shared host this is the
    # like-for-like figure (torch's OpenMP pool and XLA's Eigen pool both degrade when cores are taken).
    echo "== cpu, one thread each: matmul, sampling, training"
    python bench/matmul.py --device cpu --threads 1
    python bench/sampling.py --device cpu --threads 1
    python bench/training.py --device cpu --threads 1
  fi
  echo "== $d: compile time of the full presets"
  JAX_PLATFORMS="$platform" python bench/compile.py --out "bench/results/compile-$d.json"
done

if [[ "$TPU_FIT" == 1 ]]; then
  for task in sample train bucket max-batch; do
    echo "== TPU fit: $task"
    JAX_PLATFORMS=cpu python bench/tpu_fit.py --task "$task"
  done
fi

python bench/render.py --out BENCHMARKS.md
python bench/readme.py  # the README's measured figures, from the same files
echo "wrote BENCHMARKS.md and README.md's measured figures"
