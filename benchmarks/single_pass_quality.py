"""Held-out loss of single-pass X-LoRA at several k beside the dual pass, on the demo's experts, batches and data.

Usage (from the repository root)::

    python -m benchmarks.single_pass_quality              # SmolLM2-135M: needs the demo's cache, else it skips
    python -m benchmarks.single_pass_quality --k 10 20 25
    python -m benchmarks.single_pass_quality --tiny       # the demo's random tiny model: checks the script only

It reuses the demo engine (`peft_xlora.cli.demo`) read-only: the base model, the data and the LoRA experts come from
the demo's cache (``~/.cache/peft-xlora``, filled by ``peft-xlora demo``), and each gate is trained exactly as the
demo trains its X-LoRA gate (same batches, steps, learning rate, classifier). The real run never trains experts or
fetches a model: when the cache lacks them it says so and stops. The dual-pass gate is the demo's cached one (trained
here if missing). The table gives the mean per-token loss on the pure held-out sequences and on the mixed documents;
lower is better, and the last column is the single pass's loss minus the dual pass's.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

from peft_xlora.cli.demo import data as demo_data
from peft_xlora.cli.demo.evaluate import Losses, evaluate
from peft_xlora.cli.demo.run import Demo
from peft_xlora.cli.demo.settings import preset
from peft_xlora.cli.demo.train import train_steps

from .provenance import module_command, provenance, write_result

DEFAULT_CACHE = Path(os.environ.get("PEFT_XLORA_CACHE", Path.home() / ".cache" / "peft-xlora"))


def _mean(losses: Losses) -> tuple[float, float]:
    pure = torch.cat([t.flatten() for t in losses.pure.values()]).mean().item()
    return pure, losses.mixed.mean().item()


def _missing_cache(demo: Demo) -> str | None:
    """Why the real run cannot start from the cache, or None when the base model and every expert are there."""
    if not (demo.cache_dir / "smollm2-135m" / "config.json").is_file():
        return f"no converted SmolLM2-135M under {demo.cache_dir} (run `peft-xlora demo` once)"
    return None


def _missing_experts(demo: Demo) -> str | None:
    s = demo.s
    for domain in demo.domains:
        source = None if s.tiny else demo_data.SOURCES[domain]  # the demo's expert cache key (cli/demo/run.py)
        key = demo._recipe(domain=domain, source=source, steps=s.expert_steps, lr=s.expert_lr, lora=s.lora)
        path = demo.cache_dir / "experts" / f"{domain}-{key}"
        if not path.is_dir():
            return f"the demo's {domain!r} expert is not cached ({path})"
    return None


def _train_single(demo: Demo, k: int) -> torch.nn.Module:
    from peft import get_peft_model

    from peft_xlora import XLoraConfig

    s = demo.s
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        adapters={d: demo.expert_dirs[d] for d in demo.domains},
        xlora_depth=s.router_depth,
        xlora_size=s.router_size,
        xlora_dropout_p=0.0,
        layerwise_scalings=s.router_layerwise,
        routing="single_pass",
        scaling_pass_layers=k,
    )
    torch.manual_seed(s.seed + 20)  # the seed the demo builds its gate with
    model = get_peft_model(demo.new_base(), config)
    losses = train_steps(
        model, demo.router_batches(s.seed + 30), s.router_steps, s.router_lr, f"single pass k={k}", quiet=demo.quiet
    )
    demo.log(f"   single pass k={k}: loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f}")
    return model.eval()


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Runs the comparison; returns its rows, or None when the real run found no cache."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.single_pass_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the demo's random tiny model (numbers mean nothing)")
    p.add_argument("--k", type=int, nargs="+", help="single-pass layers (default 10 20 25 of 30; tiny: 1)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    block = provenance(module_command("benchmarks.single_pass_quality", argv))
    settings = preset(args.tiny)
    ks = args.k or ([1] if args.tiny else [10, 20, 25])  # tiny has 2 layers: k=2 would leave no routed layer
    demo = Demo(settings, args.cache_dir, args.out, quiet=args.quiet)
    if not args.tiny and (why := _missing_cache(demo)):
        print(f"skipped: {why}; no real-model numbers.")
        return None
    start = time.perf_counter()
    demo._stage("base model", demo.prepare_base)
    demo._stage("data", demo.prepare_data)
    if not args.tiny and (why := _missing_experts(demo)):
        print(f"skipped: {why}; no real-model numbers.")
        return None
    demo._stage("experts", demo.prepare_experts)  # all cached in the real run: only their folders are recorded
    demo._stage("dual-pass gate", demo.prepare_xlora)
    results: dict[str, Losses] = {}

    def ev(model: torch.nn.Module, name: str) -> None:
        results[name] = demo._stage(f"eval {name}", lambda: evaluate(model, demo.eval_set, settings.eval_batch, name))

    dual = demo.load_xlora()
    with dual.disable_adapter():
        ev(dual, "base model")
    dual_name = f"dual pass (scaling_pass_layers={settings.scaling_pass_layers})"
    ev(dual, dual_name)
    for k in ks:
        ev(demo._stage(f"train single pass k={k}", lambda k=k: _train_single(demo, k)), f"single pass k={k}")
    dual_pure, dual_mixed = _mean(results[dual_name])
    rows = []
    for name, losses in results.items():
        pure, mixed = _mean(losses)
        rows.append(
            {"variant": name, "pure": pure, "mixed": mixed, "d_pure": pure - dual_pure, "d_mixed": mixed - dual_mixed}
        )
    print(f"\n{'tiny random model: checks the script, not the quality' if args.tiny else 'SmolLM2-135M'}")
    print("| variant | pure loss | mixed loss | pure - dual | mixed - dual |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['pure']:.4f} | {r['mixed']:.4f} | {r['d_pure']:+.4f} | {r['d_mixed']:+.4f} |")
    report = {
        "tiny": args.tiny,
        "k": ks,
        "settings": settings.recipe(),
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_result(str(args.out / f"single-pass-quality-{'tiny' if args.tiny else 'smollm2'}.json"), report, block)
    return report


if __name__ == "__main__":
    main()
