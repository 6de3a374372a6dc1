"""Checkpoints: exact save/load round trips, self-contained folders, expert swapping, strict errors, atomic saves."""

import errno
import json
import os
import shutil

import pytest
import safetensors.torch
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model

import peft_xlora
from conftest import EXPERT_SPECS, input_ids, make_expert, tiny_llama
from peft_xlora import XLoraConfig
from peft_xlora.checkpoint import WEIGHTS_NAME, CheckpointError, save_pretrained


def perturb_trainable(model, seed=1):
    """Stands in for training: moves every trainable weight away from its initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g).to(param.dtype) * 0.5)


def assert_state_dicts_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


def trained_llama(expert_dirs, dtype=torch.float32, **overrides):
    kwargs = {"task_type": "CAUSAL_LM", "adapters": expert_dirs["llama"], "xlora_depth": 2, "xlora_size": 16}
    config = XLoraConfig(**{**kwargs, **overrides})

    model = get_peft_model(tiny_llama(dtype=dtype), config)
    perturb_trainable(model)
    return model.eval()


# Every depth with layerwise on and off; the (trainable experts, dtype) pairs cycle so each appears twice.
_VARIANTS = [
    (False, torch.float32, "fp32"),
    (True, torch.bfloat16, "bf16"),
    (True, torch.float32, "fp32"),
    (False, torch.bfloat16, "bf16"),
]
CASES = [
    pytest.param(depth, layerwise, trainable, dtype, id=f"depth{depth}-lw{int(layerwise)}-tr{int(trainable)}-{dt}")
    for i, (depth, layerwise) in enumerate((d, lw) for d in (1, 2, 3, 4) for lw in (False, True))
    for trainable, dtype, dt in [_VARIANTS[i % 4]]
]


@pytest.mark.parametrize(("depth", "layerwise", "trainable", "dtype"), CASES)
def test_round_trip_is_exact(tmp_path, expert_dirs, depth, layerwise, trainable, dtype):
    model = trained_llama(
        expert_dirs, dtype=dtype, xlora_depth=depth, layerwise_scalings=layerwise, use_trainable_adapters=trainable
    )
    ref = logits(model)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = PeftModel.from_pretrained(tiny_llama(dtype=dtype), tmp_path / "ckpt").eval()
    assert_state_dicts_equal(model, loaded)
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)
    # the classifier really was trained and restored: a fresh one gives other logits
    fresh = trained_llama(expert_dirs, dtype=dtype, xlora_depth=depth, layerwise_scalings=layerwise)
    with torch.no_grad():
        for p in fresh.base_model.xlora_classifier.parameters():
            p.zero_()
    assert not torch.equal(logits(fresh), ref)


def test_expert_order_survives_sorted_json(tmp_path, expert_dirs):
    # adapter_config.json is written with sorted keys; "math, code, poetry" would come back as "code, math, poetry"
    # and the classifier's outputs would gate the wrong experts.
    model = trained_llama(expert_dirs)
    assert list(model.base_model.expert_names) != sorted(model.base_model.expert_names)
    ref = logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["expert_order"] == ["math", "code", "poetry"]
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert loaded.base_model.expert_names == ["math", "code", "poetry"]
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)


def test_folder_is_self_contained(tmp_path, expert_dirs):
    # Experts made for this test only, then deleted: loading must not need them.
    sources = {}
    for seed, (name, spec) in enumerate(EXPERT_SPECS["llama"].items()):
        sources[name] = make_expert("llama", spec, seed + 10, str(tmp_path / "sources" / name))

    model = get_peft_model(
        tiny_llama(), XLoraConfig(task_type="CAUSAL_LM", adapters=sources, xlora_depth=2, xlora_size=16)
    )
    perturb_trainable(model)
    model.eval()
    ref = logits(model)
    save_pretrained(model, tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "sources")

    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert files == ["README.md", "adapter_config.json", WEIGHTS_NAME]
    text = (tmp_path / "ckpt" / "adapter_config.json").read_text()
    assert str(tmp_path) not in text
    saved = json.loads(text)
    assert saved["peft_type"] == "PEFT_XLORA"
    assert saved["peft_xlora_version"] == peft_xlora.__version__
    assert set(saved["experts"]) == {"math", "code", "poetry"}
    keys = safetensors.torch.load_file(tmp_path / "ckpt" / WEIGHTS_NAME).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.xlora_experts.code.lora_A" in keys
    assert "base_model.xlora_classifier.layers.0.weight" in keys

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ckpt").eval()
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)


def test_auto_peft_model_and_load_adapter(tmp_path, expert_dirs):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(
        base, XLoraConfig(task_type="CAUSAL_LM", adapters=expert_dirs["llama"], xlora_depth=2, xlora_size=16)
    )
    perturb_trainable(model)
    model.eval()
    ref = logits(model)
    save_pretrained(model, tmp_path / "ckpt")

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    torch.testing.assert_close(logits(auto), ref, rtol=0, atol=0)

    other = trained_llama(expert_dirs)  # same experts, another classifier
    perturb_trainable(other, seed=7)
    assert not torch.equal(logits(other), ref)
    other.load_adapter(tmp_path / "ckpt", adapter_name="default")
    torch.testing.assert_close(logits(other.eval()), ref, rtol=0, atol=0)


def test_expert_source_can_be_swapped_at_load(tmp_path, expert_dirs):
    model = trained_llama(expert_dirs)
    save_pretrained(model, tmp_path / "ckpt")
    # another rank and other target modules than the saved "math" expert
    spec = {"r": 3, "lora_alpha": 6, "target_modules": ["k_proj", "v_proj"]}
    new_math = make_expert("llama", spec, 42, str(tmp_path / "new-math"))

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ckpt", expert_sources={"math": new_math}).eval()

    adapters = dict(expert_dirs["llama"], math=new_math)
    reference = trained_llama({"llama": adapters})
    reference.base_model.xlora_classifier.load_state_dict(model.base_model.xlora_classifier.state_dict())
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=0, atol=0)
    assert not torch.equal(logits(loaded), logits(model))
    assert loaded.base_model.xlora_config.adapters["math"] == new_math

    with pytest.raises(ValueError, match="not experts of this checkpoint"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "ckpt", expert_sources={"physics": new_math})


# ---------------------------------------------------------------------------------------------------- bad files


def test_truncated_weights_name_the_file(tmp_path, expert_dirs):
    save_pretrained(trained_llama(expert_dirs), tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME} is truncated"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_missing_weights_name_the_file(tmp_path, expert_dirs):
    save_pretrained(trained_llama(expert_dirs), tmp_path)
    os.remove(tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME} does not exist"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_mismatched_weights_are_listed(tmp_path, expert_dirs):
    save_pretrained(trained_llama(expert_dirs), tmp_path)
    weights = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    del weights["base_model.xlora_classifier.layers.3.bias"]
    key = "base_model.model.model.layers.0.self_attn.q_proj.xlora_experts.math.lora_A"
    weights[key] = weights[key][:2].clone()
    other = key.replace(".math.", ".code.")  # a wrong input size too: the stacking must not fail before the report
    weights[other] = weights[other][:, :31].clone()
    safetensors.torch.save_file(weights, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError) as info:
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    message = str(info.value)
    assert "layers.3.bias" in message and "1 tensors missing" in message
    assert f"{key}: (2, 32) in the checkpoint, (4, 32) in the model" in message
    assert f"{other}: (2, 31) in the checkpoint, (2, 32) in the model" in message


def test_pickle_is_refused_unless_allowed(tmp_path, expert_dirs):
    model = trained_llama(expert_dirs)
    ref = logits(model)
    save_pretrained(model, tmp_path)
    weights = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    torch.save(weights, tmp_path / "adapter_model.bin")
    os.remove(tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="pickle"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True).eval()
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- atomic save


def _failing_writer(after_bytes, exc):
    real = safetensors.torch.save_file

    def writer(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # the disk filled up part-way through
            f.truncate(after_bytes)
        raise exc

    return writer


@pytest.mark.parametrize(
    "exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "interrupt"]
)
def test_failed_save_keeps_previous_checkpoint(tmp_path, expert_dirs, monkeypatch, exc):
    old = trained_llama(expert_dirs)
    ref = logits(old)
    target = tmp_path / "ckpt"
    save_pretrained(old, target)
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}

    new = trained_llama(expert_dirs)
    perturb_trainable(new, seed=3)
    import peft.peft_model

    monkeypatch.setattr(peft.peft_model, "safe_save_file", _failing_writer(100, exc))
    with pytest.raises(type(exc)):
        save_pretrained(new, target)
    monkeypatch.undo()

    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left behind
    loaded = PeftModel.from_pretrained(tiny_llama(), target).eval()
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)


@pytest.mark.parametrize("other_files", [False, True], ids=["checkpoint-only", "shared-folder"])
def test_save_replaces_previous_checkpoint(tmp_path, expert_dirs, other_files):
    target = tmp_path / "ckpt"
    save_pretrained(trained_llama(expert_dirs), target)
    if other_files:  # e.g. a tokenizer saved into the same folder: it must survive the new save
        (target / "tokenizer.json").write_text("{}")
        (target / "logs").mkdir()
    new = trained_llama(expert_dirs)
    perturb_trainable(new, seed=5)
    ref = logits(new)
    save_pretrained(new, target)
    expected = {"README.md", "adapter_config.json", WEIGHTS_NAME}
    expected |= {"tokenizer.json", "logs"} if other_files else set()
    assert set(os.listdir(target)) == expected
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), target).eval()), ref, rtol=0, atol=0)


def test_model_card(tmp_path, expert_dirs):
    save_pretrained(trained_llama(expert_dirs), tmp_path)
    card = (tmp_path / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: peft" in header
    assert "peft-xlora" in header and "x-lora" in header
    usage = card.split("```python")[1]
    assert usage.lstrip().startswith("import peft_xlora")


def test_low_cpu_mem_usage_and_trainable_loading(tmp_path, expert_dirs):
    model = trained_llama(expert_dirs)
    ref = logits(model)
    save_pretrained(model, tmp_path)
    low_mem = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True).eval()
    torch.testing.assert_close(logits(low_mem), ref, rtol=0, atol=0)
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, _ in trainable.named_parameters() if ".xlora_classifier." in n
    }
    torch.testing.assert_close(logits(trainable.eval()), ref, rtol=0, atol=0)


@pytest.mark.xfail(
    strict=True,
    reason="transformers' load_adapter loads weights with its own loader into the bare model, where the X-LoRA "
    "classifier (held by the tuner) is not; the forward then raises. Use PeftModel.from_pretrained.",
)
def test_transformers_load_adapter(tmp_path, expert_dirs):
    model = trained_llama(expert_dirs)
    ref = logits(model)
    save_pretrained(model, tmp_path)
    base = tiny_llama()
    base.load_adapter(str(tmp_path))
    torch.testing.assert_close(logits(base), ref, rtol=0, atol=0)


def test_odd_expert_names_round_trip(tmp_path, expert_dirs):
    # Expert names go into tensor keys: names that look like key parts must not be confused with them.
    names = ["0", "math.v2", "default"]
    model = trained_llama({"llama": dict(zip(names, expert_dirs["llama"].values()))})
    ref = logits(model)
    save_pretrained(model, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert loaded.base_model.expert_names == names
    assert_state_dicts_equal(model, loaded)
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)
