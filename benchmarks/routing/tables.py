"""Markdown tables of routing-benchmark result files, written into docs/routing.md between marker lines.

    python -m benchmarks.routing.tables            # rewrite the Results section of docs/routing.md
    python -m benchmarks.routing.tables --check    # exit 1 when the page differs from what the files give

The page's Results section, from the line `prose.START` to the end, is written by `prose.py` (sentences with a
source marker on every number); then every block ``<!-- routing-table: NAME FILE -->`` ...
``<!-- /routing-table -->`` of the page is filled: NAME picks a renderer below and FILE is a result file under
benchmarks/results/. `scripts/doc_tables.py` calls `render` to check the page (tests/contract/test_evidence.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.routing import prose

ROOT = Path(__file__).resolve().parents[2]
RUN = "python -m benchmarks.routing.tables"
PAGE = ROOT / "docs" / "routing.md"
BLOCK = re.compile(
    r"^<!-- routing-table: (?P<name>[\w-]+) (?P<file>\S+) -->\n.*?^<!-- /routing-table -->$", re.M | re.S
)

BASELINES = ["base model", "uniform mixture", "Arrow top-1", "Arrow top-2", "PEFT built-in X-LoRA"]
ORACLES = ["segment oracle", "per-token oracle"]
DEFAULTS, RECIPE = "peft-xlora defaults", "demo recipe"
SWITCH_COLUMNS = ["mixed", "after 1-4", "after 5-16", "after 17-64", "after 5-64"]


def _report(data: dict[str, Any]) -> dict[str, Any]:
    """The pooled report when several seeds ran, else the one seed's."""
    return data.get("pooled") or next(iter(data["per_seed"].values()))


def _rows(data: dict[str, Any]) -> list[str]:
    """The rows the report has (a partial file may lack some), baselines first."""
    have = _report(data)["table"]
    return [row for row in [*BASELINES, *data["variants"], *ORACLES] if row in have]


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _where(data: dict[str, Any]) -> str:
    p = data["provenance"]
    load = p.get("load_average_start") or ["?"]
    seeds = ", ".join(str(s) for s in data["seeds"])
    partial = "" if data.get("complete", True) else " A partial file: the run was still going when it was written."
    return (
        f"Measured {p['date_utc'][:10]} at commit `{p['commit'][:9]}` on {p['cpu_model']} ({p['cores']} cores, "
        f"{p['torch_threads']} thread, load average {load[0]:.1f} at the start), {data['model']}, precision "
        f"{data['precision']}, seeds {seeds}: `{p['command']}`.{partial}"
    )


def pure(data: dict[str, Any]) -> str:
    """Gap of each variant to the right expert on each domain's pure held-out text."""
    rep = _report(data)
    domains = list(data["domains"])
    head = "| variant | " + " | ".join(domains) + " | mean | worst |"
    lines = [head, "| --- |" + " ---: |" * (len(domains) + 2)]
    for row in _rows(data):
        if row == "segment oracle":
            continue
        g = rep["gaps"][row]
        cells = [_pct(g[d]) for d in domains] + [_pct(g["pure mean gap"]), _pct(g["pure max"])]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", _where(data)])


def switches(data: dict[str, Any]) -> str:
    """Mean loss on mixed documents and after switches, with 95% intervals and the gap to the segment oracle."""
    rep = _report(data)
    head = "| variant | " + " | ".join(SWITCH_COLUMNS) + " |"
    lines = [head, "| --- |" + " ---: |" * len(SWITCH_COLUMNS)]
    for row in _rows(data):
        cells = []
        for col in SWITCH_COLUMNS:
            value = rep["table"][row][col]
            low, high = rep["intervals_95"][row][col]
            gap = "" if row == "segment oracle" else f" ({_pct(rep['gaps'][row][col])})"
            cells.append(f"{value:.3f} [{low:.3f}, {high:.3f}]{gap}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", _where(data)])


def paired(data: dict[str, Any]) -> str:
    """Each of our variants minus Arrow top-1 and minus PEFT's built-in X-LoRA (paired 95% bootstrap intervals)."""
    rep = _report(data)
    cols = ["pure mean", "mixed", "after 1-4", "after 5-64"]
    lines = ["| difference | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for ours, rivals in rep["paired_95"].items():
        for rival, by_col in rivals.items():
            cells = [f"{by_col[c][0]:+.3f} [{by_col[c][1]:+.3f}, {by_col[c][2]:+.3f}]" for c in cols]
            lines.append(f"| {ours} minus {rival} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", _where(data)])


def targets(data: dict[str, Any]) -> str:
    """Issue 25's targets for every variant, PASS or FAIL."""
    rep = _report(data)
    out = []
    for ours, lines in rep["targets"].items():
        passed = sum(line.startswith("PASS") for line in lines)
        out += [f"**{ours}** ({passed} of {len(lines)} met):", ""]
        out += [f"- {line}" for line in lines] + [""]
    return "\n".join([*out, _where(data)])


def _base_of(row: str) -> str | None:
    """The gate a variant changes one thing of: the defaults ("defaults ..."), the recipe ("recipe ..."), or None."""
    if row in (DEFAULTS, RECIPE):
        return None
    return DEFAULTS if row.startswith("defaults") else RECIPE if row.startswith("recipe") else None


def ablation(data: dict[str, Any]) -> str:
    """Each variant's gap to the oracle, and its paired difference (nats) against the gate it changes one choice of.

    "defaults + ..." and "defaults, ..." rows are compared with the defaults, "recipe ..." rows with the demo's
    recipe: the mean difference and its 95% paired bootstrap interval (negative: the change helps), in bold when
    the interval excludes 0. The worst domain's gap has no interval.
    """
    rep = _report(data)
    cols = [("pure mean gap", "pure mean", "pure mean"), ("pure max", None, "pure worst")]
    cols += [("mixed", "mixed", "mixed"), ("after 1-4", "after 1-4", "1-4"), ("after 5-64", "after 5-64", "5-64")]
    head = "| variant | " + " | ".join(label for _, _, label in cols) + " |"
    lines = [head, "| --- |" + " ---: |" * len(cols)]
    for row in _rows(data):
        if row not in data["variants"]:
            continue
        base = _base_of(row)
        paired_base = rep["paired_95"].get(row, {}).get(base) if base else None
        cells = []
        for gap_key, paired_key, _ in cols:
            cell = _pct(rep["gaps"][row][gap_key])
            if paired_base is not None and paired_key is not None:
                diff, low, high = paired_base[paired_key]
                text = f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"
                cell += f"; **{text}**" if (low > 0 or high < 0) else f"; {text}"
            elif base is not None and paired_key is None:
                cell += f" ({100 * (rep['gaps'][row][gap_key] - rep['gaps'][base][gap_key]):+.1f} pp)"
            cells.append(cell)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", _where(data)])


def domains(data: dict[str, Any]) -> str:
    """Per-domain paired differences (nats) of each changed gate against the gate it changes: which kind of domain
    a choice moves (bold: the 95% interval excludes 0)."""
    rep = _report(data)
    names = list(data["domains"])
    lines = ["| variant | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for row in _rows(data):
        base = _base_of(row)
        paired_base = rep["paired_95"].get(row, {}).get(base) if base else None
        if paired_base is None:
            continue
        cells = []
        for d in names:
            diff, low, high = paired_base[d]
            cells.append(f"**{diff:+.3f}**" if (low > 0 or high < 0) else f"{diff:+.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", _where(data)])


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "pure": pure,
    "switches": switches,
    "paired": paired,
    "targets": targets,
    "ablation": ablation,
    "domains": domains,
}


def render(text: str) -> str:
    """The page with its Results section (when it has the start line) and every block rewritten from the files."""
    head, start, _ = text.partition(prose.START)
    if start:
        text = head + prose.results()

    def block(match: re.Match) -> str:
        name, file = match["name"], match["file"]
        data = json.loads((ROOT / file).read_text())
        body = RENDERERS[name](data)
        return f"<!-- routing-table: {name} {file} -->\n{body}\n<!-- /routing-table -->"

    return BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    """Rewrites (or checks) the generated blocks of docs/routing.md."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true")
    p.add_argument("--page", type=Path, default=PAGE)
    args = p.parse_args(argv)
    text = args.page.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{args.page}: the generated part differs from the result files; run {RUN}")
            return 1
        return 0
    args.page.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
