"""Gradient checkpointing lowers the activation memory X-LoRA training keeps between forward and backward."""

from __future__ import annotations

import pytest
import torch

from helpers.models import build_xlora, input_ids


def saved_activation_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # the checkpointed recomputation must still work
    return sum(storages.values())


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_checkpointing_saves_less(mode, expert_dirs):
    ids = input_ids(batch=2, seq=64, seed=11)
    plain = saved_activation_bytes(build_xlora("llama", expert_dirs).train(), ids)
    model = build_xlora("llama", expert_dirs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    checkpointed = saved_activation_bytes(model.train(), ids)
    assert checkpointed < 0.6 * plain, (checkpointed, plain)
    assert model.base_model.xlora_classifier.layers[0].weight.grad.abs().sum() > 0
