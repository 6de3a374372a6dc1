"""Export out of peft-xlora: the original/mistral.rs X-LoRA layout, and a plain LoRA equal to a pinned gate.

mistral.rs (and the original `xlora` package) read an X-LoRA model as

    xlora_config.json               hidden_size, base_model_id, adapters (names, gate order), gating options
    xlora_classifier.safetensors    inner.<i>.{weight,bias} for the i-th hidden linear layer, last.{weight,bias}
    <expert>/adapter_config.json    each expert as a standard PEFT LoRA adapter
    <expert>/adapter_model.safetensors
    xlora-ordering.json             {"order": [expert names], "layers": {module name: classifier index},
                                     "base_model_id": ...}; mistral.rs takes it as its ordering file

`export_lora` writes one PEFT LoRA adapter whose update, on every module, is the experts' updates summed with fixed
weights: its A stacks the experts' A factors, its B their B factors times weight and scale, so its rank on a module
is the sum of the ranks of the experts there. Engines that serve only LoRA can serve it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from ..core.combinations import (
    SET,
    Condition,
    Place,
    check,
    fact,
    irrelevant,
    refuse,
    refused,
    register_place,
    supported,
)
from ..core.heads import head_mixtures
from ..core.model import XLoraModel, find_tuner
from ..core.places import situation_of
from ..core.state_dict import rank_bounds
from .files import write_folder

ORDERING_NAME = "xlora-ordering.json"


def _layers_by_name(tuner) -> list[tuple[str, Any]]:
    return [(name, tuner.model.get_submodule(name)) for name in tuner.mixture_layer_names]


# What `export_mistralrs` does with every `XLoraConfig` field: written (`xlora_config.json` carries it and mistral.rs
# and the original package compute it as peft-xlora does), irrelevant (no effect on the exported model's outputs), or
# refused unless at its default (the layout has no way to say it, so the exported model would compute other outputs).
# With the named features, these make the mistral.rs column of the table of what combines (`MISTRALRS_PLACE` below,
# registered in `core.combinations`; tests/contract/test_combination_table.py checks that nothing is left unplaced).
MISTRALRS_WRITTEN = (
    "adapters",
    "expert_order",
    "experts",
    "hidden_size",
    "enable_softmax",
    "softmax_temperature",
    "layerwise_scalings",
    "top_k_lora",
    "xlora_depth",
    "xlora_size",
    "scaling_pass_value",
    "global_scaling_weight",
    "use_trainable_adapters",
)
_MISTRALRS_IRRELEVANT = {
    "single_pass_static": "single-pass routing only, which is refused",
    "xlora_dropout_p": "written as 0: mistral.rs applies the classifier's dropout at inference too",
    "classifier_init": "only the untrained classifier",
    "topk_compute": "how top_k_lora is computed (dense or sparse): the same outputs within float tolerance",
    "router_load_balancing_coef": "a training term",
    "router_entropy_coef": "a training term",
    "router_distillation_coef": "a training term",
    "router_distillation_temperature": "a training term",
    "peft_xlora_version": "bookkeeping",
}
MISTRALRS_IRRELEVANT = tuple(_MISTRALRS_IRRELEVANT)
# Refused unless at this value.
MISTRALRS_REFUSED = {
    "scaling_pass_layers": (
        None,
        "the layout always runs the whole model in the scaling pass, so the classifier would read another hidden "
        "state than the one it was trained on (the default scaling_pass_layers='auto' stops at two thirds of a "
        "generative decoder-only model's layers; build and train with scaling_pass_layers=None for a model this "
        "layout holds)",
    ),
    "scalings_mode": (
        "token",
        "the layout has no prompt mode: mistral.rs and the original package compute new scalings for every token",
    ),
    "enable_softmax_topk": (
        False,
        "mistral.rs refuses it ('`enable_softmax_topk` is not implemented') and the original package applies it "
        "across the whole batch",
    ),
    "routing": (
        "dual_pass",
        "mistral.rs runs X-LoRA's dual pass only; single-pass routing (static weights in the first "
        "scaling_pass_layers layers, the gate on their output) has no place in its layout",
    ),
    "trainable_head": (
        False,
        "the layout has no classification heads (mistral.rs serves causal language models only)",
    ),
}


def _not_default(default: Any) -> Condition:
    return Condition(f"other than {default!r}", lambda s, row: s.value(row) != default)


_PINNED = "the gate is pinned (`set_static_scalings`): the layout holds the learned classifier, not fixed weights"
_BOOKKEEPING = ("peft_type", "auto_mapping", "peft_version", "revision", "inference_mode")

MISTRALRS_PLACE = Place(
    "export_mistralrs",
    "`export_mistralrs`: the mistral.rs / original X-LoRA layout",
    {
        **dict.fromkeys(MISTRALRS_WRITTEN, supported("written to xlora_config.json")),
        **{name: irrelevant(why) for name, why in _MISTRALRS_IRRELEVANT.items()},
        **{
            name: refused(refuse(f"`{name}={{value!r}}`: {why}", _not_default(default)), note=f"{default!r} only")
            for name, (default, why) in MISTRALRS_REFUSED.items()
        },
        "task_type": irrelevant("the heads and encoder-decoder rows refuse what is not a causal LM"),
        "base_model_name_or_path": supported("the base model id mistral.rs checks, unless `base_model_id` is given"),
        **dict.fromkeys(_BOOKKEEPING, irrelevant("bookkeeping")),
        "pins": refused(refuse(_PINNED, SET)),
        "per_row_pins": refused(refuse(_PINNED, SET)),
        "masks": irrelevant("runtime state: the export gates every expert"),
        "heads": refused(
            refuse(
                "export_mistralrs writes the X-LoRA layout mistral.rs serves, which has no classification heads; "
                "this model mixes its experts' heads (or trains a shared one): keep it as a peft-xlora checkpoint "
                "(`save_pretrained`), or pin the gate and write one plain LoRA with its head (`export_lora`)",
                SET,
            )
        ),
        "encoder_decoder": refused(
            refuse(
                "mistral.rs serves X-LoRA for decoder-only causal language models, and this is an encoder-decoder "
                "model ({name})",
                SET,
            )
        ),
        "distillation": irrelevant("a training term"),
        "elastic_changes": supported("the experts the model has now are written"),
        "generate_modes": irrelevant("mistral.rs routes every token (see scalings_mode)"),
    },
    prefix="export_mistralrs cannot write this model in the mistral.rs / original X-LoRA layout: ",
    suffix=(
        ". To serve it elsewhere, export a plain LoRA equal to the mixture at fixed weights with "
        "`peft_xlora.export_lora(model, folder, weights={...})` (`peft-xlora export --format lora`), or build "
        "(and train) the model without these options."
    ),
    layer="io",
)

_GATE_REPLACED = irrelevant("the fixed weights replace the gate")
LORA_PLACE = Place(
    "export_lora",
    "`export_lora`: one plain PEFT LoRA at fixed weights",
    {
        **dict.fromkeys((*_BOOKKEEPING, "peft_xlora_version"), irrelevant("bookkeeping")),
        "task_type": supported("the exported LoRA's task type"),
        "base_model_name_or_path": supported("recorded in the exported LoRA"),
        "adapters": supported("a dict of weights names experts; missing ones get 0"),
        "experts": supported("each expert's factors, times its weight and scale"),
        "expert_order": supported("the order of a weights tensor"),
        "hidden_size": irrelevant("no classifier in a plain LoRA"),
        **dict.fromkeys(
            (
                "enable_softmax",
                "enable_softmax_topk",
                "softmax_temperature",
                "top_k_lora",
                "xlora_depth",
                "xlora_size",
                "xlora_dropout_p",
                "classifier_init",
                "scaling_pass_value",
                "scaling_pass_layers",
                "scalings_mode",
                "global_scaling_weight",
                "router_load_balancing_coef",
                "router_entropy_coef",
                "router_distillation_coef",
                "router_distillation_temperature",
                "single_pass_static",
                "topk_compute",
            ),
            _GATE_REPLACED,
        ),
        "layerwise_scalings": supported("weights may be per mixture layer, (n_layers, n_experts)"),
        "use_trainable_adapters": supported("the experts' factors as trained"),
        "trainable_head": supported("the shared head is added to the mixed head"),
        "routing": supported("single pass: every layer at the fixed weights, as a pinned single-pass model"),
        "pins": supported("without `weights`, the weights the model is pinned to"),
        "per_row_pins": refused(
            refuse(
                "The model is pinned to per-row weights (set_static_scalings(..., per_row=True)); one LoRA holds one "
                "mixture: pass `weights` (expert name -> weight) or pin shared weights first.",
                SET & fact("no_weights", "without `weights`"),
            ),
            note="with explicit `weights`",
        ),
        "masks": irrelevant("the fixed weights are used as given"),
        "heads": supported("one head in modules_to_save: sum_e w_e * head_e (the last mixture layer's weights)"),
        "encoder_decoder": supported("both stacks at the fixed weights, as a pinned encoder-decoder model"),
        "distillation": irrelevant("a training term"),
        "elastic_changes": supported("the experts the model has now"),
        "generate_modes": irrelevant("a plain LoRA has one mixture for every token"),
    },
    layer="io",
)

register_place(MISTRALRS_PLACE)
register_place(LORA_PLACE)


def _check_folder_names(names: list[str]) -> None:
    for name in names:
        if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError(f"Expert name {name!r} cannot be a folder name; rename the expert before exporting.")


def expert_state_dicts(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Each expert's factors as a standard PEFT LoRA state dict (keys as in `adapter_model.safetensors`).

    Args:
        model: The X-LoRA `PeftModel`.

    Returns:
        Expert name -> {``base_model.model.<module>.lora_A.weight``: (r, in), ``...lora_B.weight``: (out, r)},
        with ``lora_embedding_A`` / ``lora_embedding_B`` for embeddings.
    """
    tuner = find_tuner(model)
    out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in tuner.expert_names}
    for module, layer in _layers_by_name(tuner):
        names = ("lora_embedding_A", "lora_embedding_B") if layer.is_embedding else ("lora_A.weight", "lora_B.weight")
        for position, index in enumerate(layer.expert_indices):
            start, stop = rank_bounds(layer, position)
            prefix = f"base_model.model.{module}."
            out[tuner.expert_names[index]][prefix + names[0]] = layer.xlora_A[start:stop].detach().cpu().clone()
            out[tuner.expert_names[index]][prefix + names[1]] = layer.xlora_B[:, start:stop].detach().cpu().clone()
    return out


def _expert_config(config, name: str) -> dict[str, Any]:
    out = dict(config.experts[name])
    out["base_model_name_or_path"] = config.base_model_name_or_path
    out["inference_mode"] = True
    return out


def export_mistralrs(model: nn.Module, directory: str | os.PathLike, base_model_id: str | None = None) -> None:
    """Writes the X-LoRA model in the layout of the original `xlora` package and mistral.rs.

    The classifier is written with `use_bias` and `enable_relu_and_dropout` true (peft-xlora's classifier always has
    both) and `xlora_dropout_p` 0: mistral.rs applies the classifier's dropout at inference too. Pass
    ``--order <directory>/xlora-ordering.json`` to mistral.rs.

    Args:
        model: The X-LoRA `PeftModel`.
        directory: Output folder: new, empty, or a previous export (replaced atomically); anything else is refused.
        base_model_id: Hub id of the base model, which mistral.rs checks; the config's `base_model_name_or_path`
            when None.

    Raises:
        ValueError: The layout cannot represent the model (`scaling_pass_layers`, `scalings_mode="prompt"`,
            `enable_softmax_topk`, single-pass routing, a pinned gate, classification heads, an encoder-decoder
            model: the message names each and says what to do instead; see docs/combinations.md), an expert name
            cannot be a folder name, or the base model id is unknown.
    """
    tuner = find_tuner(model)
    config = tuner.xlora_config
    check(MISTRALRS_PLACE.name, situation_of(tuner))
    names = list(tuner.expert_names)
    _check_folder_names(names)
    base_model_id = base_model_id or config.base_model_name_or_path
    if not base_model_id:
        raise ValueError("mistral.rs needs the base model's id: pass `base_model_id` (e.g. 'mistralai/Mistral-7B').")
    linears = [m for m in tuner.xlora_classifier.layers if isinstance(m, nn.Linear)]
    classifier: dict[str, torch.Tensor] = {}
    for i, linear in enumerate(linears):
        prefix = "last" if i == len(linears) - 1 else f"inner.{i}"
        classifier[f"{prefix}.weight"] = linear.weight.detach().cpu().clone()
        classifier[f"{prefix}.bias"] = linear.bias.detach().cpu().clone()
    xlora_config = {
        "hidden_size": config.hidden_size,
        "base_model_id": base_model_id,
        "adapters": names,
        "layerwise_scalings": config.layerwise_scalings,
        "enable_relu_and_dropout": True,
        "use_bias": True,
        "xlora_depth": config.xlora_depth,
        "xlora_size": config.xlora_size,
        "xlora_dropout_p": 0.0,
        "enable_softmax": config.enable_softmax,
        "enable_softmax_topk": False,  # True is refused above
        "softmax_temperature": config.softmax_temperature,
        "top_k_lora": config.top_k_lora,
        "scaling_pass_value": config.scaling_pass_value,
        "global_scaling_weight": config.global_scaling_weight,
        "use_trainable_adapters": config.use_trainable_adapters,
        "stop_token_id": None,
    }
    ordering = {
        "order": names,
        "layers": {name: i for i, name in enumerate(tuner.mixture_layer_names)},
        "base_model_id": base_model_id,
    }
    experts = expert_state_dicts(model)

    def write(tmp: str) -> None:
        _write_json(os.path.join(tmp, "xlora_config.json"), xlora_config)
        _write_json(os.path.join(tmp, ORDERING_NAME), ordering)
        save_file(classifier, os.path.join(tmp, "xlora_classifier.safetensors"), metadata={"format": "pt"})
        for name in names:
            os.makedirs(os.path.join(tmp, name))
            _write_json(os.path.join(tmp, name, "adapter_config.json"), _expert_config(config, name))
            save_file(experts[name], os.path.join(tmp, name, "adapter_model.safetensors"), metadata={"format": "pt"})

    write_folder(directory, write)


def export_lora(
    model: nn.Module,
    directory: str | os.PathLike,
    weights: dict[str, float] | torch.Tensor | None = None,
) -> None:
    """Writes a plain PEFT LoRA adapter equal to the mixture with the gate pinned to `weights`.

    On each module the adapter computes ``sum_e w_e * scale_e * B_e A_e x``, exactly what the X-LoRA model computes
    after `set_static_scalings(weights)`. Its rank is the largest sum of expert ranks on one module (modules with
    fewer experts are zero-padded), and `lora_alpha` equals the rank so that PEFT's own scale is 1. A model that
    mixes its experts' classification heads gets one head in `modules_to_save`: ``sum_e w_e * head_e`` (the last
    mixture layer's weights when they are per layer), plus the shared head if it trains one.

    Args:
        model: The X-LoRA `PeftModel`.
        directory: Output folder: new, empty, or a previous export (replaced atomically); anything else is refused.
        weights: As for `XLoraModel.set_static_scalings`: expert name -> weight, or a tensor (n_experts,) or
            (n_layers, n_experts). None uses the weights the model is pinned to now.

    Raises:
        ValueError: No weights are given and the model is not pinned.
    """
    tuner = find_tuner(model)
    check(LORA_PLACE.name, situation_of(tuner, facts={"no_weights": weights is None}))
    pinned = tuner._static_scalings
    if weights is not None:
        tuner.set_static_scalings(weights)
        static = tuner._static_scalings
        tuner._static_scalings = pinned
    elif pinned is None:
        raise ValueError("Pass `weights` (expert name -> weight), or pin the model first with set_static_scalings.")
    else:
        static = pinned
    static = static.detach().cpu().float()  # (n_layers|1, n_experts): the table refused per-row pins above
    layers = _layers_by_name(tuner)
    # One rank for every module, so that engines without per-module ranks can serve it: modules with fewer experts
    # are padded with zero rows of A and zero columns of B, which add nothing.
    rank = max(sum(layer.ranks) for _, layer in layers)
    state: dict[str, torch.Tensor] = {}
    for module, layer in layers:
        slot = layer.layer_index if static.shape[0] > 1 else 0
        a = torch.zeros(rank, layer.in_features)  # (rank, in)
        b = torch.zeros(layer.out_features, rank)  # (out, rank)
        for position, index in enumerate(layer.expert_indices):
            start, stop = rank_bounds(layer, position)
            factor = float(static[slot, index]) * float(layer.rank_scale[start])
            a[start:stop] = layer.xlora_A[start:stop].detach().float().cpu()
            b[:, start:stop] = layer.xlora_B[:, start:stop].detach().float().cpu() * factor
        names = ("lora_embedding_A", "lora_embedding_B") if layer.is_embedding else ("lora_A.weight", "lora_B.weight")
        state[f"base_model.model.{module}.{names[0]}"] = a.to(layer.xlora_A.dtype)
        state[f"base_model.model.{module}.{names[1]}"] = b.to(layer.xlora_B.dtype)
    config = tuner.xlora_config
    heads = _pinned_heads(tuner, static)
    state.update(heads)
    lora = LoraConfig(
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        target_modules=sorted(name for name, _ in layers),  # full names: each matches only itself
        r=rank,
        lora_alpha=rank,  # PEFT's scale alpha / r = 1: the weights and expert scales are already in B
        lora_dropout=0.0,
        inference_mode=True,
        modules_to_save=sorted({key.removeprefix("base_model.model.").rpartition(".")[0] for key in heads}) or None,
    )

    def write(tmp: str) -> None:
        lora.save_pretrained(tmp)
        save_file(state, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})

    write_folder(directory, write)


def _pinned_heads(tuner: XLoraModel, static: torch.Tensor) -> dict[str, torch.Tensor]:
    """The classification head of the pinned gate, as PEFT saves a `modules_to_save` head; empty without heads."""
    out = {}
    for name, head in head_mixtures(tuner.model):
        w = static[-1]  # (n_experts,): the slot the head uses, the last mixture layer's when per layer
        for part in ("weight", "bias"):
            stacked = getattr(head, f"xlora_head_{part}")  # (E, labels, hidden) or (E, labels)
            shared = getattr(head.xlora_shared_head, part, None)
            if stacked is None and shared is None:
                continue
            total = 0.0
            if stacked is not None:
                for e in range(stacked.shape[0]):  # in gate order, like the mixture's forward
                    total = total + stacked[e].detach().float().cpu() * float(w[e])
            if shared is not None:
                total = total + shared.detach().float().cpu()
            dtype = (stacked if stacked is not None else shared).dtype
            out[f"base_model.model.{name}.{part}"] = total.to(dtype)
    return out


def _write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
