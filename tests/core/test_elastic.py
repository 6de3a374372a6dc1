"""Experts added to or removed from a built X-LoRA model, and experts masked at inference (core/elastic.py)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_xlora
from helpers.models import build_xlora, input_ids, make_expert, tiny_llama
from helpers.reference import gate_reference
from peft_xlora import XLoraConfig
from peft_xlora.core.elastic import ExpertChangeWarning
from peft_xlora.core.model import find_tuner

# Adapts k_proj, which no other expert does (new mixture layers between q_proj and v_proj), and v_proj.
NEW_SPEC = {"r": 3, "lora_alpha": 6, "target_modules": ["k_proj", "v_proj"]}

GATINGS = {
    "softmax": {},
    "top-k": {"top_k_lora": 2},
    "top-k renormalised": {"top_k_lora": 2, "enable_softmax_topk": True},
    "layerwise": {"layerwise_scalings": True},
    "layerwise top-k": {"layerwise_scalings": True, "top_k_lora": 1},
    "no softmax": {"enable_softmax": False},
    "no softmax layerwise": {"enable_softmax": False, "layerwise_scalings": True},
    "temperature 0.5": {"softmax_temperature": 0.5},
}
# Under top-k an expert outside the k largest gets no gradient (as the experts already there); elsewhere it gets one.
NO_GRADIENT = {"top-k renormalised"}


@pytest.fixture(scope="module")
def new_expert(tmp_path_factory):
    return make_expert("llama", NEW_SPEC, 7, str(tmp_path_factory.mktemp("llama-new")))


def build(expert_dirs, **overrides):
    return build_xlora("llama", expert_dirs, xlora_dropout_p=0.0, **overrides).eval()


def logits_and_scalings(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids).logits
    return out, model.get_latest_scalings()


def new_rows(model, n_experts):
    """Rows of the classifier's last layer that are the last expert's outputs, one per layer slot."""
    last = find_tuner(model).xlora_classifier.layers[-1]
    return torch.arange(n_experts - 1, last.out_features, n_experts)


@pytest.mark.parametrize("gating", GATINGS, ids=list(GATINGS))
def test_added_expert_changes_nothing_yet_gets_a_gradient(expert_dirs, new_expert, gating):
    model = build(expert_dirs, **GATINGS[gating])
    ids = input_ids()
    before, scalings_before = logits_and_scalings(model, ids)
    n_layers = len(find_tuner(model).mixture_layer_names)
    model.add_expert("new", new_expert)

    tuner = find_tuner(model)
    assert tuner.expert_names == ["math", "code", "poetry", "new"]
    assert len(tuner.mixture_layer_names) == n_layers + 2  # k_proj of both decoder layers
    assert [layer.layer_index for layer in tuner.mixture_layers()] == list(range(n_layers + 2))
    after, scalings = logits_and_scalings(model, ids)
    torch.testing.assert_close(after, before)  # float32 tolerance
    old_slots = [tuner.mixture_layer_names.index(n) for n in tuner.mixture_layer_names if "k_proj" not in n]
    torch.testing.assert_close(scalings[:, :, old_slots, :3], scalings_before, rtol=1e-6, atol=2e-7)
    assert float(scalings[..., 3].abs().max()) < 2e-7
    if "no softmax" in gating:
        assert float(scalings[..., 3].abs().max()) == 0.0

    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    last = tuner.xlora_classifier.layers[-1]
    grad = last.weight.grad[new_rows(model, 4)]
    assert torch.isfinite(grad).all()
    if gating in NO_GRADIENT:
        assert float(grad.abs().max()) == 0.0
    else:
        assert float(grad.abs().max()) > 0.0


@pytest.mark.parametrize("layerwise", [False, True], ids=["shared", "layerwise"])
def test_added_expert_equals_a_model_built_with_it(expert_dirs, new_expert, layerwise):
    # The extended stacks and the inserted mixture layers compute what a model built with four experts computes.
    model = build(expert_dirs, layerwise_scalings=layerwise)
    model.add_expert("new", new_expert)
    reference = build({"llama": {**expert_dirs["llama"], "new": new_expert}}, layerwise_scalings=layerwise)
    reference.base_model.xlora_classifier.load_state_dict(model.base_model.xlora_classifier.state_dict())
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-6)
    assert find_tuner(model).mixture_layer_names == find_tuner(reference).mixture_layer_names


def test_training_only_the_new_column_continues_from_where_it_was(expert_dirs, new_expert):
    # Text sampled from the new expert alone: a gate that learns to pick it lowers the loss from where it was.
    teacher = peaked({**expert_dirs["llama"], "new": new_expert})
    teacher.set_static_scalings({"new": 1.0})
    torch.manual_seed(5)
    with torch.no_grad():
        data = teacher.generate(
            input_ids=torch.randint(3, 97, (8, 1)), do_sample=True, top_k=0, max_new_tokens=11, min_new_tokens=11
        )
    model = peaked(expert_dirs["llama"])
    with torch.no_grad():
        loss_before = model(input_ids=data, labels=data).loss
    model.add_expert("new", new_expert, logit_offset=4.0)
    model.train()
    last = find_tuner(model).xlora_classifier.layers[-1]
    rows = torch.zeros(last.out_features, 1)
    rows[new_rows(model, 4)] = 1.0
    last.weight.register_hook(lambda g: g * rows)  # train the new expert's column only
    last.bias.register_hook(lambda g: g * rows[:, 0])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([last.weight, last.bias], lr=0.2)
    losses, shares = [], []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(input_ids=data, labels=data).loss
        losses.append(float(loss))
        shares.append(float(model.get_latest_scalings()[..., 3].mean()))
        loss.backward()
        optimizer.step()
    # The first step starts where the three-expert model was (offset 4: share below e^-4 ~ 0.018).
    assert losses[0] == pytest.approx(float(loss_before), abs=0.02)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, share of the new expert {shares[0]:.4f} -> {shares[-1]:.4f}")
    assert losses[-1] < losses[0] - 0.05 and shares[-1] > 4 * shares[0]
    last_names = {n for n, p in model.named_parameters() if p is last.weight or p is last.bias}
    for name, param in model.named_parameters():
        if name in frozen and name not in last_names:
            assert torch.equal(param.detach(), frozen[name]), name
    kept = torch.ones(last.out_features, dtype=torch.bool)
    kept[new_rows(model, 4)] = False
    weight_name = next(n for n in last_names if n.endswith("weight"))
    torch.testing.assert_close(last.weight.detach()[kept], frozen[weight_name][kept], rtol=0, atol=0)


def peaked(adapters):
    """X-LoRA over a tiny Llama with its head scaled up: peaked next-token distributions, where routing shows."""
    base = tiny_llama()
    with torch.no_grad():
        base.lm_head.weight.mul_(20.0)
    config = XLoraConfig(task_type="CAUSAL_LM", adapters=adapters, xlora_depth=2, xlora_size=16, xlora_dropout_p=0.0)
    return get_peft_model(base, config).eval()


@pytest.mark.parametrize("gating", ["softmax", "top-k", "top-k renormalised", "no softmax", "temperature 0.5"])
def test_masked_experts_match_a_gate_over_the_kept_logits(expert_dirs, gating):
    model = build(expert_dirs, **GATINGS[gating])
    tuner = find_tuner(model)
    logits = {}
    tuner.xlora_classifier.register_forward_hook(lambda m, a, out: logits.__setitem__("last", out.detach()))
    model.set_active_experts(["math", "poetry"])
    assert model.get_active_experts() == ["math", "poetry"]
    _, scalings = logits_and_scalings(model, input_ids())
    config = tuner.xlora_config
    kept = [0, 2]
    top_k = None if config.top_k_lora is None else min(config.top_k_lora, len(kept))
    expected = torch.zeros_like(scalings[:, :, :1])
    expected[..., kept] = gate_reference(
        logits["last"][..., kept],
        config.softmax_temperature,
        config.enable_softmax,
        top_k,
        config.enable_softmax_topk,
        config.global_scaling_weight,
    )
    torch.testing.assert_close(scalings[:, :, :1], expected, rtol=1e-6, atol=1e-7)
    assert float(scalings[..., 1].abs().max()) == 0.0
    model.set_active_experts(None)
    assert model.get_active_experts() == ["math", "code", "poetry"]


@pytest.mark.parametrize("layerwise", [False, True], ids=["shared", "layerwise"])
def test_removed_expert_renormalises_like_masking_it(expert_dirs, layerwise):
    model = build(expert_dirs, layerwise_scalings=layerwise)
    ids = input_ids()
    model.set_active_experts(["math", "poetry"])
    masked, masked_scalings = logits_and_scalings(model, ids)
    model.set_active_experts(None)
    n_layers = len(find_tuner(model).mixture_layer_names)
    model.remove_expert("code")  # the only expert on o_proj and up_proj: those mixture layers go
    tuner = find_tuner(model)
    assert tuner.expert_names == ["math", "poetry"] and tuner.xlora_config.expert_order == ["math", "poetry"]
    assert not any("o_proj" in n or "up_proj" in n for n in tuner.mixture_layer_names)
    assert len(tuner.mixture_layer_names) == n_layers - 4
    assert isinstance(tuner.model.model.layers[0].self_attn.o_proj, torch.nn.Linear)
    removed, scalings = logits_and_scalings(model, ids)
    torch.testing.assert_close(removed, masked, rtol=1e-6, atol=1e-6)
    kept_slots = [i for i in range(n_layers) if i not in _slots_of(expert_dirs, layerwise)]
    if layerwise:
        masked_scalings = masked_scalings[:, :, kept_slots]
    else:
        scalings, masked_scalings = scalings[:, :, :1], masked_scalings[:, :, :1]
    torch.testing.assert_close(scalings, masked_scalings[..., [0, 2]], rtol=1e-6, atol=1e-7)
    reference = build(
        {"llama": {k: v for k, v in expert_dirs["llama"].items() if k != "code"}}, layerwise_scalings=layerwise
    )
    reference.base_model.xlora_classifier.load_state_dict(model.base_model.xlora_classifier.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits, removed, rtol=0, atol=1e-6)


def _slots_of(expert_dirs, layerwise):
    names = find_tuner(build(expert_dirs, layerwise_scalings=layerwise)).mixture_layer_names
    return [i for i, n in enumerate(names) if "o_proj" in n or "up_proj" in n]


@pytest.mark.parametrize("layerwise", [False, True], ids=["shared", "layerwise"])
def test_changed_experts_are_saved_and_reload_exactly(expert_dirs, new_expert, tmp_path, layerwise):
    model = build(expert_dirs, layerwise_scalings=layerwise, use_trainable_adapters=True)
    model.add_expert("new", new_expert)
    assert find_tuner(model).mixture_layers()[1].xlora_A.requires_grad  # trainable experts stay trainable
    model.remove_expert("code")
    ids = input_ids()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "changed")
    config = XLoraConfig.from_pretrained(tmp_path / "changed")
    assert config.expert_order == ["math", "poetry", "new"] and list(config.experts) == ["math", "poetry", "new"]
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "changed").eval()
    last = find_tuner(loaded).xlora_classifier.layers[-1]
    n_slots = len(find_tuner(loaded).mixture_layer_names) if layerwise else 1
    assert tuple(last.weight.shape) == (3 * n_slots, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference, rtol=0, atol=0)


def test_add_expert_keeps_pinned_scalings_and_masks(expert_dirs, new_expert):
    model = build(expert_dirs)
    ids = input_ids()
    model.set_static_scalings({"math": 0.7, "code": 0.3})
    pinned, _ = logits_and_scalings(model, ids)
    model.add_expert("new", new_expert)
    again, _ = logits_and_scalings(model, ids)
    torch.testing.assert_close(again, pinned, rtol=0, atol=0)
    assert find_tuner(model)._static_scalings[0].tolist() == pytest.approx([0.7, 0.3, 0.0, 0.0])
    model.set_static_scalings(None)
    model.set_active_experts(["math", "code"])
    model.add_expert("new2", new_expert)
    assert model.get_active_experts() == ["math", "code", "new2"]


def test_changing_experts_with_a_scaling_pass_value_warns(expert_dirs, new_expert):
    model = build(expert_dirs, scaling_pass_value=0.5)
    with pytest.warns(ExpertChangeWarning, match=r"set_scaling_pass_value\(0\)"):
        model.add_expert("new", new_expert)
    with pytest.warns(ExpertChangeWarning, match="removing an expert changes the scaling pass"):
        model.remove_expert("new")


# ---- bad input (docs/errors.md): refused before anything changes ----


def _unchanged(model, ids, reference):
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=0, atol=0)
    assert find_tuner(model).expert_names == ["math", "code", "poetry"]


def test_bad_add_expert_is_refused_and_changes_nothing(expert_dirs, new_expert, tmp_path):
    model = build(expert_dirs, top_k_lora=3)
    ids = input_ids()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    with pytest.raises(ValueError, match="already has an expert 'math'"):
        model.add_expert("math", new_expert)
    with pytest.raises(ValueError, match="Expert names must be non-empty strings"):
        model.add_expert(" ", new_expert)
    with pytest.raises(ValueError, match="`logit_offset` must be a number >= 0"):
        model.add_expert("new", new_expert, logit_offset=float("nan"))
    with pytest.raises(peft_xlora.ExpertError, match="cannot read a PEFT adapter config"):
        model.add_expert("ghost", tmp_path / "no-such-adapter")
    gpt2_expert = make_expert("gpt2", {"r": 2, "target_modules": ["c_attn"]}, 3, str(tmp_path / "gpt2"))
    with pytest.raises(peft_xlora.ExpertError, match="which this LlamaForCausalLM does not have"):
        model.add_expert("gpt2", gpt2_expert)
    _unchanged(model, ids, reference)


def test_bad_remove_and_mask_are_refused_and_change_nothing(expert_dirs):
    model = build(expert_dirs, top_k_lora=3)
    ids = input_ids()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    with pytest.raises(ValueError, match=r"Unknown expert 'nope'; this model has \['math', 'code', 'poetry'\]"):
        model.remove_expert("nope")
    with pytest.raises(ValueError, match=r"`top_k_lora=3` would exceed the 2 experts left; lower it first"):
        model.remove_expert("code")
    with pytest.raises(ValueError, match=r"Unknown experts \['nope'\]"):
        model.set_active_experts(["math", "nope"])
    with pytest.raises(ValueError, match="needs at least one expert; pass None"):
        model.set_active_experts([])
    _unchanged(model, ids, reference)
    model.set_topk_lora(None)
    model.set_active_experts(["code"])
    with pytest.raises(ValueError, match="'code' is the only active expert"):
        model.remove_expert("code")
    model.set_active_experts(None)
    model.remove_expert("code")
    model.remove_expert("math")
    with pytest.raises(ValueError, match="'poetry' is the only expert; X-LoRA needs at least one"):
        model.remove_expert("poetry")


def test_add_expert_on_a_model_built_from_a_config(expert_dirs, new_expert):
    # get_peft_model directly (not the helper): the PeftModel reaches the tuner's methods.
    model = get_peft_model(tiny_llama(), XLoraConfig(task_type="CAUSAL_LM", adapters=expert_dirs["llama"]))
    model.add_expert("new", new_expert)
    assert model.peft_config["default"].expert_order == ["math", "code", "poetry", "new"]


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_added_layers_train_under_gradient_checkpointing(expert_dirs, new_expert, mode):
    # The new k_proj mixture layers get their scalings through checkpointed decoder layers like the others.
    def grads(checkpointing):
        model = build(expert_dirs, layerwise_scalings=True, use_trainable_adapters=True)
        model.add_expert("new", new_expert, logit_offset=2.0)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
        model.train()
        ids = input_ids()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    assert any("k_proj" in n for n in plain)
    for name, grad in plain.items():
        assert checkpointed[name] is not None and float(grad.abs().sum()) > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)
