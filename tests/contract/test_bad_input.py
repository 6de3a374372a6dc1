"""Bad input: each gets a clear error that says what was wrong and what to do, and nothing is changed or lost.

Every test here is a row of the table in docs/errors.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
import warnings

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model
from peft.config import PeftConfig
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from helpers.allocations import no_large_allocation
from helpers.models import VOCAB, build_xlora, input_ids, tiny_gpt2, tiny_llama
from peft_xlora import CheckpointError, ExpertError, XLoraConfig, XLoraLayer


def save_adapter(model: nn.Module, config, path) -> str:
    """Saves a PEFT adapter with random, non-zero weights."""
    torch.manual_seed(7)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad and "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    peft_model.save_pretrained(path)
    return str(path)


def xlora(model: nn.Module, adapters: dict, **kwargs):
    return get_peft_model(model, XLoraConfig(task_type="CAUSAL_LM", adapters=adapters, xlora_size=8, **kwargs))


def assert_untouched(model: nn.Module) -> None:
    """A refused build leaves the base model as it was: no mixture layer swapped in."""
    assert not any(isinstance(m, XLoraLayer) for m in model.modules())
    torch.testing.assert_close(model(input_ids=input_ids()).logits, tiny_llama()(input_ids=input_ids()).logits)


# ---------------------------------------------------------------------------------------------- the experts


def test_empty_adapter_dict():
    with pytest.raises(ValueError, match="`adapters` is empty: X-LoRA needs at least one LoRA expert"):
        XLoraConfig(adapters={})
    with pytest.raises(ValueError, match="XLoraConfig needs `adapters`"):
        XLoraConfig()


def test_missing_path(tmp_path, expert_dirs):
    base = tiny_llama()
    missing = str(tmp_path / "no-such-adapter")
    with pytest.raises(ExpertError, match=r"Expert 'ghost': cannot read a PEFT adapter config from .*no-such-adapter"):
        xlora(base, {"math": expert_dirs["llama"]["math"], "ghost": missing})
    assert_untouched(base)


def test_adapter_folder_without_weights_says_so(tmp_path, expert_dirs):
    # Before: PEFT took the folder for a Hub id and said "Repo id must be in the form 'repo_name' ...".
    import shutil

    shutil.copytree(expert_dirs["llama"]["code"], tmp_path / "code")
    (tmp_path / "code" / "adapter_model.safetensors").unlink()
    base = tiny_llama()
    match = r"Expert 'code': the folder .*code has no adapter_model.safetensors \(nor adapter_model.bin\)"
    with pytest.raises(ExpertError, match=match) as info:
        xlora(base, {"math": expert_dirs["llama"]["math"], "code": str(tmp_path / "code")})
    assert "Repo id" not in str(info.value)
    assert_untouched(base)


def test_adapter_for_another_base_model_shape(tmp_path, expert_dirs):
    torch.manual_seed(0)
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    path = save_adapter(wider, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "wide")
    base = tiny_llama()
    with pytest.raises(ExpertError, match=r"Expert 'wide' does not fit module .*q_proj.*another base model"):
        xlora(base, {"math": expert_dirs["llama"]["math"], "wide": path})
    assert_untouched(base)


def test_adapter_for_another_architecture(tmp_path, expert_dirs):
    # GPT-2 module names do not exist in Llama: before, the expert was silently dropped and X-LoRA gated nothing.
    base = tiny_llama()
    with pytest.raises(
        ExpertError,
        match=r"Expert 'gpt2' adapts 'transformer.h.0.attn.c_attn', which this "
        r"LlamaForCausalLM does not have.*another base model",
    ):
        xlora(base, {"math": expert_dirs["llama"]["math"], "gpt2": expert_dirs["gpt2"]["math"]})
    assert_untouched(base)


def test_adapter_for_a_deeper_model(tmp_path):
    # Same architecture and width, more layers: the expert's layers 2 and 3 do not exist here.
    torch.manual_seed(0)
    deeper = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    path = save_adapter(deeper, LoraConfig(r=2, target_modules=["v_proj"], layers_to_transform=[3]), tmp_path / "d")
    with pytest.raises(ExpertError, match=r"adapts 'model.layers.3.self_attn.v_proj', which this LlamaForCausalLM"):
        xlora(tiny_llama(), {"deep": path})


@pytest.mark.parametrize(
    ("kind", "config"),
    [
        ("IA3", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
        ("LOHA", LoHaConfig(r=2, target_modules=["q_proj"])),
    ],
)
def test_non_lora_adapter(tmp_path, expert_dirs, kind, config):
    path = save_adapter(tiny_llama(), config, tmp_path / kind)
    with pytest.raises(ExpertError, match=rf"Expert 'other' is a {kind} adapter; X-LoRA experts must be LoRA"):
        xlora(tiny_llama(), {"math": expert_dirs["llama"]["math"], "other": path})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"use_dora": True}, r"uses DoRA \(`use_dora=True`\), which X-LoRA does not support"),
        ({"lora_bias": True}, r"uses LoRA bias \(`lora_bias=True`\)"),
        ({"bias": "all"}, r"trains biases \(`bias='all'`\); X-LoRA cannot gate bias changes"),
        ({"modules_to_save": ["lm_head"]}, r"fully trains 'lm_head' \(modules_to_save\), which is not a seq"),
        ({"trainable_token_indices": [3, 4]}, r"uses trainable tokens"),
    ],
    ids=["dora", "lora_bias", "bias", "modules_to_save", "trainable_tokens"],
)
def test_unsupported_lora_variants(tmp_path, options, message):
    path = save_adapter(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], **options), tmp_path / "v")
    base = tiny_llama()
    with pytest.raises(ExpertError, match=rf"Expert 'variant' {message}"):
        xlora(base, {"variant": path})
    assert_untouched(base)


def test_truncated_expert_file(tmp_path, expert_dirs):
    path = save_adapter(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "cut")
    weights = os.path.join(path, "adapter_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(ExpertError, match=r"Expert 'cut': cannot read the adapter weights from .*cut"):
        xlora(tiny_llama(), {"math": expert_dirs["llama"]["math"], "cut": path})


# ---------------------------------------------------------------------------------------------- names


def test_duplicate_expert_names(expert_dirs):
    dirs = expert_dirs["llama"]
    with pytest.raises(ValueError, match=r"`expert_order` .* does not name the same experts"):
        XLoraConfig(adapters=dirs, expert_order=["math", "math", "code"])
    with pytest.raises(ValueError, match="`adapters` must be a dict of expert name -> LoRA checkpoint, got list"):
        XLoraConfig(adapters=[("math", dirs["math"]), ("math", dirs["code"])])


@pytest.mark.parametrize("name", ["", "   ", 0, None])
def test_invalid_expert_names(expert_dirs, name):
    with pytest.raises(ValueError, match="Expert names must be non-empty strings"):
        XLoraConfig(adapters={name: expert_dirs["llama"]["math"]})


def test_no_name_is_reserved(tmp_path, expert_dirs):
    # Names that look like PEFT's own (adapter name, key infixes, prefixes) are plain names: they round-trip exactly.
    names = ["default", "xlora_classifier", "base_model.model", "a.b/c lora_A"]
    paths = [*expert_dirs["llama"].values(), expert_dirs["llama"]["math"]]
    model = build_xlora("llama", {"llama": dict(zip(names, paths))}).eval()
    with torch.no_grad():
        for param in model.base_model.xlora_classifier.parameters():
            param.add_(torch.randn_like(param))
    ids = input_ids()
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "ckpt")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ckpt").eval()
    assert loaded.base_model.expert_names == names
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- the config


def test_hidden_size_mismatch(expert_dirs):
    base = tiny_llama()
    with pytest.raises(ValueError, match="hidden_size=64 does not match the model's hidden size 32"):
        xlora(base, expert_dirs["llama"], hidden_size=64)
    assert_untouched(base)
    with pytest.raises(ValueError, match="`hidden_size` must be a positive int or None"):
        XLoraConfig(adapters=expert_dirs["llama"], hidden_size=0)


@pytest.mark.parametrize("k", [0, -1, 4, 1.5])
def test_top_k_out_of_range(expert_dirs, k):
    with pytest.raises(ValueError, match=r"`top_k_lora` must be None \(dense\) or an int between 1 and the number"):
        XLoraConfig(adapters=expert_dirs["llama"], top_k_lora=k)


def test_top_k_setter_keeps_the_old_value(expert_dirs):
    model = build_xlora("llama", expert_dirs, top_k_lora=2)
    for k in (0, 4):
        with pytest.raises(ValueError, match="`top_k_lora` must be None"):
            model.set_topk_lora(k)
        assert model.get_topk_lora() == 2


@pytest.mark.parametrize("t", [0.0, -1.0, math.nan, math.inf])
def test_temperature_not_positive(expert_dirs, t):
    with pytest.raises(ValueError, match="`softmax_temperature` must be a finite number > 0"):
        XLoraConfig(adapters=expert_dirs["llama"], softmax_temperature=t)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"xlora_depth": 0}, "`xlora_depth` must be an int >= 1"),
        ({"xlora_size": 0}, "`xlora_size` must be an int >= 1"),
        ({"xlora_dropout_p": 1.0}, r"`xlora_dropout_p` must be in \[0, 1\)"),
        ({"scaling_pass_value": math.nan}, "`scaling_pass_value` must be a finite number"),
        ({"global_scaling_weight": math.inf}, "`global_scaling_weight` must be a finite number"),
        ({"enable_softmax_topk": True}, "`enable_softmax_topk=True` needs `top_k_lora`"),
        ({"scalings_mode": "sequence"}, "`scalings_mode` must be"),
    ],
)
def test_other_config_values(expert_dirs, options, message):
    with pytest.raises(ValueError, match=message):
        XLoraConfig(adapters=expert_dirs["llama"], **options)


# Sizes no real model needs (core/config.py, "bounds on sizes"): refused before anything is allocated. Before, the
# first allocated until the machine ran out of memory and the others passed validation.
OUT_OF_BOUNDS = {
    "depth-1e9": ({"xlora_depth": 10**9}, r"`xlora_depth` is 1000000000: the classifier may have at most 32 linear"),
    "depth-33": ({"xlora_depth": 33}, r"`xlora_depth` is 33: .* at most 32"),
    "size-1e12": ({"xlora_size": 10**12}, r"`xlora_size` is 1000000000000: .* at most 1048576 wide"),
    "size-over-16x-hidden": (
        {"xlora_depth": 2, "xlora_size": 10**6, "hidden_size": 32},
        r"`xlora_size` is 1000000: .* at most 4096 wide \(16x the hidden size 32, or 4096\)",
    ),
    "classifier-weights": (
        {"xlora_depth": 32, "xlora_size": 4096, "hidden_size": 32},
        r"A classifier of depth 32 and width 4096 over hidden size 32 has 503,447,552 weights; at most 134,217,728",
    ),
    "hidden-1e9": ({"hidden_size": 10**9}, r"`hidden_size` is 1000000000; at most 65536"),
    "softmax-temperature": ({"softmax_temperature": 1e-4}, r"`softmax_temperature` must be >= 0.001, got 0.0001"),
    "distillation-temperature": (
        {"router_distillation_temperature": 1e-39},
        r"`router_distillation_temperature` must be >= 0.001, got 1e-39",
    ),
}


@pytest.mark.parametrize("case", OUT_OF_BOUNDS)
def test_sizes_out_of_bounds_are_refused_before_any_allocation(expert_dirs, case):
    options, message = OUT_OF_BOUNDS[case]
    with no_large_allocation(), pytest.raises(ValueError, match=message):
        XLoraConfig(adapters=expert_dirs["llama"], **options)


def test_sizes_at_the_bounds_are_accepted(expert_dirs):
    adapters = expert_dirs["llama"]
    XLoraConfig(adapters=adapters, xlora_depth=32, xlora_size=1024, hidden_size=4096)
    XLoraConfig(adapters=adapters, xlora_depth=32, xlora_size=2048, hidden_size=32)  # the default width, any depth
    XLoraConfig(adapters=adapters, xlora_depth=2, xlora_size=4096, hidden_size=32)  # 4096 wide fits any model
    XLoraConfig(adapters=adapters, xlora_depth=1, xlora_size=2**20, hidden_size=32)  # one layer: the width is unused
    XLoraConfig(adapters=adapters, softmax_temperature=1e-3, router_distillation_temperature=1e-3)


def test_a_classifier_too_wide_for_the_model_is_refused_when_built(expert_dirs):
    # The config does not know the hidden size (32): the build checks the width once it does, before any change.
    base = tiny_llama()
    config = XLoraConfig(task_type="CAUSAL_LM", adapters=expert_dirs["llama"], xlora_depth=2, xlora_size=8192)
    with no_large_allocation(), pytest.raises(ValueError, match=r"`xlora_size` is 8192: .* \(16x the hidden size 32"):
        get_peft_model(base, config)
    assert_untouched(base)


def test_update_config_refuses_a_size_out_of_bounds(expert_dirs):
    model = build_xlora("llama", expert_dirs, xlora_dropout_p=0.0)
    with pytest.raises(ValueError, match=r"`softmax_temperature` must be >= 0\.001"):
        model.base_model.update_config(softmax_temperature=1e-9)
    assert model.peft_config["default"].softmax_temperature == 1.0


def _own_fields(kind):
    """XLoraConfig's own fields (not PeftConfig's) declared as `kind` (bool, or int / int | None / int | "auto")."""
    hints = typing.get_type_hints(XLoraConfig)
    peft_fields = {f.name for f in dataclasses.fields(PeftConfig)}
    wanted = {bool} if kind is bool else {int, int | None, int | typing.Literal["auto"] | None}
    return [f.name for f in dataclasses.fields(XLoraConfig) if f.name not in peft_fields and hints[f.name] in wanted]


BOOL_FIELDS = _own_fields(bool)
INT_FIELDS = _own_fields(int)


def test_the_typed_fields_are_found():
    # the two tests below cover every bool and int field; this keeps them from covering none
    assert set(BOOL_FIELDS) == {
        "enable_softmax",
        "enable_softmax_topk",
        "layerwise_scalings",
        "trainable_head",
        "use_trainable_adapters",
    }
    assert {"hidden_size", "top_k_lora", "xlora_depth", "xlora_size", "scaling_pass_layers"} <= set(INT_FIELDS)


@pytest.mark.parametrize("value", [1, 0, "no", "True", None, 1.0])
@pytest.mark.parametrize("field", BOOL_FIELDS)
def test_bool_fields_take_only_bools(expert_dirs, field, value):
    # before, `enable_softmax="no"` was read as True by truthiness
    base = {"adapters": expert_dirs["llama"], "top_k_lora": 2}
    with pytest.raises(ValueError, match=rf"`{field}` must be True or False, got {re.escape(repr(value))}\."):
        XLoraConfig(**base, **{field: value})
    for ok in (True, False):
        assert getattr(XLoraConfig(**base, **{field: ok}), field) is ok


@pytest.mark.parametrize("value", [True, False, 2.0, "2"])
@pytest.mark.parametrize("field", INT_FIELDS)
def test_int_fields_refuse_bools_floats_and_strings(expert_dirs, field, value):
    # before, `top_k_lora=True` and `xlora_depth=True` were taken as 1
    with pytest.raises(ValueError, match=rf"`{field}` must be .*, got {re.escape(repr(value))}\."):
        XLoraConfig(adapters=expert_dirs["llama"], **{field: value})


# ---------------------------------------------------------------------------------------------- layer types


def test_unsupported_layer_type_is_named(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3)
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.conv(x).mean((-1, -2)))

    torch.manual_seed(0)
    path = save_adapter(Net(), LoraConfig(r=2, target_modules=["conv", "lin"]), tmp_path / "conv")
    base = Net()
    with pytest.raises(
        ExpertError,
        match=r"adapts 'conv', a torch.nn.modules.conv.Conv2d, which X-LoRA cannot mix; "
        r"supported: nn.Linear",
    ):
        get_peft_model(base, XLoraConfig(adapters={"conv": path}, hidden_size=4))
    assert isinstance(base.conv, nn.Conv2d) and isinstance(base.lin, nn.Linear)


def test_quantized_layer_that_cannot_be_wrapped_is_named(expert_dirs):
    # torch's dynamic int8 Linear is not an nn.Linear: refused by type, never silently left without its experts.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(tiny_llama(), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(
        ExpertError,
        match=r"Expert 'math' adapts 'model.layers.0.[\w.]+', a "
        r"torch.ao.nn.quantized.dynamic.modules.linear.Linear, which X-LoRA cannot",
    ):
        xlora(quantized, {"math": expert_dirs["llama"]["math"]})


def test_model_without_a_hidden_state(tmp_path):
    # A plain module whose output is logits: the scaling pass cannot find a last hidden state, and says so.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 8)
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, VOCAB)

        def forward(self, input_ids):
            return self.head(self.proj(self.emb(input_ids)))

    torch.manual_seed(0)
    path = save_adapter(Net(), LoraConfig(r=2, target_modules=["proj"]), tmp_path / "net")
    model = get_peft_model(Net(), XLoraConfig(adapters={"p": path}, hidden_size=8))
    with pytest.raises(
        RuntimeError,
        match=r"scaling pass ran Net and got \(2, 7, 97\), not a last hidden state of "
        r"shape \(batch, seq, 8\)",
    ):
        model(input_ids=input_ids())


# ---------------------------------------------------------------------------------------------- at run time


def test_nan_classifier_weights_reported_with_layer_and_cause(expert_dirs):
    model = build_xlora("llama", expert_dirs).eval()
    with torch.no_grad():
        model.base_model.xlora_classifier.layers[0].weight[0, 0] = math.nan
    with pytest.raises(
        FloatingPointError,
        match=r"X-LoRA scalings are not finite \(nan\) in all \d+ mixture layers "
        r".*expert 'math', batch row 0, token 0: the gating classifier's "
        r"weights hold NaN/Inf",
    ):
        model(input_ids=input_ids())


def test_inf_in_one_layers_scalings_names_that_layer(expert_dirs):
    model = build_xlora("llama", expert_dirs, layerwise_scalings=True, xlora_depth=1).eval()
    tuner = model.base_model
    n_experts = len(tuner.expert_names)
    slot = 3
    with torch.no_grad():  # the bias of (layer 3, expert 'code') becomes +inf: softmax gives NaN in that layer only
        tuner.xlora_classifier.layers[-1].bias[slot * n_experts + 1] = math.inf
    name = tuner.mixture_layer_names[slot]
    with pytest.raises(FloatingPointError, match=rf"in mixture layer {slot} \('{name}'\), expert '"):
        model(input_ids=input_ids())


@pytest.mark.parametrize("k", [None, "auto"])
def test_nan_hidden_state_reported_as_base_model_overflow(expert_dirs, k):
    model = build_xlora("llama", expert_dirs, scaling_pass_layers=k).eval()
    inner = model.get_base_model().model
    with torch.no_grad():  # whole model: the final norm overflows; "auto" (layer 1 of 2): the first layer does
        (inner.norm if k is None else inner.layers[0].post_attention_layernorm).weight[0] = math.inf
    message = r"the scaling pass's hidden state \(the classifier's input\) already holds NaN/Inf"
    with pytest.raises(FloatingPointError, match=message):
        model(input_ids=input_ids())


def test_inputs_on_the_wrong_device(expert_dirs):
    model = build_xlora("llama", expert_dirs)
    with pytest.raises(
        ValueError,
        match=r"`input_ids` is on meta but the model's input embeddings are on cpu: move "
        r"the inputs first",
    ):
        model(input_ids=input_ids().to("meta"))
    model.set_static_scalings({"math": 1.0})
    with pytest.raises(ValueError, match="`inputs_embeds` is on meta"):
        model(inputs_embeds=torch.zeros(1, 3, 32, device="meta"))


def test_static_scalings_bad_values(expert_dirs):
    model = build_xlora("llama", expert_dirs)
    with pytest.raises(ValueError, match=r"Unknown experts \['nope'\]; this model has \['math', 'code', 'poetry'\]"):
        model.set_static_scalings({"nope": 1.0})
    with pytest.raises(ValueError, match=r"Static scalings must have shape \(3,\) or \(\d+, 3\)"):
        model.set_static_scalings(torch.ones(4))
    with pytest.raises(ValueError, match="Static scalings must be finite numbers"):
        model.set_static_scalings({"math": math.inf})
    with pytest.raises(ValueError, match=r"Per-row static scalings must have shape \(batch, 3\) or \(batch, \d+, 3\)"):
        model.set_static_scalings(torch.ones(3), per_row=True)
    with pytest.raises(ValueError, match=r"per_row=True needs a tensor"):
        model.set_static_scalings({"math": 1.0}, per_row=True)
    assert model.base_model._static_scalings is None  # nothing refused was kept


def test_second_peft_adapter_refused(expert_dirs):
    lora = PeftModel.from_pretrained(tiny_llama(), expert_dirs["llama"]["math"])
    with pytest.raises(ValueError, match="X-LoRA must be the only PEFT adapter on the model"):
        get_peft_model(lora.base_model.model, XLoraConfig(adapters=expert_dirs["llama"]))


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpoint(tmp_path, expert_dirs):
    model = build_xlora("llama", expert_dirs)
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_checkpoint_config_and_weights_disagree(checkpoint):
    config_path = checkpoint / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["experts"]["math"]["r"] = 3  # the weights hold rank 4
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"The X-LoRA weights do not match the model that adapter_config.json "
        r"describes: .*wrong shape .*xlora_experts.math.lora_A: \(4, 32\) in "
        r"the checkpoint, \(3, 32\) in the model",
    ):
        PeftModel.from_pretrained(tiny_llama(), checkpoint)


def test_checkpoint_weights_from_another_config(tmp_path, checkpoint, expert_dirs):
    other = build_xlora("llama", expert_dirs, xlora_depth=1)
    other.save_pretrained(tmp_path / "other")
    os.replace(tmp_path / "other" / "adapter_model.safetensors", checkpoint / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensors missing .*xlora_classifier"):
        PeftModel.from_pretrained(tiny_llama(), checkpoint)


def test_truncated_checkpoint_file(checkpoint):
    weights = checkpoint / "adapter_model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(
        CheckpointError,
        match=rf"adapter_model.safetensors is truncated: its tensors need {size} "
        rf"bytes but the file has {size - 100}",
    ):
        PeftModel.from_pretrained(tiny_llama(), checkpoint)


def test_gpt2_expert_and_llama_expert_on_gpt2(expert_dirs):
    # The other direction: Llama module names do not exist in GPT-2.
    base = tiny_gpt2()
    with pytest.raises(ExpertError, match="which this GPT2LMHeadModel does not have"):
        xlora(base, {"llama": expert_dirs["llama"]["code"]})


# ---------------------------------------------------------------------------------------------- vLLM spec sizes


def _spec(**changes) -> dict:
    """The serving spec of a small exported model (as config.json holds it), with `changes`."""
    from peft_xlora.serving.vllm.spec import SPEC_FORMAT

    module = "model.layers.0.self_attn.q_proj"
    spec = {
        "format": SPEC_FORMAT,
        "experts": ["a", "b"],
        "mixture_layers": [module],
        "modules": {module: [[0, 4, 2.0], [1, 4, 2.0]]},
        "classifier_depth": 2,
        "classifier_width": 16,
        "hidden_size": 32,
    }
    return {**spec, **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"classifier_depth": 10**9}, r"`xlora_depth` is 1000000000: the classifier may have at most 32"),
        ({"classifier_width": 10**6}, r"`xlora_size` is 1000000: .* at most 4096 wide \(16x the hidden size 32"),
        ({"hidden_size": 10**9}, r"`hidden_size` is 1000000000; at most 65536"),
        (
            {"modules": {"model.layers.0.self_attn.q_proj": [[0, 10**8, 1.0], [1, 4, 2.0]]}},
            r"The LoRA rank of 'model.layers.0.self_attn.q_proj' expert 0 is 100000000; at most 4096",
        ),
    ],
    ids=["depth", "width", "hidden", "rank"],
)
def test_vllm_spec_with_sizes_out_of_bounds_is_refused_before_any_allocation(changes, message):
    # Before: the plugin built whatever an exported config.json's spec asked for. The spec loader now holds the
    # bounds every config has (core/config.py, `check_sizes`).
    from peft_xlora.serving.vllm import ServingSpec, XLoraServingError

    ServingSpec.from_dict(_spec())  # the spec itself is fine
    with no_large_allocation(), pytest.raises(XLoraServingError, match=message):
        ServingSpec.from_dict(_spec(**changes))
