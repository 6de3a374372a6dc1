"""The gating classifier and the gate (softmax, temperature, top-k) against row-by-row references."""

import pytest
import torch

from helpers.reference import gate_reference
from peft_xlora import XLoraConfig
from peft_xlora.core.classifier import XLoraClassifier, gate

CASES = [
    # temperature, enable_softmax, top_k, softmax_topk, global_weight
    (1.0, True, None, False, 1.0),
    (0.5, True, None, False, 2.0),
    (1.0, False, None, False, 1.0),
    (1.0, True, 2, False, 1.0),
    (0.7, True, 2, True, 1.0),
    (1.3, False, 1, True, 0.5),
    (1.0, False, 3, False, 1.0),
]


@pytest.mark.parametrize(("temperature", "softmax", "top_k", "softmax_topk", "weight"), CASES)
def test_gate_matches_reference(temperature, softmax, top_k, softmax_topk, weight):
    logits = torch.randn(2, 3, 4, 5)
    ours = gate(
        logits,
        temperature=temperature,
        enable_softmax=softmax,
        top_k=top_k,
        softmax_topk=softmax_topk,
        global_weight=weight,
    )
    ref = gate_reference(logits, temperature, softmax, top_k, softmax_topk, weight)
    torch.testing.assert_close(ours, ref)
    if top_k is not None:
        assert ((ours != 0).sum(-1) == top_k).all()
    if (softmax and top_k is None) or softmax_topk:
        torch.testing.assert_close(ours.sum(-1), torch.full(ours.shape[:-1], weight))


def test_gate_is_float32_for_half_inputs():
    logits = torch.randn(1, 2, 1, 3, dtype=torch.bfloat16)
    out = gate(logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.softmax(logits.float(), -1))


@pytest.mark.parametrize(("depth", "layerwise"), [(1, False), (2, True), (4, False)])
def test_classifier_shapes_and_layer_names(depth, layerwise):
    config = XLoraConfig(
        adapters={"a": "x", "b": "y", "c": "z"}, xlora_depth=depth, xlora_size=8, layerwise_scalings=layerwise
    )
    clf = XLoraClassifier(config, hidden_size=16, n_layers=5, n_experts=3)
    out = clf(torch.randn(2, 7, 16))
    assert out.shape == (2, 7, 5 if layerwise else 1, 3)
    linear_names = [n for n, m in clf.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear_names) == depth
    assert all(n.startswith("layers.") for n in linear_names)  # the layout PEFT's built-in uses


@pytest.mark.parametrize(("depth", "layerwise"), [(1, False), (2, True), (3, False)])
def test_uniform_init_gives_the_uniform_mixture_and_learns(depth, layerwise):
    config = XLoraConfig(
        adapters={"a": "x", "b": "y", "c": "z"},
        xlora_depth=depth,
        xlora_size=8,
        layerwise_scalings=layerwise,
        xlora_dropout_p=0.0,
    )
    assert config.classifier_init == "uniform"  # the default
    torch.manual_seed(0)
    clf = XLoraClassifier(config, hidden_size=16, n_layers=5, n_experts=3)
    hidden = torch.randn(2, 7, 16)
    scalings = gate(clf(hidden))
    torch.testing.assert_close(scalings, torch.full_like(scalings, 1 / 3))
    # Training moves it: after two steps every layer has received a gradient and the tokens are routed apart.
    opt = torch.optim.SGD(clf.parameters(), lr=0.5)
    target = torch.tensor([0, 1, 2]).repeat(5)[:7]
    for _ in range(2):
        probs = gate(clf(hidden))  # (2, 7, slots, 3)
        index = target[None, :, None, None].expand(*probs.shape[:3], 1)
        loss = -probs.gather(-1, index).log().mean()  # each token toward its own expert
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in clf.parameters())
    after = gate(clf(hidden))
    assert (after - 1 / 3).abs().max() > 1e-3


def test_random_init_routes_tokens_apart():
    config = XLoraConfig(adapters={"a": "x", "b": "y"}, xlora_depth=2, xlora_size=8, classifier_init="random")
    torch.manual_seed(0)
    clf = XLoraClassifier(config, hidden_size=16, n_layers=1, n_experts=2)
    scalings = gate(clf(torch.randn(1, 6, 16)))
    assert (scalings - 0.5).abs().max() > 1e-3


def test_uniform_init_without_softmax_is_the_base_model(expert_dirs):
    from helpers.models import build_xlora, input_ids

    model = build_xlora("llama", expert_dirs, classifier_init="uniform", enable_softmax=False).eval()
    ids = input_ids()
    with torch.no_grad():
        out = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(out, base, rtol=0, atol=0)
