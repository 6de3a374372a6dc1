"""Checkpoints: exact save/load round trips, self-contained folders, expert swapping, strict errors, atomic saves."""

import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading

import pytest
import safetensors.torch
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model

import peft_xlora
from helpers.models import EXPERT_SPECS, input_ids, make_expert, tiny_llama
from peft_xlora import CheckpointError, XLoraConfig, save_pretrained
from peft_xlora.core.checkpoint import WEIGHTS_NAME
from peft_xlora.io import card, files


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


# Both saves are atomic: ours, and PEFT's `model.save_pretrained` (what users and Trainer call), which routes here.
SAVES = {"peft_xlora": save_pretrained, "model": lambda model, path, **kwargs: model.save_pretrained(path, **kwargs)}


@pytest.mark.parametrize("save", SAVES)
@pytest.mark.parametrize(
    "exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "interrupt"]
)
def test_failed_save_keeps_previous_checkpoint(tmp_path, expert_dirs, monkeypatch, exc, save):
    old = trained_llama(expert_dirs)
    ref = logits(old)
    target = tmp_path / "ckpt"
    SAVES[save](old, target)
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}

    new = trained_llama(expert_dirs)
    perturb_trainable(new, seed=3)
    import peft.peft_model

    monkeypatch.setattr(peft.peft_model, "safe_save_file", _failing_writer(100, exc))
    with pytest.raises(type(exc)):
        SAVES[save](new, target)
    monkeypatch.undo()

    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left behind
    loaded = PeftModel.from_pretrained(tiny_llama(), target).eval()
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)


@pytest.mark.parametrize("save", SAVES)
@pytest.mark.parametrize("other_files", [False, True], ids=["checkpoint-only", "shared-folder"])
def test_save_replaces_previous_checkpoint(tmp_path, expert_dirs, other_files, save):
    target = tmp_path / "ckpt"
    SAVES[save](trained_llama(expert_dirs), target)
    if other_files:  # e.g. a tokenizer saved into the same folder: it must survive the new save
        (target / "tokenizer.json").write_text("{}")
        (target / "logs").mkdir()
    new = trained_llama(expert_dirs)
    perturb_trainable(new, seed=5)
    ref = logits(new)
    SAVES[save](new, target)
    expected = {"README.md", "adapter_config.json", WEIGHTS_NAME}
    expected |= {"tokenizer.json", "logs"} if other_files else set()
    assert set(os.listdir(target)) == expected
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), target).eval()), ref, rtol=0, atol=0)


@pytest.mark.parametrize("save", SAVES)
def test_pickle_save_is_refused(tmp_path, expert_dirs, save):
    with pytest.raises(ValueError, match="safetensors only"):
        SAVES[save](trained_llama(expert_dirs), tmp_path / "ckpt", safe_serialization=False)
    assert os.listdir(tmp_path) == []


def test_named_adapter_saves_into_its_subfolder(tmp_path, expert_dirs):
    # PEFT saves an adapter not named "default" into <folder>/<name>; the atomic save keeps that layout.
    config = XLoraConfig(task_type="CAUSAL_LM", adapters=expert_dirs["llama"], xlora_depth=2, xlora_size=16)
    model = get_peft_model(tiny_llama(), config, adapter_name="mine")
    perturb_trainable(model)
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "mine" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ckpt" / "mine", adapter_name="mine").eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_kill_at_any_point_leaves_old_or_new(tmp_path):
    # A child process saving with `model.save_pretrained` is SIGKILLed before and after every file-system step of a
    # save, and at random instants; after each kill the folder must hold exactly the old or the new checkpoint.
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.dirname(os.path.dirname(os.path.abspath(peft_xlora.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, src]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "helpers.kill_saves", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for case in ("alone", "shared"):
        assert report[case]["points"] >= 20  # every step of a save was a kill point
        assert report[case]["seen"]["old"] > 0 and report[case]["seen"]["new"] > 0


def test_exchange_is_used_and_the_fallback_is_safe(tmp_path):
    # The atomic exchange swaps two folders; without one, the two renames still end with the new folder in place.
    for name, text in (("a", "old"), ("b", "new")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(text)
    assert files.exchange(str(tmp_path / "b"), str(tmp_path / "a"))
    assert (tmp_path / "a" / "f").read_text() == "new" and (tmp_path / "b" / "f").read_text() == "old"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "f").write_text("newer")
    files.replace_dir(str(tmp_path / "c"), str(tmp_path / "a"), swap=lambda a, b: False)
    assert (tmp_path / "a" / "f").read_text() == "newer"
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_save_without_hard_links_keeps_other_files(tmp_path, expert_dirs, monkeypatch):
    # A file system without hard links: the checkpoint's files are replaced one by one, the others stay.
    target = tmp_path / "ckpt"
    trained_llama(expert_dirs).save_pretrained(target)
    (target / "tokenizer.json").write_text("{}")
    new = trained_llama(expert_dirs)
    perturb_trainable(new, seed=6)

    def no_link(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    new.save_pretrained(target)
    monkeypatch.undo()
    assert set(os.listdir(target)) == {"README.md", "adapter_config.json", WEIGHTS_NAME, "tokenizer.json"}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), target).eval()), logits(new))


def test_users_readme_and_files_are_kept(tmp_path, expert_dirs):
    # A README.md we did not write stays byte for byte (no card is written then); a card we wrote is rewritten.
    target = tmp_path / "ckpt"
    target.mkdir()
    readme = b"# My project\n\nNotes I wrote.\n"
    (target / "README.md").write_bytes(readme)
    (target / "logs").mkdir()
    (target / "logs" / "events").write_bytes(b"step 1")
    model = trained_llama(expert_dirs)
    model.save_pretrained(target)
    model.save_pretrained(target)
    assert (target / "README.md").read_bytes() == readme
    assert (target / "logs" / "events").read_bytes() == b"step 1"
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), target).eval()), logits(model))
    (target / "README.md").unlink()
    model.save_pretrained(target)
    assert card.CARD_MARK in (target / "README.md").read_text()
    model.base_model.set_global_scaling_weight(0.5)
    model.save_pretrained(target)  # our own card is rewritten
    assert card.CARD_MARK in (target / "README.md").read_text()


@pytest.mark.parametrize("save", SAVES)
def test_save_keeps_folder_permissions_and_links(tmp_path, expert_dirs, save):
    # The staging folder must not leave its own permissions on the checkpoint, nor replace a link by a folder.
    model = trained_llama(expert_dirs)
    real = tmp_path / "real"
    real.mkdir()
    os.chmod(real, 0o755)
    os.symlink(real, tmp_path / "link")
    SAVES[save](model, tmp_path / "link")
    SAVES[save](model, tmp_path / "link")
    assert os.path.islink(tmp_path / "link") and (real / "adapter_config.json").is_file()
    assert os.stat(real).st_mode & 0o777 == 0o755
    SAVES[save](model, tmp_path / "fresh")
    assert os.stat(tmp_path / "fresh").st_mode & 0o777 == 0o777 & ~_umask()
    assert sorted(os.listdir(tmp_path)) == ["fresh", "link", "real"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_other_adapter_types_save_exactly_as_peft_does(tmp_path, expert_dirs):
    # `import peft_xlora` wraps PeftModel.save_pretrained once; a plain LoRA goes straight to PEFT's method.
    assert getattr(PeftModel.save_pretrained, "__wrapped__", None) is not None
    wrapped = PeftModel.save_pretrained
    peft_xlora.io.save.install()
    assert PeftModel.save_pretrained is wrapped  # idempotent
    lora = PeftModel.from_pretrained(tiny_llama(), expert_dirs["llama"]["math"])
    lora.save_pretrained(tmp_path / "ours")
    PeftModel.save_pretrained.__wrapped__(lora, tmp_path / "peft")
    for name in sorted(os.listdir(tmp_path / "peft")):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "peft" / name).read_bytes(), name
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "peft"))


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


# ---------------------------------------------------------------------------------------------------- transformers


@pytest.fixture
def open_peft_gate(monkeypatch):
    """transformers 5.24 refuses its adapter methods (other than `load_adapter`) for every adapter type with PEFT
    < 0.22; PEFT 0.21 is installed. Lifting that version gate runs transformers' real code against our layers."""
    import transformers.integrations.peft as integration

    monkeypatch.setattr(integration, "check_peft_version", lambda **kwargs: None)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"layerwise_scalings": True, "xlora_depth": 2, "xlora_size": 16},
        {"routing": "single_pass", "scaling_pass_layers": 1},
    ],
    ids=["default-config", "layerwise-depth2", "single-pass"],
)
def test_transformers_load_adapter(tmp_path, expert_dirs, overrides):
    config = XLoraConfig(task_type="CAUSAL_LM", adapters=expert_dirs["llama"], **overrides)
    model = get_peft_model(tiny_llama(), config)
    perturb_trainable(model)
    model.eval()
    ref = logits(model)
    save_pretrained(model, tmp_path)

    peft_loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    base = tiny_llama()
    info = base.load_adapter(str(tmp_path))
    assert (info.missing_keys, info.unexpected_keys) == (set(), set())
    torch.testing.assert_close(logits(base), logits(peft_loaded), rtol=0, atol=0)
    torch.testing.assert_close(logits(base), ref, rtol=0, atol=0)

    # the same tensors, once each: the bare model's keys are the PeftModel's without `base_model.model.`
    bare = {k: v for k, v in base.state_dict().items() if "xlora_" in k}
    wrapped = {k: v for k, v in peft_loaded.state_dict().items() if "xlora_" in k}
    assert {"base_model.model." + k for k in bare} == set(wrapped)
    assert all(torch.equal(v, wrapped["base_model.model." + k]) for k, v in bare.items())
    classifier = {"xlora_classifier." + k for k in base.xlora_classifier.state_dict()}
    assert classifier and classifier <= set(bare)
    assert base.peft_config["default"].peft_type == "PEFT_XLORA" and base._hf_peft_config_loaded
    assert not base.training and not any(p.requires_grad for p in base.parameters())  # loaded for inference

    # cached generation straight from the transformers model, token by token as the PeftModel generates
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(
        base.generate(input_ids=input_ids(), **kwargs), peft_loaded.generate(input_ids=input_ids(), **kwargs)
    )


def test_transformers_load_adapter_leaves_other_adapters_to_transformers(expert_dirs):
    from transformers.integrations.peft import PeftAdapterMixin

    wrapped = PeftAdapterMixin.load_adapter
    peft_xlora.io.transformers.install()  # a second install wraps nothing more
    assert PeftAdapterMixin.load_adapter is wrapped and not hasattr(wrapped.__wrapped__, "__wrapped__")

    lora = expert_dirs["llama"]["math"]
    base = tiny_llama()
    base.load_adapter(lora)
    assert type(base.model.layers[0].self_attn.q_proj).__module__.startswith("peft.tuners.lora")
    reference = PeftModel.from_pretrained(tiny_llama(), lora).eval()
    torch.testing.assert_close(logits(base), logits(reference), rtol=0, atol=0)


def test_transformers_load_adapter_trainable_and_named(tmp_path, expert_dirs):
    model = trained_llama(expert_dirs)
    ref = logits(model)
    save_pretrained(model, tmp_path)
    base = tiny_llama()
    base.load_adapter(str(tmp_path), adapter_name="mix", is_trainable=True)
    assert list(base.peft_config) == ["mix"]
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in base.named_parameters() if n.startswith("xlora_classifier.")}
    torch.testing.assert_close(logits(base.eval()), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already exists"):
        base.load_adapter(str(tmp_path), adapter_name="mix")


def test_transformers_load_adapter_options(tmp_path, expert_dirs):
    # PEFT's loading options pass through transformers' load_adapter: expert_sources and allow_pickle.
    model = trained_llama(expert_dirs)
    save_pretrained(model, tmp_path / "ckpt")
    new_math = make_expert("llama", {"r": 3, "lora_alpha": 6, "target_modules": ["k_proj"]}, 42, str(tmp_path / "m"))
    swapped = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ckpt", expert_sources={"math": new_math}).eval()
    base = tiny_llama()
    base.load_adapter(str(tmp_path / "ckpt"), expert_sources={"math": new_math})
    torch.testing.assert_close(logits(base), logits(swapped), rtol=0, atol=0)
    assert not torch.equal(logits(base), logits(model))

    weights = safetensors.torch.load_file(tmp_path / "ckpt" / WEIGHTS_NAME)
    given = tiny_llama()  # config and tensors passed in, as transformers allows
    given.load_adapter(peft_config=XLoraConfig.from_pretrained(str(tmp_path / "ckpt")), adapter_state_dict=weights)
    torch.testing.assert_close(logits(given), logits(model), rtol=0, atol=0)

    torch.save(weights, tmp_path / "ckpt" / "adapter_model.bin")
    os.remove(tmp_path / "ckpt" / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="pickle"):
        tiny_llama().load_adapter(str(tmp_path / "ckpt"))
    pickled = tiny_llama()
    pickled.load_adapter(str(tmp_path / "ckpt"), allow_pickle=True)
    torch.testing.assert_close(logits(pickled), logits(model), rtol=0, atol=0)


def test_auto_model_from_adapter_folder(tmp_path, expert_dirs):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # so the saved config names a local base model
    model = get_peft_model(
        base, XLoraConfig(task_type="CAUSAL_LM", adapters=expert_dirs["llama"], xlora_depth=2, xlora_size=16)
    )
    perturb_trainable(model)
    ref = logits(model.eval())
    save_pretrained(model, tmp_path / "ckpt")

    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert "xlora_classifier" in dict(auto.named_children())
    torch.testing.assert_close(logits(auto), ref, rtol=0, atol=0)


def test_transformers_load_adapter_refuses_incomplete_checkpoints(tmp_path, expert_dirs):
    save_pretrained(trained_llama(expert_dirs), tmp_path)
    weights = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    del weights["base_model.xlora_classifier.layers.3.bias"]
    del weights["base_model.model.model.layers.1.mlp.gate_proj.xlora_experts.poetry.lora_B"]
    safetensors.torch.save_file(weights, tmp_path / WEIGHTS_NAME)
    base = tiny_llama()
    plain = logits(base)
    with pytest.raises(CheckpointError, match="2 tensors missing") as info:
        base.load_adapter(str(tmp_path))
    assert "base_model.xlora_classifier.layers.3.bias" in str(info.value)
    assert "layers.1.mlp.gate_proj.xlora_experts.poetry.lora_B" in str(info.value)
    # nothing half-built is left behind: the model is the plain base model again
    assert not any("xlora" in n for n, _ in base.named_modules())
    assert not hasattr(base, "peft_config") and not base._hf_peft_config_loaded
    torch.testing.assert_close(logits(base), plain, rtol=0, atol=0)

    (tmp_path / WEIGHTS_NAME).write_bytes((tmp_path / WEIGHTS_NAME).read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME} is truncated"):
        tiny_llama().load_adapter(str(tmp_path))


def test_transformers_adapter_methods(tmp_path, expert_dirs, open_peft_gate):
    model = trained_llama(expert_dirs)
    ref = logits(model)
    save_pretrained(model, tmp_path)
    base = tiny_llama()
    plain = logits(base)
    base.load_adapter(str(tmp_path))
    assert base.active_adapters() == ["default"]

    base.disable_adapters()
    torch.testing.assert_close(logits(base), plain, rtol=0, atol=0)
    base.enable_adapters()
    torch.testing.assert_close(logits(base), ref, rtol=0, atol=0)

    base.set_adapter("default")  # PEFT's layer method would fail here: it expects per-adapter ModuleDicts
    with pytest.raises(ValueError, match="other not found"):
        base.set_adapter("other")
    with pytest.raises(ValueError, match="layer by layer"):
        base.delete_adapter("default")
    torch.testing.assert_close(logits(base), ref, rtol=0, atol=0)  # a refused call changes nothing

    peft_xlora.unload_adapter(base)
    assert not any("xlora" in n for n, _ in base.named_modules())
    assert not hasattr(base, "peft_config")
    torch.testing.assert_close(logits(base), plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no X-LoRA adapter"):
        peft_xlora.unload_adapter(base)


def test_bare_model_save_loads_back(tmp_path, expert_dirs, open_peft_gate):
    # transformers' save_pretrained of a bare model prefixes every key with `base_model.model.`: the classifier is
    # then saved as `base_model.model.xlora_classifier.*`, which loading accepts beside the usual layout.
    model = trained_llama(expert_dirs)
    ref = logits(model)
    save_pretrained(model, tmp_path / "ckpt")
    base = tiny_llama()
    base.load_adapter(str(tmp_path / "ckpt"))
    base.save_pretrained(tmp_path / "bare")
    keys = safetensors.torch.load_file(tmp_path / "bare" / WEIGHTS_NAME).keys()
    assert "base_model.model.xlora_classifier.layers.0.weight" in keys
    torch.testing.assert_close(
        logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "bare").eval()), ref, rtol=0, atol=0
    )
    other = tiny_llama()
    other.load_adapter(str(tmp_path / "bare"))
    torch.testing.assert_close(logits(other), ref, rtol=0, atol=0)


def test_checkpoint_in_the_original_key_layout_loads(tmp_path, expert_dirs):
    # The file written by hand, key by key, in the layout of every checkpoint saved so far: classifier under
    # `base_model.xlora_classifier.`, each expert's factors under `base_model.model.<module>.xlora_experts.<name>.`.
    model = trained_llama(expert_dirs, layerwise_scalings=True)
    ref = logits(model)
    tuner = model.base_model
    tensors = {
        f"base_model.xlora_classifier.{key}": value.clone()
        for key, value in tuner.xlora_classifier.state_dict().items()
    }
    for module_name, layer in zip(tuner.mixture_layer_names, tuner.mixture_layers()):
        start = 0
        for index, rank in zip(layer.expert_indices, layer.ranks):
            key = f"base_model.model.{module_name}.xlora_experts.{tuner.expert_names[index]}"
            tensors[f"{key}.lora_A"] = layer.xlora_A[start : start + rank].detach().clone()
            tensors[f"{key}.lora_B"] = layer.xlora_B[:, start : start + rank].detach().clone()
            start += rank
    safetensors.torch.save_file(tensors, tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(tmp_path)

    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()), ref, rtol=0, atol=0)
    base = tiny_llama()
    base.load_adapter(str(tmp_path))
    torch.testing.assert_close(logits(base), ref, rtol=0, atol=0)
    # and saving today writes exactly those keys
    save_pretrained(model, tmp_path / "now")
    assert safetensors.torch.load_file(tmp_path / "now" / WEIGHTS_NAME).keys() == tensors.keys()


def test_classifier_belongs_to_the_transformers_model(expert_dirs):
    model = trained_llama(expert_dirs)
    tuner = model.base_model
    assert tuner.xlora_classifier is tuner.model.xlora_classifier
    keys = [k for k in model.state_dict() if "xlora_classifier" in k]
    assert keys and all(k.startswith("base_model.model.xlora_classifier.") for k in keys)  # once, not twice
    n_classifier = sum(p.numel() for p in tuner.xlora_classifier.parameters())
    assert model.get_nb_trainable_parameters()[0] == n_classifier
    base = model.unload()
    assert "xlora_classifier" not in dict(base.named_children())
    assert not any("xlora" in k for k in base.state_dict())


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


# ------------------------------------------------------------------------------------- saves touch only what they own


def bare_model(model, folder):
    """The same X-LoRA model as a bare transformers model, saved by peft_xlora and loaded by transformers."""
    save_pretrained(model, folder)
    bare = tiny_llama()
    bare.load_adapter(str(folder))
    return bare.eval()


# The two saves above, and transformers' own `save_pretrained` of a model `load_adapter` built X-LoRA into.
EVERY_SAVE = {**SAVES, "transformers": lambda model, path, **kwargs: model.save_pretrained(path, **kwargs)}


def _model_for(save, expert_dirs, tmp_path, request):
    """A trained X-LoRA model in the form `save` takes (bare for transformers' save) and its logits."""
    model = trained_llama(expert_dirs)
    ref = logits(model)
    if save == "transformers":
        request.getfixturevalue("open_peft_gate")  # transformers' adapter save asks for PEFT >= 0.22
        model = bare_model(model, tmp_path / "source")
    return model, ref


def _special_files(folder):
    """A named pipe and a Unix socket in `folder`: opening the pipe to read it blocks until someone writes to it."""
    os.mkfifo(folder / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock"))
    return sock


def _run_with_deadline(call, seconds, release):
    """Runs `call` in a thread; fails the test if it has not returned after `seconds` (then `release` unblocks it)."""
    errors = []

    def target():
        try:
            call()
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        release()
        thread.join(30)
        pytest.fail(f"the save was still blocked after {seconds} s")
    if errors:
        raise errors[0]


def _open_pipe_for_writing(path):
    # A reader blocked in open() of the pipe returns once a writer opens it; closing at once gives it end-of-file.
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("save", EVERY_SAVE)
def test_special_files_in_the_folder_are_kept_and_never_opened(tmp_path, expert_dirs, save, request):
    # Before: the save hung forever, reading the named pipe to flush it to disk.
    target = tmp_path / "ckpt"
    target.mkdir()
    sock = _special_files(target)
    (target / "logs").mkdir()
    os.mkfifo(target / "logs" / "pipe")
    os.mkfifo(target / "README.md")  # not a card we wrote: kept, and no card is written
    model, ref = _model_for(save, expert_dirs, tmp_path, request)
    release = lambda: _open_pipe_for_writing(target / "pipe")  # noqa: E731
    try:
        for _ in range(2):  # into a folder without a checkpoint, then over the checkpoint
            _run_with_deadline(lambda: EVERY_SAVE[save](model, target), 60, release)
    finally:
        sock.close()
    kinds = {name: stat.S_IFMT(os.lstat(target / name).st_mode) for name in ("pipe", "logs/pipe", "sock", "README.md")}
    assert kinds == {"pipe": stat.S_IFIFO, "logs/pipe": stat.S_IFIFO, "sock": stat.S_IFSOCK, "README.md": stat.S_IFIFO}
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", *(["source"] if save == "transformers" else [])])
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), target).eval()), ref)


@pytest.mark.parametrize("save", EVERY_SAVE)
@pytest.mark.parametrize("where", ["target", "inside"], ids=["cwd-is-the-folder", "cwd-inside-the-folder"])
def test_save_into_the_working_directory_keeps_it_valid(tmp_path, expert_dirs, monkeypatch, save, where, request):
    # Before: `save_pretrained(".")` swapped a new folder in and deleted the old one, the process's working directory:
    # the files were there, but os.getcwd() raised FileNotFoundError and every relative path after it failed.
    target = tmp_path / "ckpt"
    (target / "logs").mkdir(parents=True)
    cwd = target if where == "target" else target / "logs"
    model, ref = _model_for(save, expert_dirs, tmp_path, request)
    monkeypatch.chdir(cwd)
    for _ in range(2):
        EVERY_SAVE[save](model, "." if where == "target" else target)
        assert os.getcwd() == os.path.realpath(cwd)
    with open("written-after.txt", "w") as f:  # a relative write, as Trainer's next one
        f.write("fine")
    assert (cwd / "written-after.txt").read_text() == "fine"
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", *(["source"] if save == "transformers" else [])])
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), target).eval()), ref)


@pytest.mark.parametrize(
    "exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "interrupt"]
)
def test_transformers_save_of_a_bare_model_is_atomic(tmp_path, expert_dirs, monkeypatch, open_peft_gate, exc):
    # Before: transformers wrote adapter_model.safetensors in place, so a full disk or an interrupt left a truncated
    # file in the checkpoint. Now its save runs into a staging folder that is checked and swapped in, as PEFT's does.
    old = bare_model(trained_llama(expert_dirs), tmp_path / "old-source")
    ref = logits(old)
    target = tmp_path / "ckpt"
    old.save_pretrained(target)
    (target / "tokenizer.json").write_text("{}")  # the user's file in the folder
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}
    assert {"adapter_config.json", WEIGHTS_NAME} <= set(before)

    new_model = trained_llama(expert_dirs)
    perturb_trainable(new_model, seed=3)
    new = bare_model(new_model, tmp_path / "new-source")
    import transformers.modeling_utils

    with monkeypatch.context() as patch, pytest.raises(type(exc)):
        patch.setattr(transformers.modeling_utils, "safe_save_file", _failing_writer(100, exc))
        new.save_pretrained(target)
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "new-source", "old-source"]  # no staging folder left behind
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), target).eval()), ref, rtol=0, atol=0)

    new.save_pretrained(target)  # succeeds: replaces the checkpoint, keeps the user's file
    assert (target / "tokenizer.json").read_text() == "{}"
    loaded = PeftModel.from_pretrained(tiny_llama(), target).eval()
    torch.testing.assert_close(logits(loaded), logits(new_model), rtol=0, atol=0)


def test_transformers_save_of_other_models_is_untouched(tmp_path):
    # A plain model (no adapter) is saved by transformers in place, as before: no staging folder, no check.
    model = tiny_llama()
    model.save_pretrained(tmp_path / "plain")
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "plain"))
    assert sorted(os.listdir(tmp_path)) == ["plain"]
