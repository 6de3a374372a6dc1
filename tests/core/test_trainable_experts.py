"""Trainable experts: gradients of the stacked factors (and of the scalings) equal the per-expert reference's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.reference import mixture_reference
from peft_xlora.core.experts import ModuleLora
from peft_xlora.core.layer import XLoraLayer
from peft_xlora.core.routing import Routing, use_routing


@pytest.mark.parametrize("ranks", [[4, 1, 7], [3, 3, 3]], ids=["mixed-ranks", "equal-ranks"])
@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_stacked_factor_gradients_equal_per_expert_reference(ranks, kind):
    n_in, n_out = 12, 10
    base = nn.Linear(n_in, n_out) if kind == "linear" else nn.Embedding(n_in, n_out)
    loras = [
        ModuleLora(
            torch.randn(r, n_in) * 0.3,
            torch.randn(n_out, r) * 0.3,
            r,
            scale=0.5 + i,
            dropout=0.0,
            is_embedding=kind == "embedding",
        )
        for i, r in enumerate(ranks)
    ]
    # Experts 0, 2 and 3 of a 4-expert model adapt this layer.
    layer = XLoraLayer(base, layer_index=1, expert_indices=[0, 2, 3], loras=loras, requires_grad=True)
    x = torch.randn(3, 5, n_in) if kind == "linear" else torch.randint(0, n_in, (3, 5))
    scalings = torch.rand(3, 5, 2, 4, requires_grad=True)  # (batch, seq, n_layers, n_experts)
    target = torch.randn(3, 5, n_out)

    with use_routing(Routing(scalings)):
        ((layer(x) - target) ** 2).sum().backward()

    leaves = [(lo.A.clone().requires_grad_(), lo.B.clone().requires_grad_(), lo.scale) for lo in loras]
    ref_scalings = scalings.detach().clone().requires_grad_()
    with torch.no_grad():
        base_out = base(x)
    ref = mixture_reference(x, base_out, leaves, ref_scalings[:, :, 1][..., [0, 2, 3]], kind == "embedding")
    ((ref - target) ** 2).sum().backward()

    for position, (A, B, _) in enumerate(leaves):
        start = sum(ranks[:position])
        stop = start + ranks[position]
        assert A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0
        torch.testing.assert_close(layer.xlora_A.grad[start:stop], A.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.xlora_B.grad[:, start:stop], B.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scalings.grad, ref_scalings.grad, rtol=1e-5, atol=1e-5)
