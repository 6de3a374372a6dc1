"""Optional router regularisers (MoE practice), off by default: load balancing and per-token entropy.

Both are computed from the router probabilities p = softmax(logits / temperature) over the experts, per token (and
per layer slot with layerwise scalings), in float32, over the tokens the attention mask keeps.

* **Load balancing** (Switch Transformer, Fedus et al. 2021, eq. 4; with top-k as in Mixtral):
  ``E * sum_e f_e * P_e`` where ``P_e`` is the mean probability of expert e and ``f_e`` the fraction of routing
  choices that go to e (each token chooses its top-k experts, k = `top_k_lora`, or its top-1 under dense gating).
  It is 1 when routing is spread evenly and up to E when every token picks the same expert; ``f`` carries no
  gradient, so the gradient lowers the probability of over-used experts.
* **Entropy**: the mean per-token entropy ``-sum_e p_e log p_e`` (nats). Adding it to the loss (coefficient > 0)
  makes each token's routing more decisive.

Under gradient accumulation in transformers' `Trainer`, each micro-batch's weighted terms count by that micro-batch's
share of the step's label tokens (`for_accumulated_batch`), as the language-model loss does, so their strength does
not depend on how a batch is split into micro-batches.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import torch


class RouterLossWarning(UserWarning):
    """The router regularisers are on, but the trainer computes its loss without them."""


# True while a trainer that adds `router_loss` to its own loss (`RouterLossMixin`) runs `compute_loss`.
_APPLIED_BY_TRAINER: ContextVar[bool] = ContextVar("peft_xlora_router_loss_applied", default=False)
_warned = False


@contextlib.contextmanager
def router_loss_applied_by_trainer() -> Iterator[None]:
    """Marks the enclosed forwards as ones whose trainer adds `output.router_loss` to its loss itself."""
    token = _APPLIED_BY_TRAINER.set(True)
    try:
        yield
    finally:
        _APPLIED_BY_TRAINER.reset(token)


def router_loss_left_to_trainer() -> bool:
    """Whether the running forward's trainer adds `output.router_loss` to its loss itself (`RouterLossMixin`)."""
    return _APPLIED_BY_TRAINER.get()


def warn_if_loss_ignores_router(output: Mapping[str, Any]) -> None:
    """Warns once when `output` comes from a fused LM head (TRL), whose trainer never reads `output.loss`.

    TRL's trainers call the model with `fused_lm_head=True` and compute the loss from the returned per-token
    `log_probs`, so the router regularisers added to `output.loss` would be dropped without a word.
    """
    global _warned
    fused = "log_probs" in output and "label_mask" in output and output.get("logits") is None
    if _warned or not fused or _APPLIED_BY_TRAINER.get():
        return
    _warned = True
    warnings.warn(
        "X-LoRA's router regularisers (router_load_balancing_coef / router_entropy_coef) are on, but this model was "
        "called with a fused LM head (TRL's trainers), whose loss is computed from `log_probs`, not from "
        "`output.loss`: the regularisers are not applied. Train with `peft_xlora.XLoraSFTTrainer`, or add "
        "`peft_xlora.RouterLossMixin` first to your TRL trainer class (`class T(RouterLossMixin, DPOTrainer)`).",
        RouterLossWarning,
        stacklevel=2,
    )


def router_losses(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The load-balancing and entropy terms of one batch of router logits.

    Args:
        logits: Classifier logits, (batch, seq, n_layers|1, n_experts).
        temperature: The gate's softmax temperature.
        top_k: Experts each token chooses (None: 1, the top choice under dense gating).
        mask: (batch, seq), nonzero for the tokens that count (the attention mask); None counts all.

    Returns:
        ``{"load_balancing": scalar, "entropy": scalar}``, float32, differentiable with respect to `logits`.
    """
    n_experts = logits.shape[-1]
    z = logits.float() / temperature
    probs = torch.softmax(z, dim=-1)  # (batch, seq, slots, E)
    weight = torch.ones(logits.shape[:2], device=logits.device) if mask is None else mask.to(logits.device).float()
    weight = weight[:, :, None, None].expand(*logits.shape[:3], 1)  # (batch, seq, slots, 1)
    total = weight.sum().clamp_min(1.0)
    k = top_k or 1
    chosen = torch.zeros_like(probs).scatter_(-1, torch.topk(z, k, dim=-1).indices, 1.0)  # (batch, seq, slots, E)
    fraction = (chosen * weight).sum(dim=(0, 1, 2)) / (total * k)  # (E,), sums to 1
    mean_prob = (probs * weight).sum(dim=(0, 1, 2)) / total  # (E,), sums to 1
    load_balancing = n_experts * (fraction * mean_prob).sum()
    entropy = -(probs * torch.log_softmax(z, dim=-1)).sum(dim=-1, keepdim=True)  # (batch, seq, slots, 1)
    return {"load_balancing": load_balancing, "entropy": (entropy * weight).sum() / total}


def for_accumulated_batch(router_loss: torch.Tensor | None, kwargs: Mapping[str, Any], model: Any) -> Any:
    """A micro-batch's router loss, weighted by its share of the label tokens of the whole accumulated batch.

    transformers' `Trainer` gives a model whose forward takes `**kwargs` the number of label tokens of every
    micro-batch of the optimizer step (`num_items_in_batch`, on every process), and then does not divide the loss by
    the accumulation steps: the model's loss is this micro-batch's token sum over that count, so the micro-batches add
    up to the mean of the whole batch. The regularisers are means over this micro-batch's tokens; weighted by the
    micro-batch's share of the label tokens (counted as `Trainer` counts them) they add up the same way, and one
    batch of 4 or 4 accumulated micro-batches of 1 train the gate alike. Without `num_items_in_batch` (a plain
    forward, evaluation, a trainer that divides the loss itself) the loss is returned unchanged.

    Args:
        router_loss: The weighted regularisers of this forward (None when they are off).
        kwargs: The keyword arguments of the model's forward.
        model: The transformers model (its loss type says whether `Trainer` counted the labels shifted).
    """
    total = kwargs.get("num_items_in_batch")
    labels = kwargs.get("shift_labels")  # a padding-free collator's labels, counted as they are
    if labels is None:
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and _loss_shifts_labels(model):
            labels = labels[..., 1:]  # a causal LM predicts label i+1 at position i: the first label is no target
    if router_loss is None or total is None or not isinstance(labels, torch.Tensor):
        return router_loss
    count = (labels != -100).sum().to(router_loss.device, torch.float32)
    total = torch.as_tensor(total, device=router_loss.device, dtype=torch.float32).reshape(-1)[0]
    return router_loss * (count / total.clamp_min(1.0))


def _loss_shifts_labels(model: Any) -> bool:
    """Whether `Trainer` counts this model's labels from the second on: a causal-LM loss, not an encoder-decoder."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    config = getattr(model, "config", None)
    causal = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
    return causal and not getattr(config, "is_encoder_decoder", False)
