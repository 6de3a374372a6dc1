"""Tokens/s of cached X-LoRA generation against the base model, the floor and PEFT's built-in X-LoRA.

Usage (from the repository root)::

    python -m benchmarks.generation_check                       # N = 8, 128 and 512 new tokens, 3 repetitions
    python -m benchmarks.generation_check --n 32 --new 128 --reps 2 --no-peft
    python -m benchmarks.generation_check --smoke               # tiny sizes: checks the script, not the speed

Writes ``benchmarks/results/generation-check.json`` (``--out``): the medians, every repetition, and the ratios, with
the provenance block of ``benchmarks/provenance.py``.

Reference workload of issue 4 (random 8-layer Llama, hidden 512; N experts of rank 16 on all seven projections;
prompt 64 tokens, greedy, exactly `new` tokens). Methods:

- ``base``: the plain model, cached.
- ``lora``: one PEFT LoRA of rank N * 16, cached (the model prompt mode is compared with).
- ``floor``: per token, a base cached step plus a ``lora`` cached step: the least work a cached dual pass can do.
  Its time is the sum of the two measured times.
- ``token`` / ``prompt``: peft-xlora in each scalings mode, cached.
- ``single``: peft-xlora with ``routing="single_pass"`` (k = half the layers), cached with the model's own cache;
  its floor is ``lora`` (issue 16: tokens/s >= 0.9x ``lora``).
- ``peft``: PEFT's built-in X-LoRA (it refuses the cache), at the shortest length only (it grows with the square)
  unless ``--peft-all``.

Repetitions of all methods are interleaved so that drifts of a shared machine hit every method alike; the table shows
medians of wall-clock time and, with ``--cpu-time``, of the process's CPU time (``time.process_time``), which a busy
shared machine disturbs less (use ``--threads 1`` with it, so no thread spins waiting for another). The full harness
(``python -m benchmarks.run``) records the same generation phase with the other phases.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from .cases import SMOKE, Workload, _build_model, _ids, generate_step, make_experts
from .provenance import module_command, provenance, write_result

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "generation-check.json")


def measure(
    work: Workload, n: int, news: list[int], reps: int, peft_news: list[int], clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Builds every method once and times interleaved repetitions; returns the seconds of every `method@new` run."""
    root = tempfile.mkdtemp(prefix="xlora-gen-")
    experts = make_experts(work, n, root)
    prompt = _ids(work, 1, work.gen_prompt, seed=3)
    models = {
        "base": _build_model(work, "base", n, experts, train=False).eval(),
        "lora": _build_model(work, "floor", n, experts, train=False).eval(),  # one LoRA of rank n * r
        "ours": _build_model(work, "ours", n, experts, train=False).eval(),
        "single": _build_model(work, "single", n, experts, train=False).eval(),
    }
    steps: dict[tuple[str, int], Callable[[], Any]] = {}
    for new in news:
        steps["base", new] = generate_step(models["base"], prompt, new, use_cache=True)
        steps["lora", new] = generate_step(models["lora"], prompt, new, use_cache=True)
        steps["token", new] = generate_step(models["ours"], prompt, new, use_cache=True, scalings_mode="token")
        steps["prompt", new] = generate_step(models["ours"], prompt, new, use_cache=True, scalings_mode="prompt")
        steps["single", new] = generate_step(models["single"], prompt, new, use_cache=True)
    if peft_news:
        models["peft"] = _build_model(work, "peft", n, experts, train=False).eval()
        for new in peft_news:
            steps["peft", new] = generate_step(models["peft"], prompt, new, use_cache=False)

    # Warm-up: a short generation per model and mode (a full-length one would double PEFT's minutes).
    for key in steps:
        method = key[0]
        model = models["ours" if method in ("token", "prompt") else method]
        extra = {"scalings_mode": method} if method in ("token", "prompt") else {}
        generate_step(model, prompt, 4, use_cache=method != "peft", **extra)()
    # That both of our modes' caches give the uncached tokens is what the tests assert; here only check that the
    # timed runs produce `new` tokens.
    times: dict[tuple[str, int], list[float]] = {key: [] for key in steps}
    for _ in range(reps):
        for key, step in steps.items():
            start = clock()
            out = step()
            times[key].append(clock() - start)
            assert out.shape[1] == work.gen_prompt + key[1], (key, out.shape)
    return {f"{m}@{new}": t for (m, new), t in times.items()}


def table(seconds: dict[str, float], news: list[int]) -> list[dict[str, Any]]:
    """Tokens/s per method and length, with the ratios the issue's targets are stated in."""
    rows = []
    for new in news:
        t = {m: seconds.get(f"{m}@{new}") for m in ("base", "lora", "token", "prompt", "single", "peft")}
        floor = t["base"] + t["lora"]
        row = {
            "new_tokens": new,
            "tok_s": {m: new / s for m, s in t.items() if s is not None} | {"floor": new / floor},
            "token_vs_floor": floor / t["token"],
            "prompt_vs_lora": t["lora"] / t["prompt"],
            "single_vs_lora": t["lora"] / t["single"],
        }
        if t["peft"] is not None:
            row["token_vs_peft"] = t["peft"] / t["token"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="number of experts")
    parser.add_argument("--new", type=int, nargs="+", default=[128, 512], help="new tokens per run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's built-in X-LoRA (slow)")
    parser.add_argument("--peft-all", action="store_true", help="PEFT's built-in at every length, not the shortest")
    parser.add_argument("--cpu-time", action="store_true", help="time with process CPU time instead of wall time")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--out", default=DEFAULT_OUT, help="the result file (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    block = provenance(module_command("benchmarks.generation_check", argv))
    work = replace(SMOKE, gen_new_tokens=[4]) if args.smoke else Workload()
    news = [4] if args.smoke else args.new
    clock = time.process_time if args.cpu_time else time.perf_counter
    reps = 1 if args.smoke else args.reps
    peft_news = [] if args.no_peft else news if args.peft_all else [min(news)]
    times = measure(work, args.n, news, reps, peft_news, clock)
    seconds = {key: statistics.median(t) for key, t in times.items()}
    rows = table(seconds, news)
    methods = ("base", "floor", "lora", "token", "prompt", "single", "peft")
    kind = "CPU" if args.cpu_time else "wall"
    print(
        f"N={args.n}, prompt {work.gen_prompt}, greedy, {args.threads} threads; tokens/s of {kind} time "
        f"(median of {reps})"
    )
    print("new   " + "".join(f"{m:>9}" for m in methods) + "  token/floor  prompt/lora  single/lora  token/peft")
    for row in rows:
        cells = "".join(f"{row['tok_s'][m]:9.1f}" if m in row["tok_s"] else f"{'-':>9}" for m in methods)
        vs_peft = f"{row['token_vs_peft']:10.1f}x" if "token_vs_peft" in row else f"{'-':>11}"
        ratios = (
            f"{row['token_vs_floor']:10.2f}x  {row['prompt_vs_lora']:10.2f}x  {row['single_vs_lora']:10.2f}x {vs_peft}"
        )
        print(f"{row['new_tokens']:<6}{cells}  {ratios}")
    payload = {
        "workload": work.to_dict(),
        "n": args.n,
        "threads": args.threads,
        "clock": kind,
        "reps": reps,
        "seconds": seconds,  # medians, method@new_tokens
        "times_s": times,  # every repetition
        "rows": rows,
    }
    write_result(args.out, payload, block)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
