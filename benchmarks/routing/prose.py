"""The Results section of docs/routing.md, written from the result files with a source marker on every number.

`python -m benchmarks.routing.tables` rewrites everything from the line ``<!-- routing-results ... -->`` to the end
of the page: first this module's text (`results()`), whose tables are empty ``routing-table`` blocks, then the
tables themselves (`tables.py`). Every number in a sentence is followed by a ``<!-- src: alias#expression -->``
marker (the syntax is `scripts/doc_tables.py`'s), written by `Source.num` from the same expression it prints, so
the page cannot quote a number its files do not hold. `--check` (and `tests/contract/test_evidence.py`, through
`scripts/doc_tables.py`) fails when the page differs from what the files give: edit this module, not the page.

Which sentences appear depends on what the files hold (rows of a partial ablation, a demo-domain check or a second
seed not yet run), so the text says what has run and what has not.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.routing import variants as V

ROOT = Path(__file__).resolve().parents[2]
RESULTS = "benchmarks/results"
# The line that starts the generated part of the page (it runs to the end of the page).
START = (
    "<!-- routing-results: written by python -m benchmarks.routing.tables from the result files; "
    "edit benchmarks/routing/prose.py, not this section -->"
)

D, R = V.DEFAULTS_LABEL, V.RECIPE_LABEL
L20 = "defaults + gate layer 20"
L30 = "defaults + gate layer 30 (no final norm)"
BUILTIN, ARROW1 = "PEFT built-in X-LoRA", "Arrow top-1"
P0 = 'per_seed["0"]'
COLS = [
    ("pure mean", "pure text"),
    ("mixed", "mixed documents"),
    ("after 1-4", "tokens 1-4 after a switch"),
    ("after 5-64", "tokens 5-64 after a switch"),
]
# The recipe's choices that are `XLoraConfig` fields (could become defaults), as a user would write them.
CONFIG_ROWS = {
    "defaults + dropout 0": "`xlora_dropout_p=0.0`",
    "defaults + layerwise": "`layerwise_scalings=True`",
    "defaults + depth 2, width 64": "`xlora_depth=2, xlora_size=64`",
    "defaults + random init": '`classifier_init="random"`',
    "defaults + distillation": "`router_distillation_coef=1.0`",
}


@functools.cache
def _doc_tables() -> Any:
    """`scripts/doc_tables.py` (not a package): its `evaluate` is the one the check uses on the markers."""
    spec = importlib.util.spec_from_file_location("_routing_doc_tables", ROOT / "scripts" / "doc_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def q(key: str) -> str:
    """A key of a key path that is not a plain word."""
    return f'["{key}"]'


@dataclass
class Source:
    """One result file the page quotes, under a short alias (``<!-- src-alias: ... -->``).

    Attributes:
        alias: The name markers use for it.
        path: Relative to the repository root.
        data: The file's content.
    """

    alias: str
    path: str
    data: dict[str, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.data = json.loads((ROOT / self.path).read_text(encoding="utf-8"))

    @property
    def line(self) -> str:
        return f"<!-- src-alias: {self.alias} = {self.path} -->"

    def value(self, expr: str) -> float:
        return _doc_tables().evaluate(f"{self.path}#{expr}")

    def num(self, expr: str, fmt: str = "{:.3f}", sign: bool = False, unit: str = "") -> str:
        """The value printed with `fmt` (a + on positives when `sign`), a unit, then its marker."""
        text = fmt.format(self.value(expr))
        if sign and not text.startswith(("+", "-")):
            text = "+" + text
        return f"{text}{unit}<!-- src: {self.alias}#{expr} -->"

    def pct(self, expr: str, digits: int = 1, sign: bool = False) -> str:
        """100 x the value, as a percentage."""
        return self.num(f"100 * ({expr})", "{:." + str(digits) + "f}", sign, unit="%")

    def rep(self, seed: str | None = "0") -> str:
        """Key path of a seed's report, or of the pooled one (None)."""
        return "pooled" if seed is None else f'per_seed["{seed}"]'

    def report(self, seed: str | None = "0") -> dict[str, Any]:
        return self.data["pooled"] if seed is None else self.data["per_seed"][seed]

    def diff(self, row: str, rival: str, col: str, seed: str | None = "0") -> str:
        """A paired difference's mean alone (nats, signed)."""
        return self.num(f"{self.rep(seed)}.paired_95{q(row)}{q(rival)}{q(col)}.0", "{:+.3f}")

    def pair(self, row: str, rival: str, col: str, seed: str | None = "0") -> str:
        """A paired difference: mean [low, high] (nats)."""
        base = f"{self.rep(seed)}.paired_95{q(row)}{q(rival)}{q(col)}"
        low, high = self.num(base + ".1", "{:+.3f}"), self.num(base + ".2", "{:+.3f}")
        return f"{self.num(base + '.0', '{:+.3f}')} [{low}, {high}]"

    def gap(self, row: str, col: str, digits: int = 1, seed: str | None = "0") -> str:
        """A gap to the oracle (the right expert, or the segment oracle), as a signed percentage."""
        return self.pct(f"{self.rep(seed)}.gaps{q(row)}{q(col)}", digits, sign=True)

    def passed(self, row: str, seed: str | None = "0") -> int:
        return sum(line.startswith("PASS") for line in self.report(seed)["targets"][row])

    def n_targets(self, row: str, seed: str | None = "0") -> int:
        return len(self.report(seed)["targets"][row])

    def interval(self, row: str, rival: str, col: str, seed: str | None = "0") -> list[float]:
        return self.report(seed)["paired_95"][row][rival][col]


def listed(items) -> str:
    """'0', '0 and 1', '0, 1 and 2'."""
    items = [str(x) for x in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def anchor(title: str) -> str:
    """The link target MkDocs gives a heading (lower case, punctuation dropped, spaces as hyphens)."""
    return re.sub(r"[^\w\s-]", "", title.lower()).strip().replace(" ", "-")


def block(name: str, file: str) -> str:
    """An empty routing-table block (`tables.py` fills it)."""
    return f"<!-- routing-table: {name} {file} -->\n<!-- /routing-table -->"


def base_of(row: str) -> str:
    """The gate a variant changes one thing of."""
    return D if row.startswith("defaults") else R


def moves(src: Source, row: str, rival: str | None = None, seed: str | None = "0") -> tuple[list, list, list]:
    """Columns where the row is better, worse, or not told apart from the rival (paired 95% intervals)."""
    rival = rival or base_of(row)
    better, worse, same = [], [], []
    for col, text in COLS:
        _, low, high = src.interval(row, rival, col, seed)
        cell = f"{text} {src.pair(row, rival, col, seed)}"
        (better if high < 0 else worse if low > 0 else same).append(cell)
    return better, worse, same


def domain_moves(src: Source, row: str, rival: str | None = None, seed: str | None = "0") -> tuple[list, list]:
    """Domains whose pure text the row helps or hurts against the rival (paired 95% intervals)."""
    rival = rival or base_of(row)
    helps, hurts = [], []
    for d in src.data["domains"]:
        _, low, high = src.interval(row, rival, d, seed)
        if high < 0 or low > 0:
            (helps if high < 0 else hurts).append(f"`{d}` {src.diff(row, rival, d, seed)}")
    return helps, hurts


def sentence(src: Source, row: str, rival: str | None = None, seed: str | None = "0") -> str:
    """What a paired comparison with the changed gate says, by column and by domain."""
    better, worse, _ = moves(src, row, rival, seed)
    helps, hurts = domain_moves(src, row, rival, seed)
    parts = []
    if better:
        parts.append("better on " + "; ".join(better))
    if worse:
        parts.append("worse on " + "; ".join(worse))
    if not better and not worse:
        parts.append("no column moves (every paired interval holds 0)")
    text = f"**{row}**: " + "; ".join(parts) + "."
    if helps or hurts:
        bits = (["helps " + ", ".join(helps)] if helps else []) + (["hurts " + ", ".join(hurts)] if hurts else [])
        text += " By domain (pure text, nats): " + "; ".join(bits) + "."
    return text


def wins(src: Source, row: str, seed: str | None = "0") -> bool:
    """Better than the defaults on pure text and on mixed documents, worse nowhere (paired 95% intervals)."""
    rep = src.report(seed)["paired_95"][row][D]
    return rep["pure mean"][2] < 0 and rep["mixed"][2] < 0 and all(rep[c][1] <= 0 for c, _ in COLS)


def how(src: Source, row: str, rival: str = D, seed: str | None = "0") -> str:
    """Which columns a row is better or worse on against a rival, in words (no numbers)."""
    rep = src.report(seed)["paired_95"][row][rival]
    better = [text for col, text in COLS if rep[col][2] < 0]
    worse = [text for col, text in COLS if rep[col][1] > 0]
    out = (["better on " + ", ".join(better)] if better else []) + (["worse on " + ", ".join(worse)] if worse else [])
    return "; ".join(out) or "no column moves"


# ---------------------------------------------------------------------------------------------- the page


class Page:
    """The result files the Results section quotes (those that exist), and its text."""

    def __init__(self) -> None:
        self.main = Source("main", f"{RESULTS}/routing-main.json")
        self.run1 = Source("run1", f"{RESULTS}/routing-main-run1.json")
        self.ideas = Source("ideas", f"{RESULTS}/routing-ideas.json")
        self.abl = Source("abl", f"{RESULTS}/routing-ablation.json")
        self.demo = self._optional("demo", f"{RESULTS}/routing-demo-domains.json")
        self.seeds = self._optional("seeds", f"{RESULTS}/routing-seeds.json")
        self.norm = self._optional("norm", f"{RESULTS}/routing-norm.json")
        self.rows = [r for r in self.abl.data["variants"] if r not in (D, R) and r in self.abl.report()["paired_95"]]
        self.missing = [v.label for v in V.ablation() if v.label not in self.rows]

    @staticmethod
    def _optional(alias: str, path: str) -> Source | None:
        return Source(alias, path) if (ROOT / path).is_file() else None

    def sources(self) -> list[Source]:
        files = (self.main, self.run1, self.ideas, self.abl, self.demo, self.seeds, self.norm)
        return [s for s in files if s is not None]

    # ------------------------------------------------------------------ status

    def status(self) -> str:
        a = self.abl
        missing = f" Not run: {', '.join(f'`{m}`' for m in self.missing)}." if self.missing else ""
        n_abl = len(self.rows) + len(self.missing)
        return f"""**Status.** Everything below is one seed (seed 0) unless it says otherwise: 4 pure windows per
domain and 12 mixed documents, so the intervals are over few documents. What has run:

- the main group (`benchmarks/results/routing-main.json`): experts, fixed mixtures, Arrow, the demo's recipe,
  peft-xlora's defaults, PEFT's built-in X-LoRA;
- the ideas (`benchmarks/results/routing-ideas.json`): the gate at layer 8, layers 8 and 20, oracle targets, on the
  recipe and on the defaults;
- the ablation (`benchmarks/results/routing-ablation.json`): {len(self.rows)} of its {n_abl}
  gates, trained by runs of the group (some stopped for time) and scored together from the cache with the
  baselines.{missing} The machine is 2 cores shared with other jobs, and
  a 100-step gate over the defaults runs the full 30-layer scaling pass and the main pass at every step: training
  `defaults + layerwise` took
  {a.num('timings["0"].gate_train_cpu_s_when_trained["defaults + layerwise"]', "{:.0f}", unit=" CPU s")}, the
  recipe's 30-step `recipe - layerwise`
  {a.num('timings["0"].gate_train_cpu_s_when_trained["recipe - layerwise"]', "{:.0f}", unit=" CPU s")}
  (`timings` in the file: each gate's training CPU seconds);
{self._status_checks()}"""

    def _status_checks(self) -> str:
        lines = []
        if self.demo is None:
            lines.append("- the check on the demo's domains (`--demo-domains`) has not run;")
        else:
            lines.append(
                "- the check on the demo's own three domains (`benchmarks/results/routing-demo-domains.json`, seeds "
                + ", ".join(str(x) for x in self.demo.data["seeds"])
                + "): "
                + ", ".join(f"`{v}`" for v in self.demo.data["variants"])
                + (
                    ", PEFT's built-in X-LoRA"
                    if BUILTIN in self.demo.report()["table"]
                    else " and the training-free baselines (PEFT's built-in X-LoRA not trained there, for time)"
                )
                + (";" if self.demo.data.get("complete", True) else " (a partial file: the run was stopped);")
            )
        if self.seeds is None:
            lines.append("- a second seed has not run.")
        else:
            seeds = ", ".join(str(s) for s in self.seeds.data["seeds"])
            lines.append(
                f"- seeds {seeds} pooled (`benchmarks/results/routing-seeds.json`): "
                + ", ".join(f"`{v}`" for v in self.seeds.data["variants"])
                + " and the baselines."
            )
        return "\n".join(lines)

    # ------------------------------------------------------------------ ablation

    def ablation_reading(self) -> str:
        a, i, rows = self.abl, self.ideas, self.rows
        out = []
        if "defaults + dropout 0" in rows:
            out.append(
                "- `defaults + dropout 0` is the defaults' gate exactly (every difference 0): dropout sits between "
                "the classifier's layers, and the default depth-1 classifier has none. `xlora_dropout_p` matters only "
                "with `xlora_depth` >= 2."
            )
        if "defaults + layerwise" in rows:
            row = "defaults + layerwise"
            out.append(
                "- **Layerwise scalings are the one switch of the ablation that moves the first tokens after a "
                f"switch**: {a.diff(row, D, 'after 1-4')} nats on tokens 1-4 against the defaults, where no idea "
                "on the recipe moved them, and better on mixed documents and tokens 5-64 too. They cost pure text "
                f"({a.diff(row, D, 'pure mean')} nats; `locales` {a.diff(row, D, 'locales')}), and on tokens 1-4 they "
                f"still do not beat Arrow top-1 ({a.pair(row, ARROW1, 'after 1-4')}). One reading, not tested here: "
                "with one scaling per layer and expert the gate can route layers differently at a token whose hidden "
                "state is between two domains, and on one domain's text the same freedom spreads weight where one "
                "expert is right. For text that switches domain often, `layerwise_scalings=True` on the defaults' "
                "gate is the measured trade-off."
            )
        if "defaults + depth 2, width 64" in rows:
            row = "defaults + depth 2, width 64"
            out.append(
                "- **A depth-2 classifier of width 64 is worse than the defaults' single linear map** on pure text "
                f"({a.diff(row, D, 'pure mean')} nats), mixed documents ({a.diff(row, D, 'mixed')}) and tokens 5-64 "
                f"({a.diff(row, D, 'after 5-64')}), most on `locales` ({a.diff(row, D, 'locales')}). With two layers "
                "the default dropout (0.2) between them takes effect too, so the row is the two together; the recipe "
                "uses depth 2 without dropout."
            )
        if "recipe - distillation" in rows:
            row = "recipe - distillation"
            out.append(
                "- **Distillation towards soft targets (T 1), the recipe's, moves no column of the recipe** (without "
                f"it: mixed {a.diff(row, R, 'mixed')}, pure {a.diff(row, R, 'pure mean')} nats, both intervals hold "
                "0; by domain it helps some and hurts others), while targets near the per-token oracle (T 0.1, the "
                f"ideas below) improve the recipe on mixed documents "
                f"({i.diff('recipe, oracle targets (T 0.1)', R, 'mixed')}): on this text the sharpness of the target "
                "is what moved the recipe."
            )
        if "recipe - layerwise" in rows:
            row = "recipe - layerwise"
            out.append(
                "- **The same switch the other way, on the recipe** (`recipe - layerwise`, one scaling per expert): "
                f"pure text {a.pair(row, R, 'pure mean')} nats, as `defaults + layerwise` says (layerwise costs "
                f"pure text); tokens 1-4 after a switch {a.pair(row, R, 'after 1-4')}: in the recipe, layerwise "
                "scalings do not measurably help the first tokens after a switch. The gain there is the defaults' "
                "gate's (100 steps, one linear map, the last hidden state), one seed."
            )
        if "defaults + random init" in rows:
            row = "defaults + random init"
            out.append(
                "- **The uniform start holds up**: a random start of the defaults' classifier is worse on pure text "
                f"({a.pair(row, D, 'pure mean')}) and on tokens 5-64 after a switch ({a.pair(row, D, 'after 5-64')}), "
                "as PEFT's built-in X-LoRA (a random start, trained the same way) is behind the defaults on the same "
                "two columns in the main group."
            )
        if "recipe - depth 2, width 64" in rows:
            row = "recipe - depth 2, width 64"
            out.append(
                "- **The recipe's depth-2 classifier is what costs it most**: the recipe with the single linear map "
                f"(`{row}`) is better than the recipe on pure text ({a.pair(row, R, 'pure mean')}), mixed "
                f"documents ({a.pair(row, R, 'mixed')}) and tokens 5-64 ({a.pair(row, R, 'after 5-64')}), "
                "as `defaults + depth 2, width 64` is worse than the defaults. Against the defaults it ties on pure "
                f"text ({a.pair(row, D, 'pure mean')}) and is better on mixed documents "
                f"({a.pair(row, D, 'mixed')}) and tokens 5-64 ({a.pair(row, D, 'after 5-64')}), meeting "
                f"{a.passed(row)} of {a.n_targets(row)} targets (the defaults meet {a.passed(D)})."
            )
        if "recipe - gate layer 20" in rows:
            row = "recipe - gate layer 20"
            out.append(
                "- **Reading layer 20 of 30 helps after a switch and costs pure text**: the recipe reading the last "
                f"hidden state is better on pure text ({a.pair(row, R, 'pure mean')}) and worse on mixed "
                f"documents ({a.pair(row, R, 'mixed')}) and tokens 5-64 ({a.pair(row, R, 'after 5-64')})."
            )
        if "defaults + layerwise" in rows:
            row = "defaults + layerwise"
            out.append(
                f"- With layerwise scalings the defaults meet {a.passed(row)} of the {a.n_targets(row)} targets "
                f"instead of {a.passed(D)}: all three against PEFT's built-in X-LoRA (mixed documents "
                f"{a.pair(row, BUILTIN, 'mixed')}, tokens 1-4 {a.pair(row, BUILTIN, 'after 1-4')}), and still none "
                "more on pure text."
            )
        if "recipe - lr 5e-3" in rows and "defaults + 30 steps" in rows:
            out.append(
                "- **Steps and learning rate go together**: the recipe's 30 steps at 1e-3 instead of 5e-3 are worse "
                f"on mixed documents ({a.pair('recipe - lr 5e-3', R, 'mixed')}), and so are the defaults cut to 30 "
                f"steps at 1e-3 ({a.pair('defaults + 30 steps', D, 'mixed')}): 30 steps at 1e-3 are too few for "
                "this gate."
            )
        if "recipe - 30 steps" in rows and "defaults + lr 5e-3" in rows:
            out.append(self._steps_and_lr())
        if "recipe + random init" in rows:
            out.append(
                "- **A random start hurts the short training most**: the recipe from a random start is worse on mixed "
                f"documents by {a.diff('recipe + random init', R, 'mixed')} nats, the defaults (100 steps) by less "
                "(above)."
            )
        return "\n".join(out)

    def _steps_and_lr(self) -> str:
        """The two training-length rows: the recipe trained 100 steps, the defaults at the recipe's lr."""
        a = self.abl
        r100, d5 = "recipe - 30 steps", "defaults + lr 5e-3"
        return (
            "- **What the recipe lacked on this text is training**: trained 100 steps instead of 30 (`recipe - 30 "
            f"steps`, still 5e-3) it is better than the recipe on {how(a, r100, R).removeprefix('better on ')}, and "
            f"against the defaults it is {how(a, r100, D)} (pure text {a.pair(r100, D, 'pure mean')}, mixed "
            f"documents {a.pair(r100, D, 'mixed')}, tokens 5-64 {a.pair(r100, D, 'after 5-64')}), meeting "
            f"{a.passed(r100)} of {a.n_targets(r100)} targets. The defaults at 5e-3 (`{d5}`, still 100 steps) are "
            f"{how(a, d5, D)} against the defaults (pure text {a.pair(d5, D, 'pure mean')}, tokens 5-64 "
            f"{a.pair(d5, D, 'after 5-64')}; mixed documents {a.pair(d5, D, 'mixed')}), most on `locales` "
            f"({a.diff(d5, D, 'locales')}) and at a cost on `perl` ({a.diff(d5, D, 'perl')}). Both are the "
            "trainer's settings, not `XLoraConfig`'s."
        )

    # ------------------------------------------------------------------ defaults

    def defaults_reading(self) -> str:
        a = self.abl
        lines = [
            "A default moves when a switch wins on this benchmark (better than the defaults on pure text and on mixed",
            "documents with paired intervals that exclude 0, worse on no column) and does not lose on the demo's own",
            "domains (`--demo-domains`, the demo's experts and its `--thorough` held-out set). Of the recipe's",
            "choices, those that are `XLoraConfig` fields could become defaults; the training length and learning",
            "rate are the trainer's, and the gate's layer is a count of decoder layers, which depends on the model",
            "(it became a default as a fraction of the depth: below).",
            "",
        ]
        for row, field_text in CONFIG_ROWS.items():
            if row in self.rows:
                verdict = "wins" if wins(a, row) else "does not win"
                lines.append(f"- {field_text} (`{row}`): {verdict} ({how(a, row)}).")
            else:
                lines.append(f"- {field_text} (`{row}`): not run.")
        lines += [
            "",
            "So none of these switches becomes a default: none is better than the defaults on both pure text and",
            "mixed documents. Layerwise scalings come closest (better after switches, "
            f"{a.passed('defaults + layerwise')} of {a.n_targets(D)} targets met against {a.passed(D)},",
            "but worse on pure text).",
        ]
        d5 = "defaults + lr 5e-3"
        if d5 in self.rows:
            lines += [
                "",
                f"Of the trainer's settings, the defaults' 100 steps at 5e-3 instead of 1e-3 ({how(a, d5)}) would be",
                "a change to the documented training recipe (`docs/training.md`), not to `XLoraConfig`.",
            ]
        if L20 in self.rows:
            lines += ["", self.layer20()]
        return "\n".join(lines)

    @staticmethod
    def _same_targets(src: Source, seed: str | None = "0") -> bool:
        """Whether the defaults and the gate at layer 20 meet the same targets (not only as many)."""
        rep = src.report(seed)["targets"]
        return [line[:4] for line in rep[D]] == [line[:4] for line in rep[L20]]

    def layer20(self) -> str:
        """The gate at layer 20 of 30 against the rule for a new default: where it wins, where it loses."""
        a = self.abl
        text = (
            "The one change that is better after switches without a cost on pure text on average is the defaults' "
            "gate reading layer 20 of 30 instead of the last (`scaling_pass_layers=20`, `defaults + gate layer "
            "20`), which also shortens the scaling pass. On seed 0 it "
            f"{'wins' if wins(a, L20) else 'does not win'} by the rule above (pure text {a.pair(L20, D, 'pure mean')})"
        )
        pooled = self.seeds is not None and "pooled" in self.seeds.data and L20 in self.seeds.report(None)["paired_95"]
        if pooled:
            s = self.seeds
            seeds = listed(s.data["seeds"])
            verdict = "it wins" if wins(s, L20, None) else "it does not win either"
            text += (
                f"; over seeds {seeds} pooled {verdict} (pure text {s.pair(L20, D, 'pure mean', None)}, mixed "
                f"documents {s.pair(L20, D, 'mixed', None)}, {how(s, L20, D, None)})"
            )
        text += "."
        ds = self.demo_seed()
        if self.demo is not None and L20 in self.demo.report(ds)["paired_95"]:
            m = self.demo
            where = "On the demo's domains" + ("" if ds else f" (seeds {self.demo_seeds_text()} pooled)")
            loses = [text for col, text in COLS if m.interval(L20, D, col, ds)[1] > 0]
            pairs = f"mixed documents {m.pair(L20, D, 'mixed', ds)}, pure text {m.pair(L20, D, 'pure mean', ds)}"
            text += f" {where} it " + (f"loses on {', '.join(loses)}" if loses else "loses on no column")
            text += f" ({pairs}); it meets {m.passed(L20, ds)} of the {m.n_targets(L20, ds)} targets there, "
            if m.passed(L20, ds) == m.passed(D, ds):
                same = "" if self._same_targets(m, ds) else ", but not the same ones"
                text += f"as many as the defaults ({m.passed(D, ds)}){same}."
            else:
                text += f"the defaults {m.passed(D, ds)}."
        text += (
            ' It is the default now, as a fraction of the depth: `scaling_pass_layers="auto"` (see'
            " [below](#the-gate-at-two-thirds-of-the-depth))."
        )
        return text

    # ------------------------------------------------------------------ the section

    def results(self) -> str:
        m, i, r1 = self.main, self.ideas, self.run1
        rows = self.rows
        aliases = "\n".join(s.line for s in self.sources())
        idea_rows = [r for r in i.data["variants"] if r not in (D, R)]
        idea_sentences = "\n".join(f"- {sentence(i, r)}" for r in idea_rows)
        abl_sentences = "\n".join(f"- {sentence(self.abl, r)}" for r in rows)
        main_file, abl_file, ideas_file = m.path, self.abl.path, i.path
        return f"""{START}
## Results

{aliases}

{self.status()}

{self.headline()}

### Main group

Gap to the right expert on each domain's pure held-out text (lower is better; the base model's row shows how much
the experts matter):

{block("pure", main_file)}

Mixed documents and the tokens after each switch: mean next-token loss (nats), 95% bootstrap interval over
documents, and in brackets the gap to the segment oracle:

{block("switches", main_file)}

Paired differences (each of our gates minus the rival; negative: ours is better; 95% bootstrap over the same
documents):

{block("paired", main_file)}

### Targets

The defaults meet {m.passed(D)} of the
{m.n_targets(D)} targets. By how much:

- **met**: pure `man` {m.gap(D, "man")} and `changelog` {m.gap(D, "changelog")} (target +3%); mixed
  {m.gap(D, "mixed")} and tokens 5-64 after a switch {m.gap(D, "after 5-64")} of the segment oracle
  (target +10%); below Arrow top-1 on mixed documents {m.pair(D, ARROW1, "mixed")} and on tokens 5-64
  {m.pair(D, ARROW1, "after 5-64")}; below PEFT's built-in X-LoRA on tokens 5-64
  {m.pair(D, BUILTIN, "after 5-64")} (nats, paired 95% intervals).
- **missed on pure text**: `man-de` {m.gap(D, "man-de")}, `perl` {m.gap(D, "perl", 2)} (just over),
  `cmake` {m.gap(D, "cmake")}, `locales` {m.gap(D, "locales")} against +3%.
- **missed after a switch and against the built-in**: tokens 1-4 after a switch minus Arrow top-1
  {m.pair(D, ARROW1, "after 1-4")} and minus the built-in
  {m.pair(D, BUILTIN, "after 1-4")}; mixed documents minus the built-in
  {m.pair(D, BUILTIN, "mixed")}: every interval holds 0 (behind on average on tokens 1-4,
  ahead on mixed documents).
{self.targets_layer20()}
{block("targets", main_file)}

### What the recipe's choices do (ablation)

Each row changes one thing of the defaults (`defaults + ...`) or of the demo's recipe (`recipe - ...`, `recipe +
...`): its gap to the oracle (the right expert on pure text, the segment oracle on mixed documents), and the paired
difference in nats against the gate it changes, with its 95% interval (negative: the change helps; bold: the
interval excludes 0):

{block("ablation", abl_file)}

The same paired differences on each domain's pure text (nats; bold: the interval excludes 0):

{block("domains", abl_file)}

{abl_sentences}
{self.ablation_reading()}
{self.demo_section()}{self.seeds_section()}
### Ideas for the tokens after a switch

The gate at a token sees one hidden state, which after a switch still carries the previous domain through
attention. Three ideas on the demo's recipe, each compared with the recipe, then the two that moved it (and both
together) on the defaults, each compared with the defaults (paired, nats):

{block("ablation", ideas_file)}

{block("domains", ideas_file)}

{idea_sentences}
- **On the recipe, none moves the first tokens after a switch** (every interval on tokens 1-4 holds 0), the tokens
  the ideas were for. Oracle targets and the two-layer gate improve the recipe where it was already routing (pure
  text, mixed documents, tokens 5-64), mostly on `changelog`.
- **On the recipe, none catches up with the defaults**: against peft-xlora's defaults, on pure text the oracle targets
  are still {i.pair("recipe, oracle targets (T 0.1)", D, "pure mean")} and the two-layer gate
  {i.pair("recipe, layers 8 + 20", D, "pure mean")} worse.
{self.ideas_on_defaults()}
- **Cost** (one forward of 256 tokens, median CPU seconds of three, interleaved, in this file's run): the recipe
  {i.num('cost["demo recipe"].median_cpu_s', "{:.2f}", unit=" CPU s")}, layers 8 + 20
  {i.num('cost["recipe, layers 8 + 20"].median_cpu_s', "{:.2f}", unit=" CPU s")}
  ({i.pct('cost["recipe, layers 8 + 20"].median_cpu_s / cost["demo recipe"].median_cpu_s - 1', 1, True)}
  against the recipe, {self._budget("recipe, layers 8 + 20", R)}: the second layer's hidden state comes from
  the same scaling pass), the gate at layer 8
  {i.num('cost["recipe, gate layer 8"].median_cpu_s', "{:.2f}", unit=" CPU s")} (a shorter scaling pass),
  oracle targets {i.num('cost["recipe, oracle targets (T 0.1)"].median_cpu_s', "{:.2f}", unit=" CPU s")} (a
  training change only); the defaults' gate
  {i.num('cost["peft-xlora defaults"].median_cpu_s', "{:.2f}", unit=" CPU s")} (all 30 layers). Reading layers 8
  and 20 widens the classifier's first layer by 576 x 64 weights.{self._cost_on_defaults()}

### Defaults

{self.defaults_reading()}
{self.decision()}
### Reading of the main group (one seed)

- **The experts matter on every domain**: the base model is {m.pct(f'{P0}.gaps["base model"].perl', 0)}
  (Perl, which it knows) to {m.pct(f'{P0}.gaps["base model"].locales', 0)} (glibc locales) above the right
  expert, and the uniform mixture is {m.pct(f'{P0}.gaps["uniform mixture"].mixed', 0)} above the segment
  oracle on mixed documents, so routing has something to win everywhere.
- **The demo's recipe does not carry over.** On these six domains peft-xlora's defaults (100 steps at 1e-3) are
  better than the demo's recipe (30 steps at 5e-3) on pure text (recipe minus defaults
  {m.pair(R, D, "pure mean")} nats) and on mixed documents ({m.pair(R, D, "mixed")}); after a switch the
  two cannot be told apart (both intervals hold 0). Both beat Arrow top-1 on mixed documents and on the tokens 5-64
  after a switch; neither does on the first 4 tokens after a switch, where every routing is close to the oracle's
  own high loss (a new segment starts in the middle of a document).
- **Against PEFT's built-in X-LoRA** (trained the same way): the defaults are better on pure text
  ({m.pair(D, BUILTIN, "pure mean")}) and on the tokens 5-64 after a switch; on mixed
  documents as a whole and on the first 4 tokens after a switch the intervals hold 0. The demo's recipe is worse
  than the built-in on pure text.
- **What is missed**: pure text is where the gates lose most. The gate spreads weight over six experts where one is
  right; on glibc's locale tables, where the base model is {m.pct(f'{P0}.gaps["base model"].locales', 0)}
  above the right expert, that costs {m.gap(D, "locales")} (defaults) to {m.gap(R, "locales")} (recipe).

### Cost and time

The first run of the main group (`benchmarks/results/routing-main-run1.json`, stopped before PEFT's built-in gate
had finished so that the paired comparison with the defaults could be added; its rows are the same as the final
file's) records the stage times: 1 thread, bf16 autocast, under other jobs' load, so CPU seconds are the comparable
figure. The six experts took {r1.num('timings["0"].stage_cpu_s.experts', "{:.0f}", unit=" CPU s")} (40 steps
each); the fixed mixtures (each expert, uniform, base: one batched pass)
{r1.num('timings["0"].stage_cpu_s["fixed mixtures"]', "{:.0f}", unit=" CPU s")}; Arrow top-1 and top-2
{r1.num('timings["0"].stage_cpu_s.Arrow', "{:.0f}", unit=" CPU s")}; the recipe's stage
{r1.num('timings["0"].stage_cpu_s["demo recipe"]', "{:.0f}", unit=" CPU s")}, of which its gate's 30 steps are
{r1.num('timings["0"].gate_train_cpu_s_this_run["demo recipe"]', "{:.0f}", unit=" CPU s")} and the rest the
experts' losses on its 30 gate batches (shared by every variant that distils) and its evaluation; the defaults'
stage {r1.num('timings["0"].stage_cpu_s["peft-xlora defaults"]', "{:.0f}", unit=" CPU s")}, of which the gate's
100 steps (each with a full 30-layer scaling pass) are
{r1.num('timings["0"].gate_train_cpu_s_this_run["peft-xlora defaults"]', "{:.0f}", unit=" CPU s")}. Each result
file keeps every gate's training CPU seconds (`timings`), also when a rerun took the gate from the cache.

`cost` in `routing-main.json`: one forward of 256 tokens took
{m.num('cost["demo recipe"].median_cpu_s', "{:.2f}", unit=" CPU s")} with the recipe's gate (a scaling pass
of 20 layers) and {m.num('cost["peft-xlora defaults"].median_cpu_s', "{:.2f}", unit=" CPU s")} with the
defaults' (all 30), medians of three.
"""

    # ------------------------------------------------------------------ parts that wait for runs

    def headline(self) -> str:
        text = (
            "**Defaults: the gate reads two thirds of the depth.** `peft-xlora defaults` in these tables are the\n"
            "defaults the issue measured, which read the last hidden state (`BASELINE` in `variants.py`). No other\n"
            "`XLoraConfig` switch of the recipe is better than them on both pure text and mixed documents (layerwise\n"
            "scalings trade pure text for the tokens after a switch; see [Defaults](#defaults)). Their gate reading\n"
            'layer 20 of 30 instead of the last, now the default (`scaling_pass_layers="auto"`), is better after\n'
            "switches"
        )
        evidence = self.evidence()
        if any(src.interval(L20, D, "pure mean", seed)[1] > 0 for _, src, seed in evidence):
            text += " but worse on pure text somewhere"
        elif any(src.interval(L20, D, "pure mean", seed)[2] < 0 for _, src, seed in evidence):
            text += " with pure text on average tied or better"
        else:
            text += " with pure text on average tied"
        where = [what for what, _, _ in evidence]
        if len(where) > 1:
            link = "[The gate at two thirds of the depth](#the-gate-at-two-thirds-of-the-depth)"
            text += f" ({'; '.join(where)}; see\n{link})"
        return text + "."

    def targets_layer20(self) -> str:
        if L20 not in self.rows:
            return ""
        a = self.abl
        pooled = ""
        if self.seeds is not None:
            seeds = [str(x) for x in self.seeds.data["seeds"]]
            title = f"Seeds {listed(seeds)}"
            pooled = f" Pooled over seeds: [{title}](#{anchor(title)}), with the misses by how much."
        return (
            f"\nWith the gate at layer 20, which is the default now, the defaults meet {a.passed(L20)} of "
            f"{a.n_targets(L20)} on this seed (mixed {a.gap(L20, 'mixed')}, tokens 5-64 "
            f"{a.gap(L20, 'after 5-64')}; pure `locales` {a.gap(L20, 'locales')}).{pooled}\n"
        )

    def demo_section(self) -> str:
        """The check a default needs: the defaults and the gate at layer 20 on the demo's own domains."""
        if self.demo is None:
            return ""
        m = self.demo
        rows = [r for r in m.data["variants"] if r in m.report()["table"]]
        names = ", ".join(f"`{d}`" for d in m.data["domains"])
        lines = [
            "",
            "### On the demo's own domains",
            "",
            f"The check a new default needs (`--demo-domains`): the demo's three domains ({names}), its cached",
            "experts, its `--thorough` held-out set (16 windows per domain, 24 mixed documents of 3 segments), and",
            "the gates trained as on this benchmark (100 steps at 1e-3 on gate batches of the demo's text, "
            + ("seed 0)." if self.demo_seed() else f"seeds {self.demo_seeds_text()}, pooled below)."),
            "",
            block("pure", m.path),
            "",
            block("switches", m.path),
            "",
            block("paired", m.path),
            "",
        ]
        if L20 in rows and D in rows:
            lines.append(f"- {sentence(m, L20, seed=self.demo_seed())}")
        for row in (D, L20):
            if row in rows:
                lines.append(self._targets_line(m, row, self.demo_seed()))
        return "\n".join(lines) + "\n"

    def _targets_line(self, src: Source, row: str, seed: str | None = "0") -> str:
        """How many of the issue's targets a row meets, its gaps, and by how much it misses the others."""
        text = (
            f"- `{row}` meets {src.passed(row, seed)} of {src.n_targets(row, seed)} targets: pure text "
            f"{src.gap(row, 'pure mean gap', seed=seed)} above the right expert on average, "
            f"{src.gap(row, 'pure max', seed=seed)} on the worst domain (target +3% on each); mixed documents "
            f"{src.gap(row, 'mixed', seed=seed)} and tokens 5-64 after a switch "
            f"{src.gap(row, 'after 5-64', seed=seed)} above the segment oracle (target +10%)."
        )
        missed = self._missed(src, row, seed)
        return text + (f" Missed: {'; '.join(missed)}." if missed else "")

    @staticmethod
    def _missed(src: Source, row: str, seed: str | None) -> list[str]:
        """The targets a row misses (`metrics.check_targets`' FAIL lines), each with the number it misses by."""
        out = []
        columns = {"mixed": "mixed", "tokens 5-64 after a switch": "after 5-64"}
        for line in src.report(seed)["targets"][row]:
            if not line.startswith("FAIL "):
                continue
            head = line[5:].split(":")[0]
            if head.startswith("pure "):
                domain = head.removeprefix("pure ")
                out.append(f"pure `{domain}` {src.gap(row, domain, seed=seed)}")
            elif head in columns and " minus " not in line:
                out.append(f"{head} {src.gap(row, columns[head], seed=seed)}")
            else:
                rival = line.split(" minus ", 1)[1].split(" -", 1)[0].split(" +", 1)[0]
                text = dict(COLS).get(head, head)
                out.append(f"{text} minus {rival} {src.pair(row, rival, head, seed)} (the interval is not below 0)")
        return out

    def seeds_section(self) -> str:
        """The defaults and the gate at layer 20 over several seeds, pooled."""
        if self.seeds is None:
            return ""
        s = self.seeds
        seeds = [str(x) for x in s.data["seeds"]]
        rows = [r for r in s.data["variants"] if r in s.report(None)["table"]] if "pooled" in s.data else []
        lines = [
            "",
            f"### Seeds {listed(seeds)}",
            "",
            "The defaults and the gate at layer 20 with the baselines, each seed's gates trained on its own batches",
            "from its own start and scored on its own mixed documents (the pure windows are the same text for every",
            "seed); pooled, every seed's documents count as documents of one set:",
            "",
        ]
        if not rows:
            return "\n".join([*lines, "(The second seed has not finished.)", ""]) + "\n"
        lines += [block("pure", s.path), "", block("switches", s.path), "", block("paired", s.path), ""]
        if L20 in rows and D in rows:
            lines.append(f"- Pooled, {sentence(s, L20, seed=None)}")
            per = "; ".join(
                f"seed {x}: mixed documents {s.pair(L20, D, 'mixed', x)}, "
                f"tokens 5-64 {s.pair(L20, D, 'after 5-64', x)}"
                for x in seeds
                if L20 in s.report(x)["paired_95"]
            )
            lines.append(f"- Each seed alone (`{L20}` minus the defaults): {per}.")
        for row in (D, L20):
            if row in rows:
                lines.append(self._targets_line(s, row, None))
        lines += ["", block("targets", s.path), ""]
        return "\n".join(lines)

    def evidence(self) -> list[tuple[str, Source, str | None]]:
        """Every comparison of the gate at layer 20 with the defaults: (what, file, seed or None for pooled)."""
        out: list[tuple[str, Source, str | None]] = []
        if L20 in self.rows:
            out.append(("seed 0", self.abl, "0"))
        if self.seeds is not None:
            for seed in self.seeds.data["per_seed"]:
                if seed != "0" and L20 in self.seeds.report(seed)["paired_95"]:
                    out.append((f"seed {seed}", self.seeds, seed))
            if "pooled" in self.seeds.data and L20 in self.seeds.report(None)["paired_95"]:
                out.append(("seeds pooled", self.seeds, None))
        if self.demo is not None:
            several = "pooled" in self.demo.data
            for seed in self.demo.data["per_seed"]:
                if L20 in self.demo.report(seed)["paired_95"]:
                    what = f"the demo's domains, seed {seed}" if several else "the demo's domains"
                    out.append((what, self.demo, seed))
            if several and L20 in self.demo.report(None)["paired_95"]:
                out.append(("the demo's domains, seeds pooled", self.demo, None))
        return out

    def demo_seed(self) -> str | None:
        """The demo-domain report the prose quotes: pooled when several seeds ran, else seed 0's."""
        return None if self.demo is not None and "pooled" in self.demo.data else "0"

    def demo_seeds_text(self) -> str:
        return listed(self.demo.data["seeds"]) if self.demo is not None else ""

    def _targets_moved(self, src: Source, seed: str | None, what: str) -> str:
        """How many targets the defaults and the gate at layer 20 meet, and the pure-text ones layer 20 loses."""
        mine, theirs = src.report(seed)["targets"][L20], src.report(seed)["targets"][D]
        lost = [
            line.split(":")[0].removeprefix("FAIL pure ")
            for line, other in zip(mine, theirs)
            if line.startswith("FAIL pure ") and other.startswith("PASS")
        ]
        n = src.n_targets(D, seed)
        text = f"{what}: the defaults {src.passed(D, seed)} of {n}, layer 20 {src.passed(L20, seed)}"
        if lost:
            missed = ", ".join(f"`{d}` at {src.gap(L20, d, seed=seed)}" for d in lost)
            text += f" (layer 20 misses pure {missed})"
        return text

    def _budget(self, row: str, base: str) -> str:
        """Whether a row's cost per forward is within the issue's budget (5% over its base's) in the ideas file."""
        cost = self.ideas.data["cost"]
        ratio = cost[row]["median_cpu_s"] / cost[base]["median_cpu_s"]
        where = "inside" if ratio <= 1.05 else "above"
        return f"{where} the issue's cost budget (five per cent)"

    def ideas_on_defaults(self) -> str:
        """Which ideas on the defaults win by the Defaults rule (better on pure text and mixed documents)."""
        i = self.ideas
        rows = [r for r in i.data["variants"] if r.startswith("defaults,") and r in i.report()["paired_95"]]
        if not rows:
            return ""
        won = [r for r in rows if wins(i, r)]
        lost = [r for r in rows if r not in won]
        out = []
        if won:
            names = ", ".join(f"`{r}`" for r in won)
            out.append(
                f"- **On the defaults, {names} win by the Defaults rule on this seed** (better on pure text and "
                "mixed documents, worse on no column): "
                + "; ".join(f"`{r}`: {how(i, r)}" for r in won)
                + ". Reading a second, earlier layer is a prototype of the benchmark"
                " (`benchmarks/routing/features.py`), not an `XLoraConfig` option; one seed."
            )
        if lost:
            out.append("- **On the defaults, no win for** " + "; ".join(f"`{r}` ({how(i, r)})" for r in lost) + ".")
        return "\n".join(out)

    def _cost_on_defaults(self) -> str:
        cost = self.ideas.data.get("cost", {})
        row = "defaults, layers 8 + last"
        if row not in cost:
            return ""
        i = self.ideas
        price = i.num(f"cost{q(row)}.median_cpu_s", "{:.2f}", unit=" CPU s")
        rel = i.pct(f"cost{q(row)}.median_cpu_s / cost{q(D)}.median_cpu_s - 1", 1, True)
        return f" On the defaults, layers 8 + last costs {price} ({rel} against the defaults, {self._budget(row, D)})."

    def decision(self) -> str:
        """Whether the evidence supports a default gate at about two thirds of the depth."""
        evidence = self.evidence()
        if len(evidence) < 2:
            return ""
        lines = [
            "",
            "### The gate at two thirds of the depth",
            "",
            "`defaults + gate layer 20` minus the defaults on this benchmark and on the demo's domains, in nats",
            "(paired 95% intervals; negative: layer 20 better):",
            "",
        ]
        for what, src, seed in evidence:
            cells = "; ".join(f"{text} {src.pair(L20, D, col, seed)}" for col, text in COLS)
            lines.append(f"- {what}: {cells}.")
        better = [
            what
            for what, src, seed in evidence
            if all(src.interval(L20, D, col, seed)[2] < 0 for col in ("mixed", "after 5-64"))
        ]
        worse = [
            f"{text} on {what}"
            for what, src, seed in evidence
            for col, text in COLS
            if src.interval(L20, D, col, seed)[1] > 0
        ]
        costs = [
            f"`{d}` {src.diff(L20, D, d, seed)} ({what})"
            for what, src, seed in evidence
            for d in src.data["domains"]
            if src.interval(L20, D, d, seed)[1] > 0
        ]
        lines.append("")
        if len(better) == len(evidence) and not worse:
            pure_better = [w for w, src, seed in evidence if src.interval(L20, D, "pure mean", seed)[2] < 0]
            pure = f"better on {'; '.join(pure_better)}; tied on the rest" if pure_better else "tied everywhere"
            lines.append(
                "Better on mixed documents and on tokens 5-64 after a switch everywhere it was measured, and worse on "
                f"no column anywhere (pure text on average: {pure})."
            )
        else:
            held = ", ".join(w for w, _, _ in evidence if w not in better)
            lines.append(
                "Not the same everywhere: "
                + (f"no gain on mixed documents or tokens 5-64 on {held}" if held else "better after switches")
                + (f"; worse on {'; '.join(worse)}" if worse else "; worse on no column")
                + "."
            )
        if costs:
            lines.append(f"On pure text it moves loss between domains: worse on {'; '.join(costs)}.")
        lines.append("")
        met = "; ".join(self._targets_moved(src, seed, what) for what, src, seed in evidence)
        lines.append(f"Targets met: {met}.")
        lines.append("")
        lines += self.norm_reading()
        lines += [
            'It is the default: `XLoraConfig`\'s `scaling_pass_layers="auto"` resolves when the model is built',
            "to `round(2 * n_layers / 3)` of a generative decoder-only model's decoder layers in the dual pass (20 of",
            "SmolLM2-135M's 30), and the scaling pass stops there. The model's config and checkpoint hold the",
            "resolved number, so a saved model loads as it was built. It stays None (the whole model) where the",
            "benchmark has nothing to say or a cut is not possible: encoder-decoder models, models that do not",
            "generate (sequence classifiers, encoders), models whose decoder layers have no exit",
            "(`GradientCheckpointingLayer`), and where two thirds round to the last layer (read",
            "before the final norm, which the norm check above found worse). Single pass keeps its own k. The",
            "evidence is one model",
            "(layers 20 and 30 of 30 on the defaults' gate, 8, 20 and 30 on the recipe's; no finer sweep).",
            "",
            "The previous default, the whole model in the scaling pass, is `scaling_pass_layers=None`; the mistral.rs",
            "export needs it (that layout always runs the whole model).",
            "",
        ]
        if self.seeds is not None and L20 in self.seeds.data.get("cost", {}):
            s = self.seeds
            lines += [
                "One forward of 256 tokens (`cost` in `routing-seeds.json`, medians of three) took",
                f"{s.num(f'cost{q(L20)}.median_cpu_s', '{:.2f}', unit=' CPU s')} with the gate at layer 20 and",
                f"{s.num(f'cost{q(D)}.median_cpu_s', '{:.2f}', unit=' CPU s')} with the defaults' whole scaling pass.",
                "",
            ]
        return "\n".join(lines)

    def norm_reading(self) -> list[str]:
        """Depth or norm: the gate at layer 20 reads the residual stream before the final norm, the defaults the
        normed last hidden state; the defaults' gate at layer 30 of 30 through the same exit tells them apart."""
        n = self.norm
        if n is None:
            return [
                "The gate at layer 20 reads the residual stream before the final norm where the defaults read the",
                "normed last hidden state, so depth and norm change together here.",
                "",
            ]
        seeds = listed(n.data["seeds"])
        cells = "; ".join(f"{text} {n.pair(L30, D, col, None)}" for col, text in COLS)
        earlier = n.interval(L30, D, "pure mean", None)[1] > 0 and n.interval(L30, D, "mixed", None)[2] > 0
        verdict = (
            "Reading the last layer without the norm is worse on pure text and no better elsewhere: the gain at"
            " layer 20 comes from the earlier layer, not from skipping the norm"
            if earlier
            else "The norm accounts for part of the difference"
        )
        return [
            "Depth or norm: the gate at layer 20 reads the residual stream before the final norm, the defaults the",
            f"normed last hidden state. `{L30}` reads layer 30 of 30 through the same exit; minus the defaults",
            f"(seeds {seeds} pooled, `benchmarks/results/routing-norm.json`): {cells}. {verdict}.",
            "",
        ]


def results() -> str:
    """The Results section (from `START` to the end of the page), tables not yet filled."""
    return Page().results()
