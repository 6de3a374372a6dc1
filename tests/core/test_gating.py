"""The gating setters: each validates its value; a refused value leaves the config (and the next save) as before."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers.models import build_xlora, input_ids
from peft_xlora import save_pretrained

# (setter, a refused value, the config field it changes)
REFUSED = [
    ("set_global_scaling_weight", math.nan, "global_scaling_weight"),
    ("set_global_scaling_weight", math.inf, "global_scaling_weight"),
    ("set_global_scaling_weight", "heavy", "global_scaling_weight"),
    ("set_scaling_pass_value", math.inf, "scaling_pass_value"),
    ("set_scaling_pass_value", -math.nan, "scaling_pass_value"),
    ("set_scaling_pass_value", [0.5], "scaling_pass_value"),
    ("set_topk_lora", 0, "top_k_lora"),
    ("set_topk_lora", 4, "top_k_lora"),
    ("set_topk_lora", 1.5, "top_k_lora"),
]


@pytest.mark.parametrize(("setter", "value", "field"), REFUSED, ids=[f"{s}-{v!r}" for s, v, _ in REFUSED])
def test_refused_value_keeps_the_previous_one(expert_dirs, tmp_path, setter, value, field):
    model = build_xlora("llama", expert_dirs)
    config = model.base_model.xlora_config
    before = config.to_dict()
    with pytest.raises(ValueError, match=field):
        getattr(model, setter)(value)
    assert config.to_dict() == before
    save_pretrained(model, tmp_path / "ckpt")  # the refused value must not reach the checkpoint either
    saved = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert saved[field] == before[field]


def test_accepted_values_are_applied_and_saved(expert_dirs, tmp_path):
    model = build_xlora("llama", expert_dirs)
    model.set_global_scaling_weight(0.5)
    model.set_scaling_pass_value(None)  # 1 / n_experts
    model.set_topk_lora(2)
    model.set_use_trainable_adapters(True)
    config = model.base_model.xlora_config
    assert (config.global_scaling_weight, config.top_k_lora, config.use_trainable_adapters) == (0.5, 2, True)
    assert config.scaling_pass_value == pytest.approx(1 / 3)
    assert all(layer.xlora_A.requires_grad for layer in model.base_model.mixture_layers())
    save_pretrained(model, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert (saved["global_scaling_weight"], saved["top_k_lora"], saved["use_trainable_adapters"]) == (0.5, 2, True)


def test_update_config_changes_fields_together_or_not_at_all(expert_dirs):
    model = build_xlora("llama", expert_dirs)
    tuner = model.base_model
    with pytest.raises(ValueError, match="softmax_temperature"):
        tuner.update_config(global_scaling_weight=3.0, softmax_temperature=-1.0)
    assert tuner.xlora_config.global_scaling_weight == 1.0
    assert tuner.xlora_config.softmax_temperature == 1.0
    with pytest.raises(ValueError, match="no field"):
        tuner.update_config(not_a_field=1)
    tuner.update_config(global_scaling_weight=3.0, softmax_temperature=2.0)
    assert (tuner.xlora_config.global_scaling_weight, tuner.xlora_config.softmax_temperature) == (3.0, 2.0)


def test_refused_setter_leaves_the_outputs_unchanged(expert_dirs):
    model = build_xlora("llama", expert_dirs).eval()
    ids = input_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with pytest.raises(ValueError):
            model.set_global_scaling_weight(math.nan)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("layerwise", [False, True])
def test_per_row_static_scalings_equal_separate_runs(expert_dirs, layerwise):
    # N fixed mixtures of the same text in one batched forward == N forwards, each pinned to its own mixture.
    model = build_xlora("llama", expert_dirs, layerwise_scalings=layerwise)
    n_layers = len(model.base_model.mixture_layer_names)
    torch.manual_seed(3)
    # (rows, n_layers, n_experts) random mixtures; or each expert alone, then the uniform mixture, (rows, n_experts)
    rows = torch.rand(4, n_layers, 3) if layerwise else torch.cat([torch.eye(3), torch.full((1, 3), 1 / 3)])
    ids = input_ids(batch=1)
    expected = []
    for weights in rows:
        model.set_static_scalings(weights)
        expected.append(model(input_ids=ids).logits)
    model.set_static_scalings(rows, per_row=True)
    batched = model(input_ids=ids.expand(rows.shape[0], -1)).logits
    torch.testing.assert_close(batched, torch.cat(expected))
    assert not torch.allclose(expected[0], expected[1])  # the rows really differ


def test_per_row_static_scalings_refuse_a_batch_of_another_size(expert_dirs):
    model = build_xlora("llama", expert_dirs)
    model.set_static_scalings(torch.eye(3), per_row=True)
    with pytest.raises(ValueError, match=r"pinned to 3 per-row weight vectors .* but this batch has 2 rows"):
        model(input_ids=input_ids(batch=2))
    model(input_ids=input_ids(batch=3))  # the right size still runs


def test_export_refuses_a_per_row_pin(expert_dirs, tmp_path):
    from peft_xlora import export_lora

    model = build_xlora("llama", expert_dirs)
    model.base_model.set_static_scalings(torch.eye(3), per_row=True)
    with pytest.raises(ValueError, match=r"pinned to per-row weights .* one LoRA holds one mixture"):
        export_lora(model, tmp_path / "lora")
    export_lora(model, tmp_path / "lora", weights={"math": 1.0})  # explicit weights still export
