"""Single-pass routing (`XLoraConfig(routing="single_pass", scaling_pass_layers=k)`): X-LoRA without a scaling pass.

One forward is one pass of the model plus the classifier:

- the mixture layers of decoder layers 1..k (and those registered before the decoder stack, e.g. an adapted input
  embedding) mix the experts with static weights: per mixture layer, a softmax over one learned logit per expert
  (zeros at first: the uniform mixture), or fixed at 1 / n_experts with ``single_pass_static="uniform"``;
- a forward hook on decoder layer k hands that layer's output of the same forward (the residual stream) to the
  classifier and the gate;
- the mixture layers after layer k (the later decoder layers, and those registered after the stack, e.g. an adapted
  LM head) apply the per-token scalings.

Every token's scalings depend only on the tokens up to it (through causal layers 1..k), so the model's ordinary KV
cache stays exact: no second cache. The static logits are the parameter ``logits`` of a `StaticWeights` module that
lives inside the classifier (``xlora_classifier.single_pass_static``), so they train, move, save and load with it;
their checkpoint key ``base_model.xlora_classifier.single_pass_static.logits`` cannot meet an expert's keys, which
all hold ``.xlora_experts.``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .changes import ExpertChange, take
from .routing import Chosen

#: Name of the static weights' module inside the classifier.
STATIC_NAME = "single_pass_static"


class StaticWeights(nn.Module):
    """The static expert weights of the early mixture layers: softmax over learned logits, or uniform.

    Args:
        n_layers: Number of mixture layers (all of them; the late ones get no row).
        early: Indices of the early mixture layers, in order; row i of `logits` belongs to `early[i]`.
        n_experts: Number of experts.
        learned: Whether the weights are a trained softmax (else fixed at 1 / n_experts).
        device: Where to build the logits.
    """

    def __init__(
        self, n_layers: int, early: list[int], n_experts: int, learned: bool, device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.n_experts, self.learned = n_experts, learned
        if learned:
            # Zeros: every expert the same logit, so training starts from the uniform mixture.
            self.logits = nn.Parameter(torch.zeros(len(early), n_experts, device=device, dtype=torch.float32))
        self._set_layers(n_layers, early, device)

    def _set_layers(self, n_layers: int, early: list[int], device: torch.device | None) -> None:
        self.n_layers, self.early = n_layers, list(early)
        row = torch.zeros(n_layers, dtype=torch.long)
        row[early] = torch.arange(len(early))
        self.register_buffer("row_of_layer", row.to(device), persistent=False)

    def forward(self, active: torch.Tensor | None = None) -> torch.Tensor:
        """Scalings (1, 1, n_layers|1, n_experts) in float32 (one row when uniform); late layers' rows go unused.

        Args:
            active: (n_experts,) bool, the experts `set_active_experts` kept; the others get 0 and the weights
                renormalise over the rest (a softmax over their logits, or 1 / n_active). None: all.
        """
        device = self.row_of_layer.device
        if not self.learned:
            weights = torch.full((1, self.n_experts), 1.0, device=device)
            if active is not None:
                weights = weights * active.to(device)
            return (weights / weights.sum(-1, keepdim=True))[None, None]
        logits = self.logits.float()
        if active is not None:
            logits = logits.masked_fill(~active.to(logits.device), float("-inf"))
        weights = torch.softmax(logits, dim=-1)  # (n_early, n_experts)
        return weights.index_select(0, self.row_of_layer)[None, None]

    @torch.no_grad()
    def follow(self, change: ExpertChange, early: list[int]) -> None:
        """Follows added or removed experts and mixture layers (`change`); `early` are the early layers after it.

        A kept early layer keeps its row and a kept expert its column. A new expert's logit starts
        `change.logit_offset` below the mean of its row (its share is below exp(-logit_offset): it changes nothing
        yet); a new early layer's row starts at zero logits for the others (uniform).
        """
        device = self.row_of_layer.device
        if self.learned:
            old_early = {layer: row for row, layer in enumerate(self.early)}
            rows = tuple(old_early.get(change.layers[layer]) for layer in early)  # old row, or None for a new layer
            logits = take(self.logits.detach(), rows, 0, 0.0)  # (n_early, E_old)
            new_column = logits.mean(dim=1, keepdim=True) - change.logit_offset  # (n_early, 1)
            logits = take(logits, change.experts, 1, new_column)  # (n_early, E_new)
            self.logits = nn.Parameter(logits.contiguous(), requires_grad=self.logits.requires_grad)
        self.n_experts = len(change.experts)
        self._set_layers(len(change.layers), early, device)


@dataclass
class SinglePassState:
    """What one single-pass forward learns at layer k; shared (mutable) by the routings of that forward.

    Attributes:
        late_layers: Indices of the mixture layers that apply the per-token scalings.
        kwargs: What the router losses read of the forward's keyword arguments (the attention mask, and the labels
            and `num_items_in_batch` that weigh a micro-batch under gradient accumulation).
        late: Per-token scalings (batch, seq, n_layers|1, n_experts), set once layer k has run.
        late_chosen: The experts each token chose under top-k (`routing.Chosen`), set with `late`; None when dense.
        router_loss: The weighted router regularisers, set with `late` (None when they are off).
    """

    late_layers: frozenset[int]
    kwargs: dict = field(repr=False)
    late: torch.Tensor | None = None
    late_chosen: Chosen | None = None
    router_loss: torch.Tensor | None = None


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's decoder layers (its `GradientCheckpointingLayer` modules), with their names, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]


def late_layer_indices(model: nn.Module, mixture_layer_names: list[str], k: int) -> frozenset[int]:
    """The mixture layers that run after decoder layer k: inside layers k+1..L, or registered after the stack."""
    names = [name for name, _ in decoder_layers(model)]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    stack_end = order[names[-1]]
    late = set()
    for index, layer_name in enumerate(mixture_layer_names):
        inside = next((i for i, name in enumerate(names) if layer_name.startswith(f"{name}.")), None)
        if (inside is not None and inside >= k) or (inside is None and order[layer_name] > stack_end):
            late.add(index)
    return frozenset(late)
