"""Training helpers: optimizer parameter groups with separate learning rates for the classifier and the experts."""

from __future__ import annotations

from typing import Any

from torch import nn

from .heads import head_mixtures
from .model import find_tuner


def optimizer_param_groups(
    model: nn.Module, classifier_lr: float, experts_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Parameter groups for a torch optimizer: the classifier at one learning rate, trainable experts at another.

    The groups are declared (the classifier module, each mixture layer's `adapter_layer_names`), not picked by name.
    A classification model's shared head (`trainable_head`) goes with the classifier, the experts' own heads with
    the experts. Frozen parameters are left out. Use with any optimizer, e.g.
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
    heads = [head for _, head in head_mixtures(xlora.model)]
    shared = [p for head in heads if head.xlora_shared_head is not None for p in head.xlora_shared_head.parameters()]
    classifier = [p for p in (*xlora.xlora_classifier.parameters(), *shared) if p.requires_grad]
    experts = [
        p
        for layer in xlora.mixture_layers()
        for name in layer.adapter_layer_names
        if (p := getattr(layer, name)).requires_grad
    ]
    experts += [p for head in heads for p in head.expert_parameters() if p.requires_grad]
    groups = []
    if classifier:
        groups.append({"params": classifier, "lr": classifier_lr, "weight_decay": weight_decay, "name": "classifier"})
    if experts:
        lr = classifier_lr if experts_lr is None else experts_lr
        groups.append({"params": experts, "lr": lr, "weight_decay": weight_decay, "name": "experts"})
    if not groups:
        raise ValueError("Nothing in this X-LoRA model trains (loaded with inference_mode=True?).")
    return groups
