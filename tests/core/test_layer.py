"""The stacked mixture layer against the per-expert reference loop."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from helpers.reference import mixture_reference
from peft_xlora.core.experts import ModuleLora
from peft_xlora.core.layer import XLoraLayer
from peft_xlora.core.routing import Routing, use_routing

TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 3e-2}}


def random_loras(n_in, n_out, ranks, dtype=torch.float32, dropout=0.0):
    loras = []
    for i, r in enumerate(ranks):
        A = (torch.randn(r, n_in) * 0.3).to(dtype)
        B = (torch.randn(n_out, r) * 0.3).to(dtype)
        loras.append(ModuleLora(A, B, r, scale=0.5 + i, dropout=dropout))
    return loras


def run(layer, x, scalings):
    with use_routing(Routing(scalings)):
        return layer(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
def test_stacked_equals_reference(dtype, base_kind):
    n_in, n_out, ranks = 12, 10, [4, 1, 7]
    base = nn.Linear(n_in, n_out).to(dtype) if base_kind == "linear" else Conv1D(n_out, n_in).to(dtype)
    loras = random_loras(n_in, n_out, ranks, dtype)
    # This layer is adapted by experts 0, 2 and 3 of a 4-expert model: expert 1 does not target it.
    layer = XLoraLayer(base, layer_index=1, expert_indices=[0, 2, 3], loras=loras)
    x = torch.randn(3, 5, n_in).to(dtype)
    scalings = torch.rand(3, 5, 4, 4)  # (batch, seq, n_layers, n_experts)
    ours = run(layer, x, scalings)
    picked = scalings[:, :, 1][..., [0, 2, 3]]
    # The reference runs in float32 on the same (rounded) inputs: it measures our error, not bf16's input rounding.
    factors = [(lo.A.float(), lo.B.float(), lo.scale) for lo in loras]
    ref = mixture_reference(x.float(), base(x).float(), factors, picked)
    torch.testing.assert_close(ours.float(), ref, **TOL[dtype])


def test_broadcast_layer_and_constant_scalings():
    base = nn.Linear(6, 6)
    loras = random_loras(6, 6, [2, 3])
    layer = XLoraLayer(base, layer_index=4, expert_indices=[0, 1], loras=loras)
    x = torch.randn(2, 3, 6)
    per_token = torch.rand(2, 3, 1, 2)  # not layerwise: one slot for every layer
    ref = mixture_reference(x, base(x), [(lo.A, lo.B, lo.scale) for lo in loras], per_token[:, :, 0])
    torch.testing.assert_close(run(layer, x, per_token), ref)
    constant = torch.tensor([0.25, 0.75]).view(1, 1, 1, 2)
    ref = mixture_reference(x, base(x), [(lo.A, lo.B, lo.scale) for lo in loras], constant[:, :, 0].expand(2, 3, 2))
    torch.testing.assert_close(run(layer, x, constant), ref)


def test_embedding_with_embed_scale():
    base = nn.Embedding(20, 8)
    base.embed_scale = torch.tensor(3.0)  # like Gemma's scaled word embedding
    base_forward = base.forward
    loras = [ModuleLora(torch.randn(r, 20), torch.randn(8, r), r, 2.0 / r, 0.0, True) for r in (2, 5)]
    layer = XLoraLayer(base, 0, [0, 1], loras)
    ids = torch.randint(0, 20, (2, 6))
    scalings = torch.rand(2, 6, 1, 2)
    ours = run(layer, ids, scalings)
    factors = [(lo.A, lo.B, lo.scale * 3.0) for lo in loras]
    ref = mixture_reference(ids, base_forward(ids), factors, scalings[:, :, 0], is_embedding=True)
    torch.testing.assert_close(ours, ref)


def test_no_routing_is_base_layer_exactly():
    base = nn.Linear(5, 4)
    layer = XLoraLayer(base, 0, [0], random_loras(5, 4, [3]))
    x = torch.randn(2, 3, 5)
    assert torch.equal(layer(x), base(x))
    assert torch.equal(run(layer, x, None), base(x))


def test_dropout_groups_per_expert_rows():
    # Experts with different dropout: in eval mode dropout is off and the result equals the reference.
    base = nn.Linear(6, 6)
    loras = random_loras(6, 6, [2, 3])
    loras[1].dropout = 0.5
    layer = XLoraLayer(base, 0, [0, 1], loras).eval()
    x = torch.randn(2, 3, 6)
    s = torch.rand(2, 3, 1, 2)
    ref = mixture_reference(x, base(x), [(lo.A, lo.B, lo.scale) for lo in loras], s[:, :, 0])
    torch.testing.assert_close(run(layer, x, s), ref)
    # In training mode the expert without dropout is untouched: pin the other expert to 0 and compare.
    layer.train()
    s_only_first = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    ref = mixture_reference(x, base(x), [(loras[0].A, loras[0].B, loras[0].scale)], torch.ones(2, 3, 1))
    torch.testing.assert_close(run(layer, x, s_only_first), ref)


def test_flattened_tokens_are_supported():
    base = nn.Linear(4, 4)
    loras = random_loras(4, 4, [2])
    layer = XLoraLayer(base, 0, [0], loras)
    x = torch.randn(2, 3, 4)
    s = torch.rand(2, 3, 1, 1)
    torch.testing.assert_close(run(layer, x.reshape(6, 4), s), run(layer, x, s).reshape(6, 4))


def test_mismatched_token_count_is_a_clear_error():
    layer = XLoraLayer(nn.Linear(4, 4), 0, [0], random_loras(4, 4, [2]))
    with pytest.raises(RuntimeError, match="scalings cover"):
        run(layer, torch.randn(2, 5, 4), torch.rand(2, 3, 1, 1))


def test_unsupported_layer_type():
    with pytest.raises(TypeError, match="supported: Linear, Conv1D, Embedding"):
        XLoraLayer(nn.Conv2d(3, 3, 1), 0, [0], random_loras(3, 3, [1]))
