"""`python -m benchmarks.routing`: train and score the routing benchmark's gates; write a result file.

Usage (from the repository root, with the project's environment)::

    python -m benchmarks.routing --group main --seeds 0 1 2      # defaults, demo recipe, baselines, 3 seeds
    python -m benchmarks.routing --group ablation --seeds 0      # each recipe choice switched on / off alone
    python -m benchmarks.routing --group ideas --seeds 0         # routing after switches
    python -m benchmarks.routing --tiny --out /tmp/smoke.json    # random tiny model: checks the pipeline only
    python -m benchmarks.routing --demo-domains --variants ...   # the same gates on the demo's own domains

Experts, distillation targets, gates and held-out losses are cached under the demo's cache folder
($PEFT_XLORA_CACHE or ~/.cache/peft-xlora), so groups and seeds can run one after the other and share them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import corpora
from benchmarks.provenance import provenance, write_result
from benchmarks.routing import variants as V
from benchmarks.routing.bench import (
    BUILTIN,
    DEMO_CHECK,
    DEMO_CHECK_TINY,
    DEMO_DOMAINS,
    REAL,
    TINY,
    RoutingBench,
    pooled,
    report,
    to_json,
)
from peft_xlora.cli.demo.base import default_cache_dir

GROUPS = {
    "main": lambda: [V.RECIPE, V.DEFAULTS],  # the cheaper gate first: a partial file says most sooner
    "ablation": lambda: [V.DEFAULTS, V.RECIPE, *V.ablation()],
    "ideas": lambda: [V.DEFAULTS, V.RECIPE, *V.ideas()],
    "all": lambda: list(V.all_variants().values()),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.routing", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="random tiny model (pipeline check, seconds)")
    p.add_argument("--group", choices=sorted(GROUPS), default="main")
    p.add_argument("--variants", nargs="*", default=None, help="variant labels (instead of --group)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--domains", nargs="+", default=list(corpora.ROUTING_SUBSET))
    p.add_argument(
        "--demo-domains",
        action="store_true",
        help="the demo's three domains, its cached experts and its --thorough held-out set (instead of --domains)",
    )
    p.add_argument("--no-builtin", action="store_true", help="skip PEFT's built-in X-LoRA (its gate's training)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument(
        "--out", type=Path, default=None, help="result file (default benchmarks/results/routing-<group>.json)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cost", action="store_true", help="also time one forward per variant (CPU s, 3 repeats)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the payload written to the result file."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    argv = sys.argv[1:] if argv is None else argv
    block = provenance("python -m benchmarks.routing " + shlex.join(argv))
    start, cpu = time.perf_counter(), time.process_time()
    settings = TINY if args.tiny else REAL
    domains = args.domains
    if args.demo_domains:
        settings = DEMO_CHECK_TINY if args.tiny else DEMO_CHECK
        domains = list(DEMO_DOMAINS[args.tiny])
    cache = args.cache_dir or default_cache_dir()
    known = V.all_variants()
    chosen = [known[label] for label in args.variants] if args.variants else GROUPS[args.group]()
    name = "demo-check" if args.demo_domains else args.group
    out = args.out or Path("benchmarks/results") / f"routing-{name}.json"
    runs: list[dict[str, Any]] = []  # per seed: bench, results, timings

    def emit(final: bool) -> dict[str, Any]:
        # Written after every stage (`complete` false until the end), so a long run leaves its numbers so far.
        payload = _payload(args, chosen, runs, start, cpu)
        payload["complete"] = final
        write_result(str(out), payload, block)
        return payload

    for seed in args.seeds:
        print(f"=== seed {seed}", flush=True)
        bench = RoutingBench(settings, cache, domains, seed=seed, quiet=True)
        run = {"seed": seed, "bench": bench, "results": {}}
        runs.append(run)
        bench.prepare()
        results = run["results"]
        results.update(bench._stage("fixed mixtures", bench.score_fixed))
        results.update(bench._stage("Arrow", bench.score_arrow))
        emit(False)
        for v in chosen:
            results[v.label] = bench._stage(v.label, lambda v=v, bench=bench: bench.score_variant(v))
            emit(False)
        if not args.no_builtin:
            results[BUILTIN] = bench._stage(BUILTIN, bench.score_builtin)
            emit(False)
        if args.cost and seed == args.seeds[0]:
            run["cost"] = bench._stage("cost", lambda bench=bench: bench.gate_cost(chosen))
    payload = emit(True)
    print(f"wrote {out} ({payload['total_wall_s']} s wall, {payload['total_cpu_s']} CPU s)")
    return payload


def _domain(bench: RoutingBench, d: str) -> dict[str, Any]:
    """Where a domain's text comes from (the corpus's record, or the demo's source) and its training windows."""
    windows = {"train_windows": int(bench.train_chunks[d].shape[0])}
    if bench.demo_domains:
        return {"source": bench.source_of(d) or "the tiny demo's synthetic text", "demo": True, **windows}
    entry = corpora.DOMAINS[d]
    return {"source": entry.source, "package": entry.package, "licence": entry.licence, **windows}


def _payload(args: argparse.Namespace, chosen: list, runs: list[dict[str, Any]], start: float, cpu: float) -> dict:
    """The result file's payload from the seeds run so far (rows: what has been scored)."""
    bench = runs[0]["bench"]
    labels = [v.label for v in chosen]
    reports, per_seed = {}, []
    for run in runs:
        results = run["results"]
        if "segment oracle" not in results:
            continue
        ours = [label for label in labels if label in results]
        reports[str(run["seed"])] = report(results, run["bench"].eval_set, bench.s.n_boot, run["seed"], ours)
        per_seed.append((results, run["bench"].eval_set))
    payload: dict[str, Any] = {
        "benchmark": "routing (issue 25)",
        "model": bench.model_id,
        "precision": bench.s.precision,
        "settings": bench.s.recipe(),
        "domains": {d: _domain(bench, d) for d in bench.domains},
        "variants": {v.label: v.recipe() for v in chosen},
        "seeds": [run["seed"] for run in runs],
        "per_seed": to_json(reports),
    }
    if len(per_seed) > 1:
        results, data = pooled(per_seed)
        ours = [label for label in labels if label in results]
        payload["pooled"] = to_json(report(results, data, bench.s.n_boot, 0, ours))
    payload["timings"] = {
        str(run["seed"]): {
            "stage_wall_s": {k: round(v, 1) for k, v in run["bench"].timings.items()},
            "stage_cpu_s": {k: round(v, 1) for k, v in run["bench"].cpu_times.items()},
            "gate_train_cpu_s_this_run": run["bench"].gate_cpu_s,
            "gate_train_cpu_s_when_trained": run["bench"].cached_train_cpu_s(chosen),
        }
        for run in runs
    }
    costs = [run["cost"] for run in runs if "cost" in run]
    if costs:
        payload["cost"] = to_json(costs[0])
    payload["total_wall_s"] = round(time.perf_counter() - start, 1)
    payload["total_cpu_s"] = round(time.process_time() - cpu, 1)
    return payload


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(0 if main() else 1)
