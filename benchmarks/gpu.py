"""The GPU benchmark: bf16, a random Mistral-7B-shaped model with 8 layers, N = 8 experts of rank 16.

Usage (from the repository root, with a CUDA build of torch)::

    python -m benchmarks.gpu                       # H100/H200: a few minutes
    python -m benchmarks.gpu --tiny --device cpu   # tiny sizes on CPU: checks the script, not the speed

Same comparisons as `benchmarks.run` (base, floor, PEFT's built-in X-LoRA, ours; prefill and training step), timed
with CUDA events after warm-up, repetitions interleaved across methods. Memory is the peak of
`torch.cuda.max_memory_allocated` during one step minus what was allocated just before it: the step's own activations,
gradients and temporaries (weights and optimizer state, allocated before, are not in it). Prints a short table last
and writes `benchmarks/results/gpu-<card>.json`.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import tempfile
import time
from dataclasses import replace
from typing import Any

import torch

from .cases import Workload, build_case, make_experts, supported
from .provenance import module_command, provenance, write_result

# Mistral 7B's sizes (v0.2+: no sliding window), 8 of its 32 layers.
MISTRAL_7B_8L = Workload(
    arch="mistral",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=8,
    num_attention_heads=32,
    num_key_value_heads=8,
    rank=16,
    prefill_batch=1,
    prefill_seq=2048,
    train_batch=2,
    train_seq=1024,
    dtype="bfloat16",
    device="cuda",
)
TINY = replace(
    MISTRAL_7B_8L,
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rank=4,
    xlora_size=16,
    prefill_seq=16,
    train_seq=16,
)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(step: Any, device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def _peak_extra_gib(step: Any, device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1024**3


def run(work: Workload, n: int, reps: int, warmup: int, phases: list[str]) -> list[dict[str, Any]]:
    """Times every method of each phase side by side; returns one row per (phase, method)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="xlora-gpu-") as tmp:
        experts = make_experts(work, n, tmp)
        for phase in phases:
            methods = [m for m in ("base", "lora", "floor", "peft", "ours") if (m, phase) in supported(m, phase)]
            cases = {}
            for m in methods:
                cases[m] = build_case(work, m, phase, n, experts)
                for _ in range(warmup):
                    cases[m].step()
            _sync(work.device)
            memory = {m: _peak_extra_gib(case.step, work.device) for m, case in cases.items()}
            times: dict[str, list[float]] = {m: [] for m in methods}
            for _ in range(reps):
                for m, case in cases.items():
                    times[m].append(_timed(case.step, work.device))
            for m in methods:
                rows.append(
                    {
                        "phase": phase,
                        "method": m,
                        "n": n,
                        "median_s": statistics.median(times[m]),
                        "times_s": times[m],
                        "peak_extra_gib": memory[m],
                    }
                )
                print(f"{phase:8s} {m:6s} {rows[-1]['median_s'] * 1000:9.2f} ms", flush=True)
            del cases
            gc.collect()
            if work.device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The short table printed last: medians, ratios to base (or lora), floor and PEFT, peak extra memory."""
    med = {(r["phase"], r["method"]): r["median_s"] for r in rows}
    lines = [f"{'phase':8s} {'method':6s} {'ms':>9s} {'/base':>7s} {'/floor':>7s} {'/peft':>7s} {'extra GiB':>9s}"]
    for r in rows:
        ref = med.get((r["phase"], "base"), med.get((r["phase"], "lora")))
        cells = [
            f"{r['median_s'] / d:7.2f}" if d else f"{'-':>7s}"
            for d in (ref, med.get((r["phase"], "floor")), med.get((r["phase"], "peft")))
        ]
        mem = f"{r['peak_extra_gib']:9.2f}" if r["peak_extra_gib"] is not None else f"{'-':>9s}"
        lines.append(f"{r['phase']:8s} {r['method']:6s} {r['median_s'] * 1000:9.2f} {' '.join(cells)} {mem}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the GPU benchmark, writes its JSON and prints the table; returns the JSON's content."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--phases", nargs="+", default=["prefill", "train"], choices=["prefill", "train"])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (to test the script on CPU)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    work = replace(TINY if args.tiny else MISTRAL_7B_8L, device=args.device)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    start = time.time()
    block = provenance(module_command("benchmarks.gpu", argv))
    rows = run(work, args.n, args.reps, args.warmup, args.phases)
    result = {
        "workload": work.to_dict(),
        "n": args.n,
        "reps": args.reps,
        "warmup": args.warmup,
        "results": rows,
        "wall_s": time.time() - start,
    }
    where = block["gpu"] or args.device
    card = re.sub(r"[^A-Za-z0-9]+", "-", where).strip("-").lower()
    path = os.path.join(args.out, f"gpu-{card}{'-tiny' if args.tiny else ''}.json")
    write_result(path, result, block)
    print(f"\nwrote {path}; {result['wall_s']:.0f} s in all")
    print(f"\n{where}, {work.dtype}, {work.arch} {work.num_hidden_layers} layers, N={args.n} r={work.rank}")
    print(table(rows))
    return result


if __name__ == "__main__":
    main()
