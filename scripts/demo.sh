#!/usr/bin/env bash
# The main job: bootstraps .venv, then runs the end-to-end demo on SmolLM2-135M-Instruct (docs/demo.md): a LoRA expert
# per text domain, an X-LoRA gate over them, and a held-out comparison with the baselines. Trained artefacts are
# cached in $PEFT_XLORA_CACHE (default ~/.cache/peft-xlora), so a rerun only evaluates. Extra arguments go to
# `peft-xlora demo` (e.g. --tiny for the seconds-long variant, --out DIR, --cache-dir DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
peft-xlora demo "$@"
