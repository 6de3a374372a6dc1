"""The `peft-xlora` command line: `parser.py` wires one module per subcommand; `demo/` is the demo's engine."""

from .parser import build_parser, main

__all__ = ["build_parser", "main"]
