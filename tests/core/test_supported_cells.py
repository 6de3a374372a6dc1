"""Every supported cell of the table of what combines, accounted for (issue 22).

For every place (column) and every row it reads (supported, or refused only in some situations and supported in the
others), either a test parametrized over the options (`helpers.compose.OPTIONS`) sets the option and compares what the
place gives against a model built directly with it or a plain reference (`helpers.reference`), or `COVERED` names the
existing test that does; `test_every_supported_cell_is_tried` fails on a cell in neither, or on a named test that does
not exist. The probes of this file:

- config: a config with the option saves and reads back the same;
- build: the model built with it computes the original X-LoRA's two passes written out (`xlora_logits_reference`);
- save_load: saved and loaded into a fresh base model, it gives the same logits, loss, config and trainable parameters;
- generate: cached generation, in token and prompt mode, gives the logits of one uncached forward over its output;
- set_static_scalings: a pinned gate computes the experts mixed at those weights, written out (`pinned_reference`);
- export_lora: the exported plain LoRA equals the pinned X-LoRA;
- export_mistralrs: the exported layout reads back (as the original package's) into the same model.

Those of update_config, add_expert, remove_expert and set_active_experts are in tests/core/test_combinations.py, the
command line's in tests/cli/test_cli.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel
from torch import nn

from helpers.compose import (
    OPTIONS,
    REFUSED_ONLY,
    ROOT,
    build_with,
    logits,
    names_a_test,
    not_irrelevant,
    probe_rows,
)
from helpers.models import input_ids, make_expert, tiny_llama
from helpers.reference import lora_factors_reference, pinned_reference, xlora_logits_reference
from peft_xlora import XLoraConfig
from peft_xlora.core.combinations import Status, places
from peft_xlora.core.routing import Routing
from peft_xlora.io.export import export_lora, export_mistralrs
from peft_xlora.io.migration import from_xlora_package

TOL = {"rtol": 1e-4, "atol": 1e-5}  # float32; references sum expert by expert, the mixture layer stacked
NEW_SPEC = {"r": 3, "lora_alpha": 6, "target_modules": ["k_proj", "v_proj"]}  # k_proj: new mixture layers

# Rows the shared options do not set, each away from the value the tests' builder uses.
EXTRA = {
    "xlora_depth": {"xlora_depth": 3},
    "xlora_size": {"xlora_size": 8},
    "xlora_dropout_p": {"xlora_dropout_p": 0.1},  # eval mode: no dropout, but the modules are there
    "classifier_init": {"classifier_init": "uniform"},
    "hidden_size": {"hidden_size": 32},
    "inference_mode": {"inference_mode": True},
    "adapters": {},
}
_BOOKKEEPING = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision")
_AS_SAVED = {row: {} for row in (*_BOOKKEEPING, "peft_xlora_version", "experts", "expert_order", "trainable_head")}


@pytest.fixture(scope="module")
def new_expert(tmp_path_factory):
    return make_expert("llama", NEW_SPEC, 7, str(tmp_path_factory.mktemp("cells-new")))


def _with_labels(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    return out.logits, out.loss


def _pin_weights(weights, names: list[str], per_row: bool) -> torch.Tensor:
    """`set_static_scalings` weights as `pinned_reference` takes them: (rows|1, n_slots|1, n_experts)."""
    if isinstance(weights, dict):
        weights = torch.tensor([float(weights.get(name, 0.0)) for name in names])
    weights = weights.float()
    if per_row:
        return weights[:, None]  # (rows, 1, n_experts)
    return weights[None, None] if weights.dim() == 1 else weights[None]  # (1, n_slots|1, n_experts)


def _slots(model) -> dict[str, int]:
    tuner = model.base_model
    return {name: tuner.model.get_submodule(name).layer_index for name in tuner.mixture_layer_names}


def _perturb_experts(model) -> None:
    """Trainable experts after some training: every stacked factor moved off its source."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in model.base_model.mixture_layers():
            layer.xlora_B.add_(torch.randn(layer.xlora_B.shape, generator=g) * 0.2)


# ---------------------------------------------------------------------------------------------- config

CONFIG_OPTIONS = {
    **OPTIONS,
    **EXTRA,
    "task_type": {"task_type": "SEQ_CLS"},
    "trainable_head": {"trainable_head": True},
    "generate_modes": {"scalings_mode": "prompt"},
}


@pytest.mark.parametrize("row", probe_rows("config", CONFIG_OPTIONS))
def test_config_with_each_option_reads_back_the_same(expert_dirs, tmp_path, row):
    options = {"task_type": "CAUSAL_LM", **CONFIG_OPTIONS[row]}
    config = XLoraConfig(adapters=expert_dirs["llama"], **options)
    config.save_pretrained(tmp_path)
    again = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(again, XLoraConfig) and again.to_dict() == config.to_dict()
    assert all(getattr(again, name) == value for name, value in options.items() if name != "task_type")


# ---------------------------------------------------------------------------------------------- build

# The options the original formula takes (`xlora_logits_reference`), the classifier's shape and the rest of EXTRA.
_FORMULA = ("enable_softmax", "enable_softmax_topk", "softmax_temperature", "top_k_lora", "global_scaling_weight")
BUILD_OPTIONS = {**EXTRA, **{row: OPTIONS[row] for row in (*_FORMULA, "scaling_pass_value", "scaling_pass_layers")}}


@pytest.mark.parametrize("row", probe_rows("build", BUILD_OPTIONS))
def test_build_with_each_option_equals_the_original_formula(expert_dirs, row):
    model = build_with(expert_dirs["llama"], {"classifier_init": "random", **BUILD_OPTIONS[row]})
    tuner = model.base_model
    config = tuner.xlora_config
    linears = [m for m in tuner.xlora_classifier.layers if isinstance(m, nn.Linear)]
    assert len(linears) == config.xlora_depth >= 2 and linears[0].out_features == config.xlora_size
    ids = input_ids()
    expected = xlora_logits_reference(
        tiny_llama(),
        [lora_factors_reference(expert_dirs["llama"][name]) for name in tuner.expert_names],
        [(m.weight.detach(), m.bias.detach()) for m in linears],
        ids,
        scaling_pass_value=config.scaling_pass_value,
        global_weight=config.global_scaling_weight,
        enable_softmax=config.enable_softmax,
        temperature=config.softmax_temperature,
        top_k=config.top_k_lora,
        softmax_topk=config.enable_softmax_topk,
        scaling_pass_layers=config.scaling_pass_layers,
    )
    torch.testing.assert_close(logits(model, {"input_ids": ids}), expected, **TOL)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert bool(trainable) != config.inference_mode  # the classifier trains unless built for inference


# ---------------------------------------------------------------------------------------------- save and load

SAVE_OPTIONS = {**OPTIONS, **EXTRA, **_AS_SAVED, "elastic_changes": {}}


@pytest.mark.filterwarnings("ignore::peft_xlora.ExpertChangeWarning")
@pytest.mark.parametrize("row", probe_rows("save_load", SAVE_OPTIONS))
def test_save_and_load_with_each_option_equals_the_model_built_with_it(expert_dirs, new_expert, tmp_path, row):
    model = build_with(expert_dirs["llama"], SAVE_OPTIONS[row])
    if row == "elastic_changes":
        model.add_expert("new", new_expert)
    if row == "use_trainable_adapters":
        _perturb_experts(model)  # the trained factors are what is saved
    config = model.base_model.xlora_config
    model.save_pretrained(tmp_path)
    saved = PeftConfig.from_pretrained(tmp_path).to_dict()
    assert saved.pop("inference_mode") is True  # PEFT saves every adapter for inference; a load says is_trainable
    assert saved == {k: v for k, v in config.to_dict().items() if k != "inference_mode"}
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=not config.inference_mode).eval()
    ids = input_ids()
    got, expected = _with_labels(loaded, ids), _with_labels(model, ids)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)  # the regularisers and distillation too
    trainable = sorted(n for n, p in loaded.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    if row == "scalings_mode":  # generate's default mode
        kwargs = {"input_ids": input_ids(batch=1), "max_new_tokens": 3, "do_sample": False}
        assert torch.equal(loaded.generate(**kwargs), model.generate(**kwargs))


# ---------------------------------------------------------------------------------------------- generate


def _pins(model, new_expert):
    model.set_static_scalings({"math": 0.7, "code": -0.4, "poetry": 1.3})


def _per_row_pins(model, new_expert):
    weights = torch.tensor([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.3, -0.3, 0.9]])
    model.set_static_scalings(weights, per_row=True)


GENERATE_STATES = {
    "pins": _pins,
    "per_row_pins": _per_row_pins,
    "masks": lambda model, new_expert: model.set_active_experts(["math", "poetry"]),
    "elastic_changes": lambda model, new_expert: model.add_expert("new", new_expert),
}
GENERATE_OPTIONS = {**OPTIONS, **{row: {} for row in (*GENERATE_STATES, "generate_modes")}}


def _generate_cases() -> list[tuple[str, str | None]]:
    cases = []
    for row in probe_rows("generate", GENERATE_OPTIONS):
        if row == "scalings_mode":
            modes = [None]  # generate's default: the config's prompt mode
        elif GENERATE_OPTIONS[row].get("routing") == "single_pass":
            modes = ["token"]  # prompt mode: refused (tests/core/test_table.py)
        else:
            modes = ["token", "prompt"]
        cases += [(row, mode) for mode in modes]
    return cases


def _one_uncached_forward(model, sequences, prompt_length: int, mode: str, pinned: bool, monkeypatch):
    """Logits of one uncached forward over the final sequences, at the positions that produced each new token.

    Prompt mode is the same forward with its routing replaced: per-token scalings on the prompt, the last prompt
    token's on every later position. A pinned gate gives every token its pins in both modes.
    """
    tuner = model.base_model
    with torch.no_grad():
        out = model(input_ids=sequences, use_cache=False).logits
        if mode == "prompt" and not pinned:
            scalings = tuner.get_latest_scalings().clone()  # (batch, seq, n_layers|1, n_experts)
            scalings[:, prompt_length:] = scalings[:, prompt_length - 1 : prompt_length]
            with monkeypatch.context() as patch:
                patch.setattr(tuner.router, "route", lambda args, kwargs: Routing(scalings))
                out = model(input_ids=sequences, use_cache=False).logits
    return out[:, prompt_length - 1 : -1]


@pytest.mark.filterwarnings("ignore::peft_xlora.ExpertChangeWarning")
@pytest.mark.parametrize(
    ("row", "mode"), _generate_cases(), ids=[f"{r}-{m or 'default'}" for r, m in _generate_cases()]
)
def test_generate_with_each_option_equals_one_uncached_forward(expert_dirs, new_expert, row, mode, monkeypatch):
    model = build_with(expert_dirs["llama"], GENERATE_OPTIONS[row])
    if row in GENERATE_STATES:
        GENERATE_STATES[row](model, new_expert)
    ids = input_ids(batch=3 if row == "per_row_pins" else 2, seq=5)
    out = model.generate(
        input_ids=ids,
        max_new_tokens=4,
        min_new_tokens=4,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **({} if mode is None else {"scalings_mode": mode}),
    )
    mode = mode or model.base_model.xlora_config.scalings_mode
    pinned = row in ("pins", "per_row_pins")
    expected = _one_uncached_forward(model, out.sequences, ids.shape[1], mode, pinned, monkeypatch)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), expected, **TOL)


# ---------------------------------------------------------------------------------------------- pins

PIN_CASES = {  # row -> (options, weights, per_row); "per-layer": random (n_layers, n_experts) weights
    "pins": ({}, {"math": 0.7, "code": -0.4, "poetry": 1.3}, False),
    "adapters": ({}, {"code": 0.6}, False),  # experts not named get 0
    "layerwise_scalings": ({"layerwise_scalings": True}, "per-layer", False),
    "routing": (OPTIONS["routing"], {"math": 0.5, "poetry": 0.5}, False),  # no static weights, no gate
    "per_row_pins": ({}, torch.tensor([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.3, -0.3, 0.9]]), True),
    "elastic_changes": ({}, {"new": 0.8, "math": 0.4}, False),
}


@pytest.mark.parametrize("row", probe_rows("set_static_scalings", PIN_CASES))
def test_pins_with_each_option_equal_the_experts_mixed_at_those_weights(expert_dirs, new_expert, row):
    options, weights, per_row = PIN_CASES[row]
    adapters = dict(expert_dirs["llama"])
    model = build_with(adapters, options)
    tuner = model.base_model
    if row == "elastic_changes":
        model.add_expert("new", new_expert)
        adapters["new"] = new_expert
    if isinstance(weights, str):
        g = torch.Generator().manual_seed(3)
        weights = torch.rand(len(tuner.mixture_layer_names), len(tuner.expert_names), generator=g) * 2 - 0.5
    model.set_static_scalings(weights, per_row=per_row)
    ids = input_ids(batch=3 if per_row else 2)
    experts = [lora_factors_reference(adapters[name]) for name in tuner.expert_names]
    pins = _pin_weights(weights, tuner.expert_names, per_row)
    expected = pinned_reference(tiny_llama(), experts, pins, _slots(model), ids)
    torch.testing.assert_close(logits(model, {"input_ids": ids}), expected, **TOL)


# ---------------------------------------------------------------------------------------------- exports

LORA_CASES = {  # row -> (options, weights given to export_lora, state before the export)
    "adapters": ({}, {"math": 0.7, "code": -0.4}, None),
    "experts": ({}, {"poetry": 1.0}, None),
    "expert_order": ({}, torch.tensor([0.2, 0.5, 0.3]), None),
    "layerwise_scalings": ({"layerwise_scalings": True}, "per-layer", None),
    "use_trainable_adapters": ({"use_trainable_adapters": True}, {"math": 0.5, "code": 0.5}, "trained"),
    "routing": (OPTIONS["routing"], {"math": 0.6, "poetry": 0.4}, None),
    "pins": ({}, None, "pinned"),  # no weights: the ones the model is pinned to
    "per_row_pins": ({}, {"math": 1.0, "code": 0.3}, "pinned per row"),
    "elastic_changes": ({}, {"new": 0.8, "math": 0.4}, "added"),
    "task_type": ({}, {"math": 1.0}, None),
    "base_model_name_or_path": ({}, {"math": 1.0}, None),
}


@pytest.mark.filterwarnings("ignore::peft_xlora.ExpertChangeWarning")
@pytest.mark.parametrize("row", probe_rows("export_lora", LORA_CASES))
def test_plain_lora_export_with_each_option_equals_the_pinned_model(expert_dirs, new_expert, tmp_path, row):
    options, weights, state = LORA_CASES[row]
    model = build_with(expert_dirs["llama"], options)
    tuner = model.base_model
    model.peft_config["default"].base_model_name_or_path = "test-org/tiny-llama"
    if state == "trained":
        _perturb_experts(model)
    elif state == "added":
        model.add_expert("new", new_expert)
    elif state == "pinned":
        model.set_static_scalings({"poetry": 0.9, "code": 0.2})
    elif state == "pinned per row":
        model.set_static_scalings(torch.eye(3), per_row=True)
    if isinstance(weights, str):
        g = torch.Generator().manual_seed(3)
        weights = torch.rand(len(tuner.mixture_layer_names), len(tuner.expert_names), generator=g) * 2 - 0.5
    before = None if tuner._static_scalings is None else tuner._static_scalings.clone()
    export_lora(model, tmp_path / "lora", weights)
    after = tuner._static_scalings  # the export leaves the model's own pins as they were
    assert (after is None and before is None) or torch.equal(after, before)
    if weights is not None:
        model.set_static_scalings(weights)
    lora = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
    torch.testing.assert_close(
        logits(lora, {"input_ids": input_ids()}), logits(model, {"input_ids": input_ids()}), **TOL
    )
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM" and saved["base_model_name_or_path"] == "test-org/tiny-llama"


def _mistralrs_options(row: str) -> dict:
    whole = {"scaling_pass_layers": None}  # the layout's scaling pass runs the whole model (the default cuts it)
    cell = places()["export_mistralrs"].cells[row]
    if cell.status is Status.REFUSED:  # supported at the layout's value only: the plain export
        return whole
    return {**whole, **{**OPTIONS, **EXTRA}.get(row, {})}


@pytest.mark.filterwarnings("ignore::peft_xlora.ExpertChangeWarning")
@pytest.mark.parametrize("row", sorted(not_irrelevant("export_mistralrs")))
def test_mistralrs_export_with_each_option_reads_back_as_the_model(expert_dirs, new_expert, tmp_path, row):
    model = build_with(expert_dirs["llama"], _mistralrs_options(row), classifier_init="random")
    model.peft_config["default"].base_model_name_or_path = "test-org/tiny-llama"
    if row == "use_trainable_adapters":
        _perturb_experts(model)  # the trained factors are written as the experts' folders
    if row == "elastic_changes":
        model.add_expert("new", new_expert)
    export_mistralrs(model, tmp_path / "out")  # the base model id: the config's
    written = json.loads((tmp_path / "out" / "xlora_config.json").read_text())
    assert written["base_model_id"] == "test-org/tiny-llama"
    assert written["adapters"] == list(model.base_model.expert_names)
    back = from_xlora_package(tiny_llama(), tmp_path / "out")
    ids = {"input_ids": input_ids()}
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the accounting

HERE = Path(__file__)
COMBINATIONS = "tests/core/test_combinations.py"
CLI = "tests/cli/test_cli.py"

# The parametrized tests (file::name) and the rows each tries, per place.
PROBES = {
    "config": ("test_config_with_each_option_reads_back_the_same", probe_rows("config", CONFIG_OPTIONS)),
    "build": ("test_build_with_each_option_equals_the_original_formula", probe_rows("build", BUILD_OPTIONS)),
    "save_load": (
        "test_save_and_load_with_each_option_equals_the_model_built_with_it",
        probe_rows("save_load", SAVE_OPTIONS),
    ),
    "generate": ("test_generate_with_each_option_equals_one_uncached_forward", [r for r, _ in _generate_cases()]),
    "set_static_scalings": (
        "test_pins_with_each_option_equal_the_experts_mixed_at_those_weights",
        probe_rows("set_static_scalings", PIN_CASES),
    ),
    "export_lora": (
        "test_plain_lora_export_with_each_option_equals_the_pinned_model",
        probe_rows("export_lora", LORA_CASES),
    ),
    "export_mistralrs": (
        "test_mistralrs_export_with_each_option_reads_back_as_the_model",
        sorted(not_irrelevant("export_mistralrs")),
    ),
    "update_config": (f"{COMBINATIONS}::test_update_config_equals_a_model_built_with_the_value", None),
    "add_expert": (f"{COMBINATIONS}::test_add_expert_with_each_option_equals_a_model_built_with_it", None),
    "remove_expert": (
        f"{COMBINATIONS}::test_remove_expert_and_mask_with_each_option_equal_a_model_built_without",
        None,
    ),
    "set_active_experts": (
        f"{COMBINATIONS}::test_remove_expert_and_mask_with_each_option_equal_a_model_built_without",
        None,
    ),
}

CORE, IO, INTEGRATION = "tests/core", "tests/io", "tests/integration"
HEADS, ELASTIC, SEQ2SEQ = f"{CORE}/test_heads.py", f"{CORE}/test_elastic.py", f"{INTEGRATION}/test_encoder_decoder.py"
TABLE = f"{CORE}/test_table.py::test_refusal_raises_its_message_and_changes_nothing"  # a cell that only refuses
SAVED = "test_save_and_load_with_each_option_equals_the_model_built_with_it"
ADDED = f"{COMBINATIONS}::test_add_expert_with_each_option_equals_a_model_built_with_it"
REMOVED = f"{COMBINATIONS}::test_remove_expert_and_mask_with_each_option_equal_a_model_built_without"
REUSED = f"{ELASTIC}::test_changed_experts_are_saved_and_reload_exactly"
END_TO_END = f"{CLI}::test_build_train_generate_inspect_export_reload"
# The rows the command line's parametrized test tries (its CLI_OPTIONS).
CLI_PROBED = (
    *("enable_softmax", "enable_softmax_topk", "softmax_temperature", "top_k_lora", "layerwise_scalings"),
    *("global_scaling_weight", "use_trainable_adapters", "scaling_pass_value", "scalings_mode", "scaling_pass_layers"),
    *("router_load_balancing_coef", "router_entropy_coef", "router_distillation_coef", "distillation"),
    *("router_distillation_temperature", "routing", "single_pass_static", "xlora_depth", "xlora_size"),
    *("xlora_dropout_p", "classifier_init", "hidden_size", "inference_mode", "pins", "generate_modes"),
    *("elastic_changes", "topk_compute"),
)

REGULARISED = f"{CORE}/test_regularisers.py::test_regularisers_are_added_to_the_loss_with_their_gradient"
DISTILLED = f"{CORE}/test_distillation.py::test_distillation_term_in_the_loss_matches_reference"
TRAINABLE = (
    f"{CORE}/test_model.py::test_trainable_adapters_declares_expert_factors, "
    f"{CORE}/test_trainable_experts.py::test_stacked_factor_gradients_equal_per_expert_reference"
)
SINGLE = f"{CORE}/test_single_pass.py::test_forward_matches_the_plain_reference"
UNIFORM = f"{CORE}/test_single_pass.py::test_uniform_static_weights_and_an_untrained_gate_are_the_uniform_mixture"
PROMPT = f"{CORE}/test_generation.py::test_greedy_cached_equals_uncached_and_full_forward"
TWO_STACKS = f"{SEQ2SEQ}::test_gating_matches_the_two_stack_reference"
OTHER_MODELS = (
    f"{COMBINATIONS}::test_update_config_with_heads_or_an_encoder_decoder_model_equals_a_model_built_with_it"
)
KEPT = f"{ELASTIC}::test_add_expert_keeps_pinned_scalings_and_masks"
FOLLOW = f"{COMBINATIONS}::test_shared_pins_and_a_mask_follow_a_removed_expert"
SEQ2SEQ_PINS = (
    f"{SEQ2SEQ}::test_pinned_one_hot_is_the_peft_expert, {SEQ2SEQ}::test_per_row_pins_score_each_expert_in_one_batch"
)
PINNED_GENERATION = ", ".join(
    f"test_generate_with_each_option_equals_one_uncached_forward[{r}]" for r in ("pins", "per_row_pins")
)
LORA_HEADS = f"{IO}/test_export.py::test_plain_lora_carries_the_pinned_head"
NO_CLI_RUN = f"{CLI}::test_inspect_without_text_describes_what_the_cli_cannot_run"
CLI_HEADS = f"{CLI}::test_inspect_shows_classification_heads"
# The vLLM export (tests/serving, run in the vLLM environment): the traced engine against peft-xlora's own model, and
# the export against the model it was saved from.
VLLM_EXPORT = "tests/serving/test_vllm_export.py"
SERVED = "tests/serving/test_vllm_exactness.py::test_vllm_serves_what_peft_xlora_computes"
PIN_SERVED = "tests/serving/test_vllm_exactness.py::test_vllm_serves_a_pinned_mixture_as_set_static_scalings"
DESCRIBED = f"{VLLM_EXPORT}::test_export_describes_the_model_peft_xlora_built"
VLLM_DEFAULTS = "tests/serving/test_vllm_exactness.py::test_eager_engine_serves_the_default_xlora"
VLLM_GATING = f"{SERVED}[llama-dual-gating]"
VLLM_SCALING_PASS = f"{SERVED}[llama-dual-scaling-pass-no-softmax-top-1]"
VLLM_SINGLE = ", ".join(
    f"{SERVED}[llama-single-{case}]" for case in ("learned-layerwise-top-k", "uniform-softmax-top-k-temperature")
)
VLLM_SPARSE = (
    f"{SERVED}[llama-dual-sparse-top-k], "
    "tests/serving/test_vllm_sparse.py::test_export_writes_topk_compute_and_the_spec_checks_it, "
    "tests/serving/test_vllm_sparse.py::test_sparse_update_equals_the_loop_over_chosen_experts_and_the_dense_stack"
)
VLLM_REFUSED_FIELD = f"{VLLM_EXPORT}::test_every_refused_field_is_refused_by_name"
VLLM_TABLE = f"{VLLM_EXPORT}::test_the_table_refuses_heads_encoder_decoders_and_expert_variants"

# Cells tried by an existing test (several: comma-separated), each checked to exist.
COVERED: dict[tuple[str, str], str] = {
    ("config", "experts"): f"{SAVED}[experts]",
    ("config", "expert_order"): f"{SAVED}[expert_order]",
    # build
    ("build", "task_type"): f"{HEADS}::test_gated_heads_match_the_plain_loop, {TWO_STACKS}",
    ("build", "router_load_balancing_coef"): REGULARISED,
    ("build", "router_entropy_coef"): REGULARISED,
    ("build", "router_distillation_coef"): DISTILLED,
    ("build", "router_distillation_temperature"): DISTILLED,
    ("build", "distillation"): DISTILLED,
    ("build", "layerwise_scalings"): f"{CORE}/test_model.py::test_model_mixture_equals_naive_reference",
    ("build", "use_trainable_adapters"): TRAINABLE,
    ("build", "trainable_head"): f"{HEADS}::test_shared_head_trains_beside_the_experts_heads",
    ("build", "heads"): f"{HEADS}::test_gated_heads_match_the_plain_loop",
    ("build", "scalings_mode"): PROMPT,
    ("build", "routing"): SINGLE,
    ("build", "single_pass_static"): UNIFORM,
    ("build", "experts"): f"{IO}/test_checkpoint.py::test_folder_is_self_contained",
    ("build", "expert_order"): f"{IO}/test_checkpoint.py::test_expert_order_survives_sorted_json",
    ("build", "encoder_decoder"): TWO_STACKS,
    ("build", "topk_compute"): f"{CORE}/test_sparse.py::test_model_logits_and_gradients_equal_dense",
    # update_config: the structural fields only refuse; the rest
    **dict.fromkeys(REFUSED_ONLY, TABLE),
    ("update_config", "xlora_dropout_p"): f"{COMBINATIONS}::test_update_classifier_dropout_rebuilds_exactly",
    (
        "update_config",
        "use_trainable_adapters",
    ): f"{COMBINATIONS}::test_update_use_trainable_adapters_changes_what_trains",
    ("update_config", "pins"): f"{COMBINATIONS}::test_update_config_while_pinned",
    ("update_config", "per_row_pins"): f"{COMBINATIONS}::test_update_config_while_pinned",
    ("update_config", "masks"): f"{COMBINATIONS}::test_update_config_while_masked",
    ("update_config", "heads"): OTHER_MODELS,
    ("update_config", "encoder_decoder"): OTHER_MODELS,
    # add_expert
    ("add_expert", "adapters"): ADDED,
    ("add_expert", "experts"): REUSED,
    ("add_expert", "expert_order"): REUSED,
    ("add_expert", "trainable_head"): f"{HEADS}::test_added_expert_brings_its_head",
    ("add_expert", "heads"): f"{HEADS}::test_added_expert_brings_its_head",
    ("add_expert", "pins"): KEPT,
    ("add_expert", "per_row_pins"): f"{COMBINATIONS}::test_per_row_pins_follow_an_added_expert",
    ("add_expert", "masks"): KEPT,
    ("add_expert", "encoder_decoder"): f"{SEQ2SEQ}::test_added_expert_equals_a_model_built_with_it",
    ("add_expert", "elastic_changes"): f"{ELASTIC}::test_added_expert_equals_a_model_built_with_it",
    # remove_expert
    ("remove_expert", "adapters"): REMOVED,
    ("remove_expert", "experts"): REUSED,
    ("remove_expert", "expert_order"): REUSED,
    ("remove_expert", "trainable_head"): f"{HEADS}::test_removed_expert_takes_its_head",
    ("remove_expert", "heads"): f"{HEADS}::test_removed_expert_takes_its_head",
    ("remove_expert", "pins"): FOLLOW,
    ("remove_expert", "per_row_pins"): f"{COMBINATIONS}::test_per_row_pins_follow_a_removed_expert",
    ("remove_expert", "masks"): FOLLOW,
    ("remove_expert", "encoder_decoder"): f"{SEQ2SEQ}::test_removed_expert_equals_a_model_built_without_it",
    ("remove_expert", "elastic_changes"): f"{ELASTIC}::test_removed_expert_renormalises_like_masking_it",
    # set_static_scalings
    ("set_static_scalings", "heads"): f"{HEADS}::test_pinned_gate_is_the_expert_with_its_head",
    ("set_static_scalings", "encoder_decoder"): SEQ2SEQ_PINS,
    (
        "set_static_scalings",
        "distillation",
    ): f"{CORE}/test_distillation.py::test_expert_token_losses_equal_one_forward_per_expert",
    ("set_static_scalings", "generate_modes"): PINNED_GENERATION,
    ("set_static_scalings", "topk_compute"): f"{CORE}/test_sparse.py::test_pinned_gate_is_the_dense_pinned_model",
    # set_active_experts
    ("set_active_experts", "adapters"): REMOVED,
    ("set_active_experts", "masks"): REMOVED,
    ("set_active_experts", "heads"): f"{HEADS}::test_mask_is_the_model_built_without",
    ("set_active_experts", "encoder_decoder"): f"{SEQ2SEQ}::test_mask_equals_a_model_built_without",
    ("set_active_experts", "elastic_changes"): f"{KEPT}, {FOLLOW}",
    ("set_active_experts", "generate_modes"): f"{COMBINATIONS}::test_masked_generation_equals_a_model_built_without",
    # save_load, generate, export_lora
    ("save_load", "heads"): f"{HEADS}::test_save_and_load_exact",
    ("save_load", "encoder_decoder"): f"{SEQ2SEQ}::test_save_and_reload_exactly",
    ("generate", "encoder_decoder"): f"{SEQ2SEQ}::test_cached_generation_equals_uncached",
    ("export_lora", "trainable_head"): LORA_HEADS,
    ("export_lora", "heads"): LORA_HEADS,
    ("export_lora", "encoder_decoder"): f"{SEQ2SEQ}::test_plain_lora_export_equals_the_pinned_model",
    # the command line: its parametrized test, the end-to-end run, and the files of what it does not run
    **{("cli", row): f"{CLI}::test_cli_with_each_option_equals_python[{row}]" for row in CLI_PROBED},
    **dict.fromkeys(
        (("cli", r) for r in ("base_model_name_or_path", "adapters", "experts", "expert_order")), END_TO_END
    ),
    ("cli", "task_type"): f"{END_TO_END}, {NO_CLI_RUN}",
    ("cli", "encoder_decoder"): NO_CLI_RUN,
    ("cli", "heads"): CLI_HEADS,
    ("cli", "trainable_head"): CLI_HEADS,
    # export_vllm: each option served by a traced engine equal to peft-xlora's model; refusals by their tests
    **{("export_vllm", row): f"{DESCRIBED}, {VLLM_DEFAULTS}" for row in ("experts", "expert_order")},
    ("export_vllm", "hidden_size"): f"{DESCRIBED}, {VLLM_EXPORT}::test_export_refuses_a_base_model_of_other_shapes",
    **dict.fromkeys(
        (("export_vllm", r) for r in ("base_model_name_or_path", "revision")),
        f"{VLLM_EXPORT}::test_export_resolves_the_recorded_base_model",
    ),
    ("export_vllm", "peft_xlora_version"): DESCRIBED,
    **dict.fromkeys(
        (
            ("export_vllm", r)
            for r in ("enable_softmax_topk", "softmax_temperature", "layerwise_scalings", "xlora_depth", "xlora_size")
        ),
        VLLM_GATING,
    ),
    ("export_vllm", "top_k_lora"): f"{VLLM_GATING}, {VLLM_SCALING_PASS}",
    ("export_vllm", "topk_compute"): VLLM_SPARSE,
    **dict.fromkeys(
        (("export_vllm", r) for r in ("enable_softmax", "scaling_pass_value", "global_scaling_weight")),
        VLLM_SCALING_PASS,
    ),
    ("export_vllm", "scaling_pass_layers"): f"{VLLM_SCALING_PASS}, {VLLM_SINGLE}",
    ("export_vllm", "routing"): f"{VLLM_DEFAULTS}, {VLLM_SINGLE}",
    ("export_vllm", "single_pass_static"): VLLM_SINGLE,
    ("export_vllm", "scalings_mode"): (
        f"{VLLM_REFUSED_FIELD}[scalings_mode], {VLLM_EXPORT}::test_a_pin_serves_what_the_gate_cannot"
    ),
    ("export_vllm", "trainable_head"): f"{VLLM_REFUSED_FIELD}[trainable_head], {VLLM_DEFAULTS}",
    ("export_vllm", "task_type"): f"{VLLM_REFUSED_FIELD}[task_type], {VLLM_DEFAULTS}",
    ("export_vllm", "pins"): (
        f"{PIN_SERVED}, {VLLM_EXPORT}::test_pinned_export_holds_what_set_static_scalings_holds, "
        f"{VLLM_EXPORT}::test_cli_exports_a_pinned_mixture"
    ),
    ("export_vllm", "per_row_pins"): (
        f"{VLLM_EXPORT}::test_a_malformed_pin_is_refused_before_anything_is_written[per-row]"
    ),
    ("export_vllm", "heads"): VLLM_TABLE,
    ("export_vllm", "encoder_decoder"): VLLM_TABLE,
    ("export_vllm", "elastic_changes"): (
        f"{VLLM_EXPORT}::test_export_after_elastic_changes_is_the_export_of_a_model_built_with_those_experts"
    ),
}


def _all_places() -> dict:
    spec = importlib.util.spec_from_file_location("combinations_table", ROOT / "scripts" / "combinations_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.load_places()  # every layer's module is imported, so each registers its places
    return places()


def test_every_supported_cell_is_tried():
    untried, missing = [], []
    for place in _all_places():
        name, rows = PROBES.get(place, (None, []))
        rows = probe_rows(place) if rows is None else rows
        for row in not_irrelevant(place):
            if row in rows:
                assert names_a_test(name, HERE), name
                continue
            reference = COVERED.get((place, row))
            if reference is None:
                untried.append((place, row))
            elif not all(names_a_test(part.strip(), HERE) for part in reference.split(",")):
                missing.append((place, row, reference))
    assert not missing, f"COVERED names tests that do not exist: {missing}"
    assert not untried, f"supported cells with no test: {untried}"
