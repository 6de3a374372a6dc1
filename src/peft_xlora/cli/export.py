"""`peft-xlora export`: a plain LoRA at fixed weights, the mistral.rs layout, or a folder vLLM serves."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..io.export import export_lora, export_mistralrs
from ..serving.vllm import export_vllm
from .common import UserError, check_base_config, check_checkpoint, folder, load_xlora, require_supported, weights


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Adds the `export` subcommand to the parser."""
    p = sub.add_parser(
        "export",
        help="a folder vLLM serves, the mistral.rs layout, or a plain LoRA at fixed weights",
        description="Exports an X-LoRA checkpoint for other runtimes.",
    )
    p.add_argument("checkpoint", help="X-LoRA checkpoint folder")
    p.add_argument(
        "--format",
        choices=["lora", "mistralrs", "vllm"],
        required=True,
        help="lora: one PEFT LoRA equal to the mixture at --weights; mistralrs: mistral.rs X-LoRA layout; "
        "vllm: a folder `vllm serve` loads with the peft-xlora plugin",
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
    """`peft-xlora export` (see `peft_xlora.io.export` and `peft_xlora.serving.vllm.export_vllm`)."""
    if args.format == "lora" and not args.weights:
        raise UserError("--format lora needs --weights NAME=W,... (the fixed expert weights of the exported LoRA).")
    if args.format != "lora" and args.weights:
        raise UserError(f"--weights applies to --format lora only; the {args.format} export keeps the learned gate.")
    loads_model = args.format != "vllm"  # the vLLM export reads the checkpoint's files; the model is never built
    require_supported(args.checkpoint, "export", args.base, loads_model, exporter=f"export_{args.format}")
    if args.format == "vllm":
        config = check_checkpoint(args.checkpoint)  # the checks the other formats get from loading the model
        base = args.base or config.get("base_model_name_or_path")
        if base and Path(base).is_dir():  # a Hub id is resolved (and checked) by the export
            check_base_config(base)
        try:
            out = export_vllm(args.checkpoint, args.out, base_model=args.base)
        except (ValueError, OSError) as exc:  # XLoraServingError, a damaged base config.json, a folder refused
            raise UserError(str(exc)) from exc
        print(f"Exported for vLLM to {out}: `vllm serve {out}` (with peft-xlora installed beside vLLM)")
        return {"out": out}
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
