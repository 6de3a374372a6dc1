"""Migration in from PEFT's built-in X-LoRA and from the original xlora package's layout."""

import json
import os
import shutil

import pytest
import safetensors.torch
import torch
from peft import PeftModel
from peft import XLoraConfig as BuiltinXLoraConfig
from peft import get_peft_model as peft_get_peft_model
from torch import nn

from helpers.models import EXPERT_SPECS, build_xlora, input_ids, make_expert, tiny_llama
from peft_xlora import CheckpointError, save_pretrained
from peft_xlora.io.export import export_mistralrs
from peft_xlora.io.migration import MigrationWarning, from_peft_builtin, from_xlora_package, migrate


def logits(model):
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


# ---------------------------------------------------------------------------------------------------- PEFT built-in


@pytest.fixture
def builtin_experts(tmp_path):
    """Fresh experts named "0", "1", "2" (the built-in needs those names), owned by this test."""
    return {
        str(i): make_expert("llama", spec, i, str(tmp_path / "experts" / name))
        for i, (name, spec) in enumerate(EXPERT_SPECS["llama"].items())
    }


def builtin_model(experts, **overrides):
    base = tiny_llama()
    base.config.use_cache = False  # the built-in refuses a cache
    kwargs = {"task_type": "CAUSAL_LM", "hidden_size": 32, "adapters": experts, "xlora_depth": 2, "xlora_size": 16}
    model = peft_get_peft_model(base, BuiltinXLoraConfig(**{**kwargs, **overrides}))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # stands in for training the classifier
        for param in model.base_model.internal_xlora_classifier.parameters():
            param.add_(torch.randn(param.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"layerwise_scalings": True, "xlora_depth": 3},
        # the built-in weighs the scaling pass's experts by scaling_pass_value * global_scaling_weight, as we do
        {"scaling_pass_value": 0.4, "global_scaling_weight": 0.7},
    ],
    ids=["depth2", "depth3-layerwise", "scaling-pass-value-and-global-weight"],
)
def test_builtin_checkpoint_migrates_to_same_outputs(tmp_path, builtin_experts, overrides):
    model = builtin_model(builtin_experts, **overrides)
    ref = logits(model)
    model.save_pretrained(tmp_path / "builtin")
    top = safetensors.torch.load_file(tmp_path / "builtin" / "adapter_model.safetensors")
    assert not any("layers.0." in k for k in top)  # the built-in's save lost classifier layer 0 here...

    with pytest.warns(MigrationWarning, match="lacks"):  # ...and the subfolders lack most expert layers
        migrated = migrate(tiny_llama(), tmp_path / "builtin")
    # With experts in the scaling pass, both passes add expert updates: summed expert by expert there and stacked
    # here, which rounds differently (float32) twice.
    tol = {"rtol": 1e-4, "atol": 1e-5} if overrides.get("scaling_pass_value") else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(logits(migrated), ref, **tol)
    # the built-in's scalings leave out the global weight, which its layers apply; ours include it
    weight = overrides.get("global_scaling_weight", 1.0)
    expected = model.base_model.internal_xlora_scalings * weight
    torch.testing.assert_close(migrated.base_model.get_latest_scalings(), expected, **tol)

    # the migrated model saves as a self-contained peft-xlora checkpoint
    save_pretrained(migrated, tmp_path / "ours")
    shutil.rmtree(tmp_path / "experts")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded), logits(migrated), rtol=0, atol=0)


def test_builtin_topk_with_experts_in_the_scaling_pass_is_refused(tmp_path, builtin_experts):
    # the built-in applies top-k to the scaling pass's equal weights too (we do not): migrated logits were off by 0.6
    builtin_model(builtin_experts, top_k_lora=2, scaling_pass_value=0.4).save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match=r"top_k_lora=2 and scaling_pass_value=0.4: PEFT's built-in .* keeps only k"):
        migrate(tiny_llama(), tmp_path / "b")
    # with scaling_pass_value 0 both scaling passes are the plain base model: exact
    model = builtin_model(builtin_experts, top_k_lora=2)
    model.save_pretrained(tmp_path / "zero")
    with pytest.warns(MigrationWarning):
        migrated = migrate(tiny_llama(), tmp_path / "zero")
    torch.testing.assert_close(logits(migrated), logits(model), rtol=1e-5, atol=1e-6)
    assert migrated.peft_config["default"].scaling_pass_layers is None  # as the built-in: the whole model


def test_original_layout_topk_with_experts_in_the_scaling_pass_warns(tmp_path, expert_dirs):
    # the folder may follow the original package (top-k in the scaling pass too) or mistral.rs (as we do): it warns
    model = build_xlora("llama", expert_dirs, top_k_lora=2, scaling_pass_value=0.4, scaling_pass_layers=None).eval()
    export_mistralrs(model, tmp_path / "out", base_model_id="x/y")
    with pytest.warns(MigrationWarning, match="applies top-k to the scaling pass's equal weights too"):
        back = from_xlora_package(tiny_llama(), tmp_path / "out")
    torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=0)
    assert back.peft_config["default"].scaling_pass_layers is None  # as the original package: the whole model


def test_builtin_lost_classifier_layer_is_named(tmp_path, builtin_experts):
    builtin_model(builtin_experts).save_pretrained(tmp_path)
    sub = tmp_path / "0" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(sub)
    for part in ("weight", "bias"):
        del tensors[f"base_model.internal_xlora_classifier.layers.{part}"]
    safetensors.torch.save_file(tensors, sub)
    with pytest.raises(CheckpointError, match=r"missing \['layers.0.bias', 'layers.0.weight'\]"):
        from_peft_builtin(tiny_llama(), tmp_path)


def test_builtin_trained_experts_lost_are_named(tmp_path, builtin_experts):
    builtin_model(builtin_experts, use_trainable_adapters=True).save_pretrained(tmp_path / "builtin")
    # trained experts must not silently fall back to their untrained originals
    with pytest.raises(CheckpointError, match=r"expert '2' lacks the LoRA factors of \['model.layers.0"):
        from_peft_builtin(tiny_llama(), tmp_path / "builtin")
    model = from_peft_builtin(tiny_llama(), tmp_path / "builtin", expert_sources=builtin_experts)
    assert model.base_model.expert_names == ["0", "1", "2"]


def test_builtin_experts_can_be_renamed(tmp_path, builtin_experts):
    model = builtin_model(builtin_experts)
    model.save_pretrained(tmp_path)
    with pytest.warns(MigrationWarning):
        migrated = from_peft_builtin(tiny_llama(), tmp_path, expert_names=["math", "code", "poetry"])
    assert migrated.base_model.expert_names == ["math", "code", "poetry"]
    torch.testing.assert_close(logits(migrated), logits(model), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- original xlora


def write_original(path, expert_dirs, linears, **config):
    """Writes the original package's layout by hand: config, classifier (`inner.<i>`, `last`), expert subfolders."""
    os.makedirs(path)
    for name, source in expert_dirs["llama"].items():
        shutil.copytree(source, os.path.join(path, name))
    cfg = {"hidden_size": 32, "adapters": list(expert_dirs["llama"]), "xlora_depth": len(linears), "xlora_size": 16}
    cfg.update(config)
    with open(os.path.join(path, "xlora_config.json"), "w") as f:
        json.dump(cfg, f)
    tensors = {}
    for key, (w, b) in linears.items():
        tensors[f"{key}.weight"] = w
        if b is not None:
            tensors[f"{key}.bias"] = b
    safetensors.torch.save_file(tensors, os.path.join(path, "xlora_classifier.safetensors"))


def random_linears(keys, sizes, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (n_in, n_out) in zip(keys, sizes):
        out[key] = (torch.randn(n_out, n_in, generator=g) * 0.3, torch.randn(n_out, generator=g) if bias else None)
    return out


def hand_scalings(linears, relu, temperature=1.0):
    """The original classifier computed by hand on the base model's last hidden state, then softmax."""
    with torch.no_grad():
        h = tiny_llama()(input_ids=input_ids(), output_hidden_states=True).hidden_states[-1]
        layers = list(linears.values())
        for i, (w, b) in enumerate(layers):
            h = h @ w.T + (b if b is not None else 0)
            if relu and i < len(layers) - 1:
                h = torch.relu(h)
        return torch.softmax(h / temperature, dim=-1)  # (batch, seq, n_experts)


@pytest.mark.parametrize(
    ("keys", "relu", "bias"),
    [
        (["last"], True, True),
        (["inner.0", "inner.3", "last"], True, True),  # the original numbers by module position (ReLU, Dropout)
        (["inner.0", "inner.1", "last"], True, True),  # mistral.rs numbers consecutively
        (["inner.0", "last"], True, False),  # use_bias=False: zero biases
        (["inner.0", "inner.1", "last"], False, True),  # no activations: composed into one linear map
    ],
    ids=["depth1", "depth3-original-numbering", "depth3-mistralrs-numbering", "no-bias", "no-relu"],
)
def test_original_layout_scalings_match_hand_computation(tmp_path, expert_dirs, keys, relu, bias):
    sizes = [(32, 16)] * (len(keys) - 1) + [(32 if len(keys) == 1 else 16, 3)]
    sizes = [(32 if i == 0 else 16, n_out) for i, (_, n_out) in enumerate(sizes)]
    linears = random_linears(keys, sizes, bias=bias)
    write_original(
        tmp_path / "orig", expert_dirs, linears, enable_relu_and_dropout=relu, use_bias=bias, softmax_temperature=0.7
    )
    model = from_xlora_package(tiny_llama(), tmp_path / "orig")
    logits(model)
    expected = hand_scalings(linears, relu, temperature=0.7)
    scalings = model.base_model.get_latest_scalings()  # (batch, seq, n_layers, n_experts)
    for layer in range(scalings.shape[2]):
        torch.testing.assert_close(scalings[:, :, layer], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("expert", ["math", "code", "poetry"])
def test_original_layout_outputs_match_each_expert(tmp_path, expert_dirs, expert):
    # A classifier whose softmax is one-hot on `expert` (bias +60): the X-LoRA model is then that expert's LoRA.
    names = list(expert_dirs["llama"])
    weight = torch.zeros(3, 32)
    bias = torch.tensor([60.0 if n == expert else 0.0 for n in names])
    write_original(tmp_path / "orig", expert_dirs, {"last": (weight, bias)})
    model = from_xlora_package(tiny_llama(), tmp_path / "orig")
    lora = PeftModel.from_pretrained(tiny_llama(), expert_dirs["llama"][expert]).eval()
    torch.testing.assert_close(logits(model), logits(lora), rtol=1e-5, atol=1e-5)


def test_original_layout_errors(tmp_path, expert_dirs):
    linears = random_linears(["inner.0", "last"], [(32, 16), (16, 3)])
    write_original(tmp_path / "a", expert_dirs, linears, enable_relu_and_dropout=True)
    shutil.rmtree(tmp_path / "a" / "code")
    with pytest.raises(CheckpointError, match=r"no subfolder for experts \['code'\]"):
        from_xlora_package(tiny_llama(), tmp_path / "a")
    model = from_xlora_package(tiny_llama(), tmp_path / "a", adapters={"code": expert_dirs["llama"]["code"]})
    assert model.base_model.expert_names == ["math", "code", "poetry"]
    # frozen experts recorded by path (the original's `adapters` dict) are read from there, with a warning
    write_original(tmp_path / "a2", expert_dirs, linears, adapters=expert_dirs["llama"])
    shutil.rmtree(tmp_path / "a2" / "code")
    with pytest.warns(MigrationWarning, match="recorded in xlora_config.json"):
        from_xlora_package(tiny_llama(), tmp_path / "a2")

    write_original(tmp_path / "b", expert_dirs, {"last": linears["last"]}, xlora_depth=2)
    with pytest.raises(CheckpointError, match=r"holds 1 linear layers but xlora_config\.json says xlora_depth=2"):
        from_xlora_package(tiny_llama(), tmp_path / "b")

    write_original(tmp_path / "c", expert_dirs, {"last": (torch.zeros(3, 32), None)}, use_bias=True)
    with pytest.raises(CheckpointError, match=r"lacks \['last.bias'\]"):
        from_xlora_package(tiny_llama(), tmp_path / "c")

    write_original(tmp_path / "d", expert_dirs, {"last": linears["last"]}, stop_token_id=2)
    with pytest.raises(ValueError, match="stop_token_id"):
        from_xlora_package(tiny_llama(), tmp_path / "d")

    with pytest.raises(CheckpointError, match="neither"):
        migrate(tiny_llama(), tmp_path / "nothing-here")


def test_migrated_model_is_frozen_unless_trainable(tmp_path, expert_dirs):
    linears = random_linears(["last"], [(32, 3)])
    write_original(tmp_path / "orig", expert_dirs, linears)
    frozen = from_xlora_package(tiny_llama(), tmp_path / "orig")
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    trainable = from_xlora_package(tiny_llama(), tmp_path / "orig", is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, _ in trainable.named_parameters() if ".xlora_classifier." in n
    }
    assert isinstance(trainable.base_model.xlora_classifier.layers[0], nn.Linear)


# ------------------------------------------------------------------------------------------------ hostile checkpoints
# Migration reads and writes only inside the checkpoint folder it is given: the config is untrusted input.


def snapshot(folder):
    """Bytes and modification time of every file under `folder`: what "untouched" means."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, folder)] = (f.read(), os.stat(full).st_mtime_ns)
    return out


@pytest.fixture
def victim(tmp_path, expert_dirs):
    """Another LoRA folder on the machine, outside any checkpoint: nothing may read or change it."""
    path = tmp_path / "victim"
    shutil.copytree(expert_dirs["llama"]["math"], path)
    return path


def builtin_checkpoint(tmp_path, builtin_experts):
    builtin_model(builtin_experts).save_pretrained(tmp_path / "builtin")
    return tmp_path / "builtin"


def rename_builtin_expert(checkpoint, old, new):
    config_path = checkpoint / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["adapters"] = {(new if k == old else k): v for k, v in config["adapters"].items()}
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize("kind", ["absolute", "dotdot"])
def test_builtin_refuses_expert_names_that_leave_the_checkpoint(tmp_path, builtin_experts, victim, kind):
    checkpoint = builtin_checkpoint(tmp_path, builtin_experts)
    # The name reaches the victim either way: "/.../victim" directly, "../victim" from inside the checkpoint.
    name = str(victim) if kind == "absolute" else "../victim"
    rename_builtin_expert(checkpoint, "0", name)
    before, listing = snapshot(victim), sorted(os.listdir(tmp_path))
    with pytest.raises(CheckpointError, match=r"not a plain folder name"):
        from_peft_builtin(tiny_llama(), checkpoint)
    assert snapshot(victim) == before
    assert sorted(os.listdir(tmp_path)) == listing


def test_builtin_refuses_a_symlinked_expert_folder(tmp_path, builtin_experts, victim):
    checkpoint = builtin_checkpoint(tmp_path, builtin_experts)
    shutil.rmtree(checkpoint / "1")
    os.symlink(victim, checkpoint / "1")
    before = snapshot(victim)
    with pytest.raises(CheckpointError, match=r"Expert '1': .* outside the checkpoint"):
        migrate(tiny_llama(), checkpoint)
    assert snapshot(victim) == before


def test_builtin_refuses_a_symlinked_file(tmp_path, builtin_experts, victim):
    checkpoint = builtin_checkpoint(tmp_path, builtin_experts)
    (checkpoint / "2" / "adapter_model.safetensors").unlink()
    os.symlink(victim / "adapter_model.safetensors", checkpoint / "2" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"outside the checkpoint"):
        from_peft_builtin(tiny_llama(), checkpoint)


def original_checkpoint(tmp_path, expert_dirs, **config):
    write_original(tmp_path / "orig", expert_dirs, random_linears(["last"], [(32, 3)]), **config)
    return tmp_path / "orig"


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "separator"])
def test_original_layout_refuses_expert_names_that_leave_the_checkpoint(tmp_path, expert_dirs, victim, kind):
    checkpoint = original_checkpoint(tmp_path, expert_dirs)
    name = {"absolute": str(victim), "dotdot": "../victim", "separator": "sub/../../victim"}[kind]
    config = json.loads((checkpoint / "xlora_config.json").read_text())
    config["adapters"] = ["math", "code", name]
    (checkpoint / "xlora_config.json").write_text(json.dumps(config))
    before = snapshot(victim)
    with pytest.raises(CheckpointError, match=r"not a plain folder name"):
        from_xlora_package(tiny_llama(), checkpoint)
    assert snapshot(victim) == before


def test_original_layout_refuses_a_symlinked_expert_folder(tmp_path, expert_dirs, victim):
    checkpoint = original_checkpoint(tmp_path, expert_dirs)
    shutil.rmtree(checkpoint / "poetry")
    os.symlink(victim, checkpoint / "poetry")
    before = snapshot(victim)
    with pytest.raises(CheckpointError, match=r"Expert 'poetry': .* outside the checkpoint"):
        migrate(tiny_llama(), checkpoint)
    assert snapshot(victim) == before


def test_original_layout_refuses_a_symlinked_classifier(tmp_path, expert_dirs):
    checkpoint = original_checkpoint(tmp_path, expert_dirs)
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(checkpoint / "xlora_classifier.safetensors", outside)
    os.symlink(outside, checkpoint / "xlora_classifier.safetensors")
    with pytest.raises(CheckpointError, match=r"The classifier: .* outside the checkpoint"):
        from_xlora_package(tiny_llama(), checkpoint)


def test_links_inside_the_checkpoint_and_hub_snapshots_are_fine(tmp_path, expert_dirs):
    # A Hub download is a folder of symlinks into the repository's blobs/: the repository folder is the checkpoint.
    checkpoint = original_checkpoint(tmp_path, expert_dirs)
    repo = tmp_path / "models--me--orig"
    (repo / "snapshots").mkdir(parents=True)
    shutil.move(checkpoint, repo / "blobs")
    snapshot_dir = repo / "snapshots" / "abc123"
    for dirpath, _, files in os.walk(repo / "blobs"):
        for name in files:
            blob = os.path.join(dirpath, name)
            link = snapshot_dir / os.path.relpath(blob, repo / "blobs")
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    model = migrate(tiny_llama(), snapshot_dir)
    assert model.base_model.expert_names == ["math", "code", "poetry"]
