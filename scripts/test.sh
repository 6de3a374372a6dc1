#!/usr/bin/env bash
# The test command: bootstraps .venv, lints, then runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
ruff check src tests examples benchmarks
python -m pytest "$@"
