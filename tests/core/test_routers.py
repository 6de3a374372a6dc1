"""The routers (core/routers/): chosen at build, owning their hooks, and handing on the experts each token chose."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from helpers.models import build_xlora, input_ids, make_seq2seq_expert, seq2seq_inputs, tiny_bart
from peft_xlora import XLoraConfig
from peft_xlora.core.layer import XLoraLayer
from peft_xlora.core.routers import ROUTERS, DualPassRouter, Seq2SeqRouter, SinglePassRouter
from peft_xlora.core.routing import Routing, current_routing
from peft_xlora.core.seq2seq import reads_source


@pytest.fixture(scope="module")
def bart_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("routers-bart")
    return {
        "e0": make_seq2seq_expert(["q_proj", "k_proj", "v_proj"], 0, str(root / "e0")),
        "e1": make_seq2seq_expert(["fc1", "v_proj"], 1, str(root / "e1"), r=4),
        "e2": make_seq2seq_expert(["k_proj", "fc2"], 2, str(root / "e2"), r=3),
    }


def bart(paths, **options):
    config = XLoraConfig(task_type="SEQ_2_SEQ_LM", adapters=paths, xlora_size=8, classifier_init="random", **options)
    return get_peft_model(tiny_bart(), config).eval()


def test_the_router_is_chosen_at_build(expert_dirs, bart_experts):
    assert set(ROUTERS) == {"dual_pass", "single_pass", "encoder_decoder"}
    assert type(build_xlora("llama", expert_dirs).base_model.router) is DualPassRouter
    single = build_xlora("llama", expert_dirs, routing="single_pass", scaling_pass_layers=1)
    assert type(single.base_model.router) is SinglePassRouter
    assert type(bart(bart_experts).base_model.router) is Seq2SeqRouter


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_rebuilds_leave_exactly_one_set_of_hooks(expert_dirs, bart_experts):
    # Adding and removing experts (and moving layer k) re-registers the router's hooks: none doubles, none is lost.
    model = build_xlora("llama", expert_dirs, scaling_pass_layers=1)
    hooks = _hook_count(model)
    model.update_config(scaling_pass_layers=2)
    model.update_config(scaling_pass_layers=1)
    assert _hook_count(model) == hooks
    seq2seq = bart({"e1": bart_experts["e1"], "e2": bart_experts["e2"]})

    def expected():  # the model's two, the encoder's two, and two per cross-attention key/value mixture layer
        return 4 + 2 * sum(reads_source(n) for n in seq2seq.base_model.mixture_layer_names)

    assert _hook_count(seq2seq) == expected() == 8  # e1's value and e2's key projections
    seq2seq.add_expert("e0", bart_experts["e0"])  # replaces both layers (its factors join theirs)
    assert _hook_count(seq2seq) == expected() == 8
    seq2seq.remove_expert("e2")  # the key projection stays (e0 adapts it), replaced again
    assert _hook_count(seq2seq) == expected() == 8
    seq2seq.remove_expert("e1")
    assert _hook_count(seq2seq) == expected() == 8
    base = seq2seq.base_model.unload()
    assert _hook_count(base) == 0
    assert {name: type(m) for name, m in base.named_modules()} == {n: type(m) for n, m in tiny_bart().named_modules()}


def _seen_routings(model) -> list[Routing]:
    """The routing each mixture layer sees in the next forward, by layer index."""
    seen: dict[int, Routing] = {}

    def keep(module, args):
        routing = current_routing()
        if routing is not None and not routing.scaling_pass:
            seen.setdefault(module.layer_index, routing)

    for module in model.modules():
        if isinstance(module, XLoraLayer):
            module.register_forward_pre_hook(keep)
    return seen


@pytest.mark.parametrize("softmax_topk", [False, True])
@pytest.mark.parametrize("mode", ["dual_pass", "single_pass", "encoder_decoder"])
def test_chosen_experts_are_the_top_k_of_each_layers_scalings(expert_dirs, bart_experts, mode, softmax_topk):
    options = {"top_k_lora": 2, "enable_softmax_topk": softmax_topk, "layerwise_scalings": True}
    if mode == "encoder_decoder":
        model, inputs = bart(bart_experts, **options), seq2seq_inputs()
    else:
        if mode == "single_pass":
            options.update(routing="single_pass", scaling_pass_layers=1)
        model, inputs = build_xlora("llama", expert_dirs, **options).eval(), {"input_ids": input_ids()}
    seen = _seen_routings(model)
    with torch.no_grad():
        model(**inputs)
    tuner = model.base_model
    checked = 0
    for index, routing in seen.items():
        scalings, chosen = routing.scalings_for(index), routing.chosen_for(index)
        if mode == "single_pass" and index not in tuner.router.late_layers:
            assert chosen is None  # the static weights mix every expert by definition
            continue
        indices, weights = chosen  # (batch, seq, n_slots, k) each
        assert indices.shape[-1] == 2 and indices.dtype == torch.long and weights.dtype == torch.float32
        torch.testing.assert_close(weights, scalings.gather(-1, indices), rtol=0, atol=0)
        dense = torch.zeros_like(scalings).scatter(-1, indices, weights)
        torch.testing.assert_close(dense, scalings, rtol=0, atol=0)  # nothing outside the choice has a scaling
        checked += 1
    assert checked > 0


def test_no_choice_without_top_k_or_with_pins(expert_dirs):
    model = build_xlora("llama", expert_dirs).eval()
    seen = _seen_routings(model)
    with torch.no_grad():
        model(input_ids=input_ids())
    assert all(r.chosen is None for r in seen.values())
    model.set_topk_lora(1)
    model.set_static_scalings({"math": 1.0})
    seen.clear()
    with torch.no_grad():
        model(input_ids=input_ids())
    assert all(r.chosen is None for r in seen.values())


@pytest.mark.parametrize("reentrant", [False, True])
def test_the_choice_reaches_recomputed_layers(expert_dirs, reentrant):
    # Under gradient checkpointing the recomputation sees the same choice as the first run (carried as arguments).
    model = build_xlora("llama", expert_dirs, top_k_lora=1, xlora_dropout_p=0.0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    runs: list[torch.Tensor] = []
    layer = model.base_model.model.get_submodule("model.layers.1.self_attn.q_proj")

    def keep(module, args):
        routing = current_routing()
        if not routing.scaling_pass:
            runs.append(routing.chosen_for(module.layer_index)[0].clone())

    layer.register_forward_pre_hook(keep)
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(runs) == 2  # the forward and the recomputation in backward
    assert torch.equal(runs[0], runs[1])
