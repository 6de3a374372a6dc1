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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .attributes import TunerAttributes
from .generation import requested_scalings_mode
from .routing import Routing, current_routing

if TYPE_CHECKING:
    from .classifier import XLoraClassifier

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
        self.n_layers, self.n_experts, self.learned = n_layers, n_experts, learned
        if learned:
            # Zeros: every expert the same logit, so training starts from the uniform mixture.
            self.logits = nn.Parameter(torch.zeros(len(early), n_experts, device=device, dtype=torch.float32))
        row = torch.zeros(n_layers, dtype=torch.long)
        row[early] = torch.arange(len(early))
        self.register_buffer("row_of_layer", row.to(device), persistent=False)

    def forward(self) -> torch.Tensor:
        """Scalings (1, 1, n_layers|1, n_experts) in float32 (one row when uniform); late layers' rows go unused."""
        device = self.row_of_layer.device
        if not self.learned:
            return torch.full((1, 1, 1, self.n_experts), 1.0 / self.n_experts, device=device)
        weights = torch.softmax(self.logits.float(), dim=-1)  # (n_early, n_experts)
        return weights.index_select(0, self.row_of_layer)[None, None]


@dataclass
class SinglePassState:
    """What one single-pass forward learns at layer k; shared (mutable) by the routings of that forward.

    Attributes:
        late_layers: Indices of the mixture layers that apply the per-token scalings.
        kwargs: What the router losses read of the forward's keyword arguments (the attention mask, and the labels
            and `num_items_in_batch` that weigh a micro-batch under gradient accumulation).
        late: Per-token scalings (batch, seq, n_layers|1, n_experts), set once layer k has run.
        router_loss: The weighted router regularisers, set with `late` (None when they are off).
    """

    late_layers: frozenset[int]
    kwargs: dict = field(repr=False)
    late: torch.Tensor | None = None
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


class SinglePassMixin(TunerAttributes):
    """The single-pass forward of `XLoraModel`: static weights up to layer k, the gate on layer k's output."""

    _log_scalings: Any
    _logs_scalings: Any

    def _install_single_pass(self, model: nn.Module, exit_layer: nn.Module, classifier: XLoraClassifier) -> None:
        """Adds the static weights to the classifier and the hook on decoder layer k (called by `inject_adapter`)."""
        config = self.xlora_config
        n_layers = len(self.mixture_layer_names)
        self._late_layers = late_layer_indices(model, self.mixture_layer_names, config.scaling_pass_layers)
        early = [i for i in range(n_layers) if i not in self._late_layers]
        device = classifier.layers[0].weight.device
        static = StaticWeights(
            n_layers, early, classifier.n_experts, learned=config.single_pass_static == "learned", device=device
        )
        classifier.add_module(STATIC_NAME, static)
        self._single_pass_hook = exit_layer.register_forward_hook(self._after_layer_k)

    def _route_single_pass(self, kwargs: dict) -> Routing:
        """The routing of a single-pass forward: the static weights now, the per-token scalings at layer k."""
        if requested_scalings_mode() == "prompt":
            raise ValueError(
                "scalings_mode='prompt' does not apply to routing='single_pass': every token is routed from the pass "
                "that computes it, with no scaling pass to skip. Generate without `scalings_mode` (or 'token')."
            )
        static = self.xlora_classifier.get_submodule(STATIC_NAME)()  # (1, 1, n_layers|1, n_experts), float32
        read = ("attention_mask", "labels", "shift_labels", "num_items_in_batch")  # what `_router_loss` reads
        state = SinglePassState(self._late_layers, {name: kwargs.get(name) for name in read})
        return Routing(static, single_pass=state)

    def _after_layer_k(self, module: nn.Module, args: tuple, output: Any) -> None:
        # Forward hook on decoder layer k. transformers checkpoints a layer's `forward`, not its hooks, so this runs
        # once per forward, outside any recomputation, on the output that carries the graph.
        routing = current_routing()
        state = routing.single_pass if routing is not None else None
        if state is None or state.late is not None:
            return
        hidden = output if isinstance(output, torch.Tensor) else output[0]  # (batch, seq, hidden)
        logits, scalings = self._gate(hidden)  # (batch, seq, n_layers|1, n_experts) each
        self._check_finite(scalings, hidden)
        state.late = scalings
        state.router_loss = self._router_loss(logits, (), state.kwargs)
        # Kept apart and combined on request: the full (batch, seq, n_layers, n_experts) tensor is only built for
        # `get_latest_scalings` and the scalings log.
        latest, static = scalings.detach(), routing.scalings.detach()  # logged from these: threads share the tuner
        self._latest_scalings, self._latest_static = latest, static
        if self._logs_scalings():
            self._log_scalings(self._reported_scalings(static, latest))

    def get_latest_scalings(self) -> torch.Tensor | None:
        """Scalings of the last forward, (batch, seq, n_layers, n_experts), detached; None before any forward.

        In single-pass mode the rows of the layers up to k hold their static weights (the same for every token), the
        others the per-token scalings the gate gave from layer k's output.
        """
        static = getattr(self, "_latest_static", None)
        if self.xlora_config.routing != "single_pass" or static is None or self._latest_scalings is None:
            return super().get_latest_scalings()
        return self._reported_scalings(static, self._latest_scalings)

    def _reported_scalings(self, static: torch.Tensor, late: torch.Tensor) -> torch.Tensor:
        """What `get_latest_scalings` reports: the late layers' per-token scalings, the early layers' static weights.

        Args:
            static: (1, 1, n_layers|1, n_experts).
            late: (batch, seq, n_layers|1, n_experts).

        Returns:
            (batch, seq, n_layers, n_experts), detached.
        """
        batch, seq, _, n = late.shape
        n_layers = len(self.mixture_layer_names)
        out = late.detach().expand(batch, seq, n_layers, n).clone()
        early = [i for i in range(n_layers) if i not in self._late_layers]
        if early:
            index = torch.tensor(early, device=out.device)
            rows = static.detach().to(out.device).expand(batch, seq, n_layers, n).index_select(2, index)
            out.index_copy_(2, index, rows.to(out.dtype))
        return out
