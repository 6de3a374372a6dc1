"""Training helpers: optimizer parameter groups, the distillation-only loss, the router regularisers under TRL."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .distillation import distillation_term
from .heads import head_mixtures
from .model import find_tuner, find_tuners
from .regularisers import router_loss_applied_by_trainer


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


class RouterLossMixin:
    """Adds X-LoRA's router regularisers to the loss of a trainer that computes its loss itself (TRL's trainers).

    `Trainer` takes `output.loss`, which already holds the regularisers. TRL's `SFTTrainer` computes its loss from the
    per-token log-probabilities of its fused LM head and never reads `output.loss`; put this class first in the bases
    (`class MyTrainer(RouterLossMixin, SFTTrainer)`, or use `XLoraSFTTrainer`) and the weighted regularisers of the
    step's forward (`output.router_loss`) are added to the loss it returns. While it computes the loss, the model
    leaves `output.loss` without them, so a trainer that also reads `output.loss` (plain `Trainer`, TRL's
    sequence-parallel path) counts them once. Under gradient accumulation they weigh as in `Trainer`: a forward that
    was given the step's `num_items_in_batch` weighed them by its share of the step's label tokens already; otherwise,
    like TRL's own MoE auxiliary loss, they are a per-micro-batch mean divided by the accumulation steps when the loss
    is normalised by the token count of the whole accumulated batch.
    """

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The trainer's own loss plus the X-LoRA router regularisers of the forward that computed it."""
        captured: list[tuple[torch.Tensor, bool]] = []  # (router loss, weighed by the forward for accumulation)
        counted: list[bool] = []

        def seen(module: nn.Module, args: tuple, kwargs: dict) -> None:
            counted.append(kwargs.get("num_items_in_batch") is not None)  # see regularisers.for_accumulated_batch

        def keep(module: nn.Module, args: tuple, output: Any) -> None:
            weighed = counted.pop() if counted else False
            if isinstance(output, Mapping) and output.get("router_loss") is not None:
                captured.append((output["router_loss"], weighed))

        # Registered after the tuner's own hook, so they see the `router_loss` it adds to the output.
        handles = [t.model.register_forward_hook(keep) for t in find_tuners(model)]
        handles += [t.model.register_forward_pre_hook(seen, with_kwargs=True) for t in find_tuners(model)]
        try:
            with router_loss_applied_by_trainer():
                result = super().compute_loss(  # type: ignore[misc]
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
        finally:
            for handle in handles:
                handle.remove()
        if not captured:
            return result
        # The forward the loss came from is the first that built a graph (TRL may run more, without grad, for its
        # metrics); without grad (evaluation) it is the first.
        router_loss, weighed = next((r for r in captured if r[0].requires_grad), captured[0])
        if num_items_in_batch is not None and not weighed:
            router_loss = router_loss / getattr(self, "current_gradient_accumulation_steps", 1)
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + router_loss.to(loss.device)
        return (loss, outputs) if return_outputs else loss


@functools.cache
def sft_trainer_class() -> type:
    """`peft_xlora.XLoraSFTTrainer`: TRL's `SFTTrainer` with `RouterLossMixin`; imports `trl` on first use."""
    try:
        from trl import SFTTrainer
    except ImportError as exc:
        raise ImportError(
            "XLoraSFTTrainer needs TRL: `pip install 'trl>=1.16,<2'` (peft-xlora's `trl` extra)."
        ) from exc

    class XLoraSFTTrainer(RouterLossMixin, SFTTrainer):
        """TRL's `SFTTrainer` that also trains with X-LoRA's router regularisers (see `RouterLossMixin`)."""

    XLoraSFTTrainer.__module__ = "peft_xlora"
    return XLoraSFTTrainer


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
        ValueError: Neither labels nor `input_ids` are given, the gate is pinned with `set_static_scalings`, or the
            model routes in a single pass or is an encoder-decoder model.
    """
    xlora = find_tuner(model)
    if xlora.xlora_config.routing != "dual_pass" or getattr(xlora.model.config, "is_encoder_decoder", False):
        raise ValueError(
            "distillation_loss runs X-LoRA's scaling pass of a decoder-only model: single-pass routing and "
            "encoder-decoder models are not supported. Use routing='dual_pass' for the distillation phase."
        )
    if labels is None:
        labels = inputs.get("input_ids")
    if labels is None:
        raise ValueError("distillation_loss needs `labels` (or `input_ids` to use as labels).")
    if xlora._static_scalings is not None:
        raise ValueError("The gate is pinned (set_static_scalings): unpin it with set_static_scalings(None) first.")
    inputs = {k: v for k, v in inputs.items() if k not in ("use_cache", "past_key_values", "return_dict")}
    hidden = xlora.router.scaling_pass((), inputs)  # (batch, seq, hidden), no gradient
    with torch.autocast(hidden.device.type, enabled=False):  # the gate in float32, as in the forward
        logits = xlora.xlora_classifier(hidden)  # (batch, seq, n_layers|1, n_experts)
    return distillation_term(xlora, logits, (), inputs, labels)  # the experts' scoring under the caller's autocast
