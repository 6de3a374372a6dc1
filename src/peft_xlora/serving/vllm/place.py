"""The vLLM exporter's column of the table of what combines (`peft_xlora.core.combinations`), and its situation.

`export_vllm` reads a saved checkpoint's files and never builds the model, so its situation is made from what the
files hold (`checkpoint_situation`): the saved config, the base model's config.json, the tensor names, and the `pin`
argument. The column is derived from one table of the config's fields (`VLLM_WRITTEN`, `VLLM_IRRELEVANT`,
`VLLM_REFUSED`, each field in exactly one; `VLLM_REFUSED_WHEN` adds a refusal in a situation to a written field) and
a cell for every named feature. `export_vllm` calls `check(VLLM_PLACE.name, situation)` before it writes anything;
tests/contract/test_combination_table.py holds the column to every row, and tests/serving/test_vllm_export.py checks
that the field tables place every config field once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ...core.combinations import (
    NO_LATE_LAYER,
    SET,
    Cell,
    Condition,
    Place,
    Refusal,
    Situation,
    fact,
    irrelevant,
    refuse,
    refused,
    supported,
)
from ...core.heads import HEAD_INFIX, SHARED_NAME
from .spec import EMBEDDING, XLoraServingError

# Every config field (the `XLoraConfig` dataclass's, PEFT's included), by what `export_vllm` does with it. Written:
# the serving spec carries it (or the tensors it decides), and the plugin computes it as peft-xlora does.
VLLM_WRITTEN: dict[str, str] = {
    "expert_order": "the gate's order: the spec's `experts`",
    "experts": "each expert's rank, alpha, rsLoRA, patterns and targets, resolved into (expert, rank, scale) entries",
    "hidden_size": "checked against the base model's",
    "enable_softmax": "the plugin's gate is peft-xlora's",
    "enable_softmax_topk": "the plugin's gate is peft-xlora's",
    "softmax_temperature": "the plugin's gate is peft-xlora's",
    "layerwise_scalings": "one scaling set per mixture layer",
    "top_k_lora": "the plugin's gate is peft-xlora's",
    "topk_compute": "the routed projections compute each token's k chosen experts only (sparse: one traced op that "
    "gathers their factors per token or groups the tokens by expert) or all of them (dense), as peft-xlora's rule "
    "decides for 'auto': the same outputs within float tolerance",
    "xlora_depth": "the classifier's linear layers",
    "xlora_size": "the classifier's width, when xlora_depth > 1",
    "scaling_pass_value": "the scaling pass's constant expert weight (times the global weight)",
    "global_scaling_weight": "multiplies every gated scaling",
    "scaling_pass_layers": "dual pass: a scaling pass cut after layer k; single pass: the gate's layer k",
    "routing": "dual pass (a scaling pass with its own paged KV cache) or single pass (one pass)",
    "single_pass_static": "single pass: the learned static logits go into the weights file; uniform is 1 / n",
    "base_model_name_or_path": "the base model exported beside the experts when `base_model` is not given",
    "revision": "the base model's revision, when it is resolved from the Hub",
    "peft_xlora_version": "recorded in the spec",
}
# No effect on what the exported model computes: training-only, initialisation, sources, or bookkeeping.
VLLM_IRRELEVANT: dict[str, str] = {
    "adapters": "where the experts came from; the checkpoint holds their weights",
    "xlora_dropout_p": "training only: the classifier runs without dropout at inference",
    "classifier_init": "overwritten by the trained classifier",
    "use_trainable_adapters": "the checkpoint holds the experts as trained",
    "router_load_balancing_coef": "a training term",
    "router_entropy_coef": "a training term",
    "router_distillation_coef": "a training term",
    "router_distillation_temperature": "a training term",
    "peft_type": "only peft-xlora checkpoints are read (checked before the table)",
    "auto_mapping": "bookkeeping",
    "peft_version": "bookkeeping",
    "inference_mode": "the export serves; nothing trains",
}
# Refused unless one of these values (with the reason the plugin cannot serve another).
VLLM_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "scalings_mode": (
        ("token",),
        "it holds each request's prompt scalings for its generated tokens, which needs per-request state the vLLM "
        "plugin does not keep. Set the config's scalings_mode='token' (every token routed) before exporting, serve "
        "a fixed mixture (`pin`), or serve with transformers' generate",
    ),
    "trainable_head": (
        (False,),
        "the vLLM plugin serves causal language models, which have no classification heads",
    ),
    "task_type": (
        (None, "CAUSAL_LM"),
        "the vLLM plugin serves causal language models (task_type 'CAUSAL_LM' or None)",
    ),
}
PINNED = Condition("with `pin`", lambda s, r: bool({"pins", "per_row_pins"} & s.features))
UNPINNED = Condition("without `pin`", lambda s, r: not PINNED(s, r))
# Refusals of VLLM_REFUSED that a pin makes moot (every token then uses the pinned weights).
_MOOT_WHEN_PINNED = ("scalings_mode",)
# Written fields refused in a situation.
VLLM_REFUSED_WHEN: dict[str, tuple[Refusal, ...]] = {
    "scaling_pass_layers": (
        refuse(
            "`routing='single_pass'` with `scaling_pass_layers={value}`: no mixture layer comes after decoder layer "
            "{value}, so the gate would never be used (peft-xlora no longer builds such a model). To serve a fixed "
            "mixture over every layer, export it pinned: `export_vllm(..., pin='uniform')` or `pin={{name: "
            "weight}}` (`peft-xlora export --format vllm --pin ...`)",
            NO_LATE_LAYER & UNPINNED,
            XLoraServingError,
        ),
    ),
    "experts": (
        refuse(
            "expert {expert} uses a LoRA variant the vLLM plugin cannot serve (it computes B A x * scale only): "
            "serve this model with transformers' generate, or use plain LoRA experts",
            fact("expert", "an expert uses DoRA, a LoRA bias, QA-LoRA, aLoRA or modules_to_save"),
            XLoraServingError,
        ),
    ),
}
#: Expert LoRA options that change what an expert computes beyond B A x * scale.
EXPERT_VARIANTS = ("use_dora", "lora_bias", "use_qalora", "alora_invocation_tokens", "modules_to_save")


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)  # PEFT's TaskType is a str enum: compare its value


def _other_than(allowed: tuple[Any, ...]) -> Condition:
    label = "other than " + " or ".join(repr(v) for v in allowed)
    return Condition(label, lambda s, r: _plain(s.value(r)) not in allowed)


def _refused_field(name: str) -> Cell:
    allowed, why = VLLM_REFUSED[name]
    when = _other_than(allowed) & UNPINNED if name in _MOOT_WHEN_PINNED else _other_than(allowed)
    note = " or ".join(repr(v) for v in allowed) + " only"
    if name in _MOOT_WHEN_PINNED:
        note += " (any, with `pin`)"
    message = f"{name}={{value!r}} is not served by the vLLM plugin: {why}"
    return refused(refuse(message, when, XLoraServingError), note=note)


def _field_cells() -> dict[str, Cell]:
    cells: dict[str, Cell] = {}
    for name, note in VLLM_WRITTEN.items():
        extra = VLLM_REFUSED_WHEN.get(name)
        cells[name] = refused(*extra, note=note) if extra else supported(note)
    cells.update({name: irrelevant(note) for name, note in VLLM_IRRELEVANT.items()})
    cells.update({name: _refused_field(name) for name in VLLM_REFUSED})
    return cells


_ONE_MIXTURE = (
    "per-row pins (one weight vector per batch row) have no counterpart in a server, whose requests are not rows of "
    "one batch: pass `pin` as shared weights (n_experts,) or one row per mixture layer (n_layers, n_experts)"
)

VLLM_PLACE = Place(
    "export_vllm",
    "`export_vllm` (`peft-xlora export --format vllm`): a folder vLLM serves with the plugin, from the saved files",
    {
        **_field_cells(),
        "pins": supported(
            "`pin=` (`--pin`): every mixture layer at the given weights, in one pass with no classifier, exactly as "
            "`set_static_scalings` (pins are not saved, so the export takes them as an argument)"
        ),
        "per_row_pins": refused(refuse(_ONE_MIXTURE, SET, XLoraServingError)),
        "masks": irrelevant("runtime state, not saved: every expert of the checkpoint is served (pin 0 to drop one)"),
        "heads": refused(
            refuse(
                "the checkpoint mixes its experts' classification heads (or trains a shared one), and the vLLM plugin "
                "serves causal language models: keep it as a peft-xlora checkpoint, or pin the gate and export one "
                "plain LoRA with its head (`export_lora`)",
                SET,
                XLoraServingError,
            )
        ),
        "encoder_decoder": refused(
            refuse(
                "the vLLM plugin serves decoder-only causal language models, and the base model ({name}) is an "
                "encoder-decoder model: serve it with transformers' generate",
                SET,
                XLoraServingError,
            )
        ),
        "distillation": irrelevant("a training term"),
        "elastic_changes": supported("the experts the checkpoint holds, after any change made before it was saved"),
        "generate_modes": irrelevant("a vLLM request has no scalings mode: every token is routed (scalings_mode)"),
    },
    prefix="export_vllm cannot serve this checkpoint with the vLLM plugin: ",
    suffix=".",
    layer="serving",
)

# A checkpoint's expert factor key: base_model.model.<module>.xlora_experts.<expert>.lora_{A,B}
_EXPERT_INFIX = ".xlora_experts."
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _late_layer_count(keys: list[str], k: int) -> int:
    """Single pass: how many adapted modules run after decoder layer k, from the checkpoint's factor keys.

    As peft-xlora decides it: modules of decoder layers k+1..L are late, the input embedding is early, and modules
    outside the decoder stack (e.g. lm_head) are late.
    """
    modules = {key.split(_EXPERT_INFIX)[0].removeprefix("base_model.model.") for key in keys if _EXPERT_INFIX in key}
    late = 0
    for module in modules:
        match = _LAYER.match(module)
        if (match and int(match.group(1)) >= k) or (not match and module != EMBEDDING):
            late += 1
    return late


def pin_feature(pin: Any) -> str | None:
    """The named feature a `pin` argument uses: None, "pins", or "per_row_pins" (one weight vector per batch row)."""
    if pin is None:
        return None
    shape = getattr(pin, "shape", None)
    if shape is not None:
        return "per_row_pins" if len(shape) == 3 else "pins"
    if (
        isinstance(pin, (list, tuple))
        and pin
        and all(isinstance(row, (list, tuple)) and row and isinstance(row[0], (list, tuple)) for row in pin)
    ):
        return "per_row_pins"
    return "pins"


def checkpoint_situation(
    config: Any, base_config: Mapping[str, Any], tensor_keys: list[str], pin: Any = None
) -> Situation:
    """The situation of exporting a saved checkpoint, from its files (the model is never built).

    Args:
        config: The checkpoint's `XLoraConfig`.
        base_config: The base model's config.json.
        tensor_keys: The names of the checkpoint's tensors.
        pin: The `pin` argument of `export_vllm`.
    """
    features = set()
    feature = pin_feature(pin)
    if feature:
        features.add(feature)
    if any(f".{HEAD_INFIX}." in key or f".{SHARED_NAME}." in key for key in tensor_keys):
        features.add("heads")
    encoder_decoder = bool(base_config.get("is_encoder_decoder"))
    if encoder_decoder:
        features.add("encoder_decoder")
    if config.router_distillation_coef:
        features.add("distillation")
    variants = [
        f"{name!r} (`{option}`)"
        for name, expert in (config.experts or {}).items()
        for option in EXPERT_VARIANTS
        if isinstance(expert, dict) and expert.get(option)
    ]
    routing = "encoder_decoder" if encoder_decoder else config.routing
    late = None
    if routing == "single_pass" and config.scaling_pass_layers is not None:
        late = _late_layer_count(tensor_keys, config.scaling_pass_layers)
    archs = base_config.get("architectures") or []
    return Situation(
        config=config,
        features=frozenset(features),
        routing=routing,
        model_name=archs[0] if archs else "this base model",
        late_layers=late,
        facts={"expert": ", ".join(variants)},
    )
