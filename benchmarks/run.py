"""Benchmark harness: the base model, the floors, PEFT's built-in X-LoRA and peft-xlora (both passes), side by side.

Usage (from the repository root)::

    python -m benchmarks.run                      # reference workload, N = 2, 8, 32 (several minutes on 2 cores)
    python -m benchmarks.run --n 8 --reps 3       # one N
    python -m benchmarks.run --phases prefill train generate --gen-new-tokens 128
    python -m benchmarks.run --smoke              # tiny sizes, one repetition: checks the harness, not the speed

Writes ``<out>/benchmark-<tag>.json`` and ``.png`` (default ``benchmarks/results/``) and prints a table of medians
and ratios. For each N and phase all methods are built together and their repetitions interleaved, so slow drifts of
the machine hit every method alike. Memory is measured separately, one fresh process per case (see `memory.py`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

import torch

from . import memory
from .cases import METHODS, SMOKE, Workload, build_case, make_experts, supported
from .provenance import module_command, provenance, rewrite_result, write_result

# (name, phase, numerator, denominator, n, limit): the targets of issue 4, checked on every run.
TARGETS = [
    ("prefill: ours <= 1.10x floor (N=8)", "prefill", "ours", "floor", 8, 1.10),
    ("prefill: ours <= 1.10x floor (N=32)", "prefill", "ours", "floor", 32, 1.10),
    ("train: ours <= 0.75x PEFT built-in (N=8)", "train", "ours", "peft", 8, 0.75),
    ("train: ours <= 1.05x floor (N=8)", "train", "ours", "floor", 8, 1.05),
    # Issue 16: the single pass against its own floor (one LoRA of rank N * r) and against today's dual pass.
    ("prefill: single <= 1.10x wide LoRA (N=8)", "prefill", "single", "wide", 8, 1.10),
    ("prefill: single <= 1.10x wide LoRA (N=32)", "prefill", "single", "wide", 32, 1.10),
    ("train: single <= 0.75x ours (N=8)", "train", "single", "ours", 8, 0.75),
    ("train: single <= 0.75x ours (N=32)", "train", "single", "ours", 32, 0.75),
    ("train: single_uniform <= 0.75x ours (N=8)", "train", "single_uniform", "ours", 8, 0.75),
    ("train: single_uniform <= 0.75x ours (N=32)", "train", "single_uniform", "ours", 32, 0.75),
]
# Cached generation, issue 16: single-pass tokens/s >= 0.9x the wide LoRA's, i.e. its time <= 1 / 0.9 of it.
GENERATION_TARGET = 1 / 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=None, help="numbers of experts (default 2 8 32; smoke: 2)")
    p.add_argument("--phases", nargs="+", default=["prefill", "train"], choices=["prefill", "train", "generate"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default 5; smoke: 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1; smoke: 0)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument(
        "--memory",
        choices=["subprocess", "inprocess", "off"],
        default=None,
        help="peak RSS per case: a fresh process each (default), this process, or not at all (smoke)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny model, one repetition: tests the harness")
    p.add_argument("--hidden-size", type=int, help="override the workload's hidden size (with --intermediate-size)")
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--layers", type=int, help="override the number of decoder layers")
    p.add_argument("--gen-new-tokens", type=int, nargs="+", help="generation lengths (default 128 512)")
    p.add_argument("--experts-dir", help="where to keep the random experts (default: a temporary folder)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tag", default=None, help="file name suffix (default: smoke or reference)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--report",
        metavar="JSON",
        help="only recompute the ratios and targets of a written JSON, print its table, redraw its plot",
    )
    args = p.parse_args(argv)
    args.n = args.n or ([2] if args.smoke else [2, 8, 32])
    args.reps = args.reps if args.reps is not None else (1 if args.smoke else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 1)
    args.memory = args.memory or ("off" if args.smoke else "subprocess")
    args.tag = args.tag or ("smoke" if args.smoke else "reference")
    return args


def workload_from(args: argparse.Namespace) -> Workload:
    """The workload named by the options."""
    work = SMOKE if args.smoke else Workload()
    changes: dict[str, Any] = {}
    if args.hidden_size:
        changes["hidden_size"] = args.hidden_size
    if args.intermediate_size:
        changes["intermediate_size"] = args.intermediate_size
    if args.layers:
        changes["num_hidden_layers"] = args.layers
    if args.gen_new_tokens:
        changes["gen_new_tokens"] = args.gen_new_tokens
    return replace(work, **changes)


def _time(step: Any) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all threads of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_group(
    work: Workload, phase: str, n: int, methods: list[str], experts: dict[str, str], reps: int, warmup: int
) -> list[dict[str, Any]]:
    """Times every method of one (phase, N), repetitions interleaved across methods."""
    cases = {m: build_case(work, m, phase, n, experts) for m in methods}
    if phase == "generate":
        steps = {(m, new): case.info["steps"][new] for m, case in cases.items() for new in work.gen_new_tokens}
    else:
        steps = {(m, None): case.step for m, case in cases.items()}
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[tuple, list[float]] = {key: [] for key in steps}
    cpu_times: dict[tuple, list[float]] = {key: [] for key in steps}
    for _ in range(reps):
        for key, step in steps.items():
            wall, cpu = _time(step)
            times[key].append(wall)
            cpu_times[key].append(cpu)
    rows = []
    for (method, new), ts in times.items():
        info = {k: v for k, v in cases[method].info.items() if k != "steps"}
        # CPU time counts the work of all threads; on a shared machine it drifts less than wall time does.
        row = {
            "phase": phase,
            "method": method,
            "n": n,
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "times_s": ts,
            "cpu_median_s": statistics.median(cpu_times[(method, new)]),
            "cpu_times_s": cpu_times[(method, new)],
            "info": info,
        }
        if new is not None:
            row["new_tokens"] = new
        rows.append(row)
    del cases, steps
    gc.collect()
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratios of medians within each (phase, N[, new tokens]) group: what the docs quote."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        groups.setdefault((r["phase"], r["n"], r.get("new_tokens")), {})[r["method"]] = r["median_s"]
    out = []
    for (phase, n, new), med in groups.items():
        ref = "base" if "base" in med else ("lora" if "lora" in med else None)
        entry: dict[str, Any] = {"phase": phase, "n": n}
        if new is not None:
            entry["new_tokens"] = new
        for num in ("wide", "floor", "peft", "ours", "single", "single_uniform"):
            if num in med and ref:
                entry[f"{num}_vs_{ref}"] = med[num] / med[ref]
        for den in ("floor", "peft"):
            if "ours" in med and den in med:
                entry[f"ours_vs_{den}"] = med["ours"] / med[den]
        for num in ("single", "single_uniform"):
            for den in ("wide", "ours"):
                if num in med and den in med:
                    entry[f"{num}_vs_{den}"] = med[num] / med[den]
        out.append(entry)
    return out


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluates the issue's targets that this run has the numbers for.

    `value` is the ratio of wall-clock medians (what is quoted), `cpu_value` the same ratio of CPU-time medians.
    """
    med = {(r["phase"], r["method"], r["n"]): r for r in rows if "new_tokens" not in r}

    def ratio(a: tuple, b: tuple, field: str) -> float:
        return med[a][field] / med[b][field]

    out = []
    for name, phase, num, den, n, limit in TARGETS:
        a, b = (phase, num, n), (phase, den, n)
        if a in med and b in med:
            value = ratio(a, b, "median_s")
            out.append(
                {
                    "target": name,
                    "value": value,
                    "cpu_value": ratio(a, b, "cpu_median_s"),
                    "limit": limit,
                    "met": value <= limit,
                }
            )
    a, b = ("prefill", "ours", 32), ("prefill", "ours", 8)
    if a in med and b in med:
        value = ratio(a, b, "median_s")
        out.append(
            {
                "target": "prefill growth: ours N=32 <= 1.6x ours N=8",
                "value": value,
                "cpu_value": ratio(a, b, "cpu_median_s"),
                "limit": 1.6,
                "met": value <= 1.6,
            }
        )
        base_a, base_b = ("prefill", "base", 32), ("prefill", "base", 8)
        if base_a in med and base_b in med:
            # The two N are measured minutes apart: dividing by each group's own base run cancels a change of load.
            value = value / ratio(base_a, base_b, "median_s")
            cpu = ratio(a, b, "cpu_median_s") / ratio(base_a, base_b, "cpu_median_s")
            out.append(
                {
                    "target": "prefill growth, each N relative to its base run: <= 1.6",
                    "value": value,
                    "cpu_value": cpu,
                    "limit": 1.6,
                    "met": value <= 1.6,
                }
            )
    for n in sorted({r["n"] for r in rows}):
        for num, den in (("ours", "floor"), ("single", "ours"), ("single_uniform", "ours")):
            a, b = med.get(("train", num, n), {}), med.get(("train", den, n), {})
            if "peak_rss_gib" in a and "peak_rss_gib" in b:
                value = a["peak_rss_gib"] / b["peak_rss_gib"]
                target = f"train peak RSS: {num} <= {den} (N={n})"
                out.append({"target": target, "value": value, "limit": 1.0, "met": value <= 1.0})
    gen = {(r["method"], r["n"], r["new_tokens"]): r for r in rows if "new_tokens" in r}
    for (method, n, new), row in sorted(gen.items()):
        wide = gen.get(("wide", n, new))
        if method == "single" and wide is not None:
            value = row["median_s"] / wide["median_s"]
            out.append(
                {
                    "target": f"generate {new} tok: single time <= 1.11x wide LoRA (tokens/s >= 0.9x) (N={n})",
                    "value": value,
                    "cpu_value": row["cpu_median_s"] / wide["cpu_median_s"],
                    "limit": round(GENERATION_TARGET, 3),
                    "met": value <= GENERATION_TARGET,
                }
            )
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: one line per (phase, N, method)."""
    ref_of = {}
    for r in rows:
        if r["method"] in ("base", "lora"):
            ref_of[(r["phase"], r["n"], r.get("new_tokens"))] = r["median_s"]
    floor_of = {(r["phase"], r["n"], r.get("new_tokens")): r for r in rows if r["method"] == "floor"}
    wide_of = {(r["phase"], r["n"], r.get("new_tokens")): r for r in rows if r["method"] == "wide"}
    lines = [
        "| phase | N | method | median s | vs base/lora | vs floor | vs wide | CPU s | CPU vs floor | CPU vs wide "
        "| peak RSS GiB | RSS increase GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(
        rows, key=lambda r: (r["phase"] != "prefill", r["phase"], r["n"], r.get("new_tokens") or 0, order[r["method"]])
    ):
        key = (r["phase"], r["n"], r.get("new_tokens"))
        phase = r["phase"] + (f" {r['new_tokens']} tok" if "new_tokens" in r else "")
        vs_ref = f"{r['median_s'] / ref_of[key]:.2f}x" if key in ref_of else ""
        vs_floor = f"{r['median_s'] / floor_of[key]['median_s']:.2f}x" if key in floor_of else ""
        cpu_vs_floor = f"{r['cpu_median_s'] / floor_of[key]['cpu_median_s']:.2f}x" if key in floor_of else ""
        vs_wide = f"{r['median_s'] / wide_of[key]['median_s']:.2f}x" if key in wide_of else ""
        cpu_vs_wide = f"{r['cpu_median_s'] / wide_of[key]['cpu_median_s']:.2f}x" if key in wide_of else ""
        mem = f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else ""
        inc = f"{r['peak_increase_gib']:.2f}" if "peak_increase_gib" in r else ""
        lines.append(
            f"| {phase} | {r['n']} | {r['method']} | {r['median_s']:.3f} | {vs_ref} | {vs_floor} | {vs_wide} | "
            f"{r['cpu_median_s']:.3f} | {cpu_vs_floor} | {cpu_vs_wide} | {mem} | {inc} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> str | None:
    """Median time against N, one panel per phase; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'peft-xlora[plot]'): no plot written", file=sys.stderr)
        return None
    rows = result["results"]
    if not rows:
        return None
    phases = sorted({r["phase"] for r in rows}, key=["prefill", "train", "generate"].index)
    # Top row wall-clock medians, bottom row CPU-time medians (steadier on a shared machine).
    fields = [("median_s", "wall")] + ([("cpu_median_s", "CPU")] if all("cpu_median_s" in r for r in rows) else [])
    fig, axes = plt.subplots(len(fields), len(phases), figsize=(5.5 * len(phases), 4 * len(fields)), squeeze=False)
    ns = sorted({r["n"] for r in rows})
    for row_axes, (field, label) in zip(axes, fields):
        for ax, phase in zip(row_axes, phases):
            lengths = sorted({r.get("new_tokens") for r in rows if r["phase"] == phase}, key=lambda t: t or 0)
            for method in METHODS:
                for new in lengths:  # generation: one line per number of new tokens
                    pts = sorted(
                        (r["n"], r[field])
                        for r in rows
                        if r["phase"] == phase and r["method"] == method and r.get("new_tokens") == new
                    )
                    if pts:
                        label = method if new is None else f"{method}, {new} tokens"
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")  # built-in X-LoRA at N = 32 is an order of magnitude above the rest
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.set_xlabel("experts N")
            ax.set_ylabel(f"median {label} seconds (log)")
            ax.set_title(f"{phase}, {label} time")
            ax.grid(alpha=0.3)
            ax.legend()
    block = result["provenance"]
    fig.suptitle(f"peft-xlora benchmark ({block['cpu_model']}, threads={block['torch_threads']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _payload(args: argparse.Namespace, work: Workload, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The result file's content beside its schema tag and provenance block (`benchmarks/provenance.py`)."""
    return {
        "workload": work.to_dict(),
        "settings": {
            "n": args.n,
            "phases": args.phases,
            "methods": args.methods,
            "reps": args.reps,
            "warmup": args.warmup,
            "threads": args.threads,
            "memory": args.memory,
            "smoke": args.smoke,
        },
        "memory_method": memory.__doc__.strip().split("\n\n")[1] if args.memory != "off" else None,
        "results": rows,
        "ratios": ratios(rows),
        "targets": check_targets(rows),
        # Generation with peft-xlora's KV cache is issue 5; `--phases ... generate` measures what exists today.
        "generation": [r for r in rows if r["phase"] == "generate"] or None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark and writes its JSON (and plot); returns the JSON's content."""
    args = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            result = json.load(f)
        # Derived fields are recomputed (and saved back), so a saved run gains checks added since it was made; the
        # provenance block stays that of the run.
        result["ratios"], result["targets"] = ratios(result["results"]), check_targets(result["results"])
        rewrite_result(args.report, result)
        png = None if args.no_plot else plot(result, args.report.removesuffix(".json") + ".png")
        _report(result, args.report, png)
        return result
    torch.set_num_threads(args.threads)
    work = workload_from(args)
    if args.memory != "off" and not memory.supported():
        print("peak RSS cannot be reset on this system: memory not measured", file=sys.stderr)
        args.memory = "off"

    block = provenance(module_command("benchmarks.run", argv))
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"benchmark-{args.tag}.json")
    rows: list[dict[str, Any]] = []
    measured: dict[tuple, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="xlora-bench-") as tmp:
        experts_root = args.experts_dir or tmp
        os.makedirs(experts_root, exist_ok=True)
        all_experts = make_experts(work, max(args.n), experts_root)
        # N outer, phase inner, the JSON rewritten after each group: a long run stopped early keeps whole N's.
        for n in args.n:
            for phase in args.phases:
                methods = [m for m in args.methods if (m, phase) in supported(m, phase)]
                experts = {str(i): all_experts[str(i)] for i in range(n)}
                group = time_group(work, phase, n, methods, experts, args.reps, args.warmup)
                for row in group:
                    # base and lora do not depend on N: their memory is measured once, at the first N.
                    key = (phase, row["method"], row.get("new_tokens"))
                    once = row["method"] in ("base", "lora") and key in measured
                    if args.memory != "off" and not once:
                        spec = {
                            "workload": work.to_dict(),
                            "method": row["method"],
                            "phase": phase,
                            "n": n,
                            "experts": experts,
                            "threads": args.threads,
                            "new_tokens": row.get("new_tokens"),
                        }
                        run = memory.run_case_subprocess if args.memory == "subprocess" else memory.run_case_here
                        row.update(run(spec))
                        measured[key] = row
                    elif once:
                        row.update({k: measured[key][k] for k in ("peak_rss_gib", "peak_increase_gib")})
                    print(
                        f"{phase:8s} N={n:<3d} {row['method']:14s} {row['median_s']:.4f} s"
                        + (f"  {row['new_tokens']} tokens" if "new_tokens" in row else "")
                        + (f"  peak {row['peak_rss_gib']:.2f} GiB" if "peak_rss_gib" in row else ""),
                        flush=True,
                    )
                rows.extend(group)
                write_result(json_path, _payload(args, work, rows), block)
    with open(json_path) as f:
        result = json.load(f)

    png = None if args.no_plot else plot(result, os.path.join(args.out, f"benchmark-{args.tag}.png"))
    _report(result, json_path, png)
    return result


def _report(result: dict[str, Any], json_path: str, png: str | None) -> None:
    print()
    print(format_table(result["results"]))
    print()
    for t in result["targets"]:
        cpu = f", CPU time {t['cpu_value']:.2f}" if "cpu_value" in t else ""
        print(f"{'MET ' if t['met'] else 'MISS'} {t['target']}: {t['value']:.2f}{cpu} (limit {t['limit']})")
    print(f"\n{json_path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
