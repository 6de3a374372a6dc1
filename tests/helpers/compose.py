"""Checks for features that combine: a changed model against one built directly, and refusals that change nothing.

- `same_as_built(model, reference, inputs, folder, base)`: `model` (changed in place: an expert added or removed, a
  structural config change) saves, and its checkpoint loaded into `reference` (built directly with the new parts,
  from the experts' sources) and into a fresh base (`PeftModel.from_pretrained`) gives the outputs `model` gives.
- `snapshot(model, inputs)` / `assert_unchanged(model, before, inputs)`: outputs, config and parameters bit-identical.
- `OPTIONS`, `build_with(adapters, options)`, `probe_rows(place)`: each option of the table away from its default, a
  tiny Llama built directly with it, and the rows of a place that the parametrized tests of the supported cells try.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

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


# ------------------------------------------------------------------------------ options of the table, set directly

#: Each option of the table away from its default: row -> the config fields that set it (with what it needs).
OPTIONS = {
    "enable_softmax": {"enable_softmax": False},
    "enable_softmax_topk": {"top_k_lora": 2, "enable_softmax_topk": True},
    "softmax_temperature": {"softmax_temperature": 0.5},
    "top_k_lora": {"top_k_lora": 2},
    "topk_compute": {"top_k_lora": 2, "topk_compute": "sparse"},
    "layerwise_scalings": {"layerwise_scalings": True},
    "global_scaling_weight": {"global_scaling_weight": 0.5},
    "use_trainable_adapters": {"use_trainable_adapters": True},
    "scaling_pass_value": {"scaling_pass_value": 0.5},
    "scalings_mode": {"scalings_mode": "prompt"},
    "scaling_pass_layers": {"scaling_pass_layers": 1},
    "router_load_balancing_coef": {"router_load_balancing_coef": 0.3},
    "router_entropy_coef": {"router_entropy_coef": 0.3},
    "router_distillation_coef": {"router_distillation_coef": 0.3},
    "router_distillation_temperature": {"router_distillation_coef": 0.3, "router_distillation_temperature": 0.5},
    "routing": {"routing": "single_pass", "scaling_pass_layers": 1},
    "single_pass_static": {"routing": "single_pass", "scaling_pass_layers": 1, "single_pass_static": "uniform"},
    "distillation": {"router_distillation_coef": 0.3},
}

#: Cells whose place only refuses the option (a structural `update_config` field): test_table.py tries each refusal.
REFUSED_ONLY = {
    ("update_config", row)
    for row in (
        *("task_type", "inference_mode", "hidden_size", "xlora_depth", "xlora_size", "layerwise_scalings"),
        *("trainable_head", "routing", "single_pass_static", "adapters", "experts", "expert_order"),
    )
}


def build_with(adapters: dict, options: dict, **more):
    """An eval-mode tiny Llama X-LoRA built directly with `options` (no dropout; single pass: random static logits)."""
    from helpers.models import build_xlora
    from peft_xlora.core.single_pass import STATIC_NAME

    options = {"xlora_dropout_p": 0.0, **options, **more}
    built = build_xlora("llama", {"llama": adapters}, **options).eval()
    if options.get("routing") == "single_pass" and options.get("single_pass_static", "learned") == "learned":
        static = built.base_model.xlora_classifier.get_submodule(STATIC_NAME)
        with torch.no_grad():  # distinct per layer and expert, not the uniform start
            static.logits.copy_(torch.randn(static.logits.shape, generator=torch.Generator().manual_seed(4)))
    return built


def not_irrelevant(place: str) -> list[str]:
    """The rows a place reads: its supported cells and its refused ones (supported outside their conditions)."""
    from peft_xlora.core.combinations import Status, places

    return [row for row, cell in places()[place].cells.items() if cell.status is not Status.IRRELEVANT]


def probe_rows(place: str, options: dict = OPTIONS) -> list[str]:
    """The rows of `place` that a parametrized test tries with `options`: read there, and not only refused."""
    return sorted(row for row in not_irrelevant(place) if row in options and (place, row) not in REFUSED_ONLY)


ROOT = Path(__file__).resolve().parents[2]


def names_a_test(reference: str, here: Path) -> bool:
    """Whether `reference` names a test that exists: ``path::test_name[param]``, ``path::name`` or ``name`` (`here`).

    The file must define ``def test_name(``; a ``[param]`` must appear in it as a quoted string (a row of a
    parametrized test).
    """
    match = re.fullmatch(r"(?:(?P<path>[\w/.]+\.py)::)?(?P<name>test_\w+)(?:\[(?P<param>[\w-]+)\])?", reference)
    if match is None:
        return False
    path = ROOT / match["path"] if match["path"] else here
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    if f"def {match['name']}(" not in text:
        return False
    return match["param"] is None or f'"{match["param"]}"' in text
