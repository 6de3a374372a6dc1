"""Training helpers: optimizer parameter groups (classifier and experts apart), and the distillation-only loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .distillation import distillation_term
from .model import find_tuner


def optimizer_param_groups(
    model: nn.Module, classifier_lr: float, experts_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Parameter groups for a torch optimizer: the classifier at one learning rate, trainable experts at another.

    The groups are declared (the classifier module, each mixture layer's `adapter_layer_names`), not picked by name.
    Frozen parameters are left out. Use with any optimizer, e.g.
    `torch.optim.AdamW(optimizer_param_groups(model, 1e-3, 1e-4))`, and give it to `Trainer(optimizers=(opt, None))`.

    Args:
        model: The X-LoRA model (PeftModel or wrapped).
        classifier_lr: Learning rate of the gating classifier.
        experts_lr: Learning rate of the experts' stacked LoRA factors (with `use_trainable_adapters=True`); None
            uses `classifier_lr`.
        weight_decay: Weight decay of both groups.

    Returns:
        One group per kind that has trainable parameters: `{"params", "lr", "weight_decay", "name"}`.
    """
    xlora = find_tuner(model)
    classifier = [p for p in xlora.xlora_classifier.parameters() if p.requires_grad]
    experts = [
        p
        for layer in xlora.mixture_layers()
        for name in layer.adapter_layer_names
        if (p := getattr(layer, name)).requires_grad
    ]
    groups = []
    if classifier:
        groups.append({"params": classifier, "lr": classifier_lr, "weight_decay": weight_decay, "name": "classifier"})
    if experts:
        lr = classifier_lr if experts_lr is None else experts_lr
        groups.append({"params": experts, "lr": lr, "weight_decay": weight_decay, "name": "experts"})
    if not groups:
        raise ValueError("Nothing in this X-LoRA model trains (loaded with inference_mode=True?).")
    return groups


def distillation_loss(model: nn.Module, labels: torch.Tensor | None = None, **inputs: Any) -> torch.Tensor:
    """The router distillation term alone, for a pretraining phase of the gate: no main pass, no language-model loss.

    Runs the scaling pass and the classifier (with gradient), scores every expert alone on the same tokens (one
    batched forward, no gradient), and returns the cross-entropy between the gate and the soft target
    softmax(-loss / `router_distillation_temperature`) (see `peft_xlora.core.distillation`). Works with any
    `router_distillation_coef` (0 included): the term is returned unweighted. In a `Trainer`, override
    `compute_loss` to return `distillation_loss(model, **inputs)`.

    Args:
        model: The X-LoRA model (PeftModel or wrapped).
        labels: (batch, seq) next-token labels as transformers takes them (-100: no label); default the inputs.
        **inputs: The model's forward inputs: `input_ids` (or `inputs_embeds`), optionally `attention_mask`, ...

    Returns:
        A float32 scalar with the classifier's gradient.

    Raises:
        ValueError: Neither labels nor `input_ids` are given, or the gate is pinned with `set_static_scalings`.
    """
    xlora = find_tuner(model)
    if labels is None:
        labels = inputs.get("input_ids")
    if labels is None:
        raise ValueError("distillation_loss needs `labels` (or `input_ids` to use as labels).")
    if xlora._static_scalings is not None:
        raise ValueError("The gate is pinned (set_static_scalings): unpin it with set_static_scalings(None) first.")
    inputs = {k: v for k, v in inputs.items() if k not in ("use_cache", "past_key_values", "return_dict")}
    hidden = xlora._scaling_pass((), inputs)  # (batch, seq, hidden), no gradient
    with torch.autocast(hidden.device.type, enabled=False):  # the gate in float32, as in the forward
        logits = xlora.xlora_classifier(hidden)  # (batch, seq, n_layers|1, n_experts)
    return distillation_term(xlora, logits, (), inputs, labels)  # the experts' scoring under the caller's autocast
