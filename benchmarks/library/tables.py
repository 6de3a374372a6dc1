"""The library benchmark's tables in Markdown, from its result file (`scripts/doc_tables.py` puts them in the docs).

Each function takes the loaded result file and returns a table; a partial file (`complete: false`) gives the rows and
columns it has, and says what is missing.
"""

from __future__ import annotations

from typing import Any

from benchmarks.library.bench import XLORA_DUAL, XLORA_SINGLE, XLORA_SOFT
from benchmarks.routing.bench import ARROW2, BASE, ORACLE, TOKEN_ORACLE, UNIFORM

BEST = "best single expert"
ROWS = [XLORA_SINGLE, XLORA_SOFT, XLORA_DUAL, ARROW2, UNIFORM, BEST, BASE, ORACLE, TOKEN_ORACLE]
COLUMNS = ["pure mean", "mixed", "after 1-4", "after 5-64"]


def _md(header: list[str], rows: list[list[str]], align: str) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", align, *("| " + " | ".join(r) + " |" for r in rows)])


def _missing(data: dict[str, Any]) -> str:
    if data.get("complete"):
        return ""
    return f" **Partial run** (`complete: false`): stages done: {', '.join(data.get('stages_done', [])) or 'none'}."


def quality(data: dict[str, Any]) -> str:
    """Held-out loss per row and column with its 95% bootstrap interval, and the gap to the segment oracle."""
    table, intervals, gaps = data.get("table", {}), data.get("intervals_95", {}), data.get("gaps", {})
    rows = []
    for name in ROWS:
        if name not in table:
            continue
        label = f"{name} ({data['best_single_expert'].removeprefix('expert: ')})" if name == BEST else name
        cells = []
        for col in COLUMNS:
            low, high = intervals[name][col]
            cells.append(f"{table[name][col]:.3f} [{low:.3f}, {high:.3f}]")
        gap = gaps.get(name, {})
        cells += [f"{100 * gap[c]:+.1f}%" if c in gap else "" for c in ("pure mean", "mixed")]
        rows.append([label, *cells])
    header = ["", *(f"{c} (nats)" for c in COLUMNS), "vs oracle, pure", "vs oracle, mixed"]
    sizes = data["sizes"]
    note = (
        f"Mean next-token loss on held-out text of {sizes['experts']} domains (lower is better), 95% bootstrap "
        f"intervals over documents ({data['settings']['n_boot']} replicates): {sizes['pure_windows_per_domain']} "
        f"windows of {sizes['window_tokens']} tokens per domain (pure mean: the mean over domains) and "
        f"{sizes['mixed_documents']} mixed documents of {sizes['segments_per_mixed_document']} segments; "
        '"after 1-4" / "after 5-64": the tokens that many tokens after a domain switch. The last two columns: '
        "relative gap to the segment oracle (each domain's own expert)." + _missing(data)
    )
    return _md(header, rows, "|---|" + "---:|" * (len(header) - 1)) + "\n\n" + note


def paired(data: dict[str, Any]) -> str:
    """X-LoRA minus each rival, paired over the same documents, with 95% bootstrap intervals."""
    rows = []
    for ours, rivals in data.get("paired_95", {}).items():
        for rival, cols in rivals.items():
            cells = []
            for col in COLUMNS:
                diff, low, high = cols[col]
                mark = "**" if high < 0 or low > 0 else ""
                cells.append(f"{mark}{diff:+.4f} [{low:+.4f}, {high:+.4f}]{mark}")
            rows.append([ours, rival, *cells])
    header = ["ours", "minus", *COLUMNS]
    note = (
        "Mean difference in nats (negative: X-LoRA better) and its 95% paired bootstrap interval; bold: the "
        "interval excludes 0." + _missing(data)
    )
    return _md(header, rows, "|---|---|" + "---:|" * len(COLUMNS)) + "\n\n" + note


def cost(data: dict[str, Any]) -> str:
    """Inference cost per token: CPU-time medians, side by side in one run, and the ratio to Arrow top-2."""
    measured = data.get("cost")
    if not measured:
        return "Not measured yet." + _missing(data)
    rows = [
        [label, f"{c['cpu_ms_per_token']:.2f}", " ".join(f"{x:.3f}" for x in c["cpu_s"]),
         f"{data['cost_vs_arrow_top2'][label]:.2f}x"]
        for label, c in measured.items()
    ]  # fmt: skip
    tokens = next(iter(measured.values()))["tokens"]
    note = (
        f"One forward over 1 x {tokens} held-out tokens without gradients (bf16 autocast, as evaluated); CPU-time "
        'median of interleaved repeats after a warm-up, per token. "(dense)": the same trained gate with '
        '`topk_compute="dense"`.' + _missing(data)
    )
    return _md(["model", "CPU ms per token", "CPU s per repeat", "vs Arrow top-2"], rows, "|---|---:|---|---:|") + (
        "\n\n" + note
    )


def targets(data: dict[str, Any]) -> str:
    """Issue 26's library targets as measured."""
    lines = data.get("targets") or []
    rows = [[line.split(" ", 1)[1], "met" if line.startswith("PASS") else "**missed**"] for line in lines]
    return _md(["target", ""], rows, "|---|---|") + ("\n\n" + _missing(data).strip() if _missing(data) else "")


def experts(data: dict[str, Any]) -> str:
    """The library: each domain, where its text comes from, and its expert's recipe."""
    rows = [
        [d, f"`{info['source']}`", str(info["expert_steps"]), f"{info['expert_max_chars']:,}"]
        for d, info in data.get("domains", {}).items()
    ]
    return _md(["expert", "text", "steps", "characters per document"], rows, "|---|---|---:|---:|")
