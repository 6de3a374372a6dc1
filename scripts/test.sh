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
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$SITE"
# The vLLM plugin's tests run in their own environment (vLLM pins transformers 5.19 and its own torch): built once
# under ~/.cache/peft-xlora (about 6-8 minutes, 3.5 GB), reused while scripts/vllm_env.sh is unchanged. Building it
# and running tests/serving go on beside the main suite, each with one thread (two 2-thread OpenMP processes on 2
# cores run many times slower than one): the wall time is the longer of the two, not their sum.
SERVING_LOG="$(mktemp)"
trap 'rm -rf "$SITE" "$SERVING_LOG"; [ -n "${SERVING_PID:-}" ] && kill -- -"$SERVING_PID" 2>/dev/null || true' EXIT
# setsid: its own process group, so an interrupted run stops the vLLM workers too.
ROOT="$ROOT" setsid bash -c '
    set -euo pipefail
    VLLM_ENV="$(bash "$ROOT/scripts/vllm_env.sh")"
    OMP_NUM_THREADS=1 "$VLLM_ENV/bin/python" -m pytest tests/serving --noconftest -p no:cacheprovider
' > "$SERVING_LOG" 2>&1 &
SERVING_PID=$!
MAIN_RC=0
OMP_NUM_THREADS=1 PEFT_XLORA_TEST_THREADS=1 python -m pytest "$@" || MAIN_RC=$?
SERVING_RC=0
wait "$SERVING_PID" || SERVING_RC=$?
SERVING_PID=
echo "================ tests/serving (vLLM environment) ================"
cat "$SERVING_LOG"
echo "main suite exit code $MAIN_RC, tests/serving exit code $SERVING_RC"
[ "$MAIN_RC" -eq 0 ] && [ "$SERVING_RC" -eq 0 ]
