"""The package's layers import only downwards: core <- io <- compat, serving <- cli, with `__init__` wiring them.

Every import counts, including those inside functions and under `TYPE_CHECKING`: a deferred import still means a
module cannot be read without the other. The test parses the sources, so it also sees imports that never run here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "peft_xlora"

# Rank of each layer: a module may import modules of its own rank or lower.
RANKS = {"_version": 0, "core": 1, "io": 2, "compat": 3, "serving": 3, "cli": 4, "__init__": 5, "__main__": 5}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """The peft_xlora modules `source` (module `module`) imports, as absolute names; `from x import y` adds x.y."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("peft_xlora")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.startswith("peft_xlora"):
                target = node.module
            else:
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names if _exists(f"{target}.{a.name}")}
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


SOURCES = sorted(PACKAGE.rglob("*.py"))


def _graph_entry(path: Path) -> set[str]:
    targets = _imports(path.read_text("utf-8"), _module_name(path), path.name == "__init__.py")
    return {m for m in targets if _exists(m) or m == "peft_xlora"}


def _upward(module: str, targets: set[str]) -> list[str]:
    rank = RANKS[_layer(module)]
    return sorted(m for m in targets if RANKS[_layer(m)] > rank)


GRAPH = {_module_name(p): _graph_entry(p) for p in SOURCES}


def test_every_module_belongs_to_a_layer():
    layers = {_layer(m) for m in GRAPH}
    assert layers <= set(RANKS), f"modules outside the known layers: {layers - set(RANKS)}; add them to RANKS"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_runs_upward(module):
    upward = _upward(module, GRAPH[module])
    assert not upward, f"{module} (layer {_layer(module)!r}) imports higher layers: {upward}"


def test_no_import_cycles():
    # Package __init__ modules re-export their children, which import siblings through them only by relative
    # module paths, so edges into a package's own __init__ are left out.
    graph = {m: {t for t in targets if t != m and not m.startswith(t + ".")} for m, targets in GRAPH.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_check_sees_deferred_and_type_checking_imports():
    # The kinds of import that made the old circle: one for typing only, one inside a function, one absolute.
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..io.save import save_pretrained\n"
        "def f():\n    from ..cli import parser\n    import peft_xlora.compat.original\n"
        "from .layer import XLoraLayer\n"
    )
    found = _imports(source, "peft_xlora.core.example")
    assert {"peft_xlora.io.save", "peft_xlora.cli", "peft_xlora.cli.parser", "peft_xlora.compat.original"} <= found
    assert _upward("peft_xlora.core.example", found) == [
        "peft_xlora.cli",
        "peft_xlora.cli.parser",
        "peft_xlora.compat.original",
        "peft_xlora.io.save",
    ]
