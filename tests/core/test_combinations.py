"""Features that combine (issue 22): each combination against a model built directly, each refusal bit-identical.

An expert added then saved and reloaded equals a model built with all experts from their sources and loaded from that
checkpoint; a removed expert equals a model built without it whose classifier holds the kept experts' rows (the gate
renormalises over the others, `helpers.reference.restricted_classifier_state`); a mask (`set_active_experts`) equals
the model built without the masked experts where a softmax renormalises. A refused change leaves outputs, config and
parameters bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from helpers.compose import OPTIONS, assert_unchanged, build_with, logits, probe_rows, same_as_built, snapshot
from helpers.models import build_xlora, input_ids, make_expert, tiny_llama
from helpers.reference import restricted_classifier_state
from peft_xlora.core.single_pass import STATIC_NAME

# Adapts k_proj, which no other expert does (new mixture layers in both decoder layers), and v_proj.
NEW_SPEC = {"r": 3, "lora_alpha": 6, "target_modules": ["k_proj", "v_proj"]}


@pytest.fixture(scope="module")
def new_expert(tmp_path_factory):
    return make_expert("llama", NEW_SPEC, 7, str(tmp_path_factory.mktemp("llama-new")))


def single(adapters: dict, k: int = 1, **overrides):
    """A single-pass tiny Llama with random static logits (distinct per layer, not the uniform start)."""
    model = build_xlora("llama", {"llama": adapters}, routing="single_pass", scaling_pass_layers=k, **overrides)
    static = model.base_model.xlora_classifier.get_submodule(STATIC_NAME)
    if static.learned:
        with torch.no_grad():
            static.logits.copy_(torch.randn(static.logits.shape, generator=torch.Generator().manual_seed(4)))
    return model.eval()


def without(adapters: dict, *names: str) -> dict:
    return {n: p for n, p in adapters.items() if n not in names}


def ids_input(batch: int = 2) -> dict:
    return {"input_ids": input_ids(batch=batch)}


def built_without(model, adapters: dict, kept: list[str], k: int | None = None, **overrides):
    """The model built directly with the `kept` experts, its classifier holding `model`'s rows for them."""
    reference = build_xlora("llama", {"llama": {n: adapters[n] for n in kept}}, **overrides).eval()
    state = restricted_classifier_state(model.base_model, reference.base_model, kept, k=k)
    reference.base_model.xlora_classifier.load_state_dict(state)
    return reference


# ------------------------------------------------------------------------------------------ single pass x experts


@pytest.mark.parametrize("static", ["learned", "uniform"])
def test_single_pass_remove_expert_equals_built_without(expert_dirs, static, tmp_path):
    adapters = expert_dirs["llama"]
    model = single(adapters, single_pass_static=static)
    kept = ["math", "poetry"]
    options = {"routing": "single_pass", "scaling_pass_layers": 1, "single_pass_static": static}
    reference = built_without(model, adapters, kept, k=1, **options)
    model.set_active_experts(kept)
    masked = logits(model, ids_input())
    model.set_active_experts(None)
    model.remove_expert("code")
    torch.testing.assert_close(logits(model, ids_input()), logits(reference, ids_input()), rtol=0, atol=1e-6)
    torch.testing.assert_close(masked, logits(reference, ids_input()), rtol=1e-5, atol=1e-6)
    assert model.get_latest_scalings().shape[-1] == 2
    fresh = build_xlora("llama", {"llama": without(adapters, "code")}, **options)
    same_as_built(model, fresh, ids_input(), tmp_path / "removed", tiny_llama)


def test_single_pass_add_expert_changes_nothing_and_equals_built_with_it(expert_dirs, new_expert, tmp_path):
    adapters = expert_dirs["llama"]
    model = single(adapters)
    before = logits(model, ids_input())
    model.add_expert("new", new_expert)
    torch.testing.assert_close(logits(model, ids_input()), before, rtol=1e-5, atol=1e-5)
    assert model.get_latest_scalings().shape[-1] == 4
    options = {"routing": "single_pass", "scaling_pass_layers": 1}
    fresh = build_xlora("llama", {"llama": {**adapters, "new": new_expert}}, **options)
    same_as_built(model, fresh, ids_input(), tmp_path / "added", tiny_llama)
    model.set_static_scalings({"new": 1.0})  # the new expert's factors really are there
    alone = PeftModel.from_pretrained(tiny_llama(), new_expert).eval()
    torch.testing.assert_close(logits(model, ids_input()), logits(alone, ids_input()), rtol=1e-5, atol=1e-5)


def test_single_pass_mask_to_one_expert_is_that_expert(expert_dirs):
    # Static weights and the gate both renormalise over the kept experts: one kept expert gets weight 1 everywhere.
    model = single(expert_dirs["llama"])
    model.set_active_experts(["math"])
    alone = PeftModel.from_pretrained(tiny_llama(), expert_dirs["llama"]["math"]).eval()
    torch.testing.assert_close(logits(model, ids_input()), logits(alone, ids_input()), rtol=1e-5, atol=1e-5)


def test_single_pass_mask_equals_built_without(expert_dirs):
    adapters = expert_dirs["llama"]
    model = single(adapters, layerwise_scalings=True)
    options = {"routing": "single_pass", "scaling_pass_layers": 1, "layerwise_scalings": True}
    reference = built_without(model, adapters, ["math", "poetry"], k=1, **options)
    model.set_active_experts(["math", "poetry"])
    torch.testing.assert_close(logits(model, ids_input()), logits(reference, ids_input()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2], ids=["experts-only-in-early-layers", "k-is-every-layer"])
def test_single_pass_whose_gate_is_never_used_is_refused(expert_dirs, tmp_path, k):
    from peft_xlora import XLoraConfig

    adapters = expert_dirs["llama"]
    if k == 1:  # experts that adapt decoder layer 1 only
        spec = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "layers_to_transform": [0]}
        adapters = {"early": make_expert("llama", spec, 9, str(tmp_path / "early"))}
    base = tiny_llama()
    before = {name: type(m) for name, m in base.named_modules()}
    config = XLoraConfig(task_type="CAUSAL_LM", adapters=adapters, routing="single_pass", scaling_pass_layers=k)
    with pytest.raises(ValueError, match="the gate would never be used"):
        build_xlora_on(base, config)
    assert {name: type(m) for name, m in base.named_modules()} == before  # refused before anything changed


def build_xlora_on(base, config):
    from peft import get_peft_model

    return get_peft_model(base, config)


def test_single_pass_remove_of_the_last_late_expert_is_refused(expert_dirs, tmp_path):
    # Removing the only expert that adapts a layer after k would leave a gate that is never used.
    spec = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "layers_to_transform": [0]}
    adapters = {"early": make_expert("llama", spec, 9, str(tmp_path / "early")), "math": expert_dirs["llama"]["math"]}
    model = single(adapters)
    before = snapshot(model, ids_input())
    with pytest.raises(ValueError, match="gate would never be used"):
        model.remove_expert("math")
    assert_unchanged(model, before, ids_input())


# ------------------------------------------------------------------------------------------ pins x experts


@pytest.mark.parametrize("layerwise", [False, True], ids=["shared", "layerwise"])
def test_per_row_pins_follow_a_removed_expert(expert_dirs, layerwise):
    adapters = expert_dirs["llama"]
    model = build_xlora("llama", expert_dirs, layerwise_scalings=layerwise).eval()
    names = model.base_model.mixture_layer_names
    rows = torch.rand(3, len(names) if layerwise else 1, 3, generator=torch.Generator().manual_seed(2))
    model.set_static_scalings(rows, per_row=True)
    model.remove_expert("code")
    reference = build_xlora("llama", {"llama": without(adapters, "code")}, layerwise_scalings=layerwise).eval()
    kept_slots = [names.index(n) for n in reference.base_model.mixture_layer_names] if layerwise else [0]
    reference.set_static_scalings(rows[:, kept_slots][..., [0, 2]], per_row=True)
    torch.testing.assert_close(logits(model, ids_input(3)), logits(reference, ids_input(3)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("layerwise", [False, True], ids=["shared", "layerwise"])
def test_per_row_pins_follow_an_added_expert(expert_dirs, new_expert, layerwise):
    # The new expert is pinned at 0 in every row, and the new layers' rows (layerwise) at 0 too.
    model = build_xlora("llama", expert_dirs, layerwise_scalings=layerwise).eval()
    names = model.base_model.mixture_layer_names
    rows = torch.rand(3, len(names) if layerwise else 1, 3, generator=torch.Generator().manual_seed(2))
    model.set_static_scalings(rows, per_row=True)
    model.add_expert("new", new_expert)
    adapters = {**expert_dirs["llama"], "new": new_expert}
    reference = build_xlora("llama", {"llama": adapters}, layerwise_scalings=layerwise).eval()
    new_names = reference.base_model.mixture_layer_names
    pins = torch.zeros(3, len(new_names) if layerwise else 1, 4)
    for slot, name in enumerate(new_names if layerwise else [None]):
        if name is None or name in names:
            pins[:, slot, :3] = rows[:, names.index(name) if name is not None else 0]
    reference.set_static_scalings(pins, per_row=True)
    torch.testing.assert_close(logits(model, ids_input(3)), logits(reference, ids_input(3)), rtol=0, atol=1e-6)


def test_shared_pins_and_a_mask_follow_a_removed_expert(expert_dirs):
    # Pins: the removed expert's weight goes, the others are used as given. A mask: it loses the removed entry.
    adapters = expert_dirs["llama"]
    model = build_xlora("llama", expert_dirs, xlora_dropout_p=0.0).eval()
    model.set_static_scalings({"math": 0.7, "code": 0.4, "poetry": -0.5})
    model.remove_expert("code")
    reference = build_xlora("llama", {"llama": without(adapters, "code")}).eval()
    reference.set_static_scalings({"math": 0.7, "poetry": -0.5})
    torch.testing.assert_close(logits(model, ids_input()), logits(reference, ids_input()), rtol=0, atol=1e-6)

    model = build_xlora("llama", expert_dirs, xlora_dropout_p=0.0).eval()
    reference = built_without(model, adapters, ["math", "poetry"], xlora_dropout_p=0.0)
    model.set_active_experts(["math", "code"])
    model.remove_expert("code")
    assert model.base_model.get_active_experts() == ["math"]
    reference.set_active_experts(["math"])
    torch.testing.assert_close(logits(model, ids_input()), logits(reference, ids_input()), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ structural update_config


def _built(expert_dirs, **options):
    model = build_xlora("llama", expert_dirs, **options).eval()
    return model


def test_update_scaling_pass_layers_rebuilds_exactly(expert_dirs, tmp_path):
    # The dual pass's exit layer moves: the model equals one built with the new k and the same classifier.
    model = _built(expert_dirs, scaling_pass_layers=None)
    model.update_config(scaling_pass_layers=1)
    reference = _built(expert_dirs, scaling_pass_layers=1)
    reference.base_model.xlora_classifier.load_state_dict(model.base_model.xlora_classifier.state_dict())
    torch.testing.assert_close(logits(model, ids_input()), logits(reference, ids_input()), rtol=0, atol=0)
    model.update_config(scaling_pass_layers=None)
    again = _built(expert_dirs, scaling_pass_layers=None)
    again.base_model.xlora_classifier.load_state_dict(model.base_model.xlora_classifier.state_dict())
    torch.testing.assert_close(logits(model, ids_input()), logits(again, ids_input()), rtol=0, atol=0)
    model.update_config(scaling_pass_layers=1)
    same_as_built(model, reference, ids_input(), tmp_path / "k1", tiny_llama, atol=0)


@pytest.mark.parametrize(("before", "after"), [(0.2, 0.0), (0.0, 0.3), (0.2, 0.1)])
def test_update_classifier_dropout_rebuilds_exactly(expert_dirs, tmp_path, before, after):
    # Dropout changes the classifier's layout (no Dropout module at p = 0): the saved keys must match a new build.
    model = _built(expert_dirs, xlora_dropout_p=before)
    model.update_config(xlora_dropout_p=after)
    reference = _built(expert_dirs, xlora_dropout_p=after)
    assert [type(m) for m in model.base_model.xlora_classifier.layers] == [
        type(m) for m in reference.base_model.xlora_classifier.layers
    ]
    dropouts = [m.p for m in model.base_model.xlora_classifier.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == ([after] if after else [])
    same_as_built(model, reference, ids_input(), tmp_path / "dropout", tiny_llama, atol=0)


def test_update_use_trainable_adapters_changes_what_trains(expert_dirs):
    model = _built(expert_dirs)
    model.update_config(use_trainable_adapters=True)
    reference = _built(expert_dirs, use_trainable_adapters=True)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in reference.named_parameters() if p.requires_grad)


STRUCTURAL = {
    "xlora_depth": 3,
    "xlora_size": 8,
    "layerwise_scalings": True,
    "hidden_size": 64,
    "routing": "single_pass",
    "trainable_head": True,
    "adapters": "reordered",
    "expert_order": "reordered",
    "experts": "reordered",
}


@pytest.mark.parametrize("field", sorted(STRUCTURAL))
def test_structural_update_config_is_refused_and_changes_nothing(expert_dirs, field):
    model = _built(expert_dirs)
    config = model.base_model.xlora_config
    value = STRUCTURAL[field]
    if value == "reordered":
        current = getattr(config, field)
        value = list(reversed(current)) if isinstance(current, list) else dict(reversed(list(current.items())))
    before = snapshot(model, ids_input())
    with pytest.raises(ValueError, match=f"`{field}` cannot change on a built model"):
        model.update_config(**{field: value})
    assert_unchanged(model, before, ids_input())


def test_single_pass_layer_k_cannot_change(expert_dirs):
    model = single(expert_dirs["llama"])
    before = snapshot(model, ids_input())
    with pytest.raises(ValueError, match="`scaling_pass_layers` cannot change on a single-pass model"):
        model.update_config(scaling_pass_layers=2)
    assert_unchanged(model, before, ids_input())
    for name, value in (("single_pass_static", "uniform"), ("routing", "dual_pass")):
        with pytest.raises(ValueError, match=f"`{name}` cannot change on a built model"):
            model.update_config(**{name: value})
        assert_unchanged(model, before, ids_input())


# ------------------------------------------------------------------------------ supported cells, from the table
#
# Each option the table marks supported at update_config, add_expert, remove_expert or set_active_experts is set to a
# value away from its default (helpers.compose.OPTIONS) and tried there against a model built directly.
# tests/core/test_supported_cells.py accounts for every supported cell of every place: these tests, or the test named.

# Options with which adding an expert changes the outputs by definition (each warns with ExpertChangeWarning).
CHANGES_OUTPUTS = {"scaling_pass_value", "single_pass_static"}


def _with_labels(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    return out.logits, out.loss


def _same_outputs(model, reference, ids, loss=True, atol=1e-6):
    got, expected = _with_labels(model, ids), _with_labels(reference, ids)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=atol)
    if loss:
        torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=atol)


@pytest.mark.parametrize("row", probe_rows("update_config"))
def test_update_config_equals_a_model_built_with_the_value(expert_dirs, row):
    options = OPTIONS[row]
    start = {k: v for k, v in options.items() if k == "top_k_lora" and "enable_softmax_topk" in options}
    model = _built(expert_dirs, xlora_dropout_p=0.0, **start)
    model.update_config(**{k: v for k, v in options.items() if k not in start})
    reference = _built(expert_dirs, xlora_dropout_p=0.0, **options)
    reference.base_model.xlora_classifier.load_state_dict(model.base_model.xlora_classifier.state_dict())
    _same_outputs(model, reference, input_ids(), atol=0)
    if row == "scalings_mode":  # the default of generate: prompt mode holds the prompt's scalings
        kwargs = {"input_ids": input_ids(batch=1), "max_new_tokens": 3, "do_sample": False}
        assert torch.equal(model.generate(**kwargs), reference.generate(**kwargs))


@pytest.mark.filterwarnings("ignore::peft_xlora.ExpertChangeWarning")
@pytest.mark.parametrize("row", probe_rows("add_expert"))
def test_add_expert_with_each_option_equals_a_model_built_with_it(expert_dirs, new_expert, tmp_path, row):
    from peft import set_peft_model_state_dict
    from peft.utils.save_and_load import load_peft_weights

    options = OPTIONS[row]
    model = build_with(expert_dirs["llama"], options)
    ids = input_ids()
    before = _with_labels(model, ids)
    model.add_expert("new", new_expert)
    if row not in CHANGES_OUTPUTS:
        torch.testing.assert_close(_with_labels(model, ids)[0], before[0], rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "added")
    reference = build_with({**expert_dirs["llama"], "new": new_expert}, options)
    set_peft_model_state_dict(reference, load_peft_weights(str(tmp_path / "added")))
    _same_outputs(model, reference, ids)


@pytest.mark.parametrize("row", probe_rows("remove_expert"))
def test_remove_expert_and_mask_with_each_option_equal_a_model_built_without(expert_dirs, row):
    options = OPTIONS[row]
    adapters = expert_dirs["llama"]
    model = build_with(adapters, options)
    kept = ["math", "poetry"]
    k = options.get("scaling_pass_layers") if options.get("routing") == "single_pass" else None
    reference = built_without(model, adapters, kept, k=k, xlora_dropout_p=0.0, **options)
    ids = input_ids()
    model.set_active_experts(kept)  # the mask: the gate's values and logits as built without "code"
    _same_outputs(model, reference, ids, loss=False, atol=1e-5)
    model.set_active_experts(None)
    model.remove_expert("code")
    _same_outputs(model, reference, ids, atol=1e-5)


def test_update_config_while_pinned(expert_dirs):
    # A pinned gate ignores the gating options; unpinned, the model is the one built with the new values.
    model = _built(expert_dirs)
    for pins, per_row, batch in ((torch.tensor([0.2, 0.5, 0.3]), False, 2), (torch.eye(3), True, 3)):
        model.set_static_scalings(pins, per_row=per_row)
        ids = input_ids(batch=batch)
        pinned = logits(model, {"input_ids": ids})
        model.update_config(top_k_lora=1, softmax_temperature=0.3)
        torch.testing.assert_close(logits(model, {"input_ids": ids}), pinned, rtol=0, atol=0)
        model.set_static_scalings(None)
        reference = _built(expert_dirs, top_k_lora=1, softmax_temperature=0.3)
        reference.base_model.xlora_classifier.load_state_dict(model.base_model.xlora_classifier.state_dict())
        _same_outputs(model, reference, ids, atol=0)
        model.update_config(top_k_lora=None, softmax_temperature=1.0)


def test_update_config_while_masked(expert_dirs):
    adapters = expert_dirs["llama"]
    model = _built(expert_dirs, xlora_dropout_p=0.0)
    model.set_active_experts(["math", "poetry"])
    model.update_config(softmax_temperature=0.4)
    reference = built_without(model, adapters, ["math", "poetry"], softmax_temperature=0.4, xlora_dropout_p=0.0)
    _same_outputs(model, reference, input_ids(), loss=False, atol=1e-5)


@pytest.mark.parametrize("kind", ["heads", "encoder_decoder"])
def test_update_config_with_heads_or_an_encoder_decoder_model_equals_a_model_built_with_it(tmp_path, kind):
    # The gating options change in place; the model equals one built with the new values and the same classifier.
    from peft import get_peft_model

    from helpers import seq_cls
    from helpers.models import make_seq2seq_expert, seq2seq_inputs, tiny_bart
    from peft_xlora import XLoraConfig

    changes = {"softmax_temperature": 0.4, "top_k_lora": 1, "global_scaling_weight": 0.6}
    if kind == "heads":
        experts = {f"e{i}": seq_cls.save_expert("llama", tmp_path / f"e{i}", i, ["q_proj"]) for i in range(2)}
        build, inputs = (lambda **c: seq_cls.xlora("llama", experts, **c)), seq_cls.inputs("llama")
    else:
        experts = {f"e{i}": make_seq2seq_expert(["q_proj", "fc1"], i, str(tmp_path / f"e{i}")) for i in range(2)}
        options = {"task_type": "SEQ_2_SEQ_LM", "adapters": experts, "xlora_size": 8, "xlora_dropout_p": 0.0}
        options["classifier_init"] = "random"
        build, inputs = (lambda **c: get_peft_model(tiny_bart(), XLoraConfig(**options, **c)).eval()), seq2seq_inputs()
    model = build()
    model.update_config(**changes)
    reference = build(**changes)
    reference.base_model.xlora_classifier.load_state_dict(model.base_model.xlora_classifier.state_dict())
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), rtol=0, atol=0)
    assert not torch.allclose(logits(model, inputs), logits(build(), inputs))  # the changes do change the outputs


@pytest.mark.parametrize("mode", ["token", "prompt"])
def test_masked_generation_equals_a_model_built_without(expert_dirs, mode):
    adapters = expert_dirs["llama"]
    model = _built(expert_dirs, xlora_dropout_p=0.0, scaling_pass_value=0.5)
    reference = built_without(model, adapters, ["math", "poetry"], xlora_dropout_p=0.0, scaling_pass_value=0.5)
    model.set_active_experts(["math", "poetry"])
    kwargs = {"input_ids": input_ids(batch=2, seq=5), "max_new_tokens": 4, "do_sample": False, "scalings_mode": mode}
    generated = model.generate(**kwargs)
    assert torch.equal(generated, model.generate(**kwargs, use_cache=False))
    assert torch.equal(generated, reference.generate(**kwargs))
