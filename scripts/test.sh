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
