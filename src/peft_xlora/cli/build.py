"""`peft-xlora build`: base model + LoRA experts (named, or every LoRA in a folder) -> an X-LoRA checkpoint folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model

from ..core.config import MAX_CLASSIFIER_DEPTH, MAX_WIDTH, XLoraConfig
from .common import (
    UserError,
    adapter,
    add_topk_compute,
    check_out_folder,
    folder,
    load_base,
    non_negative_int,
    scaling_pass_layers,
    whole_up_to,
)
from .library import adapters_in
from .places import check_command, read_json, situation


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Adds the `build` subcommand to the parser."""
    p = sub.add_parser(
        "build",
        help="base model + LoRA adapters (named, or every one in a folder) -> an X-LoRA checkpoint folder",
        description="Builds an X-LoRA model over LoRA experts and saves it (gate untrained).",
    )
    p.add_argument("--base", required=True, help="base model folder (transformers save_pretrained)")
    p.add_argument(
        "--adapter",
        action="append",
        type=adapter,
        default=[],
        metavar="NAME=PATH",
        help="a LoRA expert; repeat for each expert (names are kept as given)",
    )
    p.add_argument(
        "--adapters-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of LoRA experts: each subfolder holding an adapter_config.json is an expert named after the "
        "subfolder, in sorted order of the names (after any --adapter); repeatable",
    )
    p.add_argument("--out", required=True, type=folder, help="folder to write the X-LoRA checkpoint to")
    p.add_argument(
        "--depth",
        type=whole_up_to(MAX_CLASSIFIER_DEPTH),
        default=1,
        help=f"linear layers in the gating classifier, 1 to {MAX_CLASSIFIER_DEPTH} (default 1)",
    )
    p.add_argument(
        "--size",
        type=whole_up_to(MAX_WIDTH),
        default=2048,
        help="hidden width of the classifier (default 2048; at most 16x the base model's hidden size, or 4096)",
    )
    p.add_argument("--dropout", type=float, default=0.2, help="classifier dropout (default 0.2)")
    p.add_argument("--top-k", type=int, default=None, help="keep only the k largest scalings per token")
    add_topk_compute(p, "saved in the checkpoint; needs --top-k; default auto")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    p.add_argument("--layerwise", action="store_true", help="one scaling per layer and expert")
    p.add_argument("--scaling-pass-value", type=float, default=0.0, help="expert weight in the scaling pass")
    p.add_argument(
        "--scaling-pass-layers",
        type=scaling_pass_layers,
        default="auto",
        metavar="{auto,all,K}",
        help="decoder layers the scaling pass runs before the gate reads it: auto (the default: two thirds of a "
        "decoder-only model's layers), all (the whole model, as mistral.rs's layout needs) or a number K",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the classifier's initial weights")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`peft-xlora build`: an X-LoRA checkpoint over the given LoRA experts."""
    if not args.adapter and not args.adapters_dir:
        raise UserError("No experts: give --adapter NAME=PATH (repeat it) or --adapters-dir DIR (a folder of LoRAs).")
    adapters = dict(args.adapter)
    check_out_folder(args.out, "the X-LoRA checkpoint")
    if len(adapters) != len(args.adapter):
        raise UserError("Two --adapter arguments have the same name; expert names must be unique.")
    for name, path in adapters.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise UserError(f"Expert {name!r}: {path} is not a LoRA checkpoint folder (no adapter_config.json).")
    for directory in args.adapters_dir:
        for name, path in adapters_in(directory, out=args.out).items():
            if name in adapters:
                raise UserError(
                    f"Two experts are named {name!r}: {adapters[name]} and {path} (--adapters-dir names each expert "
                    "after its folder); rename one of the folders, or give one with --adapter OTHER_NAME=PATH."
                )
            adapters[name] = path
    try:
        config = XLoraConfig(
            task_type="CAUSAL_LM",
            adapters=adapters,
            xlora_depth=args.depth,
            xlora_size=args.size,
            xlora_dropout_p=args.dropout,
            top_k_lora=args.top_k,
            topk_compute=args.topk_compute or "auto",
            softmax_temperature=args.temperature,
            layerwise_scalings=args.layerwise,
            scaling_pass_value=args.scaling_pass_value,
            scaling_pass_layers=args.scaling_pass_layers,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    # The table of what combines, from the files alone: experts with heads, an encoder-decoder base model.
    experts = {name: read_json(Path(path) / "adapter_config.json") or {} for name, path in adapters.items()}
    base = args.base if Path(args.base).is_dir() else None
    try:
        found = situation(
            config, "build", base, loads_model=True, expert_configs=experts, topk_compute_flag=args.topk_compute
        )
        check_command(found)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    torch.manual_seed(args.seed)
    base = load_base(args.base)
    base.name_or_path = str(Path(args.base).resolve())  # recorded in the checkpoint, so later commands find it
    try:
        model = get_peft_model(base, config)
    except ValueError as exc:  # ExpertError is a ValueError
        raise UserError(str(exc)) from exc
    model.save_pretrained(args.out)
    trainable, total = model.get_nb_trainable_parameters()
    print(
        f"Built X-LoRA over {len(adapters)} experts ({', '.join(adapters)}); {trainable:,} trainable of "
        f"{total:,} parameters. Saved to {args.out}"
    )
    return {"out": str(args.out), "experts": list(adapters), "trainable": trainable}
