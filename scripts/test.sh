#!/usr/bin/env bash
# The test command: bootstraps .venv, lints, builds the documentation site strictly (broken links, missing pages and
# unresolvable API references fail), then runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
ruff check src tests examples benchmarks scripts
ruff format --check src tests examples benchmarks scripts
SITE="$(mktemp -d)"
trap 'rm -rf "$SITE"' EXIT
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$SITE"
python -m pytest "$@"
# The vLLM plugin's tests run in their own environment (vLLM pins transformers 5.19 and its own torch): built once
# under ~/.cache/peft-xlora (about 6-8 minutes, 3.5 GB), reused while scripts/vllm_env.sh is unchanged.
VLLM_ENV="$(bash "$ROOT/scripts/vllm_env.sh")"
OMP_NUM_THREADS=1 "$VLLM_ENV/bin/python" -m pytest tests/serving --noconftest -p no:cacheprovider
