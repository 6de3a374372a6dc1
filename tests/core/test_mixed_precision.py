"""Mixed precision: half-precision base models and torch.autocast on CPU, with the classifier and the gate in float32.

Each low-precision run is compared with the float32 model carrying the same classifier weights: the loss within a
dtype-dependent tolerance, and the classifier's gradient pointing the same way (cosine similarity).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from helpers.models import BUILDERS, input_ids
from peft_xlora import XLoraConfig
from peft_xlora.core.classifier import gate

HALF = [torch.bfloat16, torch.float16]
LOSS_RTOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _model(expert_dirs, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    base = BUILDERS["llama"]().to(dtype)
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        adapters=expert_dirs["llama"],
        xlora_depth=2,
        xlora_size=16,
        xlora_dropout_p=0.0,
        classifier_init="random",
        **overrides,
    )
    return get_peft_model(base, config)


def _loss_and_grads(model, ids, autocast_dtype=None):
    model.zero_grad()
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float().flatten() for n, p in model.named_parameters() if p.requires_grad}
    return loss.float().item(), grads


def _assert_close_training(reference, other, dtype):
    (ref_loss, ref_grads), (loss, grads) = reference, other
    assert abs(loss - ref_loss) <= LOSS_RTOL[dtype] * abs(ref_loss), (loss, ref_loss)
    assert ref_grads.keys() == grads.keys() and ref_grads
    for name, ref in ref_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        cos = torch.nn.functional.cosine_similarity(grads[name], ref, dim=0)
        assert cos > 0.98, (name, cos.item())


def _skip_unless_supported(dtype):
    try:
        torch.nn.functional.linear(torch.ones(2, 2, dtype=dtype), torch.ones(2, 2, dtype=dtype)).sum()
    except RuntimeError as exc:  # pragma: no cover - older CPU builds
        pytest.skip(f"{dtype} matmul not supported on this CPU build: {exc}")


@pytest.mark.parametrize("dtype", HALF)
def test_classifier_and_gate_run_in_float32_under_autocast(dtype, expert_dirs):
    _skip_unless_supported(dtype)
    model = _model(expert_dirs)
    seen = {}

    def capture(module, args, output):
        seen["hidden"], seen["logits"] = args[0], output

    model.base_model.xlora_classifier.register_forward_hook(capture)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = model(input_ids=input_ids(seed=8))
    assert out.logits.dtype == dtype  # the base model did run under autocast
    assert seen["logits"].dtype == torch.float32
    classifier = model.base_model.xlora_classifier
    with torch.no_grad():
        want = gate(classifier(seen["hidden"].float()))
    torch.testing.assert_close(model.get_latest_scalings()[:, :, :1], want, rtol=0, atol=0)


SINGLE_PASS = {"routing": "single_pass", "scaling_pass_layers": 1}
ROUTINGS = pytest.mark.parametrize("routing", [{}, SINGLE_PASS], ids=["dual-pass", "single-pass"])


@ROUTINGS
@pytest.mark.parametrize("dtype", HALF)
def test_autocast_loss_and_gradients_follow_float32(dtype, routing, expert_dirs):
    _skip_unless_supported(dtype)
    ids = input_ids(batch=2, seq=12, seed=9)
    model = _model(expert_dirs, **routing)
    _assert_close_training(_loss_and_grads(model, ids), _loss_and_grads(model, ids, autocast_dtype=dtype), dtype)


@ROUTINGS
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("trainable_experts", [False, True])
def test_half_precision_base_trains_in_float32(dtype, trainable_experts, routing, expert_dirs):
    _skip_unless_supported(dtype)
    ids = input_ids(batch=2, seq=12, seed=10)
    reference = _model(expert_dirs, use_trainable_adapters=trainable_experts, **routing)
    model = _model(expert_dirs, dtype, use_trainable_adapters=trainable_experts, **routing)
    # PEFT's default autocast_adapter_dtype=True: what trains is float32, the frozen base and experts stay in `dtype`.
    for name, param in model.named_parameters():
        expected = torch.float32 if param.requires_grad else dtype
        assert param.dtype == expected, (name, param.dtype)
    model.base_model.xlora_classifier.load_state_dict(reference.base_model.xlora_classifier.state_dict())
    result = _loss_and_grads(model, ids)
    assert model.get_latest_scalings().dtype == torch.float32
    _assert_close_training(_loss_and_grads(reference, ids), result, dtype)
