#!/usr/bin/env bash
# The main job: bootstraps .venv, then runs the end-to-end example. Extra arguments go to the example.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
python examples/quickstart.py "$@"
