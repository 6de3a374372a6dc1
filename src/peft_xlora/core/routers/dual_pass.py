"""The dual pass (X-LoRA as published): a scaling pass, the classifier on its output, then the main pass.

Before every forward of the model the scaling pass runs the model with every expert at `scaling_pass_value *
global_scaling_weight` (the plain base model when that is 0), the whole model or only its first `scaling_pass_layers`
decoder layers (an exit hook on layer k stops it there; the default, two thirds of the layers, resolved at build);
the classifier and the gate turn its last (or layer k's) hidden state into per-token
scalings, which the mixture layers of the main pass read. With a KV cache the scaling pass extends its own cache
beside the main one (`core/generation.py`); in prompt mode, decoding steps reuse the prompt's held scalings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..building import classifier_input_width, scaling_pass_exit_layer
from ..forward import _NOT_FOR_SCALING_PASS, _check_hidden, _ScalingPassExit
from ..generation import CACHE_KWARGS, XLoraCache, hold_uncached, input_length, prepare_cache
from ..routing import Routing, current_routing, pop_routing, push_routing
from .base import Router

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle


class DualPassRouter(Router):
    """`routing="dual_pass"` on decoder-only (and encoder-only) models."""

    mode = "dual_pass"

    def mode_hooks(self, model: nn.Module) -> list[RemovableHandle]:
        """The exit hook on decoder layer k when `scaling_pass_layers` shortens the scaling pass."""
        k = self.tuner.xlora_config.scaling_pass_layers
        if k is None:
            return []
        return [scaling_pass_exit_layer(model, k).register_forward_hook(self._exit_scaling_pass)]

    def check_config(self, config: Any) -> None:
        """The decoder layer `scaling_pass_layers` names must exist, and give the classifier its input width."""
        k = config.scaling_pass_layers
        if k is not None:
            scaling_pass_exit_layer(self.tuner.model, k)
        width = classifier_input_width(self.tuner.model, k)
        if config.hidden_size is not None and width is not None and width != config.hidden_size:
            # `update_config` only: at build the classifier is sized from what it reads (`infer_hidden_size`).
            raise ValueError(
                f"`scaling_pass_layers={k!r}` would feed the classifier a hidden state {width} wide, but it reads "
                f"{config.hidden_size}: this model's LM head reads a projection of the residual stream. Build a new "
                "model with the new value (the experts and base model can be reused)."
            )

    def route_gated(self, args: tuple, kwargs: dict) -> Routing:
        """Runs the scaling pass and the classifier; returns the routing for the main pass."""
        config = self.tuner.xlora_config
        # With a KV cache, the scaling pass extends its own cache beside the main one (see generation.py); in prompt
        # mode, decoding steps skip it and reuse the prompt's scalings held in the cache.
        cache, cache_name = prepare_cache(self.tuner.model, kwargs, config.scalings_mode)
        if cache is not None and not cache.needs_scaling_pass(input_length(args, kwargs) or 0):
            self.report(cache.held_scalings)  # (batch, 1, n_layers|1, n_experts)
            return Routing(cache.held_scalings)
        hidden = self.scaling_pass(args, kwargs, cache, cache_name)  # (batch, seq, hidden)
        logits, scalings, chosen = self.gate(hidden)  # (batch, seq, n_layers|1, n_experts) each
        held = cache.record(scalings) if cache is not None else hold_uncached(scalings, config.scalings_mode)
        if held is not scalings:
            chosen = None  # prompt mode held some positions' scalings: the choice of the dense tensor is theirs
        self.report(held)
        loss = self.router_loss([(logits, kwargs.get("attention_mask"))], kwargs, distill=(args, kwargs))
        return Routing(held, router_loss=loss, chosen=chosen)

    @torch.no_grad()
    def scaling_pass(
        self, args: tuple, kwargs: dict, cache: XLoraCache | None = None, cache_name: str | None = None
    ) -> torch.Tensor:
        """The last hidden state of the model with every expert at `scaling_pass_value * global_scaling_weight`.

        The global weight multiplies every expert update in both passes, as in the original X-LoRA, PEFT's built-in
        and mistral.rs, so a checkpoint means the same in all of them.

        Args:
            args: Positional arguments of the model's forward.
            kwargs: Keyword arguments of the model's forward.
            cache: The main pass's cache, whose `scaling_cache` this pass extends; None runs without a cache.
            cache_name: The keyword the model takes its cache under.

        Returns:
            (batch, seq, hidden).
        """
        model = self.tuner.model
        inner = getattr(model, "base_model", model)
        scaling_kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_FOR_SCALING_PASS}
        if cache is not None:
            scaling_kwargs[cache_name] = cache.scaling_cache  # advances by the same tokens as the main cache
            scaling_kwargs["use_cache"] = True
        elif "use_cache" in kwargs or any(name in kwargs for name in CACHE_KWARGS):
            scaling_kwargs["use_cache"] = False
        push_routing(self.scaling_pass_routing())
        try:
            out = inner(*args, **scaling_kwargs)
        except _ScalingPassExit as exit_:  # `scaling_pass_layers`: stopped after the k-th decoder layer
            out = exit_.hidden
        finally:
            pop_routing()
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out if isinstance(out, torch.Tensor) else out[0]
        _check_hidden(hidden, self.tuner.xlora_config.hidden_size, inner)
        return hidden

    def _exit_scaling_pass(self, module: nn.Module, args: tuple, output: Any) -> None:
        # Forward hook on the k-th decoder layer: in this model's scaling pass, the rest of the stack is not needed.
        routing = current_routing()
        if routing is not None and routing.scaling_pass:
            raise _ScalingPassExit(output)
