"""The core's places in the table of what combines (see `combinations`), and the situation of a built model.

Places: ``config`` (a config on its own: checked when it is made and at every `update_config`), ``build``
(`get_peft_model` and every load), ``update_config`` (every gating setter goes through it), ``add_expert``,
``remove_expert``, ``set_static_scalings``, ``set_active_experts``, ``save_load`` and ``generate``. Each lists every
config field and named feature; `tests/contract/test_combination_table.py` fails on one left out.
"""

from __future__ import annotations

import copy
from typing import Any

from .combinations import (
    CHANGED,
    ENCODER_DECODER,
    NO_LATE_LAYER,
    PROMPT_MODE,
    SET,
    SINGLE_PASS,
    Cell,
    Condition,
    Place,
    Situation,
    fact,
    irrelevant,
    refuse,
    refused,
    register_place,
    supported,
)
from .experts import ExpertError
from .heads import head_mixtures, heads_all_or_none

# ---------------------------------------------------------------------------------------------- messages

PROMPT_ON_SEQ2SEQ = (
    "scalings_mode='prompt' is not supported for encoder-decoder models ({name}): the source is routed per token "
    "by the encoder, and the decoder has no prompt to hold. Use scalings_mode='token'."
)
PROMPT_ON_SINGLE_PASS = (
    "scalings_mode='prompt' does not apply to routing='single_pass': every token is routed from the pass that "
    "computes it, with no scaling pass to skip. Generate without `scalings_mode` (or 'token')."
)
K_ON_SEQ2SEQ = (
    "`scaling_pass_layers` is not supported for encoder-decoder models ({name}): the decoder's scaling pass needs the "
    "whole encoder's output. Leave scaling_pass_layers=None."
)
DISTILLATION_ON_SEQ2SEQ = (
    "`router_distillation_coef` is not supported for encoder-decoder models ({name}) yet: the experts' per-token "
    "losses are scored for decoder-only models. Set router_distillation_coef=0."
)
_GATE_NEVER_USED = (
    "no mixture layer comes after decoder layer {value} (the experts adapt only layers up to it, or it is the last "
    "layer), so the gate would never be used"
)
_STRUCTURAL = (
    "`{field}` cannot change on a built model: it decides which parameters (and hooks) the model has. Build a new "
    "model with the new value (the experts and base model can be reused)."
)
_EXPERT_LIST = (
    "`{field}` cannot change on a built model: the experts, in this order, are the gate's outputs. Change them with "
    "`add_expert` / `remove_expert`, or build a new model."
)
_HEADS_ALL_OR_NONE = heads_all_or_none("{with_head}", "{without_head}")  # type: ignore[arg-type]

_TOKEN_CLS = Condition(
    "task_type='TOKEN_CLS'", lambda s, r: getattr(s.config.task_type, "value", s.config.task_type) == "TOKEN_CLS"
)
_NO_TOP_K = Condition("without top_k_lora", lambda s, r: s.config.top_k_lora is None)

# ---------------------------------------------------------------------------------------------- shared cells

_PEFT_BOOKKEEPING = ("peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision")
_READ_EACH_FORWARD = supported("read by the gate at every forward")
_RUNTIME = irrelevant("runtime state of the built model, not part of this place")
_BOOKKEEPING = irrelevant("bookkeeping: saved with the config, computes nothing")


def _same(cell: Cell, *names: str) -> dict[str, Cell]:
    return dict.fromkeys(names, cell)


# ---------------------------------------------------------------------------------------------- config

CONFIG = Place(
    "config",
    "a config on its own: `XLoraConfig(...)`, and every `update_config`",
    {
        "topk_compute": supported(
            "with top_k_lora: how the kept experts are computed (sparse, dense, or auto); no effect without"
        ),
        **_same(_BOOKKEEPING, *_PEFT_BOOKKEEPING, "peft_xlora_version"),
        "task_type": supported("the PEFT task; the model's head and wrapper follow it"),
        "inference_mode": supported("frozen when True"),
        "adapters": supported("expert name -> source, in gate order"),
        "hidden_size": supported("checked against the model at build"),
        "enable_softmax": supported(),
        "enable_softmax_topk": refused(
            refuse(
                "`enable_softmax_topk=True` needs `top_k_lora` to be set (the k experts to renormalise).",
                SET & _NO_TOP_K,
            ),
            note="renormalises the top-k experts",
        ),
        "softmax_temperature": supported(),
        "layerwise_scalings": supported(),
        "top_k_lora": supported("at most the number of experts"),
        **_same(
            supported("the classifier's shape"), "xlora_depth", "xlora_size", "xlora_dropout_p", "classifier_init"
        ),
        "use_trainable_adapters": supported(),
        "trainable_head": supported("sequence classification only (checked at build)"),
        "scaling_pass_value": supported(),
        "global_scaling_weight": supported(),
        "scalings_mode": refused(
            refuse(
                "`routing='single_pass'` routes every token from the pass that computes it, so there is no scaling "
                "pass for `scalings_mode='prompt'` to skip: use scalings_mode='token'.",
                SET & SINGLE_PASS,
            ),
            note="token or prompt",
        ),
        "scaling_pass_layers": supported("dual pass: a shorter scaling pass; single pass: its layer k (required)"),
        "router_load_balancing_coef": supported(),
        "router_entropy_coef": supported(),
        "routing": supported("dual_pass or single_pass (which needs scaling_pass_layers)"),
        "single_pass_static": supported("single pass only; irrelevant with dual_pass"),
        "router_distillation_coef": refused(
            refuse(
                "`router_distillation_coef` is not supported with `routing='single_pass'`: scoring every expert alone "
                "would run nested forwards inside the one pass. Train the gate with routing='dual_pass', or set "
                "router_distillation_coef=0.",
                SET & SINGLE_PASS,
            ),
            note="dual pass, decoder-only",
        ),
        "router_distillation_temperature": supported(),
        "experts": supported("filled in at build: describes a checkpoint"),
        "expert_order": supported("recorded: the gate's order"),
        **_same(_RUNTIME, "pins", "per_row_pins", "masks", "heads", "encoder_decoder", "elastic_changes"),
        "distillation": supported("the term's weight and temperature are fields of the config"),
        "generate_modes": supported("scalings_mode is generate's default mode"),
    },
)

# ---------------------------------------------------------------------------------------------- build

BUILD = Place(
    "build",
    "building the model: `get_peft_model`, `PeftModel.from_pretrained`, `load_adapter`",
    {
        "topk_compute": supported(
            "each mixture layer's path, sparse or dense: the same outputs within float tolerance"
        ),
        **_same(_BOOKKEEPING, *_PEFT_BOOKKEEPING, "peft_xlora_version"),
        "task_type": refused(
            refuse(
                "task_type='TOKEN_CLS' is not supported: PEFT's token-classification wrapper needs `modules_to_save` "
                "for the head, which X-LoRA does not train. Build the model with task_type=None instead: the head is "
                "then used as the base model has it (frozen), as with task_type='SEQ_CLS'; see docs/models.md.",
                _TOKEN_CLS,
            ),
            note="CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, FEATURE_EXTRACTION or None",
        ),
        "inference_mode": supported("nothing trains"),
        "adapters": supported("each expert is read and checked against the model"),
        "hidden_size": supported("inferred, or checked against the model"),
        **_same(
            supported("the gate's option"),
            "enable_softmax",
            "enable_softmax_topk",
            "softmax_temperature",
            "top_k_lora",
            "global_scaling_weight",
            "router_load_balancing_coef",
            "router_entropy_coef",
            "router_distillation_temperature",
        ),
        **_same(supported("the classifier's shape"), "layerwise_scalings", "xlora_depth", "xlora_size"),
        "xlora_dropout_p": supported("dropout modules between the classifier's layers (none at 0)"),
        "classifier_init": supported("the untrained gate: uniform or random"),
        "use_trainable_adapters": supported("the stacked factors (and experts' heads) train"),
        "trainable_head": supported("a shared head beside (or instead of) the experts' heads"),
        "scaling_pass_value": supported("the experts' weight in every scaling pass"),
        "scalings_mode": refused(refuse(PROMPT_ON_SEQ2SEQ, SET & ENCODER_DECODER), note="prompt mode: decoder-only"),
        "scaling_pass_layers": refused(
            refuse(
                K_ON_SEQ2SEQ,
                SET & ENCODER_DECODER,
            ),
            refuse(
                "`routing='single_pass'` with `scaling_pass_layers={value}`: " + _GATE_NEVER_USED + ". Choose a "
                "smaller k (e.g. half the layers), or experts that adapt later layers.",
                NO_LATE_LAYER,
            ),
            note="an exit hook (dual pass) or the gate's layer (single pass)",
        ),
        "routing": refused(
            refuse(
                "`routing='single_pass'` is not supported for encoder-decoder models ({name}): each stack is routed "
                "by its own scaling pass. Use routing='dual_pass' (the default).",
                SET & ENCODER_DECODER,
            ),
            note="the router: dual pass, single pass, or encoder-decoder (chosen by the model)",
        ),
        "single_pass_static": supported("single pass: learned or uniform static weights of layers 1..k"),
        "router_distillation_coef": refused(
            refuse(
                DISTILLATION_ON_SEQ2SEQ,
                SET & ENCODER_DECODER,
            ),
            note="dual pass, decoder-only",
        ),
        "experts": supported("a checkpoint's experts: their weights come from the checkpoint"),
        "expert_order": supported("the gate's order"),
        **_same(_RUNTIME, "pins", "per_row_pins", "masks", "elastic_changes", "generate_modes"),
        "heads": supported("SEQ_CLS experts' heads are stacked in an XLoraHead (all experts bring one, or none)"),
        "encoder_decoder": supported("the encoder-decoder router: each stack gated by its own tokens"),
        "distillation": supported("dual pass, decoder-only (see router_distillation_coef)"),
    },
)

# ---------------------------------------------------------------------------------------------- update_config

_REBUILT = supported("the model is rebuilt for the new value, exactly as a model built with it")

UPDATE_CONFIG = Place(
    "update_config",
    "`update_config(**fields)` on a built model (every gating setter)",
    {
        "topk_compute": supported(
            "the mixture layers switch path at the next forward; outputs move within float tolerance"
        ),
        **_same(_BOOKKEEPING, *_PEFT_BOOKKEEPING, "peft_xlora_version"),
        **_same(
            refused(refuse(_STRUCTURAL, CHANGED)),
            "task_type",
            "inference_mode",
            "hidden_size",
            "xlora_depth",
            "xlora_size",
            "layerwise_scalings",
            "trainable_head",
            "routing",
            "single_pass_static",
        ),
        **_same(refused(refuse(_EXPERT_LIST, CHANGED)), "adapters", "experts", "expert_order"),
        **_same(
            _READ_EACH_FORWARD,
            "enable_softmax",
            "enable_softmax_topk",
            "softmax_temperature",
            "top_k_lora",
            "global_scaling_weight",
            "scaling_pass_value",
            "router_load_balancing_coef",
            "router_entropy_coef",
            "router_distillation_temperature",
        ),
        "xlora_dropout_p": _REBUILT,
        "classifier_init": irrelevant("used only when the classifier is first built"),
        "use_trainable_adapters": supported("the experts' factors and heads are made trainable or frozen"),
        "scalings_mode": refused(
            refuse(PROMPT_ON_SEQ2SEQ, CHANGED & SET & ENCODER_DECODER), note="the default of the next generate"
        ),
        "scaling_pass_layers": refused(
            refuse(
                "`scaling_pass_layers` cannot change on a single-pass model: layers 1..k hold static weights trained "
                "for that k. Build a new model with the new value (the experts and base model can be reused).",
                CHANGED & SINGLE_PASS,
            ),
            refuse(
                K_ON_SEQ2SEQ,
                CHANGED & SET & ENCODER_DECODER,
            ),
            note="dual pass: the scaling pass's exit moves, exactly as a model built with the new value",
        ),
        "router_distillation_coef": refused(
            refuse(
                DISTILLATION_ON_SEQ2SEQ,
                CHANGED & SET & ENCODER_DECODER,
            ),
            note="dual pass, decoder-only (single pass: refused with the config)",
        ),
        **_same(supported("a pinned gate ignores the gating options until it is unpinned"), "pins", "per_row_pins"),
        "masks": supported("the mask stays"),
        "heads": supported("trainable_head cannot change (its row)"),
        "encoder_decoder": supported("prompt mode, scaling_pass_layers and distillation refused (their rows)"),
        "distillation": supported("router_distillation_coef and its temperature"),
        **_same(_RUNTIME, "elastic_changes", "generate_modes"),
    },
)

# ---------------------------------------------------------------------------------------------- elastic experts

_NOT_READ = irrelevant("not read when experts change")

ADD_EXPERT = Place(
    "add_expert",
    "`add_expert(name, source)`",
    {
        "topk_compute": supported("new and rebuilt mixture layers follow it"),
        **_same(_BOOKKEEPING, *_PEFT_BOOKKEEPING, "peft_xlora_version"),
        **_same(
            _NOT_READ, "task_type", "inference_mode", "hidden_size", "xlora_depth", "xlora_size", "xlora_dropout_p"
        ),
        "classifier_init": _NOT_READ,
        "adapters": supported("the new expert is appended: the last gate output"),
        "experts": supported("its LoRA config is recorded"),
        "expert_order": supported("appended"),
        **_same(
            supported("its logit starts logit_offset below the others' mean: its share is below exp(-offset)"),
            "enable_softmax",
            "softmax_temperature",
            "top_k_lora",
            "enable_softmax_topk",
        ),
        "layerwise_scalings": supported("new mixture layers' slots start as copies of slot 0"),
        "global_scaling_weight": supported(),
        "use_trainable_adapters": supported("its factors train with the others'"),
        "trainable_head": supported("the shared head stays"),
        "scaling_pass_value": supported("other than 0 it changes every token's scaling pass: ExpertChangeWarning"),
        "scalings_mode": supported(),
        "scaling_pass_layers": supported("single pass: the new layers after k read the gate"),
        **_same(supported(), "router_load_balancing_coef", "router_entropy_coef"),
        **_same(supported(), "router_distillation_coef", "router_distillation_temperature"),
        "routing": supported("single pass: its static logit starts logit_offset below the row's mean"),
        "single_pass_static": supported("uniform: layers 1..k mix 1/n of every expert, so they change (warned)"),
        "pins": supported("the new expert is pinned at 0 (and new layers' rows at 0)"),
        "per_row_pins": supported("every row pins the new expert at 0"),
        "masks": supported("the new expert is active"),
        "heads": refused(
            refuse(
                _HEADS_ALL_OR_NONE,
                fact("head_mismatch", "the new expert brings a head exactly when the others do not"),
                ExpertError,
            ),
            note="the new expert's head joins the stacked heads",
        ),
        "encoder_decoder": supported("the new layers get the source hooks of their stack"),
        "distillation": supported("scores the new expert too"),
        "elastic_changes": supported("this place"),
        "generate_modes": _RUNTIME,
    },
)

REMOVE_EXPERT = Place(
    "remove_expert",
    "`remove_expert(name)`",
    {
        "topk_compute": supported("rebuilt mixture layers follow it"),
        **_same(_BOOKKEEPING, *_PEFT_BOOKKEEPING, "peft_xlora_version"),
        **_same(
            _NOT_READ, "task_type", "inference_mode", "hidden_size", "xlora_depth", "xlora_size", "xlora_dropout_p"
        ),
        "classifier_init": _NOT_READ,
        "adapters": refused(
            refuse(
                "{expert!r} is the only expert; X-LoRA needs at least one. Use `unload()` instead.",
                fact("last_expert", "the only expert"),
            ),
            note="its gate output goes; a softmax renormalises over the rest",
        ),
        "experts": supported("its LoRA config goes"),
        "expert_order": supported("it leaves the order"),
        **_same(
            supported("a softmax renormalises over the remaining experts"), "enable_softmax", "softmax_temperature"
        ),
        "top_k_lora": refused(
            refuse(
                "`top_k_lora={value}` would exceed the {experts_left} experts left; lower it first with "
                "`set_topk_lora`.",
                fact("top_k_exceeds", "k above the experts left"),
            ),
        ),
        "enable_softmax_topk": supported(),
        "layerwise_scalings": supported("the slots of the mixture layers only it adapted go"),
        "global_scaling_weight": supported(),
        "use_trainable_adapters": supported(),
        "trainable_head": supported("the shared head stays"),
        "scaling_pass_value": supported("other than 0 it changes every token's scaling pass: ExpertChangeWarning"),
        "scalings_mode": supported(),
        "scaling_pass_layers": refused(
            refuse(
                "removing {expert!r} would leave no mixture layer after decoder layer {value}, so the single pass's "
                "gate would never be used. Keep an expert that adapts a later layer.",
                NO_LATE_LAYER,
            ),
            note="single pass: its late layers go",
        ),
        **_same(supported(), "router_load_balancing_coef", "router_entropy_coef"),
        **_same(supported(), "router_distillation_coef", "router_distillation_temperature"),
        "routing": supported("single pass: its static logits go; the static softmax renormalises"),
        "single_pass_static": supported("uniform: 1 / (n - 1)"),
        "pins": supported("its pinned weight goes (the others are used as given)"),
        "per_row_pins": supported("its column of every row goes"),
        "masks": refused(
            refuse(
                "{expert!r} is the only active expert (`set_active_experts`); call `set_active_experts(None)` first.",
                fact("only_active", "the only active expert"),
            ),
            note="the mask loses its entry",
        ),
        "heads": supported("its head leaves the stacked heads"),
        "encoder_decoder": supported("the remaining layers keep the source hooks of their stack"),
        "distillation": supported(),
        "elastic_changes": supported("this place"),
        "generate_modes": _RUNTIME,
    },
)

# ---------------------------------------------------------------------------------------------- pins and masks

_GATE_OPTION_UNUSED = irrelevant("a pinned gate uses its weights as given: no classifier, softmax or global weight")

SET_STATIC_SCALINGS = Place(
    "set_static_scalings",
    "`set_static_scalings(weights, per_row=False)`",
    {
        "topk_compute": supported("a pin to at most top_k_lora experts runs sparse, any other pin dense"),
        **_same(_BOOKKEEPING, *_PEFT_BOOKKEEPING, "peft_xlora_version"),
        **_same(irrelevant(), "task_type", "inference_mode", "hidden_size", "xlora_depth", "xlora_size"),
        **_same(irrelevant(), "xlora_dropout_p", "classifier_init", "use_trainable_adapters", "trainable_head"),
        "adapters": supported("a dict names experts; missing ones get 0"),
        **_same(irrelevant(), "experts", "expert_order"),
        **_same(
            _GATE_OPTION_UNUSED,
            "enable_softmax",
            "enable_softmax_topk",
            "softmax_temperature",
            "top_k_lora",
            "global_scaling_weight",
        ),
        "layerwise_scalings": supported("weights may be per mixture layer, (n_layers, n_experts)"),
        "scaling_pass_value": irrelevant("no scaling pass while pinned"),
        "scaling_pass_layers": irrelevant("no scaling pass while pinned"),
        "scalings_mode": irrelevant("every token uses the pinned weights"),
        **_same(irrelevant("no gate logits while pinned"), "router_load_balancing_coef", "router_entropy_coef"),
        **_same(
            irrelevant("no gate logits while pinned"), "router_distillation_coef", "router_distillation_temperature"
        ),
        "routing": supported("single pass: every layer uses the pinned weights (no static weights, no gate)"),
        "single_pass_static": irrelevant("every layer uses the pinned weights"),
        "pins": supported("this place"),
        "per_row_pins": supported("one weight vector per batch row; every forward must have that many rows"),
        "masks": irrelevant("a pinned gate ignores the mask"),
        "heads": supported("the heads are mixed with the pinned weights"),
        "encoder_decoder": supported("both stacks use the pinned weights"),
        "distillation": supported("distillation scores the experts through per-row pins"),
        "elastic_changes": supported("pins follow added and removed experts"),
        "generate_modes": supported("generation with the pinned weights (per-row pins: one row per sequence)"),
    },
)

SET_ACTIVE_EXPERTS = Place(
    "set_active_experts",
    "`set_active_experts(names)`",
    {
        "topk_compute": supported("the sparse path computes the chosen, active experts"),
        **_same(_BOOKKEEPING, *_PEFT_BOOKKEEPING, "peft_xlora_version"),
        **_same(irrelevant(), "task_type", "inference_mode", "hidden_size", "xlora_depth", "xlora_size"),
        **_same(irrelevant(), "xlora_dropout_p", "classifier_init", "use_trainable_adapters", "trainable_head"),
        "adapters": supported("names the experts to keep"),
        **_same(irrelevant(), "experts", "expert_order"),
        "enable_softmax": supported(
            "masked experts get 0; a softmax renormalises over the rest, without one they keep theirs"
        ),
        **_same(supported("top-k chooses among the active experts"), "top_k_lora", "enable_softmax_topk"),
        **_same(supported(), "softmax_temperature", "global_scaling_weight", "layerwise_scalings"),
        "scaling_pass_value": supported("masked experts sit out the scaling pass too"),
        "scaling_pass_layers": supported(),
        "scalings_mode": supported(),
        **_same(
            supported("the regularisers still see every expert's logit (the mask is meant for inference)"),
            "router_load_balancing_coef",
            "router_entropy_coef",
        ),
        **_same(supported(), "router_distillation_coef", "router_distillation_temperature"),
        "routing": supported("single pass: the static weights renormalise over the active experts too"),
        "single_pass_static": supported("learned: softmax over the active experts' logits; uniform: 1 / n_active"),
        **_same(irrelevant("a pinned gate ignores the mask"), "pins", "per_row_pins"),
        "masks": supported("this place"),
        "heads": supported("masked experts' heads get 0"),
        "encoder_decoder": supported("both stacks"),
        "distillation": supported(),
        "elastic_changes": supported("the mask follows added (active) and removed experts"),
        "generate_modes": supported(),
    },
)

# ---------------------------------------------------------------------------------------------- saving, generating

_SAVED = supported("saved in adapter_config.json and restored on load")

SAVE_LOAD = Place(
    "save_load",
    "`save_pretrained` and every load (`PeftModel.from_pretrained`, `load_adapter`)",
    {
        "topk_compute": supported("saved with the config"),
        **_same(
            _SAVED,
            "task_type",
            "peft_type",
            "auto_mapping",
            "peft_version",
            "base_model_name_or_path",
            "revision",
            "inference_mode",
            "adapters",
            "hidden_size",
            "enable_softmax",
            "enable_softmax_topk",
            "softmax_temperature",
            "layerwise_scalings",
            "top_k_lora",
            "xlora_depth",
            "xlora_size",
            "xlora_dropout_p",
            "classifier_init",
            "use_trainable_adapters",
            "trainable_head",
            "scaling_pass_value",
            "global_scaling_weight",
            "scalings_mode",
            "scaling_pass_layers",
            "router_load_balancing_coef",
            "router_entropy_coef",
            "routing",
            "single_pass_static",
            "router_distillation_coef",
            "router_distillation_temperature",
            "experts",
            "expert_order",
            "peft_xlora_version",
        ),
        **_same(irrelevant("runtime state: not saved"), "pins", "per_row_pins", "masks", "generate_modes"),
        "heads": supported("each expert's head under its own key, the shared head beside"),
        "encoder_decoder": supported(),
        "distillation": irrelevant("a training term"),
        "elastic_changes": supported("the new experts and shapes are saved and reload exactly"),
    },
)

GENERATE = Place(
    "generate",
    "`generate(..., scalings_mode=None)` and cached forwards",
    {
        "topk_compute": supported("cached decoding steps have few tokens: auto uses the decoding threshold"),
        **_same(_BOOKKEEPING, *_PEFT_BOOKKEEPING, "peft_xlora_version"),
        **_same(irrelevant(), "task_type", "inference_mode", "hidden_size", "xlora_depth", "xlora_size"),
        **_same(irrelevant(), "xlora_dropout_p", "classifier_init", "use_trainable_adapters", "trainable_head"),
        **_same(irrelevant(), "adapters", "experts", "expert_order"),
        **_same(
            _READ_EACH_FORWARD,
            "enable_softmax",
            "enable_softmax_topk",
            "softmax_temperature",
            "top_k_lora",
            "global_scaling_weight",
            "layerwise_scalings",
        ),
        "scaling_pass_value": supported("the scaling pass keeps its own KV cache"),
        "scaling_pass_layers": supported("the shortened scaling pass caches its layers"),
        "scalings_mode": supported("the default mode; prompt mode is refused where generate_modes says"),
        **_same(irrelevant("training terms"), "router_load_balancing_coef", "router_entropy_coef"),
        **_same(irrelevant("training terms"), "router_distillation_coef", "router_distillation_temperature"),
        "routing": supported("single pass: the model's own cache, exact"),
        "single_pass_static": supported(),
        "pins": supported("the pinned weights for every token"),
        "per_row_pins": supported("one row per sequence; beam search (more rows) is refused at the forward"),
        "masks": supported(),
        "heads": irrelevant("classification models do not generate"),
        "encoder_decoder": supported("both passes' caches, self- and cross-attention"),
        "distillation": irrelevant("a training term"),
        "elastic_changes": supported(),
        "generate_modes": refused(
            refuse(PROMPT_ON_SINGLE_PASS, PROMPT_MODE & SINGLE_PASS),
            refuse(PROMPT_ON_SEQ2SEQ, PROMPT_MODE & ENCODER_DECODER),
            note="token mode everywhere; prompt mode for dual-pass decoder-only models",
        ),
    },
)

for _place in (
    CONFIG,
    BUILD,
    UPDATE_CONFIG,
    ADD_EXPERT,
    REMOVE_EXPERT,
    SET_STATIC_SCALINGS,
    SET_ACTIVE_EXPERTS,
    SAVE_LOAD,
    GENERATE,
):
    register_place(_place)


# ---------------------------------------------------------------------------------------------- situations


def features_of(tuner: Any) -> frozenset[str]:
    """The named features a built model uses now."""
    on = set()
    pins = tuner._static_scalings
    if pins is not None:
        on.add("per_row_pins" if pins.dim() == 3 else "pins")
    if tuner._active_experts is not None:
        on.add("masks")
    if any(True for _ in head_mixtures(tuner.model)):
        on.add("heads")
    if tuner.router.mode == "encoder_decoder":
        on.add("encoder_decoder")
    if tuner.xlora_config.router_distillation_coef:
        on.add("distillation")
    return frozenset(on)


def situation_of(tuner: Any, config: Any = None, **kwargs: Any) -> Situation:
    """The situation of a built model (the `XLoraModel` `tuner`), for `combinations.check`.

    Args:
        tuner: The `XLoraModel`.
        config: The config to judge (default the model's own).
        **kwargs: `Situation` fields to set (`changes`, `late_layers`, `facts`, extra `features`).
    """
    extra = kwargs.pop("features", frozenset())
    return Situation(
        config=tuner.xlora_config if config is None else config,
        features=features_of(tuner) | frozenset(extra),
        routing=tuner.router.mode,
        model_name=type(tuner.model).__name__,
        late_layers=kwargs.pop("late_layers") if "late_layers" in kwargs else tuner.router.late_layer_count(),
        **kwargs,
    )


def with_changes(config: Any, changes: dict[str, Any]) -> Any:
    """A shallow copy of `config` with `changes` applied, to judge them before they are made."""
    new = copy.copy(config)
    for name, value in changes.items():
        setattr(new, name, value)
    return new
