"""The original xlora package's global API and the model API, following the seed README's examples on tiny models."""

import warnings

import pytest
import torch
from peft import PeftModel, PeftModelForCausalLM, get_peft_model
from peft_xlora.xlora_utils import load_model

import peft_xlora as xlora
from helpers.models import build_xlora, input_ids, tiny_llama
from helpers.tiny_tokenizer import tiny_tokenizer
from peft_xlora import CheckpointError, XLoraCompatWarning, XLoraConfig, xLoRAConfig

SMALL = {"xlora_depth": 2, "xlora_size": 16}


def logits(model, seed=0):
    return model(input_ids=input_ids(seed=seed)).logits


def reference_model(expert_dirs, **overrides):
    """The same X-LoRA model built the PEFT way (same seed, so the same classifier initialisation)."""
    torch.manual_seed(1)
    config = XLoraConfig(task_type="CAUSAL_LM", adapters=expert_dirs["llama"], **{**SMALL, **overrides})
    return get_peft_model(tiny_llama(), config).eval()


def trained(model):
    """Gives the classifier distinct non-default weights, as training would."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.base_model.xlora_classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


# ---------------------------------------------------------------------------------------------------- xLoRAConfig


def test_original_config_spelling_maps_onto_xlora_config(expert_dirs):
    old = xLoRAConfig(32, xlora_depth=8, device=torch.device("cpu"), top_k_lora=2, softmax_temperature=0.5)
    config = old.to_xlora_config(expert_dirs["llama"])
    assert isinstance(config, XLoraConfig)
    assert (config.hidden_size, config.xlora_depth, config.top_k_lora, config.softmax_temperature) == (32, 8, 2, 0.5)
    assert config.adapters == expert_dirs["llama"]
    assert xLoRAConfig(32, base_model_id="org/base").to_xlora_config({"a": "x"}).base_model_name_or_path == "org/base"
    # the original's scaling pass runs the whole model, not XLoraConfig's default cut; an override still wins
    assert config.scaling_pass_layers is None
    assert old.to_xlora_config(expert_dirs["llama"], scaling_pass_layers=1).scaling_pass_layers == 1


@pytest.mark.parametrize(
    "option", [{"enable_relu_and_dropout": False}, {"use_bias": False}, {"stop_token_id": 2}, {"use_mean_pool": True}]
)
def test_original_options_without_an_equivalent_are_refused(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        xLoRAConfig(32, **option)


def test_config_needs_experts_once():
    with pytest.raises(ValueError, match="No experts"):
        xLoRAConfig(32).to_xlora_config()
    with pytest.raises(ValueError, match="differently"):
        xLoRAConfig(32, adapters={"a": "x"}).to_xlora_config({"b": "y"})


# ------------------------------------------------------------------------------------------- add_xlora_to_model


def test_add_xlora_to_model_readme_example(expert_dirs):
    # README "Converting a model", on a tiny model: hidden size positional, device keyword, verbose.
    torch.manual_seed(1)
    model_created = xlora.add_xlora_to_model(
        model=tiny_llama(),
        xlora_config=xlora.xLoRAConfig(32, device=torch.device("cpu"), **SMALL),
        verbose=True,
        adapters=expert_dirs["llama"],
    ).eval()
    assert isinstance(model_created, PeftModelForCausalLM)  # a causal LM gets `generate`
    assert model_created.base_model.expert_names == ["math", "code", "poetry"]
    torch.testing.assert_close(logits(model_created), logits(reference_model(expert_dirs)), rtol=0, atol=0)
    model_created.generate(input_ids=input_ids(batch=1, seq=3), max_new_tokens=2, do_sample=False)


def test_add_xlora_to_model_accepts_xlora_config_and_leaves_it_alone(expert_dirs):
    config = XLoraConfig(adapters=expert_dirs["llama"], **SMALL)
    torch.manual_seed(1)
    model = xlora.add_xlora_to_model(tiny_llama(), config).eval()
    assert config.task_type is None and isinstance(model, PeftModelForCausalLM)
    torch.testing.assert_close(logits(model), logits(reference_model(expert_dirs)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="differently"):
        xlora.add_xlora_to_model(tiny_llama(), config, adapters={"other": expert_dirs["llama"]["math"]})


def test_add_xlora_to_model_checks_hidden_size_and_device(expert_dirs):
    with pytest.raises(ValueError, match="hidden_size=64"):
        xlora.add_xlora_to_model(tiny_llama(), xLoRAConfig(64), adapters=expert_dirs["llama"])
    with pytest.warns(XLoraCompatWarning, match="device='cuda' is ignored"):
        xlora.add_xlora_to_model(tiny_llama(), xLoRAConfig(32, device="cuda"), adapters=expert_dirs["llama"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", XLoraCompatWarning)
        xlora.add_xlora_to_model(tiny_llama(), xLoRAConfig(32, device="cpu"), adapters=expert_dirs["llama"])


# ---------------------------------------------------------------------------------------------------- from_pretrained


@pytest.fixture
def saved(tmp_path, expert_dirs):
    model = trained(reference_model(expert_dirs))
    model.save_pretrained(tmp_path / "xlora")
    return tmp_path / "xlora", logits(model)


def test_from_pretrained_with_the_adapters_dict(saved, expert_dirs):
    # README "trained without trainable adapters": experts given as a dict, device positional.
    path, expected = saved
    model_created = xlora.from_pretrained(str(path), tiny_llama(), dict(expert_dirs["llama"]), "cpu").eval()
    torch.testing.assert_close(logits(model_created), expected, rtol=0, atol=0)


@pytest.mark.parametrize("adapters", [None, ["math", "code", "poetry"], ["poetry", "math", "code"]])
def test_from_pretrained_with_names_or_nothing_uses_the_checkpoint(saved, adapters):
    path, expected = saved
    model = xlora.from_pretrained(path, tiny_llama(), adapters, device="cpu", verbose=True).eval()
    assert isinstance(model, PeftModel)
    assert model.base_model.expert_names == ["math", "code", "poetry"]  # the gate's order is the checkpoint's
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


def test_from_pretrained_with_trainable_adapters_readme_example(tmp_path, expert_dirs):
    # README "trained with trainable adapters": a list of names keeps the experts as trained.
    model = trained(reference_model(expert_dirs, use_trainable_adapters=True))
    with torch.no_grad():
        for layer in model.base_model.mixture_layers():
            layer.xlora_B.add_(0.1)  # training changed the experts
    expected = logits(model)
    model.save_pretrained(tmp_path)
    model_created = xlora.from_pretrained(str(tmp_path), tiny_llama(), ["math", "code", "poetry"], "cpu").eval()
    assert model_created.get_use_trainable_adapters() is True
    torch.testing.assert_close(logits(model_created), expected, rtol=0, atol=0)


def test_from_pretrained_dict_sources_replace_experts(saved, expert_dirs):
    path, expected = saved
    dirs = expert_dirs["llama"]
    swapped = xlora.from_pretrained(path, tiny_llama(), {"math": dirs["code"]}).eval()
    assert not torch.allclose(logits(swapped), expected, atol=1e-4)


def test_from_pretrained_rejects_wrong_names(saved):
    path, _ = saved
    with pytest.raises(ValueError, match="checkpoint's experts"):
        xlora.from_pretrained(path, tiny_llama(), ["math", "code"])
    with pytest.raises(ValueError, match=r"\['physics'\]"):
        xlora.from_pretrained(path, tiny_llama(), {"physics": "somewhere"})


def test_from_pretrained_warns_when_a_dict_replaces_trained_experts(tmp_path, expert_dirs):
    model = reference_model(expert_dirs, use_trainable_adapters=True)
    model.save_pretrained(tmp_path)
    with pytest.warns(XLoraCompatWarning, match="trainable experts"):
        xlora.from_pretrained(tmp_path, tiny_llama(), dict(expert_dirs["llama"]))


def test_from_pretrained_from_safetensors_false_reads_a_pickle_checkpoint(saved):
    import os

    import safetensors.torch

    path, expected = saved
    weights = safetensors.torch.load_file(path / "adapter_model.safetensors")
    torch.save(weights, path / "adapter_model.bin")
    os.remove(path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError):
        xlora.from_pretrained(path, tiny_llama())
    model = xlora.from_pretrained(path, tiny_llama(), from_safetensors=False).eval()
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


def test_from_pretrained_is_trainable(saved):
    path, _ = saved
    frozen = xlora.from_pretrained(path, tiny_llama())
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = xlora.from_pretrained(path, tiny_llama(), is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, _ in trainable.named_parameters() if ".xlora_classifier." in n
    }


# ---------------------------------------------------------------------------------------------------- load_model


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "base"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture
def spy(monkeypatch):
    """Records the keyword arguments of every transformers loader call made by load_model."""
    import peft_xlora.xlora_utils as utils

    calls = []
    for name in ("AutoModelForCausalLM", "AutoTokenizer"):
        real = getattr(utils, name)

        class Recorder:
            @staticmethod
            def from_pretrained(*args, _real=real, _name=name, **kwargs):
                calls.append((_name, kwargs))
                return _real.from_pretrained(*args, **kwargs)

        monkeypatch.setattr(utils, name, Recorder)
    return calls


def test_load_model_readme_example(saved, base_dir, expert_dirs, spy):
    path, expected = saved
    model_loaded, tokenizer = load_model(
        model_name=base_dir,
        device="cpu",
        dtype=torch.float32,
        fine_tune_model_name=str(path),
        adapters=dict(expert_dirs["llama"]),
    )
    assert isinstance(model_loaded, PeftModel)
    torch.testing.assert_close(logits(model_loaded.eval()), expected, rtol=0, atol=0)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer("w5 w6")["input_ids"] == [5, 6]
    assert model_loaded.config.use_cache is True
    assert [name for name, _ in spy] == ["AutoModelForCausalLM", "AutoTokenizer"]
    assert all(kwargs["trust_remote_code"] is False for _, kwargs in spy)


def test_load_model_base_only_and_new_xlora(base_dir, expert_dirs, spy):
    base, _ = load_model(base_dir, "cpu", torch.float32, load_xlora=False, use_cache=False)
    assert not isinstance(base, PeftModel) and base.config.use_cache is False
    torch.testing.assert_close(logits(base), logits(tiny_llama()), rtol=0, atol=0)
    fresh, _ = load_model(base_dir, "cpu", torch.bfloat16, adapters=dict(expert_dirs["llama"]), trust_remote_code=True)
    assert isinstance(fresh, PeftModelForCausalLM) and fresh.base_model.expert_names == ["math", "code", "poetry"]
    assert next(fresh.base_model.model.parameters()).dtype == torch.bfloat16
    assert spy[-1][1]["trust_remote_code"] is True  # only because it was asked for
    with pytest.raises(ValueError, match="fine_tune_model_name"):
        load_model(base_dir, "cpu", torch.float32, load_xlora=True)


# ---------------------------------------------------------------------------------------------------- model API


def test_trainable_parameters_readme_example(expert_dirs, capsys):
    model = build_xlora("llama", expert_dirs)
    num_trainable, num_all_params = model.get_nb_trainable_parameters()
    classifier = sum(p.numel() for p in model.base_model.xlora_classifier.parameters())
    assert (num_trainable, num_all_params) == (classifier, sum(p.numel() for p in model.parameters()))
    model.print_trainable_parameters()
    assert f"trainable params: {classifier:,d}" in capsys.readouterr().out


def test_set_use_trainable_adapters(expert_dirs):
    model = build_xlora("llama", expert_dirs)
    tuner = model.base_model
    factors = {n for n, _ in model.named_parameters() if n.endswith((".xlora_A", ".xlora_B"))}
    classifier = {n for n, _ in model.named_parameters() if ".xlora_classifier." in n}
    assert factors and model.get_use_trainable_adapters() is False
    model.set_use_trainable_adapters(True)
    assert model.get_use_trainable_adapters() is True and tuner.xlora_config.use_trainable_adapters is True
    assert {n for n, p in model.named_parameters() if p.requires_grad} == factors | classifier
    model.train()(input_ids=input_ids(), labels=input_ids()).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in factors)
    model.set_use_trainable_adapters(False)
    assert model.get_use_trainable_adapters() is False
    assert {n for n, p in model.named_parameters() if p.requires_grad} == classifier


def test_scaling_pass_value_readme_example(expert_dirs):
    model = build_xlora("llama", expert_dirs).eval()
    k = model.base_model.xlora_config.scaling_pass_layers  # the default: layer 1 of 2
    model.set_scaling_pass_value(0)
    assert model.base_model.xlora_config.scaling_pass_value == 0
    model(input_ids=input_ids())
    at_zero = model.get_latest_scalings()
    with model.disable_adapter():  # value 0: the scaling pass is the base model
        hidden = model(input_ids=input_ids(), output_hidden_states=True).hidden_states[k]
    expected = torch.softmax(model.base_model.xlora_classifier(hidden).float(), -1)
    torch.testing.assert_close(at_zero[:, :, :1], expected)
    model.set_scaling_pass_value(None)
    assert model.base_model.xlora_config.scaling_pass_value == pytest.approx(1 / 3)


def test_gating_getters_and_setters_round_trip(expert_dirs):
    model = build_xlora("llama", expert_dirs).eval()
    model(input_ids=input_ids())
    dense = model.get_latest_scalings().clone()
    model.set_global_scaling_weight(2.5)
    assert model.get_global_scaling_weight() == 2.5
    model(input_ids=input_ids())
    torch.testing.assert_close(model.get_latest_scalings(), dense * 2.5)
    model.set_global_scaling_weight(1.0)
    model.set_topk_lora(1)
    assert model.get_topk_lora() == 1
    model(input_ids=input_ids())
    top1 = torch.zeros_like(dense).scatter(-1, dense.argmax(-1, keepdim=True), dense.max(-1, keepdim=True).values)
    torch.testing.assert_close(model.get_latest_scalings(), top1)
    model.set_topk_lora(None)
    assert model.get_topk_lora() is None


def test_scalings_logging_readme_example(expert_dirs, tmp_path):
    model = build_xlora("llama", expert_dirs).eval()
    model.enable_scalings_logging()
    for seed in range(2):
        model(input_ids=input_ids(seed=seed))
    model.flush_log_scalings(str(tmp_path / "output" / "file"))
    log_copy = model.get_scalings_log()
    assert len(log_copy) == 2
    model.disable_scalings_logging()
    scalings_pred = model.get_latest_scalings()
    torch.testing.assert_close(scalings_pred, log_copy[-1])
    loaded = xlora.load_scalings_log(str(tmp_path / "output" / "file"))
    for a, b in zip(loaded, log_copy):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_from_pretrained_migrates_an_original_layout_checkpoint(tmp_path, expert_dirs):
    # The original package's layout is what `export_mistralrs` writes; the original loader reads it back.
    model = trained(reference_model(expert_dirs, scaling_pass_layers=None))  # the layout runs the whole model
    xlora.export_mistralrs(model, tmp_path / "orig", base_model_id="me/tiny")
    loaded = xlora.from_pretrained(tmp_path / "orig", tiny_llama())
    assert loaded.base_model.expert_names == ["math", "code", "poetry"]
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    with pytest.raises(ValueError, match="checkpoint's experts are"):
        xlora.from_pretrained(tmp_path / "orig", tiny_llama(), adapters=["math"])


def test_from_pretrained_migrates_a_peft_builtin_checkpoint(tmp_path, expert_dirs):
    from peft import XLoraConfig as BuiltinXLoraConfig

    base = tiny_llama()
    base.config.use_cache = False  # the built-in refuses a cache
    experts = {str(i): path for i, path in enumerate(expert_dirs["llama"].values())}
    config = BuiltinXLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=experts, xlora_depth=1)
    builtin = get_peft_model(base, config).eval()
    with torch.no_grad():
        for param in builtin.base_model.internal_xlora_classifier.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))
    ref = logits(builtin)
    builtin.save_pretrained(tmp_path / "builtin")
    with pytest.warns(xlora.MigrationWarning, match="lacks"):  # as `peft_xlora.migrate` warns
        loaded = xlora.from_pretrained(tmp_path / "builtin", tiny_llama())
    torch.testing.assert_close(logits(loaded), ref, rtol=1e-5, atol=1e-6)
