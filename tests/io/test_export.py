"""Export: the mistral.rs / original xlora layout, and a plain LoRA equal to the mixture at pinned weights."""

import json
import os
import shutil

import pytest
import safetensors.torch
import torch
from peft import PeftModel
from test_checkpoint import perturb_trainable

from helpers import seq_cls
from helpers.models import BUILDERS, build_xlora, input_ids
from peft_xlora.io.export import ORDERING_NAME, export_lora, export_mistralrs
from peft_xlora.io.migration import from_xlora_package

# The mistral.rs layout's scaling pass runs the whole model; the default ("auto") cuts it on decoder-only models.
WHOLE = {"scaling_pass_layers": None}
EXPORT_MARK = ".peft-xlora-export.json"  # every export holds it: a folder with it may be exported to again


def logits(model):
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["global", "per-layer"])
def test_plain_lora_equals_pinned_gating(tmp_path, expert_dirs, arch, layerwise):
    model = build_xlora(arch, expert_dirs).eval()
    tuner = model.base_model
    if layerwise:
        g = torch.Generator().manual_seed(3)
        weights = torch.rand(len(tuner.mixture_layer_names), len(tuner.expert_names), generator=g) * 2 - 0.5
    else:
        weights = {"math": 0.7, "code": -0.4, "poetry": 1.3}
    tuner.set_static_scalings(weights)
    ref = logits(model)
    assert not torch.allclose(ref, logits(BUILDERS[arch]()), atol=1e-3)  # the experts do change the output

    export_lora(model, tmp_path / "lora", weights)
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    assert saved["r"] == max(sum(layer.ranks) for layer in tuner.mixture_layers())
    assert saved["lora_alpha"] == saved["r"]
    lora = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(lora), ref, rtol=1e-5, atol=1e-5)


def test_plain_lora_uses_current_pin_or_asks(tmp_path, expert_dirs):
    model = build_xlora("llama", expert_dirs).eval()
    with pytest.raises(ValueError, match="Pass `weights`"):
        export_lora(model, tmp_path / "lora")
    model.base_model.set_static_scalings({"code": 1.0})
    ref = logits(model)
    export_lora(model, tmp_path / "lora")
    lora = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(lora), ref, rtol=1e-5, atol=1e-5)
    # only the code expert contributes: it equals that expert's own LoRA
    alone = PeftModel.from_pretrained(BUILDERS["llama"](), expert_dirs["llama"]["code"]).eval()
    torch.testing.assert_close(logits(lora), logits(alone), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mistralrs_layout(tmp_path, expert_dirs, depth):
    model = build_xlora("llama", expert_dirs, xlora_depth=depth, layerwise_scalings=depth == 2, **WHOLE)
    perturb_trainable(model)
    model.eval()
    out = tmp_path / "mistralrs"
    export_mistralrs(model, out, base_model_id="test-org/tiny-llama")
    tuner = model.base_model

    assert sorted(os.listdir(out)) == sorted(
        ["xlora_config.json", "xlora_classifier.safetensors", ORDERING_NAME, EXPORT_MARK, "math", "code", "poetry"]
    )
    config = json.loads((out / "xlora_config.json").read_text())
    assert config["adapters"] == ["math", "code", "poetry"]
    assert config["hidden_size"] == 32 and config["xlora_depth"] == depth
    assert config["base_model_id"] == "test-org/tiny-llama"
    assert config["use_bias"] and config["enable_relu_and_dropout"] and config["xlora_dropout_p"] == 0.0

    classifier = safetensors.torch.load_file(out / "xlora_classifier.safetensors")
    expected = {f"inner.{i}.{p}" for i in range(depth - 1) for p in ("weight", "bias")} | {"last.weight", "last.bias"}
    assert set(classifier) == expected
    last = [m for m in tuner.xlora_classifier.layers if isinstance(m, torch.nn.Linear)][-1]
    assert torch.equal(classifier["last.weight"], last.weight)

    ordering = json.loads((out / ORDERING_NAME).read_text())
    assert ordering["order"] == ["math", "code", "poetry"]
    assert ordering["layers"] == {name: i for i, name in enumerate(tuner.mixture_layer_names)}
    assert ordering["base_model_id"] == "test-org/tiny-llama"

    # every expert folder is a standard LoRA adapter equal to the expert it came from (the experts do not depend
    # on the classifier's depth: checked once)
    for name, source in expert_dirs["llama"].items() if depth == 1 else ():
        exported = PeftModel.from_pretrained(BUILDERS["llama"](), out / name).eval()
        original = PeftModel.from_pretrained(BUILDERS["llama"](), source).eval()
        torch.testing.assert_close(logits(exported), logits(original), rtol=0, atol=0)

    # and the folder reads back (as the original package's layout) into the same model
    back = from_xlora_package(BUILDERS["llama"](), out)
    torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=0)


def test_mistralrs_needs_base_model_id_and_folder_names(tmp_path, expert_dirs):
    model = build_xlora("llama", expert_dirs, **WHOLE)
    with pytest.raises(ValueError, match="base_model_id"):
        export_mistralrs(model, tmp_path / "out")
    odd = build_xlora("llama", {"llama": {"a/b": expert_dirs["llama"]["math"]}}, **WHOLE)
    with pytest.raises(ValueError, match="cannot be a folder name"):
        export_mistralrs(odd, tmp_path / "out", base_model_id="x/y")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"scaling_pass_layers": 1}, "`scaling_pass_layers=1`: the layout always runs the whole model"),
        ({"scalings_mode": "prompt"}, "`scalings_mode='prompt'`: the layout has no prompt mode"),
        ({"top_k_lora": 2, "enable_softmax_topk": True}, "`enable_softmax_topk=True`: mistral.rs refuses it"),
    ],
    ids=["scaling_pass_layers", "prompt-mode", "softmax-topk"],
)
def test_mistralrs_refuses_what_the_layout_cannot_represent(tmp_path, expert_dirs, options, named):
    # before, these were dropped (scaling_pass_layers, prompt mode) or written for mistral.rs to refuse (softmax-topk)
    model = build_xlora("llama", expert_dirs, **options).eval()
    with pytest.raises(ValueError, match="export_mistralrs cannot write this model") as info:
        export_mistralrs(model, tmp_path / "out", base_model_id="x/y")
    assert named in str(info.value) and "export_lora" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_mistralrs_refuses_a_pinned_gate_and_names_every_option(tmp_path, expert_dirs):
    model = build_xlora("llama", expert_dirs, scaling_pass_layers=1, scalings_mode="prompt").eval()
    model.base_model.set_static_scalings({"math": 1.0})
    with pytest.raises(ValueError, match="export_mistralrs cannot write") as info:
        export_mistralrs(model, tmp_path / "out", base_model_id="x/y")
    for part in ("scaling_pass_layers=1", "scalings_mode='prompt'", "the gate is pinned"):
        assert part in str(info.value)
    assert not (tmp_path / "out").exists()


def test_every_config_field_is_written_refused_or_irrelevant_for_mistralrs():
    # a new XLoraConfig field must be placed in one of the three lists of io/export.py, or this fails
    import dataclasses

    from peft.config import PeftConfig

    from peft_xlora import XLoraConfig
    from peft_xlora.io import export

    ours = {f.name for f in dataclasses.fields(XLoraConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    placed = [*export.MISTRALRS_WRITTEN, *export.MISTRALRS_IRRELEVANT, *export.MISTRALRS_REFUSED]
    assert sorted(placed) == sorted(ours)


def test_export_never_deletes_other_files(tmp_path, expert_dirs):
    model = build_xlora("llama", expert_dirs).eval()
    export_lora(model, tmp_path / "out", {"math": 1.0})
    export_lora(model, tmp_path / "out", {"code": 1.0})  # replacing a previous export is fine
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        export_lora(model, tmp_path / "out", {"math": 1.0})
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.fixture(scope="module")
def cls_experts(tmp_path_factory):
    return seq_cls.save_experts(tmp_path_factory.mktemp("cls-experts"))


@pytest.mark.parametrize("trainable_head", [False, True])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_plain_lora_carries_the_pinned_head(tmp_path, cls_experts, arch, trainable_head):
    # Classification experts with their heads: the exported LoRA holds sum_e w_e head_e (+ the shared head) in
    # modules_to_save, as PEFT saves a SEQ_CLS LoRA.
    model = seq_cls.xlora(arch, cls_experts[arch], trainable_head=trainable_head, layerwise_scalings=True)
    if trainable_head:
        with torch.no_grad():
            seq_cls.head_of(model).xlora_shared_head.weight.normal_()
    n_layers = len(model.base_model.mixture_layer_names)
    weights = torch.tensor([[0.3, 0.9]] * (n_layers - 1) + [[0.6, -0.2]])  # the head uses the last row
    batch = seq_cls.inputs(arch)
    for pinned in (weights, {"e1": 1.0}):
        model.set_static_scalings(pinned)
        export_lora(model, tmp_path / "lora", pinned)
        saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
        assert saved["modules_to_save"] == [seq_cls.HEAD[arch]]
        lora = PeftModel.from_pretrained(seq_cls.build(arch), tmp_path / "lora").eval()
        torch.testing.assert_close(lora(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
    if not trainable_head:  # pinned to one expert: exactly that expert's head
        expert = PeftModel.from_pretrained(seq_cls.build(arch), cls_experts[arch]["e1"]).get_base_model()
        head = lora.get_base_model().get_submodule(seq_cls.HEAD[arch])
        torch.testing.assert_close(head.weight, expert.get_submodule(seq_cls.HEAD[arch]).weight, rtol=0, atol=0)


def test_mistralrs_refuses_classification_heads(tmp_path, cls_experts):
    model = seq_cls.xlora("bert", cls_experts["bert"])
    with pytest.raises(ValueError, match=r"export_mistralrs writes the X-LoRA layout mistral.rs serves, which has no"):
        export_mistralrs(model, tmp_path / "out", base_model_id="test-org/tiny-bert")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("export", ["lora", "mistralrs"])
def test_export_never_displaces_a_file_or_a_foreign_folder(tmp_path, expert_dirs, export):
    model = build_xlora("llama", expert_dirs, **WHOLE).eval()

    def run(out):
        if export == "lora":
            export_lora(model, out, {"math": 1.0})
        else:
            export_mistralrs(model, out, base_model_id="me/base")

    # a file where the folder would go: kept, nothing renamed aside
    (tmp_path / "file").write_bytes(b"my data")
    with pytest.raises(FileExistsError, match="is a file"):
        run(tmp_path / "file")
    assert (tmp_path / "file").read_bytes() == b"my data"
    # someone's LoRA adapter (the same file names as our export): not ours, so never replaced
    shutil.copytree(expert_dirs["llama"]["code"], tmp_path / "their-lora")
    before = {name: (tmp_path / "their-lora" / name).read_bytes() for name in os.listdir(tmp_path / "their-lora")}
    with pytest.raises(FileExistsError, match="did not export to"):
        run(tmp_path / "their-lora")
    after = {name: (tmp_path / "their-lora" / name).read_bytes() for name in os.listdir(tmp_path / "their-lora")}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["file", "their-lora"]
    # an empty folder and a previous export are fine
    (tmp_path / "empty").mkdir()
    run(tmp_path / "empty")
    run(tmp_path / "empty")
    assert EXPORT_MARK in os.listdir(tmp_path / "empty")


def test_export_into_the_working_directory_keeps_it_valid(tmp_path, expert_dirs, monkeypatch):
    # An export swaps a new folder in like a save does; the process's working directory must follow it (it was left
    # in the deleted old folder: os.getcwd() then raised FileNotFoundError).
    model = build_xlora("llama", expert_dirs).eval()
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    for _ in range(2):  # into the empty folder, then over its own export
        export_lora(model, ".", {"math": 1.0})
        assert os.getcwd() == str((tmp_path / "out").resolve())
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]
