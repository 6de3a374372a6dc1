"""Every refusal in the table of what combines, tried: it raises its own message and changes nothing.

`CASES` holds one case per refusal of every place of core and io (`core/places.py`, `io/export.py`), keyed by (place,
row, index of the refusal in its cell); `test_every_refusal_has_a_case` fails when the table gains a refusal without
one. A case builds a model, snapshots it (outputs, config, parameters), makes the refused call, and checks that the
error carries the cell's message and that the snapshot is bit-identical afterwards; a refused build leaves the base
model as it was; a refused export writes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import get_peft_model

import peft_xlora  # noqa: F401 - registers the io places
from helpers import seq_cls
from helpers.compose import assert_unchanged, snapshot
from helpers.models import (
    build_xlora,
    input_ids,
    make_expert,
    make_seq2seq_expert,
    seq2seq_inputs,
    tiny_bart,
    tiny_llama,
)
from peft_xlora import XLoraConfig, export_lora, export_mistralrs
from peft_xlora.core.combinations import places


@pytest.fixture(scope="module")
def env(expert_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("table")
    early = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "layers_to_transform": [0]}
    return SimpleNamespace(
        llama=expert_dirs["llama"],
        bart={
            "e0": make_seq2seq_expert(["q_proj", "k_proj", "v_proj"], 0, str(root / "bart0")),
            "e1": make_seq2seq_expert(["fc1", "v_proj"], 1, str(root / "bart1"), r=4),
        },
        cls=seq_cls.save_experts(root / "cls"),
        early=make_expert("llama", early, 9, str(root / "early")),
        bare=seq_cls.save_expert("llama", root / "bare", 3, ["k_proj"], task_type=None),
        out=root / "exports",
    )


def llama(env, **options):
    return build_xlora("llama", {"llama": env.llama}, **options).eval()


def single(env, adapters=None, **options):
    adapters = env.llama if adapters is None else adapters
    return build_xlora("llama", {"llama": adapters}, routing="single_pass", scaling_pass_layers=1, **options).eval()


def bart(env, **options):
    config = XLoraConfig(task_type="SEQ_2_SEQ_LM", adapters=env.bart, xlora_size=8, **options)
    return get_peft_model(tiny_bart(), config).eval()


def cls(env, **options):
    return seq_cls.xlora("llama", env.cls["llama"], **options)


def llama_inputs(env):
    return {"input_ids": input_ids()}


def bart_inputs(env):
    return seq2seq_inputs()


def cls_inputs(env):
    return seq_cls.inputs("llama")


@dataclass(frozen=True)
class Case:
    """A refused call on a model (`model`), or a refused config or build (`model` None)."""

    act: Callable[[Any, Any], Any]
    model: Callable[[Any], Any] | None = None
    inputs: Callable[[Any], dict] = llama_inputs
    writes: str | None = None  # an export's folder, which must not appear


def config_case(**options) -> Case:
    return Case(lambda m, env: XLoraConfig(adapters=env.llama, **options))


def build_case(base: Callable[[], torch.nn.Module], adapters: str, **options) -> Case:
    def act(model, env):
        model = base()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        types = {name: type(m) for name, m in model.named_modules()}
        try:
            get_peft_model(model, XLoraConfig(adapters=getattr(env, adapters), xlora_size=8, **options))
        finally:  # refused before any module of the base model changed
            assert {name: type(m) for name, m in model.named_modules()} == types
            assert not model._forward_hooks and not model._forward_pre_hooks
            after = model.state_dict()
            assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())

    return Case(act)


def update(model_fn=llama, inputs=llama_inputs, **changes) -> Case:
    return Case(lambda m, env: m.update_config(**changes), model_fn, inputs)


def reordered(field: str) -> Case:
    def act(model, env):
        value = getattr(model.base_model.xlora_config, field)
        model.update_config(
            **{field: list(reversed(value)) if isinstance(value, list) else dict(reversed(value.items()))}
        )

    return Case(act, llama)


def mistralrs(model_fn, inputs=llama_inputs) -> Case:
    def act(model, env):
        export_mistralrs(model, env.out / "mistralrs", base_model_id="test/base")

    return Case(act, model_fn, inputs, writes="mistralrs")


def with_state(model_fn, change: Callable[[Any], Any]):
    """The model `model_fn` builds, then changed by `change` (pins, a mask) before the case snapshots it."""

    def build(env):
        model = model_fn(env)
        change(model)
        return model

    return build


def per_row(model):
    model.set_static_scalings(torch.eye(3), per_row=True)


CASES: dict[tuple[str, str, int], Case] = {
    # ------------------------------------------------------------------ a config on its own
    ("config", "enable_softmax_topk", 0): config_case(enable_softmax_topk=True),
    ("config", "scalings_mode", 0): config_case(routing="single_pass", scaling_pass_layers=1, scalings_mode="prompt"),
    ("config", "router_distillation_coef", 0): config_case(
        routing="single_pass", scaling_pass_layers=1, router_distillation_coef=0.5
    ),
    # ------------------------------------------------------------------ building
    ("build", "task_type", 0): build_case(tiny_llama, "llama", task_type="TOKEN_CLS"),
    ("build", "scalings_mode", 0): build_case(tiny_bart, "bart", task_type="SEQ_2_SEQ_LM", scalings_mode="prompt"),
    ("build", "scaling_pass_layers", 0): build_case(
        tiny_bart, "bart", task_type="SEQ_2_SEQ_LM", scaling_pass_layers=1
    ),
    ("build", "scaling_pass_layers", 1): build_case(tiny_llama, "llama", routing="single_pass", scaling_pass_layers=2),
    ("build", "routing", 0): build_case(
        tiny_bart, "bart", task_type="SEQ_2_SEQ_LM", routing="single_pass", scaling_pass_layers=1
    ),
    ("build", "router_distillation_coef", 0): build_case(
        tiny_bart, "bart", task_type="SEQ_2_SEQ_LM", router_distillation_coef=0.5
    ),
    # ------------------------------------------------------------------ update_config
    ("update_config", "task_type", 0): update(task_type="SEQ_CLS"),
    ("update_config", "inference_mode", 0): update(inference_mode=True),
    ("update_config", "hidden_size", 0): update(hidden_size=64),
    ("update_config", "xlora_depth", 0): update(xlora_depth=3),
    ("update_config", "xlora_size", 0): update(xlora_size=8),
    ("update_config", "layerwise_scalings", 0): update(layerwise_scalings=True),
    ("update_config", "trainable_head", 0): update(trainable_head=True),
    ("update_config", "routing", 0): update(routing="single_pass"),
    ("update_config", "single_pass_static", 0): update(single_pass_static="uniform"),
    ("update_config", "adapters", 0): reordered("adapters"),
    ("update_config", "experts", 0): reordered("experts"),
    ("update_config", "expert_order", 0): reordered("expert_order"),
    ("update_config", "scalings_mode", 0): update(bart, bart_inputs, scalings_mode="prompt"),
    ("update_config", "scaling_pass_layers", 0): update(single, scaling_pass_layers=2),
    ("update_config", "scaling_pass_layers", 1): update(bart, bart_inputs, scaling_pass_layers=1),
    ("update_config", "router_distillation_coef", 0): update(bart, bart_inputs, router_distillation_coef=0.5),
    # ------------------------------------------------------------------ experts added and removed
    ("add_expert", "heads", 0): Case(lambda m, env: m.add_expert("bare", env.bare), cls, cls_inputs),
    ("remove_expert", "adapters", 0): Case(
        lambda m, env: m.remove_expert("math"),
        lambda env: build_xlora("llama", {"llama": {"math": env.llama["math"]}}).eval(),
    ),
    ("remove_expert", "top_k_lora", 0): Case(
        lambda m, env: m.remove_expert("code"), lambda env: llama(env, top_k_lora=3)
    ),
    ("remove_expert", "scaling_pass_layers", 0): Case(
        lambda m, env: m.remove_expert("math"),
        lambda env: single(env, {"early": env.early, "math": env.llama["math"]}),
    ),
    ("remove_expert", "masks", 0): Case(
        lambda m, env: m.remove_expert("code"), with_state(llama, lambda m: m.set_active_experts(["code"]))
    ),
    # ------------------------------------------------------------------ generating
    ("generate", "generate_modes", 0): Case(
        lambda m, env: m.generate(input_ids=input_ids(batch=1), max_new_tokens=2, scalings_mode="prompt"), single
    ),
    ("generate", "generate_modes", 1): Case(
        lambda m, env: m.generate(input_ids=seq2seq_inputs()["input_ids"], max_new_tokens=2, scalings_mode="prompt"),
        bart,
        bart_inputs,
    ),
    # ------------------------------------------------------------------ exporters
    ("export_mistralrs", "scaling_pass_layers", 0): mistralrs(lambda env: llama(env, scaling_pass_layers=1)),
    ("export_mistralrs", "scalings_mode", 0): mistralrs(lambda env: llama(env, scalings_mode="prompt")),
    ("export_mistralrs", "enable_softmax_topk", 0): mistralrs(
        lambda env: llama(env, top_k_lora=2, enable_softmax_topk=True)
    ),
    ("export_mistralrs", "routing", 0): mistralrs(single),
    ("export_mistralrs", "trainable_head", 0): mistralrs(lambda env: cls(env, trainable_head=True), cls_inputs),
    ("export_mistralrs", "pins", 0): mistralrs(with_state(llama, lambda m: m.set_static_scalings({"math": 1.0}))),
    ("export_mistralrs", "per_row_pins", 0): mistralrs(
        with_state(llama, per_row), lambda env: {"input_ids": input_ids(3)}
    ),
    ("export_mistralrs", "heads", 0): mistralrs(cls, cls_inputs),
    ("export_mistralrs", "encoder_decoder", 0): mistralrs(bart, bart_inputs),
    ("export_lora", "per_row_pins", 0): Case(
        lambda m, env: export_lora(m, env.out / "lora"),
        with_state(llama, per_row),
        lambda env: {"input_ids": input_ids(3)},
        writes="lora",
    ),
}


def _refusals() -> dict[tuple[str, str, int], Any]:
    # The places of core and io; the layers above try theirs where they run (the `cli` column: tests/cli/test_cli.py).
    return {
        (place.name, row, i): refusal
        for place in places().values()
        if place.layer in ("core", "io")
        for row, cell in place.cells.items()
        for i, refusal in enumerate(cell.refusals)
    }


def test_every_refusal_has_a_case():
    assert set(_refusals()) == set(CASES), "add a case for each new refusal of the table (and drop removed ones)"


@pytest.mark.parametrize("key", sorted(CASES), ids=["-".join(map(str, k)) for k in sorted(CASES)])
def test_refusal_raises_its_message_and_changes_nothing(env, key):
    case = CASES[key]
    refusal = _refusals()[key]
    model = case.model(env) if case.model is not None else None
    inputs = case.inputs(env)
    before = snapshot(model, inputs) if model is not None else None
    with pytest.raises(refusal.error) as info:
        case.act(model, env)
    fixed = re.split(r"\{[^}]*\}", refusal.message)  # the message's fixed parts, around its placeholders
    assert all(part in str(info.value) for part in fixed if part.strip()), str(info.value)
    if model is not None:
        assert_unchanged(model, before, inputs)
    if case.writes is not None:
        assert not (env.out / case.writes).exists()
