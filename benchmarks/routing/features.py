"""Prototype: a gate that reads the hidden states of several decoder layers (not in the library yet).

The library's classifier reads one hidden state: the output of decoder layer `scaling_pass_layers` (or the final
norm). After a domain switch that state still carries the previous domain through attention; an earlier layer is
more local. `MultiLayerClassifier` concatenates the outputs of `extra_layers` (captured by forward hooks during the
scaling pass only) with the usual hidden state and feeds them to an ordinary `XLoraClassifier` built for the wider
input, so the gate, the losses and the scalings downstream are the library's own. The extra cost per token is the
classifier's first layer growing by `len(extra_layers) * hidden` inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_xlora.core.building import CLASSIFIER_NAME
from peft_xlora.core.classifier import XLoraClassifier
from peft_xlora.core.model import find_tuner
from peft_xlora.core.routing import current_routing


class _Tap:
    """Keeps the output of one decoder layer from the current scaling pass."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        routing = current_routing()
        if routing is not None and routing.scaling_pass:
            self.hidden = output[0] if isinstance(output, tuple) else output  # (batch, seq, hidden)


class MultiLayerClassifier(nn.Module):
    """The gating classifier over [outputs of `extra_layers`..., the usual hidden state], concatenated.

    Args:
        inner: An `XLoraClassifier` whose input width is (1 + len(taps)) * hidden.
        taps: One per extra layer, filled by forward hooks during the scaling pass.
    """

    def __init__(self, inner: XLoraClassifier, taps: list[_Tap]) -> None:
        super().__init__()
        self.inner = inner
        self.taps = taps
        self.n_layers, self.n_experts, self.layerwise = inner.n_layers, inner.n_experts, inner.layerwise

    @property
    def layers(self) -> nn.Sequential:
        """The inner classifier's layers (the tuner reads their device)."""
        return self.inner.layers

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden) -> (batch, seq, n_layers or 1, n_experts)."""
        extra = []
        for tap in self.taps:
            if tap.hidden is None or tap.hidden.shape[:2] != hidden.shape[:2]:
                raise RuntimeError("MultiLayerClassifier: an extra layer's output is missing for this scaling pass.")
            extra.append(tap.hidden.to(hidden.dtype))
        return self.inner(torch.cat([*extra, hidden], dim=-1))  # (batch, seq, (1 + n_extra) * hidden) in


def install(model: nn.Module, extra_layers: tuple[int, ...]) -> MultiLayerClassifier:
    """Replaces the X-LoRA classifier of `model` by a `MultiLayerClassifier` reading `extra_layers` (1-based) too.

    The new classifier is built from the model's config (same depth, width, dropout, init), trainable, on the device
    and in the dtype of the one it replaces.
    """
    tuner = find_tuner(model)
    old = tuner.xlora_classifier
    weight = old.layers[0].weight
    config = tuner.xlora_config
    decoder_layers = tuner.model.model.layers
    taps = []
    for k in extra_layers:
        tap = _Tap()
        decoder_layers[k - 1].register_forward_hook(tap, prepend=True)  # before the scaling pass exits there
        taps.append(tap)
    inner = XLoraClassifier(
        config,
        config.hidden_size * (1 + len(extra_layers)),
        old.n_layers,
        old.n_experts,
        device=weight.device,
        dtype=weight.dtype,
    )
    new = MultiLayerClassifier(inner, taps).train(old.training)  # eval mode stays eval mode (dropout)
    tuner.model.add_module(CLASSIFIER_NAME, new)  # where the tuner looks the classifier up
    return new
