"""`python -m benchmarks.library`: X-LoRA top-2 over 16 LoRA experts against Arrow top-2; writes a result file.

Usage (from the repository root, with the project's environment)::

    python -m benchmarks.library                       # 16 experts, Arrow top-2, the gate, cost, fixed mixtures
    python -m benchmarks.library --gates single dual   # also the dual-pass gate
    python -m benchmarks.library --tiny --out x.json   # random tiny model: checks the pipeline only

Experts, gates and held-out losses are cached under the demo's cache folder ($PEFT_XLORA_CACHE or
~/.cache/peft-xlora), shared with the routing benchmark; a rerun reuses every stage that finished. The result file is
written after every stage with `complete: false` until the last.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.library.bench import (
    DOMAINS,
    GATES,
    LEFT_OUT,
    REAL,
    TINY,
    XLORA_DUAL,
    XLORA_SINGLE,
    XLORA_SOFT,
    LibraryBench,
    domain_info,
)
from benchmarks.provenance import provenance, write_result
from benchmarks.routing.bench import ARROW2, ORACLE, UNIFORM, to_json
from benchmarks.routing.metrics import MIXED_COLUMNS, bench_columns, gaps, summary
from peft_xlora.cli.demo.base import default_cache_dir
from peft_xlora.cli.demo.evaluate import Bootstrap, EvalSet, Losses

BEST = "best single expert"
GATE_NAMES = {"single": XLORA_SINGLE, "dual": XLORA_DUAL, "soft": XLORA_SOFT}
COST_LIMIT = 1.3  # issue 26: single-pass X-LoRA top-2 under 1.3x Arrow top-2's inference cost


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.library", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="random tiny model (pipeline check, seconds)")
    p.add_argument("--gates", nargs="+", choices=sorted(GATE_NAMES), default=["single"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/library-main.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cost-repeats", type=int, default=5)
    return p.parse_args(argv)


def best_single(results: dict[str, Losses], data: EvalSet) -> str | None:
    """The expert row with the lowest mean of "pure mean" and "mixed" (None before the experts are scored)."""
    table = summary({k: v for k, v in results.items() if k.startswith("expert: ")}, data)
    if not table:
        return None
    return min(table, key=lambda k: table[k]["pure mean"] + table[k]["mixed"])


def report(results: dict[str, Losses], data: EvalSet, n_boot: int, seed: int, ours: list[str]) -> dict[str, Any]:
    """Table, gaps to the segment oracle, intervals, and ours minus each rival, paired over documents."""
    table = summary(results, data)
    boot = Bootstrap(data, n_boot, seed, columns=bench_columns)
    rivals = [r for r in (ARROW2, UNIFORM, BEST) if r in results]
    out: dict[str, Any] = {
        "table": table,
        "intervals_95": boot.intervals(results),
        # ours -> rival -> column -> [mean difference, low, high] (negative: ours better)
        "paired_95": {label: boot.paired(results, label, rivals) for label in ours if label in results},
        "columns": [*data.pure, "pure mean", *MIXED_COLUMNS],
    }
    if ORACLE in results:
        out["gaps"] = gaps(table, ORACLE)
    return out


def check_targets(rep: dict[str, Any], cost: dict[str, Any] | None) -> list[str]:
    """Issue 26's library targets per single-pass gate, each a line starting with PASS or FAIL (those measured)."""
    lines = []
    for gate in (XLORA_SINGLE, XLORA_SOFT):
        paired = rep["paired_95"].get(gate, {}).get(ARROW2)
        if paired:
            for col in ("mixed", "pure mean"):
                diff, low, high = paired[col]
                ok = high < 0
                lines.append(
                    f"{'PASS' if ok else 'FAIL'} {col}: {gate} minus Arrow top-2 {diff:+.4f} "
                    f"[{low:+.4f}, {high:+.4f}] nats (closer to the oracle: the interval excludes 0 and is < 0)"
                )
        if cost and f"{gate} (sparse)" in cost:
            ratio = cost[f"{gate} (sparse)"]["median_cpu_s"] / cost[ARROW2]["median_cpu_s"]
            ok = ratio < COST_LIMIT
            lines.append(
                f"{'PASS' if ok else 'FAIL'} inference cost: {gate} (sparse) {ratio:.2f}x Arrow top-2's CPU time per "
                f"token (target < {COST_LIMIT}x)"
            )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the payload written to the result file."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    argv = sys.argv[1:] if argv is None else argv
    block = provenance("python -m benchmarks.library " + shlex.join(argv))
    start, cpu = time.perf_counter(), time.process_time()
    settings = TINY if args.tiny else REAL
    cache = args.cache_dir or default_cache_dir()
    gates = [GATES[GATE_NAMES[g]] for g in args.gates]
    if args.tiny:  # the smoke version trains each gate for the tiny settings' few steps
        gates = [replace(v, steps=settings.router_steps) for v in gates]
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    bench = LibraryBench(settings, cache, list(DOMAINS), seed=args.seed, quiet=True, log=log)
    results: dict[str, Losses] = {}
    state: dict[str, Any] = {"cost": None, "stages": []}

    def emit(stage: str | None, final: bool = False) -> dict[str, Any]:
        # Written after every stage (`complete` false until the end), so a long run leaves its numbers so far.
        if stage:
            state["stages"].append(stage)
        payload = _payload(args, bench, gates, results, state, start, cpu)
        payload["complete"] = final
        write_result(str(args.out), payload, block)
        return payload

    bench.prepare()
    emit("experts")
    results.update(bench._stage(ARROW2, bench.score_arrow2))
    emit(ARROW2)
    for v in gates:
        results[v.label] = bench._stage(v.label, lambda v=v: bench.score_variant(v))
        emit(v.label)
    results.update(bench._stage("fixed mixtures", bench.score_fixed))
    best = best_single(results, bench.eval_set)
    results[BEST] = results[best]
    state["best_single_expert"] = best
    emit("fixed mixtures")
    state["cost"] = bench._stage("cost", lambda: bench.inference_cost(gates, args.cost_repeats))
    payload = emit("cost", final=True)
    print(f"wrote {args.out} ({payload['total_wall_s']} s wall, {payload['total_cpu_s']} CPU s)")
    for line in payload.get("targets", []):
        print(line)
    return payload


def _payload(
    args: argparse.Namespace,
    bench: LibraryBench,
    gates: list,
    results: dict[str, Losses],
    state: dict[str, Any],
    start: float,
    cpu: float,
) -> dict[str, Any]:
    """The result file's payload from the stages run so far."""
    s = bench.s
    payload: dict[str, Any] = {
        "benchmark": "library (issue 26)",
        "model": getattr(bench, "model_id", None),
        "precision": s.precision,
        "settings": s.recipe(),
        "sizes": {
            "experts": len(DOMAINS),
            "held_out_tokens": (s.eval_pure * len(DOMAINS) + s.eval_mixed) * s.eval_seq_len,
            "pure_windows_per_domain": s.eval_pure,
            "mixed_documents": s.eval_mixed,
            "segments_per_mixed_document": s.eval_segments,
            "window_tokens": s.eval_seq_len,
            "gate_steps": {v.label: v.steps for v in gates},
            "gate_batch": f"{s.batch_size} x {s.seq_len} tokens (half mixed documents of {s.train_segments} segments)",
        },
        "left_out_domains": list(LEFT_OUT),
        "domains": {d: domain_info(bench, d) for d in getattr(bench, "expert_dirs", {})},
        "gates": {v.label: v.recipe() for v in gates},
        "seed": args.seed,
        "stages_done": list(state["stages"]),
    }
    if results:
        ours = [v.label for v in gates]
        rep = report(results, bench.eval_set, s.n_boot, args.seed, ours)
        payload.update(to_json(rep))
        payload["targets"] = check_targets(rep, state["cost"])
    if state.get("best_single_expert"):
        payload["best_single_expert"] = state["best_single_expert"]
    if state["cost"]:
        cost = state["cost"]
        payload["cost"] = to_json(cost)
        arrow = cost[ARROW2]["median_cpu_s"]
        payload["cost_vs_arrow_top2"] = {label: round(c["median_cpu_s"] / arrow, 3) for label, c in cost.items()}
    payload["timings"] = {
        "stage_wall_s": {k: round(v, 1) for k, v in bench.timings.items()},
        "stage_cpu_s": {k: round(v, 1) for k, v in bench.cpu_times.items()},
        "gate_train_cpu_s_this_run": bench.gate_cpu_s,
    }
    payload["total_wall_s"] = round(time.perf_counter() - start, 1)
    payload["total_cpu_s"] = round(time.process_time() - cpu, 1)
    return payload


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(0 if main() else 1)
