"""Router regularisers: load balancing and entropy against a token-by-token reference, and in the model's loss."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.models import build_xlora, input_ids
from helpers.reference import router_losses_reference
from peft_xlora import XLoraConfig
from peft_xlora.core.regularisers import router_losses


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("slots", [1, 3])
@pytest.mark.parametrize("with_mask", [False, True])
def test_router_losses_match_reference(top_k, slots, with_mask):
    logits = torch.randn(3, 5, slots, 4) * 2
    mask = (torch.rand(3, 5) > 0.3).long() if with_mask else None
    got = router_losses(logits, temperature=0.7, top_k=top_k, mask=mask)
    want = router_losses_reference(logits, temperature=0.7, top_k=top_k, mask=mask)
    for name in ("load_balancing", "entropy"):
        torch.testing.assert_close(got[name], torch.tensor(want[name]), rtol=1e-5, atol=1e-6)


def test_router_losses_extremes():
    uniform = router_losses(torch.zeros(2, 8, 1, 4))
    assert uniform["entropy"].item() == pytest.approx(math.log(4), rel=1e-6)
    balanced = torch.eye(4).repeat(2, 1)[None, :, None] * 20  # each expert wins 2 of 8 tokens, confidently
    assert router_losses(balanced)["load_balancing"].item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.tensor([20.0, 0, 0, 0]).expand(1, 8, 1, 4)
    assert router_losses(collapsed)["load_balancing"].item() == pytest.approx(4.0, abs=1e-6)
    assert router_losses(collapsed)["entropy"].item() < 1e-6


def test_off_by_default_and_config_checks(expert_dirs):
    model = build_xlora("llama", expert_dirs)
    out = model(input_ids=input_ids(), labels=input_ids())
    assert "router_loss" not in out and model.base_model.get_latest_router_losses() is None
    with pytest.raises(ValueError, match="router_entropy_coef"):
        XLoraConfig(adapters={"a": "x"}, router_entropy_coef=-1.0)


@pytest.mark.parametrize("top_k", [None, 1])
def test_regularisers_are_added_to_the_loss_with_their_gradient(top_k, expert_dirs):
    ids, labels = input_ids(seed=3), input_ids(seed=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    coefs = {"router_load_balancing_coef": 0.3, "router_entropy_coef": 0.05}
    torch.manual_seed(0)
    plain = build_xlora("llama", expert_dirs, xlora_dropout_p=0.0, top_k_lora=top_k)
    torch.manual_seed(0)
    regular = build_xlora("llama", expert_dirs, xlora_dropout_p=0.0, top_k_lora=top_k, **coefs)
    base_out = plain(input_ids=ids, attention_mask=mask, labels=labels)
    out = regular(input_ids=ids, attention_mask=mask, labels=labels)

    # The terms of this forward, from the logits the classifier gave.
    seen = {}
    regular.base_model.xlora_classifier.register_forward_hook(lambda m, a, o: seen.setdefault("logits", o))
    regular(input_ids=ids, attention_mask=mask)
    terms = router_losses(seen["logits"], top_k=top_k, mask=mask)
    latest = regular.base_model.get_latest_router_losses()
    for name in terms:
        torch.testing.assert_close(latest[name], terms[name].detach())
    expected = 0.3 * terms["load_balancing"] + 0.05 * terms["entropy"]
    torch.testing.assert_close(out.router_loss, expected)
    torch.testing.assert_close(out.loss, base_out.loss + expected)

    # Its gradient reaches the classifier: the difference of the two gradients is the regulariser's own.
    base_out.loss.backward()
    out.loss.backward()
    reg_grads = torch.autograd.grad(expected, list(regular.base_model.xlora_classifier.parameters()))
    for p_plain, p_reg, g in zip(
        plain.base_model.xlora_classifier.parameters(), regular.base_model.xlora_classifier.parameters(), reg_grads
    ):
        assert g.abs().sum() > 0
        torch.testing.assert_close(p_reg.grad - p_plain.grad, g, rtol=1e-4, atol=1e-6)
