"""Checkpoints and expert files that would load into silently wrong results are refused, naming what is wrong."""

import json
import struct

import pytest
import safetensors.torch
import torch
from peft import PeftModel

from helpers.allocations import no_large_allocation
from helpers.models import EXPERT_SPECS, build_xlora, input_ids, make_expert, tiny_llama
from peft_xlora import CheckpointError, ExpertError
from peft_xlora.core.checkpoint import WEIGHTS_NAME, check_safetensors_file

EXPERT_KEY = "base_model.model.model.layers.0.self_attn.q_proj.xlora_experts.code.lora_A"
CLASSIFIER_KEY = "base_model.xlora_classifier.layers.0.weight"


def logits(model):
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


@pytest.fixture
def checkpoint(tmp_path, expert_dirs):
    model = build_xlora("llama", expert_dirs).eval()  # experts "math", "code", "poetry": not sorted
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", logits(model)


def edit_config(folder, edit):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, sort_keys=True))


def edit_tensor(folder, key, change):
    path = folder / WEIGHTS_NAME
    tensors = safetensors.torch.load_file(path)
    tensors[key] = change(tensors[key])
    safetensors.torch.save_file(tensors, path)


# ------------------------------------------------------------------------------------------------- expert order


def test_a_config_without_expert_order_is_refused(checkpoint):
    # adapter_config.json has sorted keys: without `expert_order` the gate's outputs would go to re-sorted experts
    folder, ref = checkpoint
    edit_config(folder, lambda c: c.pop("expert_order"))
    with pytest.raises(CheckpointError, match=r"has no `expert_order`.*Add `\"expert_order\": \[") as info:
        PeftModel.from_pretrained(tiny_llama(), folder)
    assert "['code', 'math', 'poetry']" in str(info.value)  # the names to put in order
    # the fix the message gives: the gate's order restored by hand
    edit_config(folder, lambda c: c.update(expert_order=["math", "code", "poetry"]))
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), folder)), ref, rtol=0, atol=0)


def test_one_expert_needs_no_expert_order(tmp_path, expert_dirs):
    model = build_xlora("llama", {"llama": {"code": expert_dirs["llama"]["code"]}}).eval()
    model.save_pretrained(tmp_path / "ckpt")
    edit_config(tmp_path / "ckpt", lambda c: c.pop("expert_order"))  # one expert: one possible order
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ckpt")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- tensor values


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_expert_factors_are_named(checkpoint, bad):
    folder, _ = checkpoint
    edit_tensor(folder, EXPERT_KEY, lambda t: t.index_put_((torch.tensor([0]), torch.tensor([1])), torch.tensor(bad)))
    with pytest.raises(
        CheckpointError, match=r"expert 'code' on module 'model.layers.0.self_attn.q_proj' .* holds 1 NaN/Inf value"
    ):
        PeftModel.from_pretrained(tiny_llama(), folder)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_or_bool_expert_tensors_are_refused(checkpoint, dtype):
    folder, _ = checkpoint
    edit_tensor(folder, EXPERT_KEY, lambda t: (t * 10).to(dtype))
    message = rf"expert 'code' .*\({EXPERT_KEY}\) holds {dtype} values; LoRA factors are floating"
    with pytest.raises(CheckpointError, match=message):
        PeftModel.from_pretrained(tiny_llama(), folder)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64, torch.bool])
def test_a_classifier_tensor_of_another_dtype_is_refused_at_load(checkpoint, dtype):
    # before: float dtypes failed at the first forward (a matmul of mixed dtypes), int and bool loaded silently
    folder, _ = checkpoint
    edit_tensor(folder, CLASSIFIER_KEY, lambda t: t.to(dtype))
    with pytest.raises(CheckpointError, match=rf"classifier tensor {CLASSIFIER_KEY} holds {dtype}"):
        PeftModel.from_pretrained(tiny_llama(), folder)


def test_bad_factors_in_an_expert_source_are_named(tmp_path):
    path = make_expert("llama", EXPERT_SPECS["llama"]["math"], 0, str(tmp_path / "math"))
    weights = tmp_path / "math" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    clean = dict(tensors)
    tensors[key][3, 0] = float("nan")
    safetensors.torch.save_file(tensors, weights)
    where = r"Expert 'math': module 'model.layers.1.self_attn.v_proj', factor B at .*"
    with pytest.raises(ExpertError, match=where + "holds 1 NaN/Inf"):
        build_xlora("llama", {"llama": {"math": path}})
    safetensors.torch.save_file({**clean, key: clean[key].to(torch.int8)}, weights)
    with pytest.raises(ExpertError, match=where + "holds torch.int8 values"):
        build_xlora("llama", {"llama": {"math": path}})


# ------------------------------------------------------------------------------------------------- file headers


@pytest.mark.parametrize(
    "header",
    [
        [1, 2],
        {"a": 3},
        {"a": {"dtype": "F32", "shape": [1]}},
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": ["x", 4]}},
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},
    ],
    ids=["list", "number-entry", "no-offsets", "text-offset", "reversed-offsets"],
)
def test_a_malformed_safetensors_header_names_the_file(checkpoint, header):
    folder, _ = checkpoint
    raw = json.dumps(header).encode()
    (folder / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME} is not a valid safetensors file"):
        check_safetensors_file(str(folder / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME} is not a valid safetensors file"):
        PeftModel.from_pretrained(tiny_llama(), folder)


# ------------------------------------------------------------------------------------------------- sizes


def _set_rank(config):
    config["experts"]["code"]["r"] = 10**9


def _set_rank_pattern(config):
    config["experts"]["math"]["rank_pattern"] = {"q_proj": 10**7}


HOSTILE_SIZES = {
    "depth": (lambda c: c.update(xlora_depth=10**9), r"`xlora_depth` is 1000000000: .* at most 32"),
    "width": (lambda c: c.update(xlora_size=10**12), r"`xlora_size` is 1000000000000: .* at most 4096 wide"),
    "width-hidden-unknown": (
        lambda c: c.update(xlora_size=2**20, hidden_size=None),
        r"`xlora_size` is 1048576: .* at most 4096 wide \(16x the hidden size 32, or 4096\)",
    ),
    "hidden": (lambda c: c.update(hidden_size=10**9), r"`hidden_size` is 1000000000; at most 65536"),
    "rank": (_set_rank, r"The LoRA rank of expert 'code', r is 1000000000; at most 4096"),
    "rank-pattern": (_set_rank_pattern, r"The LoRA rank of expert 'math', rank_pattern\['q_proj'\] is 10000000"),
    "temperature": (lambda c: c.update(softmax_temperature=1e-30), r"`softmax_temperature` must be >= 0.001"),
}


@pytest.mark.parametrize("load", ["peft", "transformers"])
@pytest.mark.parametrize("case", HOSTILE_SIZES)
def test_hostile_sizes_in_the_config_fail_before_any_allocation(checkpoint, case, load):
    # Before: xlora_depth=10**9 (or a rank of 10**9) allocated until the machine ran out of memory. The guard turns
    # any allocation past a few MiB into a MemoryError, so the refusal must come first, from the config alone.
    folder, _ = checkpoint
    edit, message = HOSTILE_SIZES[case]
    edit_config(folder, edit)
    base = tiny_llama()
    with no_large_allocation(), pytest.raises(ValueError, match=message):
        if load == "peft":
            PeftModel.from_pretrained(base, folder)
        else:
            base.load_adapter(str(folder))
    assert not hasattr(base, "peft_config")


# ------------------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize(
    ("field", "value", "what"),
    [
        ("experts", ["math", "code", "poetry"], "an object of expert name -> LoRA config object"),
        ("experts", {"math": 1, "code": {}, "poetry": {}}, "an object of expert name -> LoRA config object"),
        ("expert_order", "math", "a list of expert names"),
        ("expert_order", ["math", 2, "poetry"], "a list of expert names"),
        ("adapters", ["math", "code", "poetry"], "an object of expert name -> source"),
    ],
    ids=["experts-list", "expert-not-object", "order-string", "order-non-string", "adapters-list"],
)
def test_config_fields_of_the_wrong_json_type_are_named(checkpoint, field, value, what):
    # Before: a TypeError or AttributeError from inside XLoraConfig that named neither the file nor the field.
    folder, _ = checkpoint
    edit_config(folder, lambda c: c.update({field: value}))
    with pytest.raises(
        CheckpointError, match=rf"adapter_config.json: `{field}` is .*, not {what}; the file was edited"
    ):
        PeftModel.from_pretrained(tiny_llama(), folder)
