"""`export_vllm` and the plugin's torch arithmetic, checked without vLLM (these run in the main environment too).

The export is checked against the peft-xlora model it came from: the same mixture layers in the same order, the same
per-expert ranks and scales (rsLoRA, rank and alpha patterns), the same tensors. The arithmetic of `ops` is checked
against plain per-expert loops written from the paper's formula, including the tensor-parallel sharding.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from xlora_vllm_cases import EXPERT_SPECS, build_case, make_experts, save_base

from peft_xlora import CheckpointError
from peft_xlora.serving.vllm import SPEC_KEY, ServingSpec, XLoraServingError, export_vllm, scaling_pass_constant
from peft_xlora.serving.vllm import export as export_module
from peft_xlora.serving.vllm.ops import Segment, StackedLora, classify, gate
from peft_xlora.serving.vllm.spec import WEIGHTS_FILE


def _read_served(path):
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return config, ServingSpec.from_dict(config[SPEC_KEY])


# ---------------------------------------------------------------------------------------------------- export


def test_export_describes_the_model_peft_xlora_built(tmp_path):
    case = build_case(str(tmp_path), layerwise_scalings=True, top_k_lora=2, xlora_depth=2, xlora_size=16)
    tuner = case.model.base_model
    config, spec = _read_served(case.served)
    assert config["architectures"] == ["XLoraLlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert spec.experts == tuner.expert_names
    assert spec.mixture_layers == tuner.mixture_layer_names  # the order layerwise scalings index
    assert spec.n_slots == len(tuner.mixture_layer_names)
    for name, layer in zip(tuner.mixture_layer_names, tuner.mixture_layers()):
        entries = spec.modules[name]
        assert [e.expert for e in entries] == layer.expert_indices
        assert [e.rank for e in entries] == layer.ranks
        starts = [sum(layer.ranks[:i]) for i in range(len(layer.ranks))]
        scales = [float(layer.rank_scale[s]) for s in starts]  # alpha / r after rsLoRA and patterns
        torch.testing.assert_close(torch.tensor([e.scale for e in entries]), torch.tensor(scales))
    # rsLoRA, rank and alpha patterns really are exercised.
    poetry = spec.experts.index("poetry")
    k_proj = next(e for e in spec.modules["model.layers.0.self_attn.k_proj"] if e.expert == poetry)
    assert (k_proj.rank, k_proj.scale) == (8, 5 / 8)
    gate_proj = next(e for e in spec.modules["model.layers.0.mlp.gate_proj"] if e.expert == poetry)
    assert (gate_proj.rank, gate_proj.scale) == (3, 4 / 3)
    code = spec.experts.index("code")
    o_proj = next(e for e in spec.modules["model.layers.0.self_attn.o_proj"] if e.expert == code)
    assert o_proj.scale == pytest.approx(4 / math.sqrt(2))

    weights = load_file(os.path.join(case.served, WEIGHTS_FILE))
    saved = load_file(os.path.join(case.checkpoint, "adapter_model.safetensors"))
    for e, name in enumerate(spec.experts):
        for module in spec.modules:
            key = f"base_model.model.{module}.xlora_experts.{name}.lora_A"
            if key in saved:
                torch.testing.assert_close(weights[f"xlora.experts.{module}.{e}.lora_A"], saved[key])
    linears = [m for m in tuner.xlora_classifier.layers if isinstance(m, torch.nn.Linear)]
    for j, linear in enumerate(linears):
        torch.testing.assert_close(weights[f"xlora.classifier.{j}.weight"], linear.weight.detach())
    # The base model's files come along: weights and tokenizer.
    assert {"model.safetensors", "tokenizer.json", WEIGHTS_FILE} <= set(os.listdir(case.served))


def test_experts_are_distinct(tmp_path):
    # Identical experts would make every mixture test pass vacuously.
    paths = make_experts("llama", str(tmp_path))
    weights = {name: load_file(os.path.join(p, "adapter_model.safetensors")) for name, p in paths.items()}
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert not torch.allclose(weights["math"][key][:2], weights["code"][key])
    assert len({frozenset(w) for w in weights.values()}) == len(weights)  # each adapts other modules


def test_every_config_field_is_written_refused_or_irrelevant_for_vllm():
    # A new XLoraConfig field must be placed in one of the three tables of serving/vllm/export.py, or this fails.
    import dataclasses

    from peft.config import PeftConfig

    from peft_xlora import XLoraConfig

    ours = {f.name for f in dataclasses.fields(XLoraConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    placed = [*export_module.VLLM_WRITTEN, *export_module.VLLM_IRRELEVANT, *export_module.VLLM_REFUSED]
    assert sorted(placed) == sorted(ours)


@pytest.mark.parametrize("field", sorted(export_module.VLLM_REFUSED))
def test_every_refused_field_is_refused_by_name(saved_case, tmp_path, field):
    # Each refused option, set in an otherwise servable checkpoint, stops the export with its name and reason.
    other = {"routing": "single_pass", "scalings_mode": "prompt", "trainable_head": True}[field]
    assert other != export_module.VLLM_REFUSED[field][0]
    path = _broken_copy(saved_case, tmp_path, "refused")
    extra = {"scaling_pass_layers": 2} if field == "routing" else {}
    _write_config(path, lambda config: config.update({field: other, **extra}))
    with pytest.raises(XLoraServingError, match=f"{field}={other!r} is not served by the vLLM plugin"):
        export_vllm(path, tmp_path / "out", base_model=saved_case.base)
    assert not (tmp_path / "out").exists()


def test_export_refuses_prompt_mode(tmp_path):
    with pytest.raises(XLoraServingError, match="scalings_mode='prompt'"):
        build_case(str(tmp_path), scalings_mode="prompt")


def test_export_refuses_lm_head_experts(tmp_path):
    experts = make_experts("llama", str(tmp_path), {"head": {"r": 2, "lora_alpha": 2, "target_modules": ["lm_head"]}})
    with pytest.raises(XLoraServingError, match="lm_head is not supported"):
        build_case(str(tmp_path), experts=experts)


def test_export_refuses_unsupported_architectures(tmp_path):
    case = build_case(str(tmp_path / "ok"))
    base = str(tmp_path / "gpt2")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=97)).save_pretrained(base)
    with pytest.raises(XLoraServingError, match="GPT2LMHeadModel"):
        export_vllm(case.checkpoint, tmp_path / "out", base_model=base)


def test_export_refuses_a_base_model_of_other_shapes(tmp_path):
    case = build_case(str(tmp_path / "ok"))
    other = save_base("llama", str(tmp_path / "wide"), hidden_size=128)
    with pytest.raises(XLoraServingError, match="another base model"):
        export_vllm(case.checkpoint, tmp_path / "out", base_model=other)


def test_export_refuses_other_checkpoints(tmp_path):
    lora = make_experts("llama", str(tmp_path), {"one": EXPERT_SPECS["math"]})["one"]
    base = save_base("llama", str(tmp_path / "base"))
    with pytest.raises(XLoraServingError, match="Not a peft-xlora checkpoint"):
        export_vllm(lora, tmp_path / "out", base_model=base)


def test_export_never_displaces_a_foreign_folder_or_file(tmp_path):
    case = build_case(str(tmp_path / "case"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="did not export to"):
        export_vllm(case.checkpoint, foreign, base_model=case.base)
    assert os.listdir(foreign) == ["notes.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    with pytest.raises(FileExistsError, match="is a file"):
        export_vllm(case.checkpoint, a_file, base_model=case.base)
    assert a_file.read_text() == "mine"


def test_export_replaces_an_earlier_export_atomically(tmp_path, monkeypatch):
    case = build_case(str(tmp_path))
    before = load_file(os.path.join(case.served, WEIGHTS_FILE))
    export_vllm(case.checkpoint, case.served, base_model=case.base)  # over an earlier export: allowed

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_vllm(case.checkpoint, case.served, base_model=case.base)
    after = load_file(os.path.join(case.served, WEIGHTS_FILE))  # the earlier export is untouched
    assert before.keys() == after.keys()
    assert not [n for n in os.listdir(tmp_path) if ".xlora-tmp-" in n]  # no temporary folder left behind


# ---------------------------------------------------------------------------------------------------- arithmetic


def test_scaling_pass_constant_is_value_times_global_weight():
    # As in the original xlora package, PEFT's built-in X-LoRA and mistral.rs (issue #15).
    assert scaling_pass_constant(0.5, 1.7) == pytest.approx(0.85)
    assert scaling_pass_constant(0.0, 3.0) == 0.0


def _gate_reference(logits, temperature, enable_softmax, top_k, softmax_topk, weight):
    """Per row, from the definition: softmax(logits / T), keep the k largest logits, renormalise if asked."""
    out = torch.zeros(logits.shape)
    for i, row in enumerate(logits.tolist()):
        z = [v / temperature for v in row] if (enable_softmax or softmax_topk) else row
        probs = torch.softmax(torch.tensor(z), -1).tolist() if enable_softmax else z
        keep = sorted(range(len(z)), key=lambda j: -z[j])[: top_k or len(z)]
        if softmax_topk:
            kept = torch.softmax(torch.tensor([z[j] for j in keep]), -1).tolist()
            probs = [kept[keep.index(j)] if j in keep else 0.0 for j in range(len(z))]
        else:
            probs = [p if j in keep else 0.0 for j, p in enumerate(probs)]
        out[i] = torch.tensor(probs) * weight
    return out


@pytest.mark.parametrize(
    ("temperature", "enable_softmax", "top_k", "softmax_topk", "weight"),
    [
        (1.0, True, None, False, 1.0),
        (0.5, True, 2, False, 1.3),
        (2.0, True, 2, True, 0.7),
        (1.0, False, 1, False, 1.0),
    ],
)
def test_gate_matches_its_definition(temperature, enable_softmax, top_k, softmax_topk, weight):
    logits = torch.randn(9, 4)
    ours = gate(
        logits,
        temperature=temperature,
        enable_softmax=enable_softmax,
        top_k=top_k,
        softmax_topk=softmax_topk,
        global_weight=weight,
    )
    torch.testing.assert_close(ours, _gate_reference(logits, temperature, enable_softmax, top_k, softmax_topk, weight))


def test_classifier_is_linear_relu_linear():
    hidden = torch.randn(5, 8)
    w = [torch.randn(6, 8), torch.randn(3, 6)]
    b = [torch.randn(6), torch.randn(3)]
    expected = torch.relu(hidden @ w[0].T + b[0]) @ w[1].T + b[1]
    torch.testing.assert_close(classify(hidden, w, b), expected)


def _fused_case(n_tokens=6, n_in=8, outs=(10, 4), n_experts=3, n_slots=2):
    """Random factors of a fused projection with two sub-projections; experts differ in rank and presence."""
    ranks = {(0, 0): 2, (0, 2): 3, (1, 1): 4, (1, 2): 1}  # (sub-projection, expert) -> rank; expert 1 not on sub 0
    ranks = {k: r for k, r in ranks.items() if k[0] < len(outs)}
    factors = {k: (torch.randn(r, n_in), torch.randn(outs[k[0]], r), 0.5 + k[1]) for k, r in ranks.items()}
    x = torch.randn(n_tokens, n_in)
    scalings = torch.rand(n_tokens, n_slots * n_experts)
    slot_of_sub = {0: 0, 1: 1}  # layerwise: each sub-projection reads its own scaling slot
    return x, scalings, factors, outs, n_experts, slot_of_sub


def _loop_reference(x, scalings, factors, outs, n_experts, slot_of_sub, weight=None):
    """sum_e s_e * scale_e * B_e A_e x per sub-projection, one expert at a time."""
    out = torch.zeros(x.shape[0], sum(outs))
    offsets = [0, outs[0]]
    for (sub, e), (a, b, scale) in factors.items():
        index = slot_of_sub[sub] * n_experts + e
        s = weight if weight is not None else scalings[:, index : index + 1]
        out[:, offsets[sub] : offsets[sub] + outs[sub]] += s * scale * (x @ a.T @ b.T)
    return out


def _stack(factors, outs, n_experts, slot_of_sub, *, in_features, a_cols, b_rows_of, out_sizes, weight=0.0):
    segments, start = [], 0
    for sub, size in enumerate(out_sizes):
        seg = Segment(start, start + size, b_rows_of(sub))
        for (s, e), (a, _, scale) in sorted(factors.items(), key=lambda kv: kv[0][1]):
            if s == sub:
                seg.experts.append((f"{sub}.{e}", a.shape[0], slot_of_sub[sub] * n_experts + e, scale))
        segments.append(seg)
        start += size
    stack = StackedLora(in_features, a_cols, segments, weight, torch.float32)
    for (sub, e), (a, b, _) in factors.items():
        stack.load(f"{sub}.{e}", a, b)
    return stack


def test_stacked_update_equals_the_per_expert_loop():
    x, scalings, factors, outs, n, slots = _fused_case()
    stack = _stack(
        factors, outs, n, slots, in_features=x.shape[1], a_cols=(0, x.shape[1]), b_rows_of=lambda s: (0, outs[s]),
        out_sizes=outs, weight=0.85,
    )  # fmt: skip
    base = torch.randn(x.shape[0], sum(outs))
    expected = base + _loop_reference(x, scalings, factors, outs, n, slots)
    torch.testing.assert_close(stack(base.clone(), x, scalings), expected)
    # The scaling pass: every expert at the constant weight.
    expected = base + _loop_reference(x, scalings, factors, outs, n, slots, weight=0.85)
    torch.testing.assert_close(stack(base.clone(), x, None), expected)


def test_column_parallel_shards_hold_their_output_rows():
    # Two tensor-parallel ranks of a column-parallel projection: each holds half of every sub-projection's output
    # columns (B's rows) and the full A; side by side they give the unsharded update.
    x, scalings, factors, outs, n, slots = _fused_case()
    full = _loop_reference(x, scalings, factors, outs, n, slots)
    halves = [o // 2 for o in outs]
    parts = []
    for rank in range(2):
        stack = _stack(
            factors, outs, n, slots, in_features=x.shape[1], a_cols=(0, x.shape[1]),
            b_rows_of=lambda s, rank=rank: (rank * halves[s], (rank + 1) * halves[s]), out_sizes=halves,
        )  # fmt: skip
        parts.append(stack(torch.zeros(x.shape[0], sum(halves)), x, scalings))
    # Reassemble: rank 0 has [sub0 first half, sub1 first half], rank 1 the second halves.
    sub0 = torch.cat([parts[0][:, : halves[0]], parts[1][:, : halves[0]]], -1)
    sub1 = torch.cat([parts[0][:, halves[0] :], parts[1][:, halves[0] :]], -1)
    torch.testing.assert_close(torch.cat([sub0, sub1], -1), full)


def test_row_parallel_shards_sum_to_the_update():
    # Row-parallel: each rank sees half of the input columns (and A's), the full B; the all-reduce sums them.
    x, scalings, factors, outs, n, slots = _fused_case(outs=(10,))
    full = _loop_reference(x, scalings, factors, outs, n, slots)
    half = x.shape[1] // 2
    total = torch.zeros_like(full)
    for rank in range(2):
        stack = _stack(
            factors, outs, n, slots, in_features=half, a_cols=(rank * half, (rank + 1) * half),
            b_rows_of=lambda s: (0, outs[s]), out_sizes=outs,
        )  # fmt: skip
        total += stack(torch.zeros_like(full), x[:, rank * half : (rank + 1) * half], scalings)
    torch.testing.assert_close(total, full)


def test_embedding_update_is_a_row_lookup():
    vocab, dim, r = 11, 6, 3
    a, b = torch.randn(r, vocab), torch.randn(dim, r)
    ids = torch.tensor([0, 4, 10, 4])
    scalings = torch.rand(4, 2)
    seg = Segment(0, dim, (0, dim), [("emb.1", r, 1, 0.5)])
    stack = StackedLora(vocab, (0, vocab), [seg], 0.0, torch.float32, embedding=True)
    stack.load("emb.1", a, b)
    expected = scalings[:, 1:2] * 0.5 * (torch.nn.functional.one_hot(ids, vocab).float() @ a.T @ b.T)
    torch.testing.assert_close(stack(torch.zeros(4, dim), ids, scalings), expected)
    assert stack(torch.zeros(4, dim), ids, None).abs().max() == 0  # scaling-pass weight 0: no update there


def test_spec_refuses_other_formats_and_unknown_entries(tmp_path):
    case = build_case(str(tmp_path))
    _, spec = _read_served(case.served)
    data = spec.to_dict()
    assert ServingSpec.from_dict(data) == spec
    with pytest.raises(XLoraServingError, match="spec format"):
        ServingSpec.from_dict({**data, "format": 99})
    with pytest.raises(XLoraServingError, match="newer peft-xlora"):
        ServingSpec.from_dict({**data, "future_option": 1})


@pytest.mark.parametrize("static", ["uniform", "learned"])
def test_export_refuses_single_pass_checkpoints_for_now(tmp_path, static):
    with pytest.raises(XLoraServingError, match="routing='single_pass'"):
        build_case(str(tmp_path), routing="single_pass", scaling_pass_layers=2, single_pass_static=static)


@pytest.fixture(scope="module")
def saved_case(tmp_path_factory):
    """One exported tiny model shared by the broken-input tests (each breaks a copy of its checkpoint)."""
    return build_case(str(tmp_path_factory.mktemp("saved")), top_k_lora=2)


def _broken_copy(case, tmp_path, name: str) -> str:
    import shutil

    path = str(tmp_path / name)
    shutil.copytree(case.checkpoint, path)
    return path


def _truncate(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)


def _write_config(path: str, edit) -> None:
    config_path = os.path.join(path, "adapter_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    edit(config)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f)


@pytest.mark.parametrize(
    ("breakage", "error", "match"),
    [
        ("no-folder", CheckpointError, "adapter_config.json does not exist"),
        ("no-config", CheckpointError, "adapter_config.json does not exist"),
        ("no-weights", CheckpointError, "adapter_model.safetensors does not exist"),
        ("truncated-weights", CheckpointError, "is truncated"),
        ("config-not-json", CheckpointError, "not valid JSON"),
        ("config-bad-value", ValueError, "top_k_lora"),
    ],
)
def test_export_checks_the_checkpoint_before_reading_it(saved_case, tmp_path, breakage, error, match):
    path = _broken_copy(saved_case, tmp_path, "broken")
    if breakage == "no-folder":
        path = str(tmp_path / "missing")
    elif breakage == "no-config":
        os.remove(os.path.join(path, "adapter_config.json"))
    elif breakage == "no-weights":
        os.remove(os.path.join(path, "adapter_model.safetensors"))
    elif breakage == "truncated-weights":
        _truncate(os.path.join(path, "adapter_model.safetensors"))
    elif breakage == "config-not-json":
        with open(os.path.join(path, "adapter_config.json"), "a", encoding="utf-8") as f:
            f.write("{")
    elif breakage == "config-bad-value":
        _write_config(path, lambda config: config.update(top_k_lora=99))
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        export_vllm(path, out, base_model=saved_case.base)
    assert not out.exists()  # nothing written
