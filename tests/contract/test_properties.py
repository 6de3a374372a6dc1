"""Property-based tests (hypothesis) of the gating invariants, over config values and input shapes.

Invariants: the scalings have shape (batch, seq, n_layers, n_experts); with softmax, each token's row sums to the
global weight; top-k keeps exactly k non-zeros per token and layer; pinning the gate to one expert gives exactly that
expert's PEFT LoRA model; the stacked mixture equals the per-expert loop for any ranks and sizes. Examples are
derandomized so every run checks the same cases.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from torch import nn

from helpers.models import BUILDERS, build_xlora, input_ids
from helpers.reference import gate_reference, mixture_reference
from peft_xlora import XLoraConfig
from peft_xlora.core.classifier import gate
from peft_xlora.core.experts import ModuleLora
from peft_xlora.core.layer import XLoraLayer
from peft_xlora.core.routing import Routing, use_routing

FAST = settings(max_examples=60, deadline=None, derandomize=True)
# Model-level examples each run a forward of a tiny model: fewer of them.
MODEL = settings(max_examples=15, deadline=None, derandomize=True)

temperatures = st.floats(min_value=0.1, max_value=10.0)
weights = st.floats(min_value=0.1, max_value=4.0)


@st.composite
def gate_cases(draw):
    n = draw(st.integers(1, 8))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 4)), n)
    seed = draw(st.integers(0, 2**16))
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * draw(st.floats(0.1, 5.0))
    top_k = draw(st.none() | st.integers(1, n))
    softmax_topk = top_k is not None and draw(st.booleans())
    return logits, draw(temperatures), draw(st.booleans()), top_k, softmax_topk, draw(weights)


@FAST
@given(gate_cases())
def test_gate_invariants(case):
    logits, temperature, softmax, top_k, softmax_topk, weight = case
    s = gate(
        logits,
        temperature=temperature,
        enable_softmax=softmax,
        top_k=top_k,
        softmax_topk=softmax_topk,
        global_weight=weight,
    )
    assert s.shape == logits.shape and s.dtype == torch.float32
    torch.testing.assert_close(s, gate_reference(logits, temperature, softmax, top_k, softmax_topk, weight))
    n = logits.shape[-1]
    if top_k is not None and (softmax or softmax_topk):  # softmax outputs are > 0, so exactly k survive
        assert ((s != 0).sum(-1) == top_k).all()
    if top_k is not None:
        assert ((s != 0).sum(-1) <= top_k).all()
    if softmax_topk or (softmax and (top_k is None or top_k == n)):
        torch.testing.assert_close(s.sum(-1), torch.full(s.shape[:-1], weight))
    if softmax:
        assert (s >= 0).all()


_MODELS: dict = {}


def _model(expert_dirs, layerwise: bool = False, depth: int = 2):
    """One model per gating layout, shared by all examples (hypothesis runs many examples in one test call)."""
    key = (layerwise, depth)
    if key not in _MODELS:
        _MODELS[key] = build_xlora("llama", expert_dirs, layerwise_scalings=layerwise, xlora_depth=depth).eval()
    return _MODELS[key]


@functools.cache
def _single_lora(path: str):
    return PeftModel.from_pretrained(BUILDERS["llama"](), path).eval()


@MODEL
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 9),
    layerwise=st.booleans(),
    depth=st.integers(1, 2),
    temperature=temperatures,
    top_k=st.none() | st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_model_scalings_invariants(expert_dirs, batch, seq, layerwise, depth, temperature, top_k, seed):
    model = _model(expert_dirs, layerwise, depth)
    config = model.peft_config["default"]
    config.softmax_temperature = temperature
    model.set_topk_lora(top_k)
    try:
        model(input_ids=input_ids(batch, seq, seed=seed))
    finally:
        config.softmax_temperature = 1.0
        model.set_topk_lora(None)
    s = model.get_latest_scalings()
    n_layers = len(model.base_model.mixture_layer_names)
    assert s.shape == (batch, seq, n_layers, 3)
    assert torch.isfinite(s).all() and (s >= 0).all()
    if top_k is None:
        torch.testing.assert_close(s.sum(-1), torch.ones(batch, seq, n_layers))
    else:
        assert ((s != 0).sum(-1) == top_k).all()
    if not layerwise:
        assert (s == s[:, :, :1]).all()


@MODEL
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 9),
    expert=st.sampled_from(["math", "code", "poetry"]),
    seed=st.integers(0, 1000),
)
def test_pinned_one_hot_equals_single_expert(expert_dirs, batch, seq, expert, seed):
    model = _model(expert_dirs)
    ids = input_ids(batch, seq, seed=seed)
    model.set_static_scalings({expert: 1.0})
    try:
        ours = model(input_ids=ids).logits
    finally:
        model.set_static_scalings(None)
    reference = _single_lora(expert_dirs["llama"][expert])(input_ids=ids).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@st.composite
def layer_cases(draw):
    n_experts = draw(st.integers(1, 5))
    users = sorted(draw(st.sets(st.integers(0, n_experts - 1), min_size=1)))
    ranks = [draw(st.integers(1, 6)) for _ in users]
    n_in, n_out = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    lead = (draw(st.integers(1, 3)), draw(st.integers(1, 5)))
    n_layers = draw(st.integers(1, 3))
    return n_experts, users, ranks, n_in, n_out, lead, n_layers, draw(st.integers(0, 2**16))


@FAST
@given(layer_cases())
def test_stacked_mixture_equals_per_expert_loop(case):
    n_experts, users, ranks, n_in, n_out, lead, n_layers, seed = case
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(n_in, n_out)
    loras = [
        ModuleLora(torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g), r, 0.5 + i, 0.0)
        for i, r in enumerate(ranks)
    ]
    index = n_layers - 1
    layer = XLoraLayer(base, layer_index=index, expert_indices=users, loras=loras)
    x = torch.randn(*lead, n_in, generator=g)
    scalings = torch.rand(*lead, n_layers, n_experts, generator=g)  # (batch, seq, n_layers, n_experts)
    with use_routing(Routing(scalings)):
        ours = layer(x)
    slot = index if n_layers > 1 else 0
    ref = mixture_reference(x, base(x), [(lo.A, lo.B, lo.scale) for lo in loras], scalings[:, :, slot][..., users])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


numbers = st.one_of(st.integers(-3, 10), st.floats(allow_nan=True, allow_infinity=True), st.none())


@FAST
@given(
    depth=numbers,
    size=numbers,
    dropout=numbers,
    temperature=numbers,
    top_k=numbers,
    pass_value=numbers,
    weight=numbers,
    softmax_topk=st.booleans(),
)
def test_config_accepts_exactly_the_valid_values(
    depth, size, dropout, temperature, top_k, pass_value, weight, softmax_topk
):
    # Any value is either accepted, and then within its documented range, or refused with a ValueError naming it.
    values = {
        "xlora_depth": depth,
        "xlora_size": size,
        "xlora_dropout_p": dropout,
        "softmax_temperature": temperature,
        "top_k_lora": top_k,
        "scaling_pass_value": pass_value,
        "global_scaling_weight": weight,
        "enable_softmax_topk": softmax_topk,
    }
    valid = (
        isinstance(depth, int) and depth >= 1
        and isinstance(size, int) and size >= 1
        and dropout is not None and 0 <= dropout < 1
        and temperature is not None and math.isfinite(temperature) and temperature >= 1e-3
        and (top_k is None or (isinstance(top_k, int) and 1 <= top_k <= 3))
        and pass_value is not None and math.isfinite(pass_value)
        and weight is not None and math.isfinite(weight)
        and (not softmax_topk or top_k is not None)
    )  # fmt: skip
    adapters = {"a": "x", "b": "y", "c": "z"}
    if valid:
        config = XLoraConfig(adapters=adapters, **values)
        assert config.top_k_lora == top_k and config.softmax_temperature == temperature
    else:
        with pytest.raises(ValueError):
            XLoraConfig(adapters=adapters, **values)
