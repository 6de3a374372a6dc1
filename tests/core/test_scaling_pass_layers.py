"""`scaling_pass_layers=k`: the classifier reads the residual stream after the first k decoder layers."""

import pytest
import torch

from helpers.models import build_xlora, input_ids
from peft_xlora.core.classifier import gate


@pytest.mark.parametrize(("arch", "k"), [("llama", 1), ("gpt2", 1)])
def test_scalings_come_from_the_kth_layer(arch, k, expert_dirs):
    model = build_xlora(arch, expert_dirs, scaling_pass_layers=k).eval()
    ids = input_ids()
    model(input_ids=ids)
    with model.disable_adapter():
        # hidden_states[0] is the embedding output, hidden_states[k] the k-th layer's output (the last one normed).
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    reference_hidden = states[k]
    expected = gate(model.base_model.xlora_classifier(reference_hidden))
    torch.testing.assert_close(model.get_latest_scalings()[:, :, :1], expected)


def test_cached_generation_equals_uncached(expert_dirs):
    model = build_xlora("llama", expert_dirs, scaling_pass_layers=1).eval()
    ids = input_ids(batch=1, seq=5)
    cached = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    uncached = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_training_and_checkpointing_still_reach_the_classifier(expert_dirs):
    model = build_xlora("llama", expert_dirs, scaling_pass_layers=1, xlora_dropout_p=0.0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.base_model.xlora_classifier.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_too_many_layers_is_a_clear_error(expert_dirs):
    with pytest.raises(ValueError, match="has 2 decoder layers"):
        build_xlora("llama", expert_dirs, scaling_pass_layers=3)
    with pytest.raises(ValueError, match="scaling_pass_layers"):
        build_xlora("llama", expert_dirs, scaling_pass_layers=0)
