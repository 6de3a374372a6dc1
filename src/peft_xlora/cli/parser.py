"""The `peft-xlora` command line: build, train, generate, inspect, export, demo.

Every subcommand has `--help`. Models are read from local folders: a base model saved by transformers (with its
tokenizer) and X-LoRA checkpoints written by `build` or `train`, which remember their base model's folder. Each
subcommand lives in its own module, which adds its parser and runs it; this module only wires them.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from . import build, export, generate, inspect, train
from .common import Parser, UserError
from .demo import command as demo

SUBCOMMANDS = (build, train, generate, inspect, export, demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `peft-xlora`, with one subparser per subcommand."""
    parser = Parser(
        prog="peft-xlora",
        description="X-LoRA (Mixture of LoRA Experts) for PEFT: build, train, use and inspect X-LoRA models.",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: its own)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `peft-xlora` with `argv` (default: the process arguments); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error, already printed in one line; --help exits 0 as argparse does
        if exc.code in (0, None):
            raise
        return int(exc.code) if isinstance(exc.code, int) else 2
    if args.threads is not None and args.threads < 1:
        print(
            f"peft-xlora {args.command}: error: --threads must be a whole number >= 1, got {args.threads}.",
            file=sys.stderr,
        )
        return 2
    # A command may change the thread count (--threads, the tiny demo); a caller running `main()` in-process (tests,
    # notebooks) gets its own back.
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():
            # transformers' notice to PEFT, not to the user (PEFT reads the deprecated attribute on every load): it
            # would print two lines above every error of a command that loads a model.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            result: Any = args.func(args)
    except UserError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message of the error it wraps
        print(f"peft-xlora {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    if isinstance(result, dict) and getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
