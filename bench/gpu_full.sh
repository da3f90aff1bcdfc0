#!/usr/bin/env bash
# Every GPU benchmark of docs/benchmarks.md, on a CUDA machine (the checks of `bash bench/gpu.sh` come first):
#   bash bench/gpu_full.sh
# Writes metrics/bench_moe_layer.json, metrics/bench_train_variants.json (full-logits vs chunked loss vs
# train.compile, docs/performance.md), metrics/bench_train.json and (when models/export and
# models/quantized exist, i.e. after `dvc repro`) metrics/bench_quant.json, and metrics/bench_serving.json (with a
# CUDA vLLM environment, docs/serving.md); `python bench/report.py`
# then prints the tables of docs/benchmarks.md. Needs metrics/prepare.json of the reference data for the seed-recipe
# comparison in bench_train (run `dvc repro prepare` first; without it that row is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/gpu.sh
python bench/moe_layer.py --device cuda
python bench/train_variants.py --device cuda
python bench/train_step.py
if [ -d models/export ] && [ -d models/quantized ]; then
  python bench/quantized_inference.py --device cuda
fi
# vLLM vs transformers serving: needs a CUDA vLLM environment with the moechat-vllm plugin at .venv-vllm (or
# $MOECHAT_VLLM_PYTHON); the CUDA path is unverified until this runs.
if [ -x "${MOECHAT_VLLM_PYTHON:-.venv-vllm/bin/python}" ]; then
  if [ -d models/export ]; then python bench/serving.py --device cuda --model models/export --memory-share 0.5
  else python bench/serving.py --device cuda --memory-share 0.5; fi
fi
python bench/report.py
