"""The default `scaling_pass_layers="auto"`: two thirds of a decoder-only model's layers, resolved at build.

Every case is checked against a model built directly with the value "auto" should give (and against the written-out
reference of the two passes), never against an earlier output of the same code.
"""

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peft_xlora
from helpers.models import VOCAB, build_xlora, input_ids, make_seq2seq_expert, seq2seq_inputs, tiny_bart
from helpers.reference import lora_factors_reference, xlora_logits_reference
from peft_xlora.core.building import resolve_scaling_pass

# n decoder layers -> what "auto" gives: round(2n/3), None (the whole model) where that is the last layer.
EXPECTED = {1: None, 2: 1, 3: 2, 4: 3, 5: 3, 6: 4, 9: 6, 30: 20}


def _llama(n_layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=n_layers, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _expert(n_layers: int, seed: int, path: str) -> str:
    model = get_peft_model(
        _llama(n_layers),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def deep_experts(tmp_path_factory):
    """n_layers -> {name: folder} of two random LoRA experts of `_llama(n_layers)`."""
    out = {}
    for n in (3, 6):
        root = tmp_path_factory.mktemp(f"auto-{n}")
        out[n] = {name: _expert(n, seed, str(root / name)) for seed, name in enumerate(("a", "b"))}
    return out


def _build(n_layers: int, experts: dict, **overrides) -> PeftModel:
    config = peft_xlora.XLoraConfig(
        task_type="CAUSAL_LM", adapters=experts, xlora_depth=2, xlora_size=8, classifier_init="random", **overrides
    )
    torch.manual_seed(1)  # the same random classifier for every build
    return get_peft_model(_llama(n_layers), config).eval()


def _classifier(model: PeftModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    linears = [m for m in model.base_model.xlora_classifier.modules() if isinstance(m, nn.Linear)]
    return [(m.weight.detach(), m.bias.detach()) for m in linears]


def test_the_default_is_auto():
    config = peft_xlora.XLoraConfig(adapters={"a": "x"})
    assert config.scaling_pass_layers == "auto"


@pytest.mark.parametrize("n_layers", sorted(EXPECTED))
def test_auto_reads_two_thirds_of_the_layers(n_layers):
    model = _llama(n_layers) if n_layers <= 9 else LlamaForCausalLM(LlamaConfig(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=n_layers, num_attention_heads=1,
    ))  # fmt: skip
    default = peft_xlora.XLoraConfig(adapters={"a": "x"}).scaling_pass_layers
    assert resolve_scaling_pass(model, default, "dual_pass") == EXPECTED[n_layers]


@pytest.mark.parametrize("n_layers", [3, 6])
def test_auto_builds_the_model_built_with_its_layer(n_layers, deep_experts):
    experts = deep_experts[n_layers]
    auto = _build(n_layers, experts)
    k = EXPECTED[n_layers]
    assert auto.peft_config["default"].scaling_pass_layers == k
    direct = _build(n_layers, experts, scaling_pass_layers=k)
    whole = _build(n_layers, experts, scaling_pass_layers=None)
    ids = input_ids(seq=6)
    with torch.no_grad():
        got = auto(input_ids=ids).logits
        torch.testing.assert_close(got, direct(input_ids=ids).logits, rtol=0, atol=0)
        assert not torch.allclose(got, whole(input_ids=ids).logits, atol=1e-4)  # the layer read matters here
    factors = [lora_factors_reference(experts[name]) for name in ("a", "b")]
    expected = xlora_logits_reference(_llama(n_layers), factors, _classifier(auto), ids, scaling_pass_layers=k)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_checkpoint_holds_the_resolved_layer(deep_experts, tmp_path):
    model = _build(6, deep_experts[6])
    model.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        assert json.load(f)["scaling_pass_layers"] == 4
    reloaded = PeftModel.from_pretrained(_llama(6), str(tmp_path)).eval()
    assert reloaded.peft_config["default"].scaling_pass_layers == 4
    ids = input_ids(seq=6)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("saved", ["missing", "null"])
def test_a_config_saved_without_the_field_or_with_null_loads_the_whole_model(saved, deep_experts, tmp_path):
    whole = _build(6, deep_experts[6], scaling_pass_layers=None)
    whole.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "adapter_config.json")
    with open(path) as f:
        data = json.load(f)
    assert data["scaling_pass_layers"] is None
    if saved == "missing":  # a checkpoint written before the field existed
        del data["scaling_pass_layers"]
    with open(path, "w") as f:
        json.dump(data, f)
    reloaded = PeftModel.from_pretrained(_llama(6), str(tmp_path)).eval()
    assert reloaded.peft_config["default"].scaling_pass_layers is None
    assert PeftConfig.from_pretrained(str(tmp_path)).scaling_pass_layers is None  # PEFT's generic loader too
    ids = input_ids(seq=6)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, whole(input_ids=ids).logits, rtol=0, atol=0)


def test_a_recipe_saved_before_build_keeps_auto(tmp_path):
    config = peft_xlora.XLoraConfig(adapters={"a": "hub/a"}, task_type="CAUSAL_LM")
    config.save_pretrained(tmp_path)
    loaded = peft_xlora.XLoraConfig.from_json_file(os.path.join(tmp_path, "adapter_config.json"))
    assert loaded["scaling_pass_layers"] == "auto"


def test_update_config_auto_gives_the_model_built_with_auto(deep_experts):
    experts = deep_experts[6]
    model = _build(6, experts, scaling_pass_layers=None)
    model.base_model.update_config(scaling_pass_layers="auto")
    assert model.peft_config["default"].scaling_pass_layers == 4
    direct = _build(6, experts)
    ids = input_ids(seq=6)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, direct(input_ids=ids).logits, rtol=0, atol=0)


def test_encoder_decoder_models_keep_the_whole_model(tmp_path):
    experts = {
        name: make_seq2seq_expert(["q_proj", "v_proj", "fc1"], seed, str(tmp_path / name))
        for seed, name in enumerate(("a", "b"))
    }

    def build(**overrides):
        config = peft_xlora.XLoraConfig(
            task_type="SEQ_2_SEQ_LM", adapters=experts, classifier_init="random", xlora_size=8, **overrides
        )
        torch.manual_seed(1)
        return get_peft_model(tiny_bart(), config).eval()

    auto, whole = build(), build(scaling_pass_layers=None)
    assert auto.peft_config["default"].scaling_pass_layers is None
    inputs = seq2seq_inputs()
    with torch.no_grad():
        torch.testing.assert_close(auto(**inputs).logits, whole(**inputs).logits, rtol=0, atol=0)


def test_models_that_do_not_generate_keep_the_whole_model():
    # The routing benchmark measured causal language models; a sequence classifier or an encoder keeps the whole model.
    from transformers import BertConfig, BertForSequenceClassification, LlamaForSequenceClassification

    default = peft_xlora.XLoraConfig(adapters={"a": "x"}).scaling_pass_layers
    llama = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=6, num_attention_heads=1)
    bert = BertConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=6, num_attention_heads=1)
    assert resolve_scaling_pass(LlamaForCausalLM(llama), default, "dual_pass") == 4  # the same stack, generating
    assert resolve_scaling_pass(LlamaForSequenceClassification(llama), default, "dual_pass") is None
    assert resolve_scaling_pass(BertForSequenceClassification(bert), default, "dual_pass") is None


def test_models_without_an_exit_keep_the_whole_model():
    default = peft_xlora.XLoraConfig(adapters={"a": "x"}).scaling_pass_layers
    assert resolve_scaling_pass(nn.Sequential(nn.Linear(4, 4)), default, "dual_pass") is None


def test_single_pass_needs_an_int():
    with pytest.raises(ValueError, match="needs `scaling_pass_layers=k` \\(an int, not 'auto'\\)"):
        peft_xlora.XLoraConfig(adapters={"a": "x"}, routing="single_pass")


def test_the_mistralrs_refusal_says_how_to_get_an_exportable_model(expert_dirs, tmp_path):
    model = build_xlora("llama", expert_dirs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="scaling_pass_layers=None"):
        peft_xlora.export_mistralrs(model, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
