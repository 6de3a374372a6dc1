"""`peft-xlora demo`: the end-to-end demo on SmolLM2-135M, or `--tiny` (see docs/demo.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..common import UserError, folder, non_negative_int, positive_int
from .base import DemoSetupError, default_cache_dir
from .data import DataError
from .precision import PRECISIONS
from .run import Demo
from .settings import preset


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Adds the `demo` subcommand to the parser."""
    p = sub.add_parser(
        "demo",
        help="the end-to-end demo on SmolLM2-135M (or --tiny) with a comparison table",
        description="Trains a LoRA expert per text domain, an X-LoRA gate over them, and compares "
        "held-out losses with the base model, single experts, a uniform mixture, Arrow routing, "
        "PEFT's built-in X-LoRA and the oracles. Trained artefacts are cached and reused.",
    )
    p.add_argument("--tiny", action="store_true", help="random tiny model and synthetic domains (seconds)")
    p.add_argument(
        "--cache-dir",
        type=folder,
        default=None,
        help="cache of the base model, experts and gates (default: $PEFT_XLORA_CACHE or ~/.cache/peft-xlora)",
    )
    p.add_argument("--out", type=folder, default=Path("demo-output"), help="results folder (default: demo-output)")
    p.add_argument("--expert-steps", type=positive_int, default=None, help="training steps per expert")
    p.add_argument("--router-steps", type=positive_int, default=None, help="training steps of each gate")
    p.add_argument("--seed", type=non_negative_int, default=None)
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="bf16 autocast or float32; auto (default): bf16 only on a CPU with native bf16 (AVX512-BF16 or AMX)",
    )
    p.add_argument(
        "--thorough",
        action="store_true",
        help="evaluate on four times the held-out documents (the trained artefacts are the default run's)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`peft-xlora demo`: the end-to-end demo (see docs/demo.md)."""
    if args.tiny and args.threads is None:
        # The tiny model is too small to gain from threads, and loses much when cores are busy.
        torch.set_num_threads(1)
    settings = preset(
        args.tiny,
        thorough=args.thorough,
        expert_steps=args.expert_steps,
        router_steps=args.router_steps,
        seed=args.seed,
        precision=None if args.tiny and args.precision == "auto" else args.precision,  # --tiny: float32 unless asked
    )
    cache = args.cache_dir or default_cache_dir()
    print(f"Cache: {cache} (reused between runs); results: {args.out}")
    try:
        report = Demo(settings, cache, args.out, quiet=args.quiet).run()
    except (DemoSetupError, DataError) as exc:
        raise UserError(str(exc)) from exc
    print()
    print((args.out / "results.md").read_text())
    return report
