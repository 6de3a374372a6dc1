#!/usr/bin/env bash
# The main job: bootstraps .venv, then runs the end-to-end demo on SmolLM2-135M-Instruct (docs/demo.md): a LoRA expert
# per text domain, an X-LoRA gate over them, and a held-out comparison with the baselines. Trained artefacts are
# cached in $PEFT_XLORA_CACHE (default ~/.cache/peft-xlora), so a rerun only evaluates. Extra arguments go to
# `peft-xlora demo` (e.g. --tiny for the seconds-long variant, --out DIR, --cache-dir DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
# Nothing here needs the Hub (the tests run their own look-alike on 127.0.0.1); offline, an import that looks
# something up there (bitsandbytes asks for a CPU kernel on AVX512-BF16 machines) fails at once instead.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
cd "$ROOT"
peft-xlora demo "$@"
