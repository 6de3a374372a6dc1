"""benchmarks/sparse_topk.py in smoke mode (tiny sizes, one repetition), so it cannot rot. Structure, not speed."""

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # `benchmarks` lives beside `src`, not inside the installed package
    sys.path.insert(0, ROOT)

from benchmarks import memory, sparse_topk  # noqa: E402
from benchmarks.provenance import check_result  # noqa: E402


def test_kernel_model_and_plot_in_smoke_mode(tmp_path):
    threads = torch.get_num_threads()
    memory_mode = "inprocess" if memory.supported() else "off"
    try:
        kernel = sparse_topk.main(["kernel", "--smoke", "--out", str(tmp_path)])
        model = sparse_topk.main(
            ["model", "--smoke", "--out", str(tmp_path), "--experts-dir", str(tmp_path / "experts"),
             "--memory", memory_mode, "--memory-n", "4"]
        )  # fmt: skip
        crossover = sparse_topk.main(["crossover", "--smoke", "--out", str(tmp_path)])
        sparse_topk.main(["plot", "--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    for name in ("kernel", "model", "crossover-cpu"):
        with open(tmp_path / f"sparse-topk-{name}-smoke.json") as f:
            assert check_result(json.load(f)) == []
    # the crossover: per rank, every phase's crossover and the thresholds "auto" would hold, never lower at a lower
    # rank; the rows timed dense against the method the sparse path picks
    assert set(crossover["crossover"]) == set(crossover["sparse_from_rank"]) == {"4", "8"}
    for entries in crossover["crossover"].values():
        assert {c["phase"] for c in entries} == {"prefill", "train", "decode"}
    table = crossover["sparse_from_rank"]
    assert all(table[r][kind] >= table[r][f"{kind}_measured"] for r in table for kind in ("many", "few"))
    assert table["4"]["many"] >= table["8"]["many"] and table["4"]["few"] >= table["8"]["few"]
    for r in crossover["results"]:
        assert r["method"] in ("base", "dense", sparse_topk.sparse_method(r["pairs"])) and r["rank"] in (4, 8)
    phases = {r["phase"] for r in kernel["results"]}
    assert phases == {"prefill", "train", "decode"}
    # every phase and k has a crossover entry, and every method ran where it is timed
    assert {(c["phase"], c["k"]) for c in kernel["crossover"]} == {(p, 1) for p in phases}
    assert {r["method"] for r in kernel["results"]} == set(sparse_topk.KERNEL_METHODS)
    cells = {(r["phase"], r["method"], r["n"]) for r in model["results"]}
    assert cells == {(p, m, n) for p in ("prefill", "train") for m in sparse_topk.MODEL_METHODS for n in (2, 4)}
    if memory_mode != "off":
        assert all("peak_rss_gib" in r for r in model["results"] if r["n"] == 4)
    assert all(r["largest_expert_share"] > 0 for r in model["results"] if r["method"] != "floor")
    assert (tmp_path / "sparse-topk-smoke.png").stat().st_size > 0 or "matplotlib" not in sys.modules
