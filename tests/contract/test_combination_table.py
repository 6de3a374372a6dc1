"""The table of what combines (`core/combinations.py`): every config field and named feature placed in every place.

A new `XLoraConfig` field, a new named feature or a new place fails here until each of its cells says supported,
refused (with a message and the situations it refuses in) or irrelevant; docs/combinations.md is the table, written
by scripts/combinations_table.py.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from peft_xlora import XLoraConfig
from peft_xlora.core.combinations import FEATURES, Status, places, rows

ROOT = Path(__file__).resolve().parents[2]
# What a refusal's message may name: the model's class, the row's value and name, and the places' facts.
PLACEHOLDERS = {"name", "value", "field", "expert", "experts_left", "with_head", "without_head"}


def _script():
    spec = importlib.util.spec_from_file_location("combinations_table", ROOT / "scripts" / "combinations_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table():
    script = _script()
    script.load_places()  # every layer's module is imported, so each registers its places
    return script, places()


def test_the_places_of_every_layer_are_registered(table):
    _, found = table
    core = {"config", "build", "update_config", "add_expert", "remove_expert", "set_static_scalings"}
    core |= {"set_active_experts", "save_load", "generate"}
    assert core | {"export_mistralrs", "export_lora", "cli"} <= set(found)
    assert {found[name].layer for name in ("export_lora", "cli")} == {"io", "cli"}


def test_every_field_and_feature_is_placed_in_every_place(table):
    _, found = table
    expected = set(rows(XLoraConfig))
    assert {"pins", "per_row_pins", "masks", "heads", "encoder_decoder", "distillation"} <= set(FEATURES)
    for name, place in found.items():
        assert set(place.cells) == expected, (
            f"place {name!r}: unplaced {sorted(expected - set(place.cells))}, "
            f"unknown {sorted(set(place.cells) - expected)}"
        )


def test_refused_cells_say_when_and_what_to_do(table):
    _, found = table
    for name, place in found.items():
        for row, cell in place.cells.items():
            assert (cell.status is Status.REFUSED) == bool(cell.refusals), (name, row)
            for refusal in cell.refusals:
                assert refusal.when.label and len(refusal.message) > 30, (name, row)
                placeholders = set(re.findall(r"\{(\w+)", refusal.message))
                assert placeholders <= PLACEHOLDERS, (name, row, placeholders - PLACEHOLDERS)


def test_the_docs_page_is_the_table(table):
    script, _ = table
    page = ROOT / "docs" / "combinations.md"
    assert page.read_text(encoding="utf-8") == script.render(), "run: python scripts/combinations_table.py"
