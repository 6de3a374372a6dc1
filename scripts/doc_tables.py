"""Numbers in README.md, docs/ and CHANGELOG.md come from result files: this script writes and checks them.

Every figure we publish is held by a result file in `benchmarks/results/` (schema and provenance:
`benchmarks/provenance.py`). Two markers tie the pages to those files; both are HTML comments, so neither GitHub nor
the documentation site shows them.

**Generated tables.** A table is written by this script between two marker lines::

    <!-- table: perf-reference -->
    (generated: do not edit by hand)
    <!-- /table -->

The name picks a function below (`@table("perf-reference")`) that reads result files and returns Markdown, usually
a table with a line under it saying where, when and by which command it was measured. `python scripts/doc_tables.py`
rewrites every such block in place; `--check` only reports blocks that differ from what the files give.

**Numbers in prose.** A number quoted in a sentence carries a source marker right after it (a short unit such as
`x`, `%`, ` s` or ` GiB` may sit between the number and the marker)::

    PEFT's built-in X-LoRA takes 3.4x<!-- src: benchmarks/results/benchmark-reference.json#
        results[phase=train,method=peft,n=8].cpu_median_s / results[phase=train,method=ours,n=8].cpu_median_s -->

(on one line). After `#` comes a key path into the file, or arithmetic (`+ - * /`, parentheses, numbers) over
several. A key path is keys and list indices joined by dots, plus two selectors: `name[key=value,...]` picks the one
element of the list `name` whose fields have those values (compared as text), and `name["any key"]` reads a key
that is not a plain word. The value must round to the printed number: as many decimals as printed (`1.82` means the
value is in [1.815, 1.825)), or as many significant digits for numbers printed in scientific notation (`1.9e-6`).
Percentages are stated in the expression (`100 * (a / b - 1)`).

`tests/contract/test_evidence.py` runs `--check` on every page: a table that the files no longer give, a marker that
does not resolve or a printed number that does not match, and a result file without provenance all fail it.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` lives beside `src`, not inside the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.provenance import check_result  # noqa: E402

PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]

TABLE_START = re.compile(r"^<!-- table: (?P<name>[\w-]+) -->$")
TABLE_END = "<!-- /table -->"
SOURCE = re.compile(r"<!-- src: (?P<file>[^#\s]+)#(?P<expr>.+?) -->")
# The number a source marker backs: the last number before it, followed by at most a short unit.
_NUMBER_BEFORE = re.compile(r"(?P<num>[-+−]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?)(?P<unit>[^\d\n<>|]{0,12})$")

TABLES: dict[str, Callable[[], str]] = {}


def table(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Registers a table generator under the name its marker uses."""

    def register(fn: Callable[[], str]) -> Callable[[], str]:
        TABLES[name] = fn
        return fn

    return register


class EvidenceError(ValueError):
    """A marker that does not resolve, or a result file that is not one."""


# ---------------------------------------------------------------------------------------------- result files


@functools.cache
def load(path: str) -> dict[str, Any]:
    """A result file (path relative to the repository root), checked against the schema."""
    full = ROOT / path
    if not full.is_file():
        raise EvidenceError(f"{path}: no such result file")
    data = json.loads(full.read_text(encoding="utf-8"))
    if problems := check_result(data):
        raise EvidenceError(f"{path} is not a result file with provenance: {'; '.join(problems)}")
    return data


_SEGMENT = re.compile(r'\.?(?:(?P<name>[A-Za-z_]\w*)|(?P<index>\d+))|\[(?P<select>[^\]"]*)\]|\["(?P<key>[^"]*)"\]')


def resolve(data: Any, path: str) -> Any:
    """The value at a key path (see the module docstring), e.g. `results[phase=train,n=8].cpu_median_s`."""
    pos, value = 0, data
    while pos < len(path):
        m = _SEGMENT.match(path, pos)
        if m is None or m.end() == pos:
            raise EvidenceError(f"cannot parse key path {path!r} at {path[pos:]!r}")
        pos = m.end()
        try:
            if m["name"] is not None:
                value = value[m["name"]]
            elif m["index"] is not None:
                value = value[int(m["index"])]
            elif m["key"] is not None:
                value = value[m["key"]]
            else:
                wanted = dict(part.split("=", 1) for part in m["select"].split(","))
                hits = [v for v in value if all(str(v.get(k)) == w for k, w in wanted.items())]
                if len(hits) != 1:
                    raise EvidenceError(f"{path!r}: [{m['select']}] matches {len(hits)} elements, not one")
                value = hits[0]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            if isinstance(e, EvidenceError):
                raise
            raise EvidenceError(f"{path!r}: nothing at {path[: m.end()]!r} ({type(e).__name__}: {e})") from None
    return value


# A key path inside an expression: a word, then dotted words/indices and selectors.
_PATH_IN_EXPR = re.compile(r"[A-Za-z_]\w*(?:\.\w+|\[[^\]]*\])*")
_ALLOWED = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Name, ast.Load, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.USub)


def evaluate(source: str) -> float:
    """The value of `file#expression`."""
    file, _, expr = source.partition("#")
    data = load(file)
    names: dict[str, float] = {}

    def name(m: re.Match) -> str:
        key = f"_v{len(names)}"
        value = resolve(data, m[0])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EvidenceError(f"{file}#{m[0]} is {value!r}, not a number")
        names[key] = value
        return key

    code = _PATH_IN_EXPR.sub(name, expr.strip())
    tree = ast.parse(code, mode="eval")
    if not all(
        isinstance(node, _ALLOWED) or (isinstance(node, ast.Constant) and type(node.value) in (int, float))
        for node in ast.walk(tree)
    ):
        raise EvidenceError(f"{source!r}: only + - * /, parentheses, numbers and key paths are allowed")
    return float(eval(compile(tree, source, "eval"), {"__builtins__": {}}, names))


def matches(printed: str, value: float) -> bool:
    """Whether `value` rounds to the number as printed (its decimals, or its significant digits in e-notation)."""
    text = printed.replace(",", "").replace("−", "-")
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    shown = f"{value:.{decimals}e}" if exponent else f"{value:.{decimals}f}"
    return float(shown) == float(text)


# ---------------------------------------------------------------------------------------------- pages


def render(text: str) -> str:
    """The page with every generated table written afresh from the result files."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        m = TABLE_START.match(lines[i])
        out.append(lines[i])
        i += 1
        if m is None:
            continue
        end = next((j for j in range(i, len(lines)) if lines[j] == TABLE_END), None)
        if end is None:
            raise EvidenceError(f"<!-- table: {m['name']} --> has no {TABLE_END} line")
        if m["name"] not in TABLES:
            raise EvidenceError(f"no table generator named {m['name']!r} (scripts/doc_tables.py)")
        out += ["", TABLES[m["name"]]().strip("\n"), "", TABLE_END]
        i = end + 1
    return "\n".join(out)


def check_sources(text: str) -> list[str]:
    """Problems with the source markers of a page: unresolved, or not what the page prints."""
    problems = []
    for m in SOURCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[text.rfind("\n", 0, m.start()) + 1 : m.start()]
        number = _NUMBER_BEFORE.search(before)
        if number is None:
            problems.append(f"line {line}: no number right before <!-- src: {m['file']}#... -->")
            continue
        try:
            value = evaluate(f"{m['file']}#{m['expr']}")
        except (EvidenceError, SyntaxError, ZeroDivisionError) as e:
            problems.append(f"line {line}: {e}")
            continue
        if not matches(number["num"], value):
            problems.append(f"line {line}: prints {number['num']} but {m['file']}#{m['expr']} is {value!r}")
    return problems


def sources(text: str) -> set[str]:
    """The result files a page quotes through source markers."""
    return {m["file"] for m in SOURCE.finditer(text)}


def check_page(page: Path) -> list[str]:
    """Everything wrong with one page's evidence (empty when the tables and numbers hold)."""
    text = page.read_text(encoding="utf-8")
    name = page.relative_to(ROOT)
    try:
        problems = [] if render(text) == text else ["a generated table differs: run python scripts/doc_tables.py"]
    except (EvidenceError, OSError) as e:
        problems = [str(e)]
    return [f"{name}: {p}" for p in problems + check_sources(text)]


# ---------------------------------------------------------------------------------------------- helpers for tables


def caption(path: str) -> str:
    """One line under a table: when, where, at which commit, how busy the machine was, and the command."""
    block = load(path)["provenance"]
    threads = block.get("torch_threads")
    load_start, load_end = block.get("load_average_start"), block.get("load_average_end")
    busy = ""
    if load_start and load_end:
        busy = f"; load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end"
    dirty = " with uncommitted changes" if block.get("dirty") else ""
    versions = block.get("versions") or {}
    stack = ", ".join(f"{k} {versions[k]}" for k in ("torch", "transformers", "peft") if versions.get(k))
    return (
        f"Measured {block['date_utc'][:16].replace('T', ' ')} UTC at commit `{block['commit'][:9]}`{dirty} on "
        f"{block['gpu'] or block['cpu_model']} ({block['cores']} cores"
        + (f", {threads} torch thread{'s' if threads != 1 else ''}" if threads else "")
        + f"{busy}); {stack}. Command: `{block['command']}`. File: `{path}`."
    )


def _md(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    rule = align or "|" + "|".join("---" for _ in header) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)])


def _x(value: float) -> str:
    return f"{value:.2f}x"


def _rows(path: str, **fields: Any) -> list[dict[str, Any]]:
    return [r for r in load(path)["results"] if all(r.get(k) == v for k, v in fields.items())]


def _row(path: str, **fields: Any) -> dict[str, Any]:
    (row,) = _rows(path, **fields)
    return row


# ---------------------------------------------------------------------------------------------- the tables

REFERENCE = "benchmarks/results/benchmark-reference.json"


def main(argv: list[str] | None = None) -> int:
    """Rewrites the generated tables (or, with --check, reports what is out of date); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; list problems and exit 1 if any")
    parser.add_argument("pages", nargs="*", type=Path, help="pages to process (default: README, CHANGELOG, docs)")
    args = parser.parse_args(argv)
    pages = [p.resolve() for p in args.pages] or PAGES
    problems = []
    for page in pages:
        if not args.check:
            text = page.read_text(encoding="utf-8")
            new = render(text)
            if new != text:
                page.write_text(new, encoding="utf-8")
                print(f"rewrote the tables of {page.relative_to(ROOT)}")
        problems += check_page(page)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
