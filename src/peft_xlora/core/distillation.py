"""Router distillation from the experts' own losses (off by default: `XLoraConfig.router_distillation_coef`).

For each training token, every expert is scored alone (the gate pinned to that expert, no gradient): its loss on the
next token says how well it knows this place in the text. The per-token losses become a soft target over the experts,
``q = softmax(-loss / T)`` (T = `router_distillation_temperature`, in nats: a small T picks the best expert, a large
one spreads the target), and the term is the cross-entropy between that target and the gate's own distribution
``p = softmax(logits / softmax_temperature)``, ``-sum_e q_e log p_e``, averaged over the tokens that have a label and
over the layer slots. It teaches the gate the routing the experts' losses show, which the language-model loss only
reaches through the mixture.

All experts are scored in one batched forward: the batch is repeated once per expert along the rows, and each copy
is pinned to its expert with per-row static scalings (`set_static_scalings(..., per_row=True)`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # labels that do not count, as in transformers

# Keyword arguments with one row per batch row, repeated with the inputs for the experts' scoring forward.
_ROW_KWARGS = ("attention_mask", "position_ids", "token_type_ids")


@torch.no_grad()
def expert_token_losses(tuner: Any, args: tuple, kwargs: dict, labels: torch.Tensor) -> torch.Tensor:
    """Each expert's loss on every next token, with the gate pinned to that expert alone.

    Args:
        tuner: The `XLoraModel`.
        args: Positional arguments of the model's forward (the inputs first, if positional).
        kwargs: Keyword arguments of the model's forward (`input_ids` or `inputs_embeds`, `attention_mask`, ...).
        labels: (batch, seq) next-token labels as transformers takes them (shifted inside), -100 where none.

    Returns:
        (batch, seq - 1, n_experts) float32 losses; position t is the loss of predicting label t + 1.
    """
    n = len(tuner.expert_names)
    inputs = kwargs.get("input_ids", args[0] if args else None)
    name = "input_ids"
    if inputs is None:
        inputs, name = kwargs.get("inputs_embeds"), "inputs_embeds"
    batch = inputs.shape[0]
    repeat = {name: inputs.repeat(n, *([1] * (inputs.dim() - 1)))}  # rows: expert-major, (n * batch, seq[, hidden])
    for key in _ROW_KWARGS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[0] == batch:
            repeat[key] = value.repeat(n, 1)
    device = tuner.xlora_classifier.layers[0].weight.device
    pins = torch.eye(n, device=device).repeat_interleave(batch, dim=0)  # (n * batch, n_experts)
    saved = tuner._static_scalings
    tuner.set_static_scalings(pins, per_row=True)
    try:
        logits = tuner.model(**repeat, use_cache=False).logits  # (n * batch, seq, vocab)
    finally:
        tuner._static_scalings = saved
    targets = labels[:, 1:].to(logits.device).repeat(n, 1)  # (n * batch, seq - 1)
    losses = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (n * batch, seq - 1)
    return losses.view(n, batch, -1).permute(1, 2, 0)  # (batch, seq - 1, n_experts)


def soft_targets(losses: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distillation target over experts, softmax(-loss / T), (..., n_experts) float32."""
    return torch.softmax(-losses.float() / temperature, dim=-1)


def gate_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, softmax_temperature: float, valid: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy between the targets and the gate's distribution over the valid tokens and layer slots.

    Args:
        logits: Classifier logits, (batch, seq, n_layers|1, n_experts); the last position has no next token.
        targets: (batch, seq - 1, n_experts) soft targets.
        softmax_temperature: The gate's softmax temperature.
        valid: (batch, seq - 1) bool, the positions whose next token has a label.

    Returns:
        A float32 scalar, differentiable with respect to `logits`.
    """
    log_p = torch.log_softmax(logits[:, :-1].float() / softmax_temperature, dim=-1)  # (batch, seq - 1, slots, E)
    per_token = -(targets.to(log_p.device)[:, :, None, :] * log_p).sum(-1).mean(-1)  # (batch, seq - 1)
    weight = valid.to(per_token.device).float()
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


def distillation_term(tuner: Any, logits: torch.Tensor, args: tuple, kwargs: dict, labels: torch.Tensor) -> Any:
    """The unweighted distillation term of one forward, from its classifier logits (batch, seq, slots, E)."""
    config = tuner.xlora_config
    losses = expert_token_losses(tuner, args, kwargs, labels)  # (batch, seq - 1, E)
    valid = labels[:, 1:] != IGNORE_INDEX
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == labels.shape:
        valid = valid & mask[:, 1:].to(valid.device).bool()
    targets = soft_targets(losses, config.router_distillation_temperature)
    return gate_cross_entropy(logits, targets, config.softmax_temperature, valid)
