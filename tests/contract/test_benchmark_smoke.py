"""The benchmark harness in smoke mode (tiny model, one repetition), so it cannot rot. Checks structure, not speed."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # `benchmarks` lives beside `src`, not inside the installed package
    sys.path.insert(0, ROOT)

from benchmarks import memory  # noqa: E402
from benchmarks import run as bench  # noqa: E402
from benchmarks.cases import SMOKE  # noqa: E402
from benchmarks.provenance import check_result  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    memory_mode = "inprocess" if memory.supported() else "off"
    # One thread: on a busy machine tiny ops with two threads wait on each other far longer than they compute.
    argv = ["--smoke", "--threads", "1", "--phases", "prefill", "train", "--memory", memory_mode, "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        result = bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    return out, result, memory_mode


def test_smoke_writes_json_and_plot(smoke):
    out, result, _ = smoke
    with open(out / "benchmark-smoke.json") as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert (out / "benchmark-smoke.png").stat().st_size > 0 or "matplotlib" not in sys.modules


def test_smoke_structure(smoke):
    _, result, memory_mode = smoke
    assert {"schema", "provenance", "workload", "settings", "results", "ratios", "targets"} <= set(result)
    assert check_result(result) == []
    assert result["provenance"]["versions"]["torch"] and result["provenance"]["cores"]
    assert result["provenance"]["command"].startswith("python -m benchmarks.run --smoke")
    assert result["provenance"]["torch_threads"] == 1
    assert result["workload"]["hidden_size"] == SMOKE.hidden_size
    got = {(r["phase"], r["method"], r["n"]) for r in result["results"]}
    expected = {("prefill", m, 2) for m in ("base", "wide", "floor", "peft", "ours", "single")}
    expected |= {("train", m, 2) for m in ("lora", "wide", "floor", "peft", "ours", "single", "single_uniform")}
    assert got == expected
    for r in result["results"]:
        assert len(r["times_s"]) == 1 and r["median_s"] > 0
        if memory_mode != "off":
            assert r["peak_rss_gib"] > 0 and r["peak_increase_gib"] >= 0
    by_phase = {r["phase"]: r for r in result["ratios"]}
    prefill_ratios = {"floor_vs_base", "peft_vs_base", "ours_vs_base", "ours_vs_floor", "ours_vs_peft"}
    assert prefill_ratios <= set(by_phase["prefill"])
    assert {"ours_vs_floor", "ours_vs_peft", "single_vs_wide", "single_vs_ours"} <= set(by_phase["train"])
    assert {"single_vs_wide", "single_vs_ours"} <= set(by_phase["prefill"])
    assert result["generation"] is None  # not asked for
    # The reference targets are quoted at N = 8 and 32: a smoke run at N = 2 checks none of the timing ones.
    assert all(t["target"].startswith("train peak RSS") for t in result["targets"])


def test_format_table_lists_every_row(smoke):
    _, result, _ = smoke
    table = bench.format_table(result["results"])
    assert len(table.splitlines()) == 2 + len(result["results"])


def test_gpu_script_runs_tiny_on_cpu(tmp_path):
    from benchmarks import gpu

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = gpu.main(["--tiny", "--device", "cpu", "--reps", "1", "--warmup", "0", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert result["workload"]["dtype"] == "bfloat16" and result["workload"]["arch"] == "mistral"
    got = {(r["phase"], r["method"]) for r in result["results"]}
    assert got == {("prefill", m) for m in ("base", "floor", "peft", "ours")} | {
        ("train", m) for m in ("lora", "floor", "peft", "ours")
    }
    (path,) = tmp_path.glob("gpu-*-tiny.json")
    assert check_result(json.loads(path.read_text())) == []


@pytest.mark.slow
def test_single_pass_quality_script_runs_tiny(tmp_path):
    from benchmarks import single_pass_quality

    threads = torch.get_num_threads()
    try:
        report = single_pass_quality.main(
            ["--tiny", "--threads", "1", "--quiet", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(threads)
    variants = [row["variant"] for row in report["rows"]]
    assert variants == ["base model", "dual pass (scaling_pass_layers=None)", "single pass k=1"]
    assert all(row["pure"] > 0 and row["mixed"] > 0 for row in report["rows"])
    assert (tmp_path / "single-pass-quality-tiny.json").is_file()


def test_single_pass_quality_script_skips_without_the_demo_cache(tmp_path, capsys):
    from benchmarks import single_pass_quality

    assert single_pass_quality.main(["--cache-dir", str(tmp_path / "empty")]) is None
    assert "skipped: no converted SmolLM2-135M" in capsys.readouterr().out


def _one_thread(fn):
    threads = torch.get_num_threads()
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def test_generation_check_writes_a_result_file(tmp_path):
    from benchmarks import generation_check

    out = tmp_path / "gen.json"
    _one_thread(lambda: generation_check.main(["--smoke", "--threads", "1", "--out", str(out)]))
    data = json.loads(out.read_text())
    assert check_result(data) == []
    assert data["rows"][0]["new_tokens"] == 4 and data["rows"][0]["token_vs_peft"] > 0
    assert all(len(t) == data["reps"] for t in data["times_s"].values())


def test_scaling_pass_layers_writes_a_result_file(tmp_path):
    from benchmarks import scaling_pass_layers

    out = tmp_path / "spl.json"
    payload = _one_thread(lambda: scaling_pass_layers.main(["--smoke", "--reps", "1", "--out", str(out)]))
    data = json.loads(out.read_text())
    assert check_result(data) == [] and data["rows"] == payload["rows"]
    assert [r["layers"] for r in data["rows"]] == ["all", "4", "2", "1"]
