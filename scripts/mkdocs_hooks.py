"""MkDocs hooks: the command-line reference on docs/cli.md is generated from the `peft-xlora` argument parser.

The page's `<!-- cli-reference -->` marker is replaced by the `--help` text of the program and of every subcommand,
so the options listed on the site are always the parser's. The parser is read from `src/peft_xlora/cli.py` with its
command implementations stubbed out: building the site does not import torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
from pathlib import Path

MARKER = "<!-- cli-reference -->"
CLI = Path(__file__).resolve().parents[1] / "src" / "peft_xlora" / "cli.py"


def _load_parser() -> argparse.ArgumentParser:
    package = types.ModuleType("_peft_xlora_cli_doc")
    package.__path__ = []  # a namespace for cli.py's relative import
    commands = types.ModuleType("_peft_xlora_cli_doc.cli_commands")
    commands.__getattr__ = lambda name: (lambda args: None)  # every command, unused here
    sys.modules.update({package.__name__: package, commands.__name__: commands})
    try:
        spec = importlib.util.spec_from_file_location(f"{package.__name__}.cli", CLI)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.build_parser()
    finally:
        for name in [n for n in sys.modules if n.startswith(package.__name__)]:
            del sys.modules[name]


def render_cli_reference() -> str:
    """Markdown: the `--help` of `peft-xlora` and of each subcommand, in the parser's order."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal width; fix it for the site
    try:
        parser = _load_parser()
        (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parts = ["### `peft-xlora`", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, sub in subparsers.choices.items():
            parts += [f"### `peft-xlora {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Fills the marker on cli.md; fails the build if the page lost it."""
    if page.file.src_uri != "cli.md":
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"docs/cli.md must contain {MARKER} where the generated option reference goes")
    return markdown.replace(MARKER, render_cli_reference())
