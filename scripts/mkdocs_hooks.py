"""MkDocs hooks: the command-line reference on docs/cli.md is generated from the `peft-xlora` argument parser.

The page's `<!-- cli-reference -->` marker is replaced by the `--help` text of the program and of every subcommand,
so the options listed on the site are always the parser's (`peft_xlora.cli.parser`, which wires the subcommand
modules of `peft_xlora/cli/`): building the site imports the installed package.
"""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- cli-reference -->"


def _load_parser() -> argparse.ArgumentParser:
    from peft_xlora.cli.parser import build_parser  # the installed package (`pip install -e '.[docs]'`)

    return build_parser()


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
