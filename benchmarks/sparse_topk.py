"""Sparse top-k compute (issue 26): its kernels in one mixture layer, and its cost in N on the reference workload.

Usage (from the repository root)::

    python -m benchmarks.sparse_topk kernel --threads 1      # one decoder layer's 7 projections: dense vs sparse
    python -m benchmarks.sparse_topk crossover --threads 1   # the dense/sparse crossover N at ranks 8, 16, 32
    python -m benchmarks.sparse_topk model --threads 1       # the reference workload at N = 8 .. 128, top-2
    python -m benchmarks.sparse_topk plot                    # sparse-topk.png from the three recorded files
    python -m benchmarks.sparse_topk report                  # their Markdown tables (as docs/performance.md quotes)
    python -m benchmarks.sparse_topk kernel --smoke          # tiny sizes, one repetition: checks the harness

``kernel`` times the seven projections of one decoder layer of the reference workload (hidden 512, MLP 1376, every
expert of rank 16 on all of them, the same random top-k gate for all seven), for the dense path and each sparse
method (``grouped``, ``gather``, ``loop``, see `peft_xlora.core.sparse`) and the base projections alone, in three
phases: prefill (1 x 512 tokens, no grad), a training step's forward and backward (2 x 256 tokens, gradient to the
gate and the inputs, experts frozen) and one cached decoding step (1 token). It records where sparse overtakes
dense (the crossover N behind `SPARSE_FROM`) and, at the two largest N, the same with skewed routing (one expert
chosen by about 40 % of the tokens, as a random gate on real hidden states does: see the model part).

``crossover`` times the same seven projections at top-2 for the experts' ranks 8, 16 and 32 (``--ranks``), dense
against the sparse method `sparse_mixture` picks, in the three phases, over a finer grid of N, and records per rank
the smallest N from which sparse is faster in each phase, and the experts per kept expert that `use_sparse`'s
"auto" rule uses (`SPARSE_FROM_RANK`) into ``sparse-topk-crossover-<device type>.json``.

``model`` runs the reference workload of `benchmarks.run` (random 8-layer Llama, hidden 512, N random rank-16
experts on the seven projections, classifier depth 2 width 256; `benchmarks.cases` builds it) with `top_k_lora=2`
and a randomly initialised classifier (the uniform one would send every token to the same two experts), for:

- ``floor``: a no-grad pass of the decoder stack (the scaling pass) plus one PEFT LoRA of rank 2 x 16: the least a
  top-2 mixture of rank-16 experts can cost (``benchmarks.cases``' floor at N = 2);
- ``dense``: `topk_compute="dense"`, every expert multiplied and the unchosen ones weighed 0;
- ``sparse``: `topk_compute="sparse"`, only the chosen experts computed.

Per N the three are built together and their repetitions interleaved; timings are CPU-time medians (`time.
process_time`, this process) beside wall-clock medians. Peak memory: a fresh process per case (`benchmarks.memory`).
Every file is written through `benchmarks.provenance` into ``benchmarks/results/sparse-topk-<part>[-tag].json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from peft_xlora.core.classifier import gate
from peft_xlora.core.experts import ModuleLora
from peft_xlora.core.layer import XLoraLayer
from peft_xlora.core.routing import Routing, use_routing
from peft_xlora.core.sparse import (
    GATHER_MAX_PAIRS,
    SPARSE_FROM,
    SPARSE_FROM_RANK,
    chosen_indices,
    sparse_mixture,
)

from . import memory
from .cases import SMOKE, Workload, build_case, make_experts
from .provenance import provenance, write_result

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KERNEL_METHODS = ("base", "dense", "grouped", "gather", "loop")
MODEL_METHODS = ("floor", "dense", "sparse")
PHASES = ("prefill", "train", "decode")
#: The gather method copies every pair's factors: it is timed only up to this many (token, expert) pairs.
GATHER_TIMED_PAIRS = 64
K = 2  # the targets are at top-2

# (name, phase, numerator (method, N), denominator (method, N), limit): issue 26's targets, on CPU-time medians.
TARGETS = [
    ("prefill: sparse N=64 <= 1.3x sparse N=8", "prefill", ("sparse", 64), ("sparse", 8), 1.3),
    ("train: sparse N=64 <= 1.3x sparse N=8", "train", ("sparse", 64), ("sparse", 8), 1.3),
    ("prefill: sparse N=64 <= 1.25x floor (LoRA 2x16 + scaling pass)", "prefill", ("sparse", 64), ("floor", 64), 1.25),
    ("train: sparse N=64 <= 1.25x floor (LoRA 2x16 + scaling pass)", "train", ("sparse", 64), ("floor", 64), 1.25),
]  # fmt: skip


def _median_times(step: Any, reps: int) -> tuple[list[float], list[float]]:
    cpu, wall = [], []
    for _ in range(reps):
        c, w = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return cpu, wall


def _interleaved(steps: dict[Any, Any], reps: int, warmup: int) -> dict[Any, dict[str, Any]]:
    """Times every step `reps` times, repetitions interleaved across steps, after `warmup` untimed runs each."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    cpu: dict[Any, list[float]] = {key: [] for key in steps}
    wall: dict[Any, list[float]] = {key: [] for key in steps}
    for _ in range(reps):
        for key, step in steps.items():
            c, w = _median_times(step, 1)
            cpu[key] += c
            wall[key] += w
    return {
        key: {
            "cpu_median_s": statistics.median(cpu[key]),
            "cpu_times_s": cpu[key],
            "median_s": statistics.median(wall[key]),
            "times_s": wall[key],
        }
        for key in steps
    }


# ------------------------------------------------------------------ kernel: one decoder layer's projections


def projections(work: Workload) -> list[tuple[str, int, int]]:
    """(name, in, out) of a Llama decoder layer's seven adapted projections."""
    h, m = work.hidden_size, work.intermediate_size
    return [("q", h, h), ("k", h, h), ("v", h, h), ("o", h, h), ("gate", h, m), ("up", h, m), ("down", m, h)]


def kernel_layers(work: Workload, n: int, seed: int = 0) -> list[XLoraLayer]:
    """The seven projections, each a mixture layer over `n` distinct random experts of rank `work.rank`."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for index, (_, n_in, n_out) in enumerate(projections(work)):
        base = nn.Linear(n_in, n_out, bias=False).requires_grad_(False)
        r = work.rank
        loras = []
        for _ in range(n):
            A = torch.randn(r, n_in, generator=g) / n_in**0.5
            B = torch.randn(n_out, r, generator=g) / r**0.5
            loras.append(ModuleLora(A, B, r, scale=2.0, dropout=0.0))
        layers.append(XLoraLayer(base, index, list(range(n)), loras).eval())
    return layers


def kernel_shape(work: Workload, phase: str) -> tuple[int, int]:
    """(batch, seq) of a phase: the harness's prefill and training shapes, one token for decoding."""
    return {
        "prefill": (work.prefill_batch, work.prefill_seq),
        "train": (work.train_batch, work.train_seq),
        "decode": (1, 1),
    }[phase]


def routing_logits(shape: tuple[int, int], n: int, skew: float = 0.0, seed: int = 1) -> torch.Tensor:
    """Gate logits (batch, seq, 1, n): standard normal, plus `skew * log(1 / rank)` to favour the first experts."""
    logits = torch.randn(*shape, 1, n, generator=torch.Generator().manual_seed(seed))
    if skew:
        logits = logits - skew * torch.log(torch.arange(1, n + 1, dtype=torch.float32))
    return logits


def kernel_step(
    layers: list[XLoraLayer], inputs: list[torch.Tensor], logits: torch.Tensor, k: int, method: str, train: bool
):
    """One call of the seven projections with `method` ("base", "dense" or a sparse method)."""

    def step():
        leaf = logits.clone().requires_grad_(train)
        with torch.set_grad_enabled(train):
            scalings = gate(leaf, top_k=k)  # (batch, seq, 1, n): the forward's gate, shared by the seven layers
            routing = Routing(scalings)
            total = 0.0
            for layer, x in zip(layers, inputs):
                if method == "base":
                    y = layer.base_layer(x)
                elif method == "dense":
                    layer.topk = None
                    with use_routing(routing):
                        y = layer(x)
                else:  # as XLoraLayer.forward does: the update added into the base output
                    indices = chosen_indices(routing, scalings, k)
                    y = sparse_mixture(layer, x, scalings, indices, method, into=layer.base_layer(x))
                total = total + y.float().sum() if train else y
            if train:
                total.backward()

    return step


def run_kernel(args: argparse.Namespace, work: Workload) -> dict[str, Any]:
    """Times the kernels for every (phase, k, N); returns the payload of sparse-topk-kernel.json."""
    rows = []
    for n in args.n:
        layers = kernel_layers(work, n)
        for phase in args.phases:
            train = phase == "train"
            shape = kernel_shape(work, phase)
            inputs = [torch.randn(*shape, n_in).requires_grad_(train) for _, n_in, _ in projections(work)]
            for k in [k for k in args.k if k < n]:
                skewed = n in sorted(args.n)[-2:] and phase != "decode"  # the two largest N
                skews = [0.0] + ([args.skew] if skewed and args.skew else [])
                for skew in skews:
                    logits = routing_logits(shape, n, skew)
                    pairs = shape[0] * shape[1] * k
                    methods = [m for m in KERNEL_METHODS if m != "gather" or pairs <= GATHER_TIMED_PAIRS]
                    if args.part == "crossover":  # the base, dense and the method sparse_mixture picks
                        methods = ["base", "dense", sparse_method(pairs)]
                    steps = {m: kernel_step(layers, inputs, logits, k, m, train) for m in methods}
                    times = _interleaved(steps, args.reps, args.warmup)
                    chosen = logits.topk(k, dim=-1).indices.flatten()
                    load = torch.bincount(chosen, minlength=n).float()
                    for method, t in times.items():
                        rows.append(
                            {"phase": phase, "n": n, "k": k, "rank": work.rank, "skew": skew, "method": method,
                             "pairs": pairs, **t, "largest_expert_share": float(load.max() / load.sum())}
                        )  # fmt: skip
                    base = times["base"]["cpu_median_s"]
                    line = "  ".join(
                        f"{m} {1000 * (t['cpu_median_s'] - base):8.2f}" for m, t in times.items() if m != "base"
                    )
                    print(
                        f"r={work.rank:<3d} {phase:8s} N={n:<4d} k={k} skew={skew:<3} base {1000 * base:7.2f} ms "
                        f"| mixture ms: {line}",
                        flush=True,
                    )
            del inputs
        del layers
        gc.collect()
    return {"kernel_workload": work.to_dict(), "results": rows, "crossover": crossovers(rows)}


def sparse_method(pairs: int) -> str:
    """The method `sparse_mixture` picks for this many (token, expert) pairs."""
    return "gather" if pairs <= GATHER_MAX_PAIRS else "grouped"


def crossovers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (phase, k): the smallest N from which sparse (the method it picks) is faster than dense at every N measured.

    Compared on CPU-time medians of the whole call (the base projections included, the same in both).
    """
    out = []
    plain = [r for r in rows if not r["skew"]]
    for phase in PHASES:
        for k in sorted({r["k"] for r in plain if r["phase"] == phase}):
            cells = {(r["n"], r["method"]): r for r in plain if r["phase"] == phase and r["k"] == k}
            ns = sorted({n for n, _ in cells})
            ratio = {}
            for n in ns:
                dense = cells.get((n, "dense"))
                chosen = cells.get((n, sparse_method(dense["pairs"]))) if dense else None
                if dense and chosen:
                    ratio[n] = chosen["cpu_median_s"] / dense["cpu_median_s"]
            wins = [n for n in ratio if all(ratio[m] < 1.0 for m in ratio if m >= n)]
            out.append(
                {"phase": phase, "k": k, "sparse_from_n": min(wins) if wins else None,
                 "sparse_over_dense": {str(n): ratio[n] for n in sorted(ratio)}}
            )  # fmt: skip
    return out


# ------------------------------------------------------------------ crossover: where sparse overtakes dense, per rank

#: The crossover part's N: finer than powers of two, so that a threshold is not rounded up to the next doubling.
CROSSOVER_N = [4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
CROSSOVER_RANKS = [8, 16, 32]


def run_crossover(args: argparse.Namespace, work: Workload) -> dict[str, Any]:
    """The kernel timings at every rank of `args.ranks`; returns the payload of sparse-topk-crossover-<device>.json."""
    rows: list[dict[str, Any]] = []
    per_rank: dict[str, list[dict[str, Any]]] = {}
    for rank in args.ranks:
        part = run_kernel(args, dataclasses.replace(work, rank=rank))
        rows += part["results"]
        per_rank[str(rank)] = part["crossover"]
    workload = work.to_dict()
    workload["rank"] = list(args.ranks)
    return {
        "kernel_workload": workload,
        "results": rows,
        "crossover": per_rank,
        "sparse_from_rank": sparse_from_rank(per_rank, max(args.n)),
    }


def sparse_from_rank(per_rank: dict[str, list[dict[str, Any]]], largest_n: int) -> dict[str, dict[str, Any]]:
    """Per rank: the experts per kept expert from which "auto" goes sparse, for many tokens and for a few.

    ``many`` covers prefill and training (the larger of their crossovers, so that neither gets slower), ``few`` a
    cached decoding step; each is the crossover N divided by k, rounded up (``*_measured``). A phase where sparse never
    won up to the largest N measured counts as twice that N (``never_won`` names it): "auto" then stays dense as far
    as measured. A lower rank makes the dense mixture cheaper and leaves the sparse path's fixed costs, so sparse
    cannot start earlier at a lower rank: a rank whose measured value is below a higher rank's (noise) takes that
    higher rank's (``many`` and ``few``, what `SPARSE_FROM_RANK` holds).
    """
    table: dict[str, dict[str, Any]] = {}
    for rank, entries in per_rank.items():
        cell: dict[str, Any] = {}
        never: list[str] = []
        for kind, phases in (("many", ("prefill", "train")), ("few", ("decode",))):
            per_kept = 0
            for c in entries:
                if c["phase"] in phases:
                    n = c["sparse_from_n"]
                    if n is None:
                        never.append(f"{c['phase']} k={c['k']}")
                        n = 2 * largest_n
                    per_kept = max(per_kept, -(-n // c["k"]))
            cell[f"{kind}_measured"] = per_kept
        table[rank] = {**cell, "never_won": never}
    floor = {"many": 0, "few": 0}
    for rank in sorted(table, key=int, reverse=True):  # from the highest rank down
        for kind in floor:
            floor[kind] = max(floor[kind], table[rank][f"{kind}_measured"])
            table[rank][kind] = floor[kind]
    return table


# ------------------------------------------------------------------ model: the reference workload in N


def model_case(work: Workload, method: str, phase: str, n: int, experts: dict[str, str]):
    """The floor (one LoRA of rank 2 x r plus the scaling pass), or peft-xlora top-2 with the given compute."""
    if method == "floor":
        return build_case(work, "floor", phase, K, {})
    return build_case(work, "ours", phase, n, experts, options=model_options(method))


def model_options(method: str) -> dict[str, Any]:
    """The `XLoraConfig` fields of a peft-xlora method of this benchmark."""
    return {"top_k_lora": K, "topk_compute": method, "classifier_init": "random"}


def routing_share(case) -> float | None:
    """The largest share of (token, expert) choices one expert got in the last forward of `case`."""
    tuner = getattr(getattr(case.model, "base_model", None), "get_latest_scalings", None)
    scalings = tuner() if tuner else None
    if scalings is None:
        return None
    counts = (scalings[:, :, 0] != 0).sum((0, 1)).float()  # (n_experts,)
    return float(counts.max() / counts.sum())


def run_model(args: argparse.Namespace, work: Workload, path: str, block: dict[str, Any]) -> dict[str, Any]:
    """Times floor, dense and sparse per N and phase; rewrites the result file after each N."""
    experts_dir = args.experts_dir or os.path.join(
        os.path.expanduser("~"), ".cache", "peft-xlora", "sparse-topk-experts"
    )
    tag = f"h{work.hidden_size}-m{work.intermediate_size}-l{work.num_hidden_layers}-r{work.rank}-v{work.vocab_size}"
    root = os.path.join(experts_dir, tag)
    os.makedirs(root, exist_ok=True)
    all_experts = make_experts(work, max(args.n), root)
    rows: list[dict[str, Any]] = []
    floor_memory: dict[str, dict[str, float]] = {}
    payload: dict[str, Any] = {}
    for n in args.n:
        experts = {str(i): all_experts[str(i)] for i in range(n)}
        for phase in args.phases:
            cases = {m: model_case(work, m, phase, n, experts) for m in MODEL_METHODS}
            times = _interleaved({m: c.step for m, c in cases.items()}, args.reps, args.warmup)
            for method, t in times.items():
                row = {"phase": phase, "n": n, "method": method, **t}
                if method != "floor":
                    row["largest_expert_share"] = routing_share(cases[method])
                if args.memory != "off" and n in args.memory_n:
                    if method == "floor" and phase in floor_memory:
                        row.update(floor_memory[phase])
                    else:
                        spec = {
                            "workload": work.to_dict(),
                            "method": "floor" if method == "floor" else "ours",
                            "phase": phase,
                            "n": K if method == "floor" else n,
                            "experts": {} if method == "floor" else experts,
                            "threads": args.threads,
                            "options": None if method == "floor" else model_options(method),
                        }
                        run = memory.run_case_subprocess if args.memory == "subprocess" else memory.run_case_here
                        row.update(run(spec))
                        if method == "floor":
                            floor_memory[phase] = {k: row[k] for k in ("peak_rss_gib", "peak_increase_gib")}
                rows.append(row)
                mem = f"  peak {row['peak_rss_gib']:.2f} GiB" if "peak_rss_gib" in row else ""
                print(
                    f"{phase:8s} N={n:<4d} {method:7s} CPU {row['cpu_median_s']:.3f} s  wall {row['median_s']:.3f} s"
                    + mem,
                    flush=True,
                )
            del cases
            gc.collect()
        payload = {
            "workload": work.to_dict(),
            "settings": _settings(args),
            "results": rows,
            "targets": model_targets(rows),
        }
        write_result(path, payload, block)  # after each N: a long run stopped early keeps whole N's
    return payload


def model_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 26's targets this run has the numbers for, on CPU-time medians (wall-clock beside them).

    A ratio across two N compares runs minutes apart; `per_group_floor` divides each by the floor timed in its own
    group, which cancels a change of the machine's load between them.
    """
    cell = {(r["phase"], r["method"], r["n"]): r for r in rows}
    out = []
    for name, phase, (num_m, num_n), (den_m, den_n), limit in TARGETS:
        a, b = cell.get((phase, num_m, num_n)), cell.get((phase, den_m, den_n))
        if not (a and b):
            continue
        value = a["cpu_median_s"] / b["cpu_median_s"]
        entry = {"target": name, "value": value, "wall_value": a["median_s"] / b["median_s"], "limit": limit}
        fa, fb = cell.get((phase, "floor", num_n)), cell.get((phase, "floor", den_n))
        if num_n != den_n and fa and fb:
            entry["per_group_floor"] = value / (fa["cpu_median_s"] / fb["cpu_median_s"])
        entry["met"] = value <= limit
        out.append(entry)
    return out


# ------------------------------------------------------------------ plot


def plot(
    kernel: dict[str, Any] | None, model: dict[str, Any] | None, path: str, crossover: dict[str, Any] | None = None
) -> str | None:
    """CPU-time medians against N: the model's phases (floor, dense, sparse), the kernels' mixture cost, and the
    crossover's sparse / dense ratio per rank."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'peft-xlora[plot]'): no plot written", file=sys.stderr)
        return None
    panels = []
    if model:
        panels += [
            ("model", phase) for phase in ("prefill", "train") if any(r["phase"] == phase for r in model["results"])
        ]
    if kernel:
        panels += [("kernel", phase) for phase in PHASES if any(r["phase"] == phase for r in kernel["results"])]
    if crossover:
        panels.append(("crossover", None))
    if not panels:
        return None
    colors = {"floor": "tab:gray", "dense": "tab:red", "sparse": "tab:green", "grouped": "tab:green",
              "gather": "tab:blue", "loop": "tab:orange"}  # fmt: skip
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 4 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (part, phase) in zip(axes.flat, panels):
        if part == "model":
            rows = [r for r in model["results"] if r["phase"] == phase]
            for method in MODEL_METHODS:
                pts = sorted((r["n"], r["cpu_median_s"]) for r in rows if r["method"] == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method, color=colors[method])
            ax.set_ylabel("CPU seconds (median)")
            ax.set_title(f"reference workload, {phase}, top-{K}")
        elif part == "crossover":
            styles = {"prefill": ":", "train": "-", "decode": "--"}
            for i, (rank, entries) in enumerate(crossover["crossover"].items()):
                for c in entries:
                    pts = sorted((int(n), x) for n, x in c["sparse_over_dense"].items())
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[c["phase"]], marker=".",
                            color=f"C{i}", label=f"rank {rank}, {c['phase']}")  # fmt: skip
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylabel("sparse / dense CPU time (one decoder layer)")
            ax.set_title(f"where sparse overtakes dense, top-{crossover['settings']['k'][0]}")
        else:
            ks = sorted({r["k"] for r in kernel["results"]})
            k = K if K in ks else ks[0]
            rows = [r for r in kernel["results"] if r["phase"] == phase and r["k"] == k and not r["skew"]]
            base = {r["n"]: r["cpu_median_s"] for r in rows if r["method"] == "base"}
            for method in KERNEL_METHODS[1:]:
                pts = sorted(
                    (r["n"], 1000 * (r["cpu_median_s"] - base[r["n"]])) for r in rows if r["method"] == method
                )
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method, color=colors[method])
            ax.set_ylabel("mixture CPU ms (call minus base projections)")
            ax.set_title(f"one decoder layer's projections, {phase}, top-{k}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts N")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small" if part == "crossover" else None)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ report


def report(kernel: dict[str, Any] | None, model: dict[str, Any] | None) -> str:
    """Markdown tables of the recorded files: what docs/performance.md quotes."""
    lines: list[str] = []
    if model:
        rows = model["results"]
        lines += ["| phase | N | floor CPU s | dense CPU s | sparse CPU s | sparse / floor | dense / floor | "
                  "sparse peak RSS GiB | dense peak RSS GiB | floor peak RSS GiB | largest expert share |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for phase in ("prefill", "train"):
            for n in sorted({r["n"] for r in rows}):
                cell = {r["method"]: r for r in rows if r["phase"] == phase and r["n"] == n}
                if len(cell) < 3:
                    continue
                f, d, sp = (cell[m] for m in MODEL_METHODS)
                mem = [f"{c['peak_rss_gib']:.2f}" if "peak_rss_gib" in c else "" for c in (sp, d, f)]
                share = sp.get("largest_expert_share")
                lines.append(
                    f"| {phase} | {n} | {f['cpu_median_s']:.3f} | {d['cpu_median_s']:.3f} | {sp['cpu_median_s']:.3f} "
                    f"| {sp['cpu_median_s'] / f['cpu_median_s']:.2f}x | {d['cpu_median_s'] / f['cpu_median_s']:.2f}x "
                    f"| {' | '.join(mem)} | {share:.2f} |"
                )
        lines += ["", "| target | CPU | wall | per-group floor | limit | |", "|---|---|---|---|---|---|"]
        for t in model["targets"]:
            group = f"{t['per_group_floor']:.2f}" if "per_group_floor" in t else ""
            met = "met" if t["met"] else "missed"
            lines.append(
                f"| {t['target']} | {t['value']:.2f} | {t['wall_value']:.2f} | {group} | {t['limit']} | {met} |"
            )
    if kernel:
        rows = [r for r in kernel["results"] if not r["skew"]]
        lines += [
            "",
            "| phase | k | " + " | ".join(f"N={n}" for n in sorted({r["n"] for r in rows})) + " | sparse from |",
        ]
        ns = sorted({r["n"] for r in rows})
        lines.append("|---|---|" + "---|" * len(ns) + "---|")
        for c in kernel["crossover"]:
            ratios = [c["sparse_over_dense"].get(str(n)) for n in ns]
            cells = " | ".join(f"{x:.2f}" if x is not None else "" for x in ratios)
            lines.append(f"| {c['phase']} | {c['k']} | {cells} | {c['sparse_from_n']} |")
        methods = KERNEL_METHODS[1:]
        lines += ["", "| phase | N | k | routing | base ms | " + " | ".join(f"{m} ms" for m in methods) + " |"]
        lines.append("|---|---|---|---|---|" + "---|" * len(methods))
        for r0 in kernel["results"]:
            if r0["method"] != "base" or r0["k"] != K:
                continue
            key = (r0["phase"], r0["n"], r0["k"], r0["skew"])
            same = {r["method"]: r for r in kernel["results"] if (r["phase"], r["n"], r["k"], r["skew"]) == key}
            base = r0["cpu_median_s"]
            mix = [f"{1000 * (same[m]['cpu_median_s'] - base):.1f}" if m in same else "" for m in KERNEL_METHODS[1:]]
            routing = f"skewed (largest {r0['largest_expert_share']:.2f})" if r0["skew"] else "random"
            lines.append(
                f"| {r0['phase']} | {r0['n']} | {r0['k']} | {routing} | {1000 * base:.1f} | {' | '.join(mix)} |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------ command line


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("part", "n", "k", "ranks", "phases", "reps", "warmup", "threads", "memory", "memory_n", "skew", "smoke")
    return {key: getattr(args, key) for key in keys if hasattr(args, key)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.sparse_topk", description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["kernel", "crossover", "model", "plot", "report"])
    p.add_argument("--n", type=int, nargs="+", help="numbers of experts (kernel: 2..128, model: 8 16 32 64 128)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="kernel: top-k values (default 1 2 4)")
    p.add_argument("--phases", nargs="+", default=None, help="kernel: prefill train decode; model: prefill train")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default kernel 7, model 3; smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1; smoke 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="crossover: the experts' ranks (8 16 32)")
    p.add_argument("--skew", type=float, default=1.5, help="kernel: skew of the extra skewed-routing run")
    p.add_argument("--memory", choices=["subprocess", "inprocess", "off"], default=None, help="model: peak RSS")
    p.add_argument("--memory-n", type=int, nargs="+", default=[64, 128], help="model: the N whose memory is measured")
    p.add_argument("--experts-dir", help="model: where the random experts are kept (default ~/.cache/peft-xlora/...)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition: tests the harness")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--tag", default=None, help="file name suffix (default none; smoke: smoke)")
    p.add_argument("--png", default=None, help="plot: where to write it (default <out>/sparse-topk[-tag].png)")
    args = p.parse_args(argv)
    model = args.part == "model"
    crossover = args.part == "crossover"
    if args.n is None:
        if args.smoke:
            args.n = [2, 4]
        elif model:
            args.n = [8, 16, 32, 64, 128]
        else:
            args.n = list(CROSSOVER_N) if crossover else [2, 4, 8, 16, 32, 64, 128]
    args.k = args.k or ([1] if args.smoke else ([K] if crossover else [1, 2, 4]))
    if crossover:
        args.ranks = args.ranks or ([4, 8] if args.smoke else list(CROSSOVER_RANKS))
        args.skew = 0.0  # the crossover is for the routing a random gate gives
    args.phases = args.phases or (["prefill", "train"] if model else list(PHASES))
    args.reps = args.reps if args.reps is not None else (1 if args.smoke else (3 if model else 7))
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 1)
    args.memory = args.memory or ("off" if args.smoke else "subprocess")
    args.tag = args.tag or ("smoke" if args.smoke else None)
    return args


def result_path(out: str, part: str, tag: str | None, device: str = "cpu") -> str:
    """benchmarks/results/sparse-topk-<part>[-<device>][-<tag>].json (the device type only in the crossover's name)."""
    name = f"sparse-topk-{part}" + (f"-{device}" if part == "crossover" else "") + (f"-{tag}" if tag else "")
    return os.path.join(out, name + ".json")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Runs one part and writes its result file (or the plot); returns the payload."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = SMOKE if args.smoke else Workload()
    if args.part in ("plot", "report"):
        loaded = {}
        for part in ("kernel", "model", "crossover"):
            path = result_path(args.out, part, args.tag, work.device)
            loaded[part] = None
            if os.path.exists(path):
                with open(path) as f:
                    loaded[part] = json.load(f)
        if args.part == "report":
            print(report(loaded["kernel"], loaded["model"]))
            return None
        png = plot(
            loaded["kernel"],
            loaded["model"],
            args.png or os.path.join(args.out, "sparse-topk" + (f"-{args.tag}" if args.tag else "") + ".png"),
            loaded["crossover"],
        )
        print(png or "nothing to plot")
        return None
    block = provenance()
    path = result_path(args.out, args.part, args.tag, work.device)
    if args.part == "kernel":
        payload = {**run_kernel(args, work), "settings": _settings(args), "sparse_from_in_code": dict(SPARSE_FROM)}
        write_result(path, payload, block)
    elif args.part == "crossover":
        in_code = {str(r): list(v) for r, v in SPARSE_FROM_RANK.get(work.device, {}).items()}
        payload = {**run_crossover(args, work), "settings": _settings(args), "sparse_from_rank_in_code": in_code}
        write_result(path, payload, block)
    else:
        payload = run_model(args, work, path, block)
        for t in payload["targets"]:
            floor = f", per-group floor {t['per_group_floor']:.2f}" if "per_group_floor" in t else ""
            print(
                f"{'MET ' if t['met'] else 'MISS'} {t['target']}: CPU {t['value']:.2f} "
                f"(wall {t['wall_value']:.2f}{floor}, limit {t['limit']})"
            )
    if args.part == "kernel":
        for c in payload["crossover"]:
            print(f"crossover {c['phase']:8s} k={c['k']}: sparse from N = {c['sparse_from_n']}")
    if args.part == "crossover":
        for rank, entries in payload["crossover"].items():
            for c in entries:
                print(f"rank {rank:>3s} {c['phase']:8s} k={c['k']}: sparse from N = {c['sparse_from_n']}")
        print("experts per kept expert (many tokens, few):", payload["sparse_from_rank"])
    print(path)
    return payload


if __name__ == "__main__":
    main()
