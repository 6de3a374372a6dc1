"""One table of what combines: every option and feature against every place it can meet.

Rows are every `XLoraConfig` field (listed from the dataclass) and the named runtime features in `FEATURES`. Columns
are the places an option meets the others: making a config, building the model, `update_config`, `add_expert`,
`remove_expert`, `set_static_scalings`, `set_active_experts`, saving and loading, `generate`, and the places other
layers register (`io/export.py` registers the mistral.rs and plain-LoRA exporters, `cli/places.py` the command line;
`serving/vllm/export.py` can register its own with `register_place`). Each cell is a `Cell`:

- **supported**, with a note on how (what the place does with it);
- **refused**, with the message the user gets (what was wrong and what to do) and the `Condition` under which it is
  refused (e.g. "set, on an encoder-decoder model"); outside that condition the cell is supported;
- **irrelevant**: the place does not read it, with a note why.

Pairwise only: a cell is one option against one place, and a condition names the other option or feature that makes
it refused. Every place calls `check(place, situation)` once, before it changes anything; `check` raises one error
that lists every refused cell that applies. `tests/contract/test_combination_table.py` fails when a config field or a
named feature is left out of any registered place, `tests/core/test_supported_cells.py` when a supported cell has no
test, and `scripts/combinations_table.py` writes the table to docs/combinations.md.

Hook for other layers (core cannot import them): a module above core calls `register_place(Place(...))` at import
time with a cell for every row (`rows(XLoraConfig)`), and `check(place, situation)` where it acts, before it writes
anything. A place that has a built model takes `core.places.situation_of(tuner)`; one that reads only a saved
checkpoint's files (the vLLM exporter, `export_vllm`, never builds the model) builds `Situation(config,
routing=config.routing, features=...)` from what the files hold, as the command line does (`cli/places.py`). The
vLLM exporter's column (`export_vllm`, with the serving layer's field table) is meant to be registered that way by
`serving/vllm/export.py`; the contract test then holds it to every row too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Status(str, Enum):
    """What a place does with an option or feature."""

    SUPPORTED = "supported"
    REFUSED = "refused"
    IRRELEVANT = "irrelevant"


#: The named runtime features, beside the config fields (a row each).
FEATURES: dict[str, str] = {
    "pins": "a pinned gate: `set_static_scalings(weights)`",
    "per_row_pins": "per-row pins: `set_static_scalings(weights, per_row=True)`",
    "masks": "masked experts: `set_active_experts(names)`",
    "heads": "classification experts' heads mixed by the gate (`XLoraHead`)",
    "encoder_decoder": "an encoder-decoder base model (BART, T5): each stack gated by its own tokens",
    "distillation": "router distillation: `distillation_loss` and the term `router_distillation_coef` weighs",
    "elastic_changes": "experts added or removed after building: `add_expert`, `remove_expert`",
    "generate_modes": "`generate(..., scalings_mode=...)` per call, with the KV cache of both passes",
}


@dataclass
class Situation:
    """What a place knows when it checks: the config and the features in use, before it changes anything.

    Attributes:
        config: The config as it is, or as it would be after the change (`update_config`).
        changes: `update_config`: field -> new value, for the fields whose value changes.
        features: The named runtime features in use (keys of `FEATURES`).
        routing: The router mode: ``"dual_pass"``, ``"single_pass"`` or ``"encoder_decoder"``.
        model_name: The base model's class name, for messages.
        late_layers: Single pass: how many mixture layers would read the gate (after layer k); None otherwise.
        facts: Place-specific facts (e.g. the experts left after `remove_expert`), read by conditions and messages.
    """

    config: Any
    changes: Mapping[str, Any] = field(default_factory=dict)
    features: frozenset[str] = frozenset()
    routing: str = "dual_pass"
    model_name: str = "this model"
    late_layers: int | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)

    def value(self, row: str) -> Any:
        """The config value of field `row`, or whether feature `row` is in use."""
        if row in FEATURES:
            return row in self.features
        return getattr(self.config, row)


@dataclass(frozen=True)
class Condition:
    """When a refused cell applies: a test of the situation (and the cell's row), with a label for the docs."""

    label: str
    test: Callable[[Situation, str], bool]

    def __call__(self, situation: Situation, row: str) -> bool:
        """Whether the condition holds for `row` in `situation`."""
        return bool(self.test(situation, row))

    def __and__(self, other: Condition) -> Condition:
        return Condition(f"{self.label}, {other.label}", lambda s, r: self(s, r) and other(s, r))


def _unset_values(config: Any) -> dict[str, tuple[Any, ...]]:
    """Per field, the values that leave its option unused: its default, or the field's ``metadata["unset"]``."""
    out = {}
    for f in dataclasses.fields(config):
        if "unset" in f.metadata:  # e.g. `scaling_pass_layers`: None and "auto" (which may resolve to None)
            out[f.name] = tuple(f.metadata["unset"])
        elif f.default is not dataclasses.MISSING:
            out[f.name] = (f.default,)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = (f.default_factory(),)
    return out


def _is_set(situation: Situation, row: str) -> bool:
    if row in FEATURES:
        return row in situation.features
    return getattr(situation.config, row) not in _unset_values(situation.config).get(row, (None,))


#: The option is in use: a config field away from its default (or its `unset` values), or a named feature that is on.
SET = Condition("set", _is_set)
#: `update_config`: the field changes.
CHANGED = Condition("changed", lambda s, r: r in s.changes)
ENCODER_DECODER = Condition("on an encoder-decoder model", lambda s, r: s.routing == "encoder_decoder")
SINGLE_PASS = Condition("with routing='single_pass'", lambda s, r: s.routing == "single_pass")
NO_LATE_LAYER = Condition(
    "no mixture layer after layer k", lambda s, r: s.routing == "single_pass" and s.late_layers == 0
)
PROMPT_MODE = Condition(
    "scalings_mode='prompt'", lambda s, r: s.facts.get("scalings_mode", s.config.scalings_mode) == "prompt"
)


def fact(name: str, label: str) -> Condition:
    """A condition on a place-specific fact being true (e.g. ``fact("only_active", "the only active expert")``)."""
    return Condition(label, lambda s, r: bool(s.facts.get(name)))


@dataclass(frozen=True)
class Refusal:
    """One way a place refuses an option: the condition, and the message the user gets.

    Attributes:
        when: The situations it refuses in.
        message: What was wrong and what to do, with ``{name}`` (the model's class), ``{value}`` (the row's value,
            the new one in `update_config`), ``{field}`` (the row) and the situation's facts as placeholders.
        error: The exception class it raises.
    """

    when: Condition
    message: str
    error: type[Exception] = ValueError


@dataclass(frozen=True)
class Cell:
    """One option or feature at one place.

    Attributes:
        status: Supported, refused (in the situations of `refusals`, supported otherwise) or irrelevant.
        note: How the place supports it, or why it does not read it.
        refusals: For refused cells, the situations it refuses in.
    """

    status: Status
    note: str = ""
    refusals: tuple[Refusal, ...] = ()


def supported(note: str = "") -> Cell:
    """A supported cell."""
    return Cell(Status.SUPPORTED, note)


def irrelevant(note: str = "") -> Cell:
    """A cell whose place does not read the option."""
    return Cell(Status.IRRELEVANT, note)


def refuse(message: str, when: Condition, error: type[Exception] = ValueError) -> Refusal:
    """One refusal of a cell: `message` in the situations `when` holds."""
    return Refusal(when, message, error)


def refused(*refusals: Refusal, note: str = "") -> Cell:
    """A cell refused in the situations of `refusals` (supported otherwise, as `note` says)."""
    return Cell(Status.REFUSED, note, refusals)


@dataclass(frozen=True)
class Place:
    """A column: where options meet, and what it does with each.

    Attributes:
        name: The place's key (``"build"``, ``"export_mistralrs"``, ...).
        title: How the docs name it.
        cells: Row -> cell, for every config field and named feature.
        prefix: Put before the refusal messages (e.g. which exporter refuses).
        suffix: Put after them (e.g. what to use instead).
        layer: The package layer that registers it (``"core"``, ``"io"``, ...), for the docs.
    """

    name: str
    title: str
    cells: Mapping[str, Cell]
    prefix: str = ""
    suffix: str = ""
    layer: str = "core"


_PLACES: dict[str, Place] = {}


def register_place(place: Place) -> None:
    """Adds (or replaces) a column of the table. Layers above core call this at import for their own places."""
    _PLACES[place.name] = place


def places() -> dict[str, Place]:
    """The registered places, in registration order."""
    return dict(_PLACES)


def rows(config_cls: type) -> list[str]:
    """Every row of the table: the config class's fields, then the named features."""
    return [f.name for f in dataclasses.fields(config_cls)] + list(FEATURES)


def refusals(place: str, situation: Situation) -> list[tuple[str, Refusal]]:
    """The (row, refusal) pairs of `place` that apply in `situation`."""
    return [
        (row, refusal)
        for row, cell in _PLACES[place].cells.items()
        for refusal in cell.refusals
        if refusal.when(situation, row)
    ]


def check(place: str, situation: Situation) -> None:
    """Raises if `place` refuses any option or feature in `situation`; call it before changing anything.

    Raises:
        ValueError: (or the cell's own subclass, when every refusal has the same one) listing every refusal that
            applies, each with what to do instead.
    """
    found = refusals(place, situation)
    if not found:
        return
    info = _Placeholders(situation)
    messages = [refusal.message.format_map(info.for_row(row)) for row, refusal in found]
    column = _PLACES[place]
    errors = {refusal.error for _, refusal in found}
    error = errors.pop() if len(errors) == 1 else ValueError
    raise error(column.prefix + "; ".join(messages) + column.suffix)


class _Placeholders:
    def __init__(self, situation: Situation) -> None:
        self.situation = situation

    def for_row(self, row: str) -> dict[str, Any]:
        s = self.situation
        value = s.changes.get(row, s.value(row)) if row not in FEATURES else s.value(row)
        return {"name": s.model_name, "value": value, "field": row, **s.facts}
