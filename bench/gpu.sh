#!/usr/bin/env bash
# The GPU check in one command (bench/gpu_check.py): device and compute capability, the expert and attention
# paths taken, host syncs per training step, planned vs max_memory_allocated vs max_memory_reserved at the
# reference micro-batch, tokens/s and MFU per attention backend beside sdpa, flex vs sdpa gradients, and the MoE
# layer per expert path against a dense FFN. Writes metrics/bench_gpu.json and the bench_gpu table of
# docs/performance.md; compiler caches go to a scratch folder that is removed on exit.
#   bash bench/gpu.sh          # on a CUDA GPU, unattended, under 8 minutes on an H100
#   bash bench/gpu.sh --dry    # on CPU: the same code at the tiny preset's dims; CUDA-only parts are skipped
#                              # and named, and nothing in the repository is written
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export TORCHINDUCTOR_CACHE_DIR="$scratch/inductor" TRITON_CACHE_DIR="$scratch/triton"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ "${1:-}" = "--dry" ]; then
  echo "dry run on CPU: CUDA-only measurements are skipped and named; the repository is not written"
  cp docs/performance.md "$scratch/performance.md"
  "$PYTHON" bench/gpu_check.py --dry --out "$scratch/bench_gpu.json" --doc "$scratch/performance.md"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader
timeout 470 "$PYTHON" bench/gpu_check.py
