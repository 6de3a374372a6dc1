"""The `peft-xlora` command line: build, train, generate, inspect, export, demo.

Every subcommand has `--help`. Models are read from local folders: a base model saved by transformers (with its
tokenizer) and X-LoRA checkpoints written by `build` or `train`, which remember their base model's folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import cli_commands as commands


def _weights(text: str) -> dict[str, float]:
    """Parses `name=weight,name=weight`."""
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected name=weight[,name=weight...], got {text!r}")
    return out


def _adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (a LoRA checkpoint folder), got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `peft-xlora`, with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="peft-xlora",
        description="X-LoRA (Mixture of LoRA Experts) for PEFT: build, train, use and inspect X-LoRA models.",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: its own)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "build",
        help="base model + named LoRA adapters -> an X-LoRA checkpoint folder",
        description="Builds an X-LoRA model over LoRA experts and saves it (gate untrained).",
    )
    p.add_argument("--base", required=True, help="base model folder (transformers save_pretrained)")
    p.add_argument(
        "--adapter",
        action="append",
        type=_adapter,
        required=True,
        metavar="NAME=PATH",
        help="a LoRA expert; repeat for each expert (names are kept as given)",
    )
    p.add_argument("--out", required=True, type=Path, help="folder to write the X-LoRA checkpoint to")
    p.add_argument("--depth", type=int, default=1, help="linear layers in the gating classifier (default 1)")
    p.add_argument("--size", type=int, default=2048, help="hidden width of the classifier (default 2048)")
    p.add_argument("--dropout", type=float, default=0.2, help="classifier dropout (default 0.2)")
    p.add_argument("--top-k", type=int, default=None, help="keep only the k largest scalings per token")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    p.add_argument("--layerwise", action="store_true", help="one scaling per layer and expert")
    p.add_argument("--scaling-pass-value", type=float, default=0.0, help="expert weight in the scaling pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier's initial weights")
    p.set_defaults(func=commands.build)

    p = sub.add_parser(
        "train",
        help="train the gating classifier on text or JSONL data",
        description="Trains the gate with transformers' Trainer: train/eval split, eval loss, "
        "checkpoints every --save-steps, --resume from the last one.",
    )
    p.add_argument("checkpoint", help="X-LoRA checkpoint folder (from `build` or an earlier `train`)")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        type=Path,
        help=".txt files (one document each) or .jsonl files (one JSON object per line)",
    )
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--out", required=True, type=Path, help="folder for the trained checkpoint (and checkpoints/)")
    p.add_argument("--base", default=None, help="base model folder (default: the one the checkpoint records)")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps (default 100)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training window (default 128)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of windows held out (default 0.1)")
    p.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: at the end)")
    p.add_argument("--save-steps", type=int, default=None, help="save a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in OUT/checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=commands.train)

    p = sub.add_parser(
        "generate",
        help="prompt(s) -> text, optionally with a gating heatmap PNG",
        description="Generates a continuation of each prompt with the X-LoRA model.",
    )
    p.add_argument("checkpoint", help="X-LoRA checkpoint folder")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--base", default=None, help="base model folder (default: the one the checkpoint records)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument(
        "--mode",
        choices=["token", "prompt"],
        default=None,
        help="token: a gate per token; prompt: hold the prompt's gate (default: the checkpoint's)",
    )
    p.add_argument(
        "--static",
        type=_weights,
        default=None,
        metavar="NAME=W,...",
        help="pin the gate to fixed expert weights (no classifier)",
    )
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--heatmap", type=Path, default=None, help="write the gate over the first prompt + its generated text as a PNG"
    )
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=commands.generate)

    p = sub.add_parser(
        "inspect",
        help="experts, ranks, target modules, parameter counts, config; gating plot",
        description="Describes an X-LoRA checkpoint; with --text, plots the gate on that text.",
    )
    p.add_argument("checkpoint", help="X-LoRA checkpoint folder")
    p.add_argument("--base", default=None, help="base model folder (default: the one the checkpoint records)")
    p.add_argument("--text", default=None, help="a text to route; prints the mean gate per expert")
    p.add_argument("--plot", type=Path, default=None, help="with --text: write the gating heatmap (PNG/SVG/PDF)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=commands.inspect)

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
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--weights",
        type=_weights,
        default=None,
        metavar="NAME=W,...",
        help="with --format lora: the fixed expert weights (missing experts get 0)",
    )
    p.add_argument("--base", default=None, help="base model folder (default: the one the checkpoint records)")
    p.set_defaults(func=commands.export)

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
        type=Path,
        default=None,
        help="cache of the base model, experts and gates (default: $PEFT_XLORA_CACHE or ~/.cache/peft-xlora)",
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="results folder (default: demo-output)")
    p.add_argument("--expert-steps", type=int, default=None, help="training steps per expert")
    p.add_argument("--router-steps", type=int, default=None, help="training steps of each gate")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=commands.demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `peft-xlora` with `argv` (default: the process arguments); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch  # already imported by the commands module

    # A command may change the thread count (--threads, the tiny demo); a caller running `main()` in-process (tests,
    # notebooks) gets its own back.
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result: Any = args.func(args)
    except commands.UserError as exc:
        print(f"peft-xlora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    if isinstance(result, dict) and getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
