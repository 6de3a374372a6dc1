"""The single pass (`routing="single_pass"`): static weights up to decoder layer k, the gate on its output after.

See `core/single_pass.py` for the parts (the static weights, which layers are late). The router adds the static
weights to the classifier when it is installed, hooks decoder layer k, and hands every forward a `Routing` whose
`single_pass` state the hook fills with the per-token scalings once layer k has run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..building import CLASSIFIER_NAME, scaling_pass_exit_layer
from ..routing import Routing, current_routing
from ..single_pass import STATIC_NAME, SinglePassState, StaticWeights, late_layer_indices
from .base import Router

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from ..changes import ExpertChange


class SinglePassRouter(Router):
    """`routing="single_pass"` on decoder-only models."""

    mode = "single_pass"

    def __init__(self, tuner: Any) -> None:
        super().__init__(tuner)
        self._latest_static: torch.Tensor | None = None

    @property
    def late_layers(self) -> frozenset[int]:
        """Indices of the mixture layers after decoder layer k: they apply the gate's per-token scalings."""
        return self._late

    @property
    def static(self) -> StaticWeights:
        """The static weights of the early layers (a submodule of the classifier, saved with it)."""
        return self.tuner.xlora_classifier.get_submodule(STATIC_NAME)

    def late_layer_count(self, names: list[str] | None = None) -> int:
        """How many of the mixture layers `names` (default the model's) come after decoder layer k."""
        names = self.tuner.mixture_layer_names if names is None else names
        return len(late_layer_indices(self.tuner.model, names, self.tuner.xlora_config.scaling_pass_layers))

    def check_config(self, config: Any) -> None:
        """Decoder layer k must exist."""
        scaling_pass_exit_layer(self.tuner.model, config.scaling_pass_layers)

    def build_parameters(self) -> None:
        """Adds the static weights to the classifier (once), and finds the late layers."""
        tuner = self.tuner
        names = tuner.mixture_layer_names
        self._late = late_layer_indices(tuner.model, names, tuner.xlora_config.scaling_pass_layers)
        classifier = tuner.model.get_submodule(CLASSIFIER_NAME)
        if STATIC_NAME in classifier._modules:
            return
        early = [i for i in range(len(names)) if i not in self._late]
        learned = tuner.xlora_config.single_pass_static == "learned"
        device = classifier.layers[0].weight.device
        classifier.add_module(STATIC_NAME, StaticWeights(len(names), early, classifier.n_experts, learned, device))

    def follow(self, change: ExpertChange) -> None:
        """The static logits follow the experts and layers (see `StaticWeights.follow`)."""
        tuner = self.tuner
        late = late_layer_indices(tuner.model, tuner.mixture_layer_names, tuner.xlora_config.scaling_pass_layers)
        early = [i for i in range(len(tuner.mixture_layer_names)) if i not in late]
        self.static.follow(change, early)
        self._latest_static = None

    def mode_hooks(self, model: nn.Module) -> list[RemovableHandle]:
        """The hook on decoder layer k that gates the later layers."""
        exit_layer = scaling_pass_exit_layer(model, self.tuner.xlora_config.scaling_pass_layers)
        return [exit_layer.register_forward_hook(self._after_layer_k)]

    def route_gated(self, args: tuple, kwargs: dict) -> Routing:
        """The routing of a single-pass forward: the static weights now, the per-token scalings at layer k."""
        static = self.static(self.tuner._active_experts)  # (1, 1, n_layers|1, n_experts), float32
        read = ("attention_mask", "labels", "shift_labels", "num_items_in_batch")  # what `router_loss` reads
        state = SinglePassState(self._late, {name: kwargs.get(name) for name in read})
        return Routing(static, single_pass=state)

    def forward_router_loss(self, routing: Routing) -> torch.Tensor | None:
        """Known once layer k has run, in the forward's shared state."""
        state = routing.single_pass
        return state.router_loss if state is not None else routing.router_loss

    def _after_layer_k(self, module: nn.Module, args: tuple, output: Any) -> None:
        # Forward hook on decoder layer k. transformers checkpoints a layer's `forward`, not its hooks, so this runs
        # once per forward, outside any recomputation, on the output that carries the graph.
        routing = current_routing()
        state = routing.single_pass if routing is not None else None
        if state is None or state.late is not None:
            return
        hidden = output if isinstance(output, torch.Tensor) else output[0]  # (batch, seq, hidden)
        logits, scalings, chosen = self.gate(hidden)  # (batch, seq, n_layers|1, n_experts) each
        state.late, state.late_chosen = scalings, chosen
        state.router_loss = self.router_loss([(logits, state.kwargs.get("attention_mask"))], state.kwargs)
        # Kept apart and combined on request: the full (batch, seq, n_layers, n_experts) tensor is only built for
        # `latest_scalings` and the scalings log.
        latest, static = scalings.detach(), routing.scalings.detach()  # logged from these: threads share the tuner
        self._latest, self._latest_static = latest, static
        if self.tuner._logs_scalings():
            self.tuner._log_scalings(self.reported(static, latest))

    def latest_scalings(self) -> torch.Tensor | None:
        """Scalings of the last forward, (batch, seq, n_layers, n_experts), detached; None before any forward.

        The rows of the layers up to k hold their static weights (the same for every token), the others the
        per-token scalings the gate gave from layer k's output.
        """
        if self._latest_static is None or self._latest is None:
            return super().latest_scalings()
        return self.reported(self._latest_static, self._latest)

    def reported(self, static: torch.Tensor, late: torch.Tensor) -> torch.Tensor:
        """The late layers' per-token scalings and the early layers' static weights, in one tensor.

        Args:
            static: (1, 1, n_layers|1, n_experts).
            late: (batch, seq, n_layers|1, n_experts).

        Returns:
            (batch, seq, n_layers, n_experts), detached.
        """
        batch, seq, _, n = late.shape
        n_layers = len(self.tuner.mixture_layer_names)
        out = late.detach().expand(batch, seq, n_layers, n).clone()
        early = [i for i in range(n_layers) if i not in self._late]
        if early:
            index = torch.tensor(early, device=out.device)
            rows = static.detach().to(out.device).expand(batch, seq, n_layers, n).index_select(2, index)
            out.index_copy_(2, index, rows.to(out.dtype))
        return out
