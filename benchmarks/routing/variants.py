"""The gates the routing benchmark trains: peft-xlora's defaults, the demo's recipe, its ablation, and new ideas.

A variant is an `XLoraConfig` (options on top of `DEFAULTS`, the config's own defaults as a new user gets them) plus
how it is trained (steps, learning rate, distillation from the experts' per-token losses) and, for prototypes the
library does not have yet, the extra decoder layers whose output the classifier reads beside its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Variant:
    """One gate of the benchmark.

    Attributes:
        label: Row name in the tables.
        options: `XLoraConfig` arguments (besides the experts).
        steps: Optimiser steps of the gate.
        lr: Peak learning rate.
        distillation: Weight of the distillation term from the experts' own per-token losses (0: off). The
            benchmark adds it from cached expert losses, which is the library's `router_distillation_coef` term
            computed once per training batch for all variants (`tests/contract/test_routing_bench.py` checks that
            the two agree).
        temperature: Temperature (nats) of the distillation target softmax(-loss / T); small: the per-token oracle.
        extra_layers: Decoder layers (1-based) whose output the classifier reads beside the hidden state of
            `scaling_pass_layers` (concatenated): the multi-layer prototype (`features.py`). Empty: the library's gate.
    """

    label: str
    options: dict[str, Any] = field(default_factory=dict)
    steps: int = 100
    lr: float = 1e-3
    distillation: float = 0.0
    temperature: float = 1.0
    extra_layers: tuple[int, ...] = ()

    def recipe(self) -> dict[str, Any]:
        """What makes this gate, for its cache key (not the label)."""
        return {
            "options": self.options,
            "steps": self.steps,
            "lr": self.lr,
            "distillation": self.distillation,
            "temperature": self.temperature,
            "extra_layers": list(self.extra_layers),
        }


# The `XLoraConfig` defaults of the fields the benchmark varies, as the issue measured them (peft-xlora before issue
# 25 chose defaults from this benchmark). Every gate is built from these plus its own options, so a gate, its cache
# key and the ablation's switches stay what they were when the config's defaults change.
BASELINE: dict[str, Any] = {
    "xlora_depth": 1,
    "xlora_size": 2048,
    "xlora_dropout_p": 0.2,
    "layerwise_scalings": False,
    "scaling_pass_layers": None,
    "classifier_init": "uniform",
    "router_distillation_coef": 0.0,  # the benchmark adds the term itself (`Variant.distillation`)
}

DEFAULTS_LABEL = "peft-xlora defaults"
RECIPE_LABEL = "demo recipe"

# The "as a new user would": the config's defaults (`BASELINE`), 100 steps at lr 1e-3.
DEFAULTS = Variant(DEFAULTS_LABEL)

# The demo's choices (docs/demo.md), each one switch of the ablation. `None` in options means "the default".
RECIPE_CHOICES: dict[str, dict[str, Any]] = {
    "distillation": {"distillation": 1.0},
    "gate layer 20": {"options": {"scaling_pass_layers": 20}},
    "layerwise": {"options": {"layerwise_scalings": True}},
    "depth 2, width 64": {"options": {"xlora_depth": 2, "xlora_size": 64}},
    "dropout 0": {"options": {"xlora_dropout_p": 0.0}},
    "30 steps": {"steps": 30},
    "lr 5e-3": {"lr": 5e-3},
}
# The initialisation is the one choice where the demo and the defaults agree (uniform): its switch is "random".
INIT_SWITCH = {"options": {"classifier_init": "random"}}


def _merge(base: Variant, label: str, change: dict[str, Any]) -> Variant:
    options = {**base.options, **change.get("options", {})}
    rest = {k: v for k, v in change.items() if k != "options"}
    return Variant(
        label=label,
        options=options,
        **{k: rest.get(k, getattr(base, k)) for k in ("steps", "lr", "distillation", "temperature", "extra_layers")},
    )


def _recipe() -> Variant:
    out = DEFAULTS
    for change in RECIPE_CHOICES.values():
        out = _merge(out, RECIPE_LABEL, change)
    return out


RECIPE = _recipe()


def _without(choice: str) -> dict[str, Any]:
    """The change that undoes one recipe choice (back to the default)."""
    change = RECIPE_CHOICES[choice]
    undo: dict[str, Any] = {}
    for key, value in change.items():
        if key == "options":
            undo["options"] = {k: BASELINE[k] for k in value}
        else:
            undo[key] = getattr(DEFAULTS, key)
    return undo


# The recipe's choices that are `XLoraConfig` fields, so could become its defaults (the others are how the gate is
# trained, or a layer number that depends on the model): their switches over the defaults run first.
CONFIG_CHOICES = ("dropout 0", "layerwise", "depth 2, width 64", "distillation")  # distillation: the dearest, last


def ablation() -> list[Variant]:
    """Each recipe choice switched on alone over the defaults, and off alone from the recipe; plus the init switch.

    In the order they run (a partial file says most sooner): the switches over the defaults that could become a
    default (`CONFIG_CHOICES`, the init), then the recipe's rows (30 steps each but one, the cheapest), then the
    switches over the defaults that are training settings or a model-specific layer.
    """
    on_defaults = {choice: _merge(DEFAULTS, f"defaults + {choice}", c) for choice, c in RECIPE_CHOICES.items()}
    out = [on_defaults[choice] for choice in CONFIG_CHOICES[:-1]]
    out.append(_merge(DEFAULTS, "defaults + random init", INIT_SWITCH))
    out.append(on_defaults["distillation"])  # the dearest: the experts' losses on 100 gate batches first
    off_recipe = [_merge(RECIPE, f"recipe - {choice}", _without(choice)) for choice in RECIPE_CHOICES]
    off_recipe.append(_merge(RECIPE, "recipe + random init", INIT_SWITCH))
    out += sorted(off_recipe, key=lambda v: v.steps)  # "recipe - 30 steps" (100 steps) last
    out += [v for choice, v in on_defaults.items() if choice not in CONFIG_CHOICES]
    return out


# Distillation (weight 1) towards a target close to the per-token oracle: the best expert of each token.
ORACLE_TARGETS = {"distillation": 1.0, "temperature": 0.1}


def ideas() -> list[Variant]:
    """Routing after switches: an earlier layer, two layers, per-token-oracle targets (all within the cost budget)."""
    return [
        _merge(RECIPE, "recipe, gate layer 8", {"options": {"scaling_pass_layers": 8}}),
        _merge(RECIPE, "recipe, layers 8 + 20", {"extra_layers": (8,)}),
        _merge(RECIPE, "recipe, oracle targets (T 0.1)", {"temperature": 0.1}),
        # The two that moved the recipe after switches, on the defaults (the better gate on this benchmark). The
        # defaults read the last hidden state (after the final norm); "layers 8 + last" adds decoder layer 8's output.
        _merge(DEFAULTS, "defaults, oracle targets (T 0.1)", ORACLE_TARGETS),
        _merge(DEFAULTS, "defaults, layers 8 + last", {"extra_layers": (8,)}),
        _merge(DEFAULTS, "defaults, oracle targets + layers 8", {**ORACLE_TARGETS, "extra_layers": (8,)}),
    ]


def norm_check() -> list[Variant]:
    """The gate at layer 20 reads the residual stream before the final norm, the defaults the normed last hidden
    state: depth and norm change together. Layer 30 of 30 through the same exit reads the last layer un-normed."""
    return [_merge(DEFAULTS, "defaults + gate layer 30 (no final norm)", {"options": {"scaling_pass_layers": 30}})]


def by_label(variants: list[Variant]) -> dict[str, Variant]:
    """Variants by label; labels must be unique."""
    out = {v.label: v for v in variants}
    if len(out) != len(variants):
        raise ValueError("Variant labels must be unique.")
    return out


def all_variants() -> dict[str, Variant]:
    """Every variant the full benchmark knows, by label."""
    return by_label([DEFAULTS, RECIPE, *ablation(), *ideas(), *norm_check()])
