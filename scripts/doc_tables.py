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

(on one line). A page that quotes one file often may name it once, on a line of its own:
`<!-- src-alias: ref = benchmarks/results/benchmark-reference.json -->`, and then write `<!-- src: ref#... -->`.
After `#` comes a key path into the file, or arithmetic (`+ - * /`, parentheses, numbers) over
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
# `<!-- src-alias: ref = benchmarks/results/x.json -->` on a page lets its markers say `ref#...` for that file.
ALIAS = re.compile(r"(?<!`)<!-- src-alias: (?P<name>\w+) = (?P<file>\S+) -->")
# A marker quoted in inline code (`<!-- src: ... -->`, as on the page that explains them) is not one.
SOURCE = re.compile(r"(?<!`)<!-- src: (?P<file>[^#\s]+)#(?P<expr>.+?) -->")
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


def render(text: str, problems: list[str] | None = None) -> str:
    """The page with every generated table written afresh from the result files.

    A table whose generator fails (a result file missing or without provenance) keeps its old content, and the
    failure is appended to `problems`; without a `problems` list it raises.
    """
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
        try:
            if m["name"] not in TABLES:
                raise EvidenceError(f"no table generator named {m['name']!r} (scripts/doc_tables.py)")
            out += ["", TABLES[m["name"]]().strip("\n"), "", TABLE_END]
        except (EvidenceError, OSError, KeyError, ValueError) as e:
            if problems is None:
                raise
            problems.append(f"table {m['name']!r}: {type(e).__name__}: {e}")
            out += lines[i : end + 1]
        i = end + 1
    return "\n".join(out)


def _aliases(text: str) -> dict[str, str]:
    return {m["name"]: m["file"] for m in ALIAS.finditer(text)}


def check_sources(text: str) -> list[str]:
    """Problems with the source markers of a page: unresolved, or not what the page prints."""
    problems, aliases = [], _aliases(text)
    for m in SOURCE.finditer(text):
        file = aliases.get(m["file"], m["file"])
        line = text.count("\n", 0, m.start()) + 1
        before = text[text.rfind("\n", 0, m.start()) + 1 : m.start()]
        number = _NUMBER_BEFORE.search(before)
        if number is None:
            problems.append(f"line {line}: no number right before <!-- src: {m['file']}#... -->")
            continue
        try:
            value = evaluate(f"{file}#{m['expr']}")
        except (EvidenceError, SyntaxError, ZeroDivisionError) as e:
            problems.append(f"line {line}: {e}")
            continue
        if not matches(number["num"], value):
            problems.append(f"line {line}: prints {number['num']} but {file}#{m['expr']} is {value!r}")
    return problems


def sources(text: str) -> set[str]:
    """The result files a page quotes through source markers."""
    aliases = _aliases(text)
    return {aliases.get(m["file"], m["file"]) for m in SOURCE.finditer(text)}


# The routing benchmark's pages keep blocks of their own (`<!-- routing-table: NAME FILE -->` ...
# `<!-- /routing-table -->`), written by `python -m benchmarks.routing.tables`; they are checked here the same way.
ROUTING_TABLE = re.compile(r"^<!-- routing-table: (?P<name>[\w-]+) (?P<file>\S+) -->$")
ROUTING_TABLE_END = "<!-- /routing-table -->"


def _check_routing_tables(text: str) -> list[str]:
    """Problems with a page's routing-benchmark blocks: a file without provenance, or a block that is stale."""
    files = [m["file"] for line in text.split("\n") if (m := ROUTING_TABLE.match(line))]
    if not files:
        return []
    from benchmarks.routing.tables import render as render_routing

    problems = []
    for file in files:
        try:
            load(file)
        except EvidenceError as e:
            problems.append(str(e))
    if not problems and render_routing(text) != text:
        problems.append("a routing-table block differs from its result file: run python -m benchmarks.routing.tables")
    return problems


def check_page(page: Path) -> list[str]:
    """Everything wrong with one page's evidence (empty when the tables and numbers hold)."""
    text = page.read_text(encoding="utf-8")
    problems: list[str] = []
    try:
        if render(text, problems) != text and not problems:
            problems.append("a generated table differs from its result files: run python scripts/doc_tables.py")
    except EvidenceError as e:
        problems.append(str(e))
    problems += _check_routing_tables(text)
    return [f"{page.relative_to(ROOT)}: {p}" for p in problems + check_sources(text)]


def caption(path: str) -> str:
    """One line under a table: when, where, at which commit, how busy the machine was, and the command."""
    block = load(path)["provenance"]
    threads = block.get("torch_threads")
    load_start, load_end = block.get("load_average_start"), block.get("load_average_end")
    busy = ""
    if load_start and load_end:
        busy = f"; load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end"
    dirty = ""
    if block.get("dirty"):
        paths = block.get("dirty_paths")
        dirty = " with uncommitted changes" + (f" to {', '.join(f'`{p}`' for p in paths)}" if paths else "")
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
GENERATION = "benchmarks/results/generation-check.json"
SCALING_PASS_LAYERS = "benchmarks/results/scaling-pass-layers.json"
SEQ2SEQ = "benchmarks/results/seq2seq-classifier.json"
DEMO = "benchmarks/results/demo-default.json"
DEMO_THOROUGH = "benchmarks/results/demo-thorough.json"

METHOD_NAMES = {
    "base": "base model",
    "lora": "one LoRA, rank 16",
    "wide": "one LoRA, rank N x 16 (`wide`)",
    "floor": "`floor`: no-grad base pass + `wide`",
    "peft": "PEFT's built-in X-LoRA",
    "ours": "peft-xlora, dual pass",
    "single": "peft-xlora, single pass",
    "single_uniform": "peft-xlora, single pass, uniform static weights",
}


@table("readme-reference")
def readme_reference() -> str:
    """README: peft-xlora beside PEFT's built-in X-LoRA and one LoRA of the experts' total rank, CPU time."""
    header = [
        f"median of {load(REFERENCE)['settings']['reps']} runs",
        "N",
        "peft-xlora",
        "peft-xlora, single pass",
        "PEFT's built-in X-LoRA",
        "one LoRA of rank N x 16",
    ]
    rows = []
    phases = (("train", "training step, 2 x 256 tokens: CPU s"), ("prefill", "prefill, 1 x 512 tokens: CPU s"))
    for phase, label in phases:
        for n in load(REFERENCE)["settings"]["n"]:
            t = {
                m: _row(REFERENCE, phase=phase, method=m, n=n)["cpu_median_s"]
                for m in ("ours", "single", "peft", "wide")
            }
            peft = f"{t['peft']:.2f} ({_x(t['peft'] / t['ours'])})"
            rows.append([label, str(n), f"{t['ours']:.2f}", f"{t['single']:.2f}", peft, f"{t['wide']:.2f}"])
    for n in load(REFERENCE)["settings"]["n"]:
        gib = {
            m: _row(REFERENCE, phase="train", method=m, n=n)["peak_rss_gib"]
            for m in ("ours", "single", "peft", "wide")
        }
        rows.append(
            ["training step: peak RSS, GiB", str(n), *(f"{gib[m]:.2f}" for m in ("ours", "single", "peft", "wide"))]
        )
    return "\n\n".join(
        [
            _md(header, rows, "|---|---:|---:|---:|---:|---:|"),
            "In brackets: PEFT's built-in X-LoRA's time over peft-xlora's. " + caption(REFERENCE),
        ]
    )


@table("perf-reference")
def perf_reference() -> str:
    """performance.md: every method of the reference run, CPU and wall medians, ratios within one N, memory."""
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    rows = []
    results = sorted(load(REFERENCE)["results"], key=lambda r: (r["phase"] != "prefill", r["n"], order[r["method"]]))
    for r in results:
        group = {x["method"]: x for x in _rows(REFERENCE, phase=r["phase"], n=r["n"])}
        vs = [_x(r["cpu_median_s"] / group[m]["cpu_median_s"]) if m in group else "" for m in ("ours", "wide")]
        memory = [f"{r[k]:.2f}" if k in r else "" for k in ("peak_rss_gib", "peak_increase_gib")]
        rows.append(
            [r["phase"], str(r["n"]), METHOD_NAMES[r["method"]], f"{r['cpu_median_s']:.3f}", *vs,
             f"{r['median_s']:.3f}", *memory]
        )  # fmt: skip
    header = [
        "phase",
        "N",
        "method",
        "CPU s",
        "CPU vs ours",
        "CPU vs wide",
        "wall s",
        "peak RSS GiB",
        "RSS increase GiB",
    ]
    reps = load(REFERENCE)["settings"]["reps"]
    return "\n\n".join(
        [
            _md(header, rows, "|---|---:|---|---:|---:|---:|---:|---:|---:|"),
            f"Medians of {reps} interleaved repetitions after a warm-up. " + caption(REFERENCE),
        ]
    )


@table("perf-targets")
def perf_targets() -> str:
    """performance.md: the targets the harness checks, judged on CPU time (wall time beside it)."""
    rows = []
    for t in load(REFERENCE)["targets"]:
        cpu = t.get("cpu_value")
        verdict = (cpu if cpu is not None else t["value"]) <= t["limit"]
        rows.append(
            [t["target"], f"{cpu:.2f}" if cpu is not None else "-", f"{t['value']:.2f}", f"{t['limit']:g}",
             "met" if verdict else "**missed**"]
        )  # fmt: skip
    header = ["target", "ratio of CPU times", "ratio of wall times (memory: of peak RSS)", "limit", "on CPU time"]
    return _md(header, rows, "|---|---:|---:|---:|---|") + "\n\n" + caption(REFERENCE)


@table("perf-generation")
def perf_generation() -> str:
    """performance.md: cached generation, tokens per CPU second of every method, and the ratios."""
    data = load(GENERATION)
    methods = ("base", "lora", "floor", "token", "prompt", "single", "peft")
    header = ["N", "new tokens", *methods, "token / floor", "prompt / lora", "single / lora", "token / peft"]
    rows = []
    for r in data["rows"]:
        cells = [f"{r['tok_s'][m]:.1f}" if m in r["tok_s"] else "" for m in methods]
        ratios = [r.get(k) for k in ("token_vs_floor", "prompt_vs_lora", "single_vs_lora", "token_vs_peft")]
        rows.append([str(data["n"]), str(r["new_tokens"]), *cells, *(_x(v) if v else "" for v in ratios)])
    unit = "CPU second" if data["clock"] == "CPU" else "second"
    return "\n\n".join(
        [
            _md(header, rows, "|---:|---:|" + "---:|" * (len(header) - 2)),
            f"Tokens per {unit}, medians of {data['reps']} interleaved repetitions. " + caption(GENERATION),
        ]
    )


@table("perf-scaling-pass-layers")
def perf_scaling_pass_layers() -> str:
    """performance.md: prefill with a shorter scaling pass, and the routing task's outcome, per k."""
    data = load(SCALING_PASS_LAYERS)
    header = ["scaling_pass_layers", "prefill CPU s", "CPU vs all layers", "wall s", "final KL", "mean gate on target"]
    rows = [
        [r["layers"], f"{r['cpu_median_s']:.3f}", _x(r["cpu_vs_all"]), f"{r['median_s']:.3f}", f"{r['final_kl']:.3f}",
         f"{r['target_share']:.3f}"]
        for r in data["rows"]
    ]  # fmt: skip
    return "\n\n".join(
        [
            _md(header, rows, "|---|---:|---:|---:|---:|---:|"),
            f"N = {data['n']}, medians of {data['reps']} interleaved repetitions. " + caption(SCALING_PASS_LAYERS),
        ]
    )


@table("seq2seq-classifier")
def seq2seq_classifier() -> str:
    """models.md: one classifier for both stacks of an encoder-decoder model, or one per stack."""
    data = load(SEQ2SEQ)
    header = ["rule", "classifier", "parameters", "encoder accuracy", "decoder accuracy", "held-out cross-entropy"]
    rows = [
        [r["rule"], r["classifier"], str(r["parameters"]), f"{r['encoder_accuracy']:.3f}",
         f"{r['decoder_accuracy']:.3f}", f"{r['cross_entropy']:.3f}"]
        for r in data["rows"]
    ]  # fmt: skip
    settings = data["settings"]
    return "\n\n".join(
        [
            _md(header, rows, "| --- | --- | ---: | ---: | ---: | ---: |"),
            f"Medians of {settings['seeds']} seeds, {settings['steps']} Adam steps each. " + caption(SEQ2SEQ),
        ]
    )


SINGLE_PASS_QUALITY = "benchmarks/results/single-pass-quality-smollm2.json"
CHECKPOINTING = "benchmarks/results/checkpointing-memory.json"


@table("demo-single-pass")
def demo_single_pass() -> str:
    """demo.md: single-pass gates at several k beside the dual pass, on the demo's experts and held-out data."""
    data = load(SINGLE_PASS_QUALITY)
    header = ["variant", "pure (mean of the domains)", "mixed", "pure - dual", "mixed - dual"]
    rows = [
        [r["variant"], f"{r['pure']:.3f}", f"{r['mixed']:.3f}", f"{r['d_pure']:+.3f}", f"{r['d_mixed']:+.3f}"]
        for r in data["rows"]
    ]
    return _md(header, rows, "| --- | ---: | ---: | ---: | ---: |") + "\n\n" + caption(SINGLE_PASS_QUALITY)


REGULARISERS = "benchmarks/results/router-regularisers.json"


@table("training-checkpointing")
def training_checkpointing() -> str:
    """training.md: what gradient checkpointing saves while training the gate (examples/measure_checkpointing.py)."""
    data = load(CHECKPOINTING)
    header = ["checkpointing", "saved activations (MB)", "peak RSS (MB)", "step CPU s", "step wall s"]
    rows = [
        [mode, f"{r['saved_mb']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['step_cpu_s']:.2f}", f"{r['step_s']:.2f}"]
        for mode, r in data["rows"].items()
    ]
    return _md(header, rows, "| --- | ---: | ---: | ---: | ---: |") + "\n\n" + caption(CHECKPOINTING)


@table("training-regularisers")
def training_regularisers() -> str:
    """training.md: what the router regularisers change (examples/router_regularisers.py)."""
    data = load(REGULARISERS)
    columns = [c for c in data["rows"][0] if c != "setting"]
    rows = [[r["setting"], *(f"{r[c]:.3f}" for c in columns)] for r in data["rows"]]
    align = "| --- |" + " ---: |" * len(columns)
    return _md(["setting", *columns], rows, align) + f"\n\n{data['steps']} Adam steps. " + caption(REGULARISERS)


def _demo_table(path: str) -> str:
    from peft_xlora.cli.demo.evaluate import markdown_paired, markdown_table

    data = load(path)
    oracle = next(v for v in data["table"] if v == "oracle")
    return "\n\n".join(
        [
            markdown_table(data["table"], oracle, data["intervals_95"]),
            markdown_paired(data["paired_95"], "X-LoRA", ["mixed", "after switch"]),
            f"Precision {data['precision']}, {data['threads']} thread. " + caption(path),
        ]
    )


def _demo_checks(path: str) -> str:
    return "\n".join(f"- {line}" for line in load(path)["checks"])


def _demo_timings(path: str) -> str:
    data = load(path)
    rows = [[stage, f"{wall:.1f}", f"{data['cpu_s'][stage]:.1f}"] for stage, wall in data["timings_s"].items()]
    trained = [name for name, hit in data["cache_hits"].items() if not hit]
    note = (
        f"Trained in this run (not from the cache): {', '.join(trained)}. "
        if trained
        else "Everything from the cache. "
    )
    return "\n\n".join([_md(["stage", "wall s", "CPU s"], rows, "| --- | ---: | ---: |"), note + caption(path)])


@table("demo-default")
def demo_default() -> str:
    """README and demo.md: the default demo run's table and paired differences."""
    return _demo_table(DEMO)


@table("demo-default-checks")
def demo_default_checks() -> str:
    """demo.md: the default run's targets, as the demo checked them."""
    return _demo_checks(DEMO)


@table("demo-default-timings")
def demo_default_timings() -> str:
    """demo.md: the default run's stages, wall and CPU seconds."""
    return _demo_timings(DEMO)


@table("demo-thorough")
def demo_thorough() -> str:
    """demo.md: the `--thorough` run's table and paired differences."""
    return _demo_table(DEMO_THOROUGH)


@table("demo-thorough-checks")
def demo_thorough_checks() -> str:
    """demo.md: the thorough run's targets."""
    return _demo_checks(DEMO_THOROUGH)


SPARSE_MODEL = "benchmarks/results/sparse-topk-model.json"
SPARSE_KERNEL = "benchmarks/results/sparse-topk-kernel.json"
SPARSE_CROSSOVER = "benchmarks/results/sparse-topk-crossover-cpu.json"
SPARSE_K = 2  # the kernel's per-method table is at top-2, the targets, at a few N
SPARSE_METHODS_N = (8, 64, 128)


@table("sparse-model")
def sparse_model() -> str:
    """performance.md: the reference workload with top-2 of N experts, floor / dense / sparse, CPU time and memory."""
    data = load(SPARSE_MODEL)
    rows = []
    for phase in ("prefill", "train"):
        for n in data["settings"]["n"]:
            cell = {r["method"]: r for r in _rows(SPARSE_MODEL, phase=phase, n=n)}
            f, d, sp = cell["floor"], cell["dense"], cell["sparse"]
            memory = [f"{c['peak_rss_gib']:.2f}" if "peak_rss_gib" in c else "" for c in (sp, d, f)]
            rows.append(
                [phase, str(n), *(f"{c['cpu_median_s']:.3f}" for c in (f, d, sp)),
                 _x(sp["cpu_median_s"] / f["cpu_median_s"]), _x(d["cpu_median_s"] / f["cpu_median_s"]), *memory,
                 f"{sp['largest_expert_share']:.2f}"]
            )  # fmt: skip
    header = ["phase", "N", "floor CPU s", "dense CPU s", "sparse CPU s", "sparse / floor", "dense / floor",
              "sparse peak RSS GiB", "dense peak RSS GiB", "floor peak RSS GiB", "largest expert share"]  # fmt: skip
    reps = data["settings"]["reps"]
    return "\n\n".join(
        [
            _md(header, rows, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"),
            f"CPU-time medians of {reps} interleaved repetitions per N. " + caption(SPARSE_MODEL),
        ]
    )


@table("sparse-targets")
def sparse_targets() -> str:
    """performance.md: the sparse path's targets (issue 26), CPU and wall ratios and the per-group floor."""
    rows = [
        [t["target"], f"{t['value']:.2f}", f"{t['wall_value']:.2f}",
         f"{t['per_group_floor']:.2f}" if "per_group_floor" in t else "", f"{t['limit']:g}",
         "met" if t["met"] else "**missed**"]
        for t in load(SPARSE_MODEL)["targets"]
    ]  # fmt: skip
    header = ["target", "CPU", "wall", "per-group floor", "limit", "on CPU time"]
    return _md(header, rows, "|---|---:|---:|---:|---:|---|") + "\n\n" + caption(SPARSE_MODEL)


@table("sparse-crossover")
def sparse_crossover() -> str:
    """performance.md: one decoder layer's projections, sparse over dense CPU time per N and k, and the crossover."""
    data = load(SPARSE_KERNEL)
    ns = data["settings"]["n"]
    rows = []
    for c in data["crossover"]:
        ratios = [c["sparse_over_dense"].get(str(n)) for n in ns]
        rows.append([c["phase"], str(c["k"]), *(f"{x:.2f}" if x is not None else "" for x in ratios),
                     str(c["sparse_from_n"])])  # fmt: skip
    header = ["phase", "k", *(f"N={n}" for n in ns), "sparse from"]
    reps = data["settings"]["reps"]
    return "\n\n".join(
        [
            _md(header, rows, "|---|---:|" + "---:|" * len(ns) + "---:|"),
            f"CPU-time medians of {reps} repetitions. " + caption(SPARSE_KERNEL),
        ]
    )


@table("sparse-crossover-rank")
def sparse_crossover_rank() -> str:
    """performance.md: sparse over dense CPU time per rank, phase and N at top-2, the crossover and "auto"'s table."""
    data = load(SPARSE_CROSSOVER)
    ns = data["settings"]["n"]
    rows = []
    for rank, entries in data["crossover"].items():
        table_entry = data["sparse_from_rank"][rank]
        for c in entries:
            kind = "few" if c["phase"] == "decode" else "many"
            ratios = [c["sparse_over_dense"].get(str(n)) for n in ns]
            rows.append([rank, c["phase"], *(f"{x:.2f}" if x is not None else "" for x in ratios),
                         str(c["sparse_from_n"]), str(table_entry[kind] * c["k"])])  # fmt: skip
    header = ["rank", "phase", *(f"N={n}" for n in ns), "sparse from", "auto: sparse from"]
    reps, k = data["settings"]["reps"], data["settings"]["k"][0]
    return "\n\n".join(
        [
            _md(header, rows, "|---:|---|" + "---:|" * len(ns) + "---:|---:|"),
            f"Top-{k}; CPU-time medians of {reps} repetitions. " + caption(SPARSE_CROSSOVER),
        ]
    )


@table("sparse-methods")
def sparse_methods() -> str:
    """performance.md: the mixture's own CPU milliseconds per call and method at top-2 (the base's time subtracted)."""
    data = load(SPARSE_KERNEL)
    methods = ("dense", "grouped", "gather", "loop")
    rows = []
    for base in data["results"]:
        if base["method"] != "base" or base["k"] != SPARSE_K or base["n"] not in SPARSE_METHODS_N:
            continue
        key = (base["phase"], base["n"], base["k"], base["skew"])
        same = {r["method"]: r for r in data["results"] if (r["phase"], r["n"], r["k"], r["skew"]) == key}
        t0 = base["cpu_median_s"]
        mix = [f"{1000 * (same[m]['cpu_median_s'] - t0):.1f}" if m in same else "" for m in methods]
        routing = f"skewed (largest {base['largest_expert_share']:.2f})" if base["skew"] else "random"
        rows.append([base["phase"], str(base["n"]), str(base["k"]), routing, f"{1000 * t0:.1f}", *mix])
    header = ["phase", "N", "k", "routing", "base ms", *(f"{m} ms" for m in methods)]
    return _md(header, rows, "|---|---:|---:|---|---:|" + "---:|" * len(methods)) + "\n\n" + caption(SPARSE_KERNEL)


SERVING = "benchmarks/results/vllm-serving-cpu.json"


def _serving_labels(workload: dict[str, Any]) -> dict[str, str]:
    k = workload.get("single_pass_layers")
    total_rank = workload["experts"] * (workload.get("rank") or workload.get("r"))
    return {
        "vllm_base": "vLLM, base model",
        "vllm_pinned": "plugin, pinned gate (single pass, k = all layers, uniform)",
        "vllm_single": f"plugin, single pass (k = {k})",
        "vllm_dual": "plugin, dual pass",
        "vllm_lora": f"vLLM's own LoRA, one LoRA of rank {total_rank}",
        "hf_generate": "peft-xlora HF `generate` (dual pass), one batch",
    }


def _serving_table(name: str) -> str:
    """One workload of the serving benchmark: CPU and wall medians and tokens per second of every method."""
    data = load(SERVING)
    part = data["workloads"][name]
    labels = _serving_labels(part["workload"])
    rows = [
        [labels[m], f"{r['cpu_median_s']:.2f}", f"{r['tokens_per_cpu_s']:.1f}", f"{r['median_s']:.2f}",
         f"{r['tokens_per_s']:.1f}"]
        for m, r in part["results"].items()
    ]  # fmt: skip
    header = ["method", "median CPU s", "tokens / CPU-s", "median wall s", "tokens / s"]
    what = (
        f"{data['requests']} concurrent greedy requests, prompt {data['prompt']} tokens, {data['new_tokens']} new "
        f"tokens each, {data['dtype']}; medians of {data['repeats']} timed runs. "
    )
    return _md(header, rows, "| --- | ---: | ---: | ---: | ---: |") + "\n\n" + what + caption(SERVING)


@table("serving-reference")
def serving_reference() -> str:
    """serving.md: the serving benchmark on the reference workload."""
    return _serving_table("reference")


@table("serving-smollm2")
def serving_smollm2() -> str:
    """serving.md: the serving benchmark on SmolLM2-135M with the demo's expert shape."""
    return _serving_table("smollm2")


SERVING_RATIOS = {
    "single_over_pinned": "single pass / pinned gate",
    "single_over_dual": "single pass / dual pass",
    "dual_over_half_pinned": "dual pass / half the pinned gate",
    "pinned_over_base": "pinned gate / base model",
    "dual_over_base": "dual pass / base model",
    "single_over_vllm_lora": "single pass / vLLM's own LoRA",
    "dual_over_hf_generate": "dual pass / HF `generate`",
}


@table("serving-targets")
def serving_targets() -> str:
    """serving.md: the ratios of issue 23 (tokens per CPU-second) on both workloads, and whether each target is met."""
    data = load(SERVING)
    targets = data["targets"]
    rows = []
    for key, label in SERVING_RATIOS.items():
        cells = []
        for name in ("reference", "smollm2"):
            value = data["workloads"][name]["summary"]["CPU time"][key]
            verdict = "" if key not in targets else (" (met)" if value >= targets[key] else " (missed)")
            cells.append(f"{value:.2f}{verdict}" if value < 10 else f"{value:.1f}{verdict}")
        rows.append([label, f">= {targets[key]:g}" if key in targets else "", *cells])
    header = ["ratio", "target", "reference", "SmolLM2"]
    return _md(header, rows, "| --- | ---: | ---: | ---: |") + "\n\nIn tokens per CPU-second. " + caption(SERVING)


LIBRARY = "benchmarks/results/library-main.json"


def _library(part: str, with_caption: bool = True) -> str:
    """library.md: a table of the library benchmark (issue 26), rendered by `benchmarks/library/tables.py`."""
    from benchmarks.library import tables as library_tables

    text = getattr(library_tables, part)(load(LIBRARY))
    return text + ("\n\n" + caption(LIBRARY) if with_caption else "")


@table("library-experts")
def library_experts() -> str:
    """library.md: the 16 experts, their text and recipe."""
    return _library("experts", with_caption=False)


@table("library-quality")
def library_quality() -> str:
    """library.md: held-out loss of X-LoRA top-2, Arrow top-2, the uniform mixture, the best expert, the oracles."""
    return _library("quality")


@table("library-paired")
def library_paired() -> str:
    """library.md: X-LoRA top-2 minus each rival, paired bootstrap intervals."""
    return _library("paired", with_caption=False)


@table("library-cost")
def library_cost() -> str:
    """library.md: inference CPU time per token, X-LoRA top-2 (sparse, dense) against Arrow top-2."""
    return _library("cost")


@table("library-targets")
def library_targets() -> str:
    """library.md: issue 26's library targets."""
    return _library("targets", with_caption=False)


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
            new = render(text, [])
            if new != text:
                page.write_text(new, encoding="utf-8")
                print(f"rewrote the tables of {page.relative_to(ROOT)}")
        problems += check_page(page)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
