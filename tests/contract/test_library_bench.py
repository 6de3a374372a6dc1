"""The library benchmark (benchmarks/library, issue 26): fixed mixtures against plain models, a tiny smoke run."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # `benchmarks` lives beside `src`, not inside the installed package
    sys.path.insert(0, ROOT)

from benchmarks.library.__main__ import BEST, main  # noqa: E402
from benchmarks.library.bench import DOMAINS, TINY, XLORA_SINGLE, LibraryBench  # noqa: E402
from benchmarks.provenance import check_result  # noqa: E402
from benchmarks.routing.bench import ARROW2, BASE, ORACLE, TOKEN_ORACLE, UNIFORM  # noqa: E402

from peft_xlora.cli.demo.evaluate import evaluate  # noqa: E402

needs_debian_text = pytest.mark.skipif(
    not Path("/usr/share/man").is_dir() or not Path("/usr/share/i18n/locales").is_dir(),
    reason="needs Debian's text files (benchmarks/corpora.py)",
)


def test_the_library_has_sixteen_distinct_domains():
    assert len(DOMAINS) == len(set(DOMAINS)) == 16


@needs_debian_text
def test_fixed_mixtures_equal_each_expert_alone_and_the_base_model(tmp_path):
    # Each row is the model it names, in the library's order: expert d's row is what the plain PEFT LoRA model of the
    # expert trained on d gives, the base model's what the base model gives.
    domains = ["locales", "cmake", "shakespeare"]
    bench = LibraryBench(TINY, tmp_path / "cache", domains, quiet=True, log=lambda *a: None)
    bench.prepare()
    results = bench.score_fixed()
    data = bench.eval_set
    wants = {BASE: evaluate(bench.new_base().eval(), data, 4, "base", quiet=True)}
    for d in bench.domains:
        plain = PeftModel.from_pretrained(bench.new_base(), bench.expert_dirs[d]).eval()
        wants[f"expert: {d}"] = evaluate(plain, data, 4, d, quiet=True)
    for name, want in wants.items():
        torch.testing.assert_close(results[name].mixed, want.mixed, rtol=1e-5, atol=1e-5, msg=name)
        for d in data.pure:
            torch.testing.assert_close(results[name].pure[d], want.pure[d], rtol=1e-5, atol=1e-5, msg=name)
    # the segment oracle scores each pure domain with its own expert
    for d in data.pure:
        torch.testing.assert_close(results[ORACLE].pure[d], wants[f"expert: {d}"].pure[d])


@needs_debian_text
def test_tiny_run_writes_a_result_file(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "library-smoke.json"
    try:
        payload = main(["--tiny", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert check_result(data) == [] and data["complete"] is True
    assert len(data["domains"]) == 16 and set(data["domains"]) == set(DOMAINS)
    table = data["table"]
    rows = {ARROW2, XLORA_SINGLE, UNIFORM, BASE, ORACLE, TOKEN_ORACLE, BEST} | {f"expert: {d}" for d in DOMAINS}
    assert rows <= set(table)
    experts = {k: v for k, v in table.items() if k.startswith("expert: ")}
    best = min(experts, key=lambda k: experts[k]["pure mean"] + experts[k]["mixed"])
    assert data["best_single_expert"] == best and table[BEST] == table[best]
    assert all(abs(g) < 1e-9 for g in data["gaps"][ORACLE].values())
    # the per-token oracle is the lower bound of every row
    assert all(table[TOKEN_ORACLE]["mixed"] <= row["mixed"] + 1e-6 for row in table.values())
    assert set(data["paired_95"][XLORA_SINGLE]) == {ARROW2, UNIFORM, BEST}
    assert {f"{XLORA_SINGLE} (sparse)", f"{XLORA_SINGLE} (dense)", ARROW2, BASE} == set(data["cost"])
    assert data["cost_vs_arrow_top2"][ARROW2] == 1.0
    assert len(payload["targets"]) == 3 and all(line.startswith(("PASS ", "FAIL ")) for line in payload["targets"])
