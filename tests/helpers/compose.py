"""Checks for features that combine: a changed model against one built directly, and refusals that change nothing.

- `same_as_built(model, reference, inputs, folder, base)`: `model` (changed in place: an expert added or removed, a
  structural config change) saves, and its checkpoint loaded into `reference` (built directly with the new parts,
  from the experts' sources) and into a fresh base (`PeftModel.from_pretrained`) gives the outputs `model` gives.
- `snapshot(model, inputs)` / `assert_unchanged(model, before, inputs)`: outputs, config and parameters bit-identical.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from peft import PeftModel, set_peft_model_state_dict
from peft.utils.save_and_load import load_peft_weights


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def same_as_built(model, reference, inputs: dict, folder, base: Callable[[], torch.nn.Module], atol: float = 1e-6):
    """Asserts that `model` equals `reference` (built directly) and a fresh load, once its checkpoint is loaded.

    Args:
        model: The X-LoRA `PeftModel` changed in place.
        reference: A `PeftModel` built directly (from the experts' sources) with the parts `model` has now.
        inputs: Forward keyword arguments.
        folder: Where `model` saves.
        base: Builds a fresh base model for `PeftModel.from_pretrained`.
        atol: Absolute tolerance (the stacks may be summed in another order).

    Returns:
        The model loaded from the checkpoint.
    """
    model.save_pretrained(folder)
    set_peft_model_state_dict(reference, load_peft_weights(str(folder)))
    expected = logits(model, inputs)
    torch.testing.assert_close(logits(reference.eval(), inputs), expected, rtol=0, atol=atol)
    loaded = PeftModel.from_pretrained(base(), folder).eval()
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=atol)
    assert loaded.base_model.mixture_layer_names == reference.base_model.mixture_layer_names
    return loaded


def snapshot(model, inputs: dict) -> dict:
    """What a refusal must leave bit-identical: outputs, the config, every parameter and buffer, the expert list."""
    tuner = model.base_model
    return {
        "logits": logits(model, inputs),
        "config": copy.deepcopy(tuner.xlora_config.to_dict()),
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "experts": list(tuner.expert_names),
        "layers": list(tuner.mixture_layer_names),
        "active": tuner.get_active_experts(),
    }


def assert_unchanged(model, before: dict, inputs: dict) -> None:
    """Asserts that `model` is bit-identical to the `snapshot` it had."""
    after = snapshot(model, inputs)
    assert after["config"] == before["config"]
    assert after["experts"] == before["experts"] and after["layers"] == before["layers"]
    assert after["active"] == before["active"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    torch.testing.assert_close(after["logits"], before["logits"], rtol=0, atol=0)
