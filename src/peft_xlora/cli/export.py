"""`peft-xlora export`: a plain LoRA at fixed weights, or the mistral.rs layout."""

from __future__ import annotations

import argparse
from typing import Any

from ..io.export import export_lora, export_mistralrs
from .common import UserError, folder, load_xlora, weights


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Adds the `export` subcommand to the parser."""
    p = sub.add_parser(
        "export",
        help="the mistral.rs layout, or a plain LoRA at fixed weights",
        description="Exports an X-LoRA checkpoint for other runtimes.",
    )
    p.add_argument("checkpoint", help="X-LoRA checkpoint folder")
    p.add_argument(
        "--format",
        choices=["lora", "mistralrs"],
        required=True,
        help="lora: one PEFT LoRA equal to the mixture at --weights; mistralrs: mistral.rs X-LoRA layout",
    )
    p.add_argument("--out", required=True, type=folder, help="output folder")
    p.add_argument(
        "--weights",
        type=weights,
        default=None,
        metavar="NAME=W,...",
        help="with --format lora: the fixed expert weights (missing experts get 0)",
    )
    p.add_argument("--base", default=None, help="base model folder (default: the one the checkpoint records)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`peft-xlora export`: a plain LoRA at fixed weights, or the mistral.rs layout (see `peft_xlora.io.export`)."""
    if args.format == "lora" and not args.weights:
        raise UserError("--format lora needs --weights NAME=W,... (the fixed expert weights of the exported LoRA).")
    if args.format == "mistralrs" and args.weights:
        raise UserError("--weights applies to --format lora only; the mistral.rs layout keeps the learned gate.")
    model, _, _ = load_xlora(args.checkpoint, args.base)
    try:
        if args.format == "lora":
            export_lora(model, args.out, weights=args.weights)
            print(f"Exported a plain PEFT LoRA equal to the mixture at {args.weights} to {args.out}")
        else:
            export_mistralrs(model, args.out)
            print(f"Exported the mistral.rs X-LoRA layout to {args.out} (pass --order {args.out}/xlora-ordering.json)")
    except (ValueError, FileExistsError) as exc:
        raise UserError(str(exc)) from exc
    return {"out": str(args.out)}
