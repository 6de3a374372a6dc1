"""`export_vllm` and the plugin's torch arithmetic, checked without vLLM (these run in the main environment too).

The export is checked against the peft-xlora model it came from: the same mixture layers in the same order, the same
per-expert ranks and scales (rsLoRA, rank and alpha patterns), the same tensors. The arithmetic of `ops` is checked
against plain per-expert loops written from the paper's formula, including the tensor-parallel sharding.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file
from xlora_vllm_cases import (
    EXPERT_SPECS,
    build_case,
    join_column_shards,
    make_experts,
    random_factors,
    save_base,
    shard_stack,
)

from peft_xlora import CheckpointError
from peft_xlora.core.classifier import gate
from peft_xlora.core.combinations import Status, places
from peft_xlora.serving.vllm import SPEC_KEY, ServingSpec, XLoraServingError, export_vllm, scaling_pass_constant
from peft_xlora.serving.vllm import export as export_module
from peft_xlora.serving.vllm.ops import Block, Partition, StackedLora, XLoraRouter, classify
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
    # Every config field (PEFT's included) is in exactly one of the three tables of serving/vllm/place.py, from which
    # the exporter's column of the table of what combines is made (tests/contract holds that column to every row).
    import dataclasses

    from peft_xlora import XLoraConfig

    fields = sorted(f.name for f in dataclasses.fields(XLoraConfig))
    placed = [*export_module.VLLM_WRITTEN, *export_module.VLLM_IRRELEVANT, *export_module.VLLM_REFUSED]
    assert sorted(placed) == fields
    assert set(export_module.VLLM_REFUSED_WHEN) <= set(export_module.VLLM_WRITTEN)
    cells = places()["export_vllm"].cells
    for name in fields:
        expected = Status.IRRELEVANT if name in export_module.VLLM_IRRELEVANT else Status.SUPPORTED
        if name in export_module.VLLM_REFUSED or name in export_module.VLLM_REFUSED_WHEN:
            expected = Status.REFUSED
        assert cells[name].status is expected, name


_OTHER_VALUE = {"scalings_mode": "prompt", "trainable_head": True, "task_type": "SEQ_CLS"}


@pytest.mark.parametrize("field", sorted(export_module.VLLM_REFUSED))
def test_every_refused_field_is_refused_by_name(saved_case, tmp_path, field):
    # Each refused option, set in an otherwise servable checkpoint, stops the export with its name and reason.
    other = _OTHER_VALUE[field]
    assert other not in export_module.VLLM_REFUSED[field][0]
    path = _broken_copy(saved_case, tmp_path, "refused")
    _write_config(path, lambda config: config.update({field: other}))
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


# A projection with two output partitions (e.g. gate and up of gate_up_proj, sizes 10 and 4) and input width 8; three
# experts. Blocks: (module, expert) -> (rank, parts covered). "fused" covers both partitions with one A (Phi-3's own
# gate_up_proj); the others one partition each, expert 1 absent from the first.
_OUTS = (10, 4)
_N_IN, _N_EXPERTS = 8, 3
_BLOCKS = {
    ("gate", 0): (2, [0]),
    ("gate", 2): (3, [0]),
    ("up", 1): (4, [1]),
    ("up", 2): (1, [1]),
    ("fused", 1): (2, [0, 1]),
}
_SLOT = {"gate": 0, "up": 1, "fused": 2}  # layerwise: each module reads its own scaling slot


def _factors(seed=0, row_parallel=False):
    return random_factors(_BLOCKS, _OUTS, _N_IN, seed, row_parallel, scale=lambda key, block: 0.5 + key[1])


def _loop_reference(x, factors, weight_of):
    """sum over blocks of weight * scale * B A x, one block at a time, B's rows split over the partitions it covers."""
    out = torch.zeros(x.shape[0], sum(_OUTS))
    offsets = [0, _OUTS[0]]
    for (module, e), (a, b, scale) in factors.items():
        full = x @ a.T @ b.T  # (tokens, rows of the covered partitions)
        row = 0
        for p in _BLOCKS[(module, e)][1]:
            out[:, offsets[p] : offsets[p] + _OUTS[p]] += weight_of(module, e) * scale * full[:, row : row + _OUTS[p]]
            row += _OUTS[p]
    return out


def _stack(factors, *, shards=1, rank=0, row_parallel=False):
    """The StackedLora of one tensor-parallel shard (column-parallel by default, like gate_up_proj)."""
    geometry = {"outs": _OUTS, "n_in": _N_IN, "n_experts": _N_EXPERTS, "slot": _SLOT}
    return shard_stack(_BLOCKS, factors, **geometry, shards=shards, rank=rank, row_parallel=row_parallel)


def _per_token_weights(stack, scalings):
    return scalings.index_select(1, stack.scaling_index)  # what MixedProjection hands the stack


def test_stacked_update_equals_the_per_expert_loop():
    factors = _factors()
    x = torch.randn(6, _N_IN)
    scalings = torch.rand(6, 3 * _N_EXPERTS)  # (tokens, n_slots * n_experts)
    stack = _stack(factors)
    base = torch.randn(6, sum(_OUTS))

    def weight_of(module, e):
        index = _SLOT[module] * _N_EXPERTS + e
        return scalings[:, index : index + 1]

    expected = base + _loop_reference(x, factors, weight_of)
    ours = stack.add_update(base.clone(), x, _per_token_weights(stack, scalings), stack.own_B())
    torch.testing.assert_close(ours, expected)
    # Constant weights folded into B (static weights, the scaling pass): each (module, expert) at its own value.
    constant = {key: 0.1 + 0.2 * i for i, key in enumerate(_BLOCKS)}
    weights = stack.rank_weights(lambda module, e: constant[(module, e)])
    expected = base + _loop_reference(x, factors, lambda module, e: constant[(module, e)])
    torch.testing.assert_close(stack.add_update(base.clone(), x, None, stack.weighted_B(weights)), expected)


def test_column_parallel_shards_hold_their_output_rows():
    # Two tensor-parallel ranks of a column-parallel projection: each holds half of every partition's rows (B's rows)
    # and the full A; side by side, partition by partition, they give the unsharded update.
    factors = _factors(1)
    x = torch.randn(5, _N_IN)
    scalings = torch.rand(5, 3 * _N_EXPERTS)
    halves = [o // 2 for o in _OUTS]
    parts = []
    for rank in range(2):
        stack = _stack(factors, shards=2, rank=rank)
        parts.append(
            stack.add_update(torch.zeros(5, sum(halves)), x, _per_token_weights(stack, scalings), stack.own_B())
        )
    whole = _stack(factors)
    full = whole.add_update(torch.zeros(5, sum(_OUTS)), x, _per_token_weights(whole, scalings), whole.own_B())
    torch.testing.assert_close(join_column_shards(parts, _OUTS), full)


def test_row_parallel_shards_sum_to_the_update():
    # Row-parallel: each rank sees half of the input columns (and A's) and the full B; the all-reduce sums them.
    factors = _factors(2, row_parallel=True)
    x = torch.randn(4, _N_IN)
    scalings = torch.rand(4, 3 * _N_EXPERTS)
    whole = _stack(factors, row_parallel=True)
    full = whole.add_update(torch.zeros(4, sum(_OUTS)), x, _per_token_weights(whole, scalings), whole.own_B())
    total = torch.zeros_like(full)
    half = _N_IN // 2
    for rank in range(2):
        stack = _stack(factors, shards=2, rank=rank, row_parallel=True)
        shard_x = x[:, rank * half : (rank + 1) * half]
        total += stack.add_update(torch.zeros_like(full), shard_x, _per_token_weights(stack, scalings), stack.own_B())
    torch.testing.assert_close(total, full)


def test_embedding_update_is_a_row_lookup():
    vocab, dim, r = 11, 6, 3
    a, b = torch.randn(r, vocab), torch.randn(dim, r)
    ids = torch.tensor([0, 4, 10, 4])
    scalings = torch.rand(4, 2)
    block = Block("emb.1", "emb", 1, r, 0.5, 1, [0], [dim])
    stack = StackedLora(vocab, (0, vocab), [Partition(0, dim, (0, dim))], [block], torch.float32, embedding=True)
    stack.load("emb.1", a, b)
    stack.fold_scales()
    expected = scalings[:, 1:2] * 0.5 * (torch.nn.functional.one_hot(ids, vocab).float() @ a.T @ b.T)
    ours = stack.add_update(torch.zeros(4, dim), ids, _per_token_weights(stack, scalings), stack.own_B())
    torch.testing.assert_close(ours, expected)


def test_router_writes_the_gated_scalings_of_each_token(tmp_path):
    # The router's buffer holds, for this forward's tokens, peft-xlora's gate of the classifier's logits.
    case = build_case(str(tmp_path), layerwise_scalings=True, top_k_lora=2, xlora_depth=2, xlora_size=16)
    _, spec = _read_served(case.served)
    router = XLoraRouter(spec, max_tokens=32)
    classifier = case.model.base_model.xlora_classifier
    linears = [m for m in classifier.layers if isinstance(m, torch.nn.Linear)]
    for j, linear in enumerate(linears):
        getattr(router, f"weight{j}").copy_(linear.weight.detach())
        getattr(router, f"bias{j}").copy_(linear.bias.detach())
    hidden = torch.randn(7, spec.hidden_size)
    router.route(hidden)
    expected = case.model.base_model.router.gate(hidden[None])[1][0]  # (tokens, n_layers, n_experts)
    torch.testing.assert_close(router.scalings[:7], expected.flatten(1))
    assert router.scalings[7:].abs().max() == 0  # rows past this forward's tokens untouched


def test_spec_refuses_other_formats_and_unknown_entries(tmp_path):
    case = build_case(str(tmp_path))
    _, spec = _read_served(case.served)
    data = spec.to_dict()
    assert ServingSpec.from_dict(data) == spec
    for other in (1, 99):  # 1: the first plugin's exports (dual pass only), which lack the routing
        with pytest.raises(XLoraServingError, match="Export the checkpoint again"):
            ServingSpec.from_dict({**data, "format": other})
    with pytest.raises(XLoraServingError, match="newer peft-xlora"):
        ServingSpec.from_dict({**data, "future_option": 1})


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


def test_export_refuses_embedding_experts_on_gemma2(tmp_path):
    # vLLM's Gemma 2 computes its logits with the embedding module itself: the plugin cannot wrap it.
    experts = make_experts(
        "gemma2", str(tmp_path), {"emb": {"r": 2, "lora_alpha": 2, "target_modules": ["embed_tokens"]}}
    )
    with pytest.raises(XLoraServingError, match="computes its logits with the input embedding module"):
        build_case(str(tmp_path), arch="gemma2", experts=experts)
    assert not (tmp_path / "served").exists()


@pytest.mark.parametrize("static", ["learned", "uniform"])
def test_single_pass_export_writes_its_routing_and_static_logits(tmp_path, static):
    case = build_case(str(tmp_path), routing="single_pass", scaling_pass_layers=2, single_pass_static=static)
    _, spec = _read_served(case.served)
    tuner = case.model.base_model
    assert (spec.routing, spec.single_pass_static, spec.scaling_pass_layers) == ("single_pass", static, 2)
    # The mixture layers the spec calls late are peft-xlora's late layers.
    late = {tuner.mixture_layer_names[i] for i in tuner.router.late_layers}
    assert {m for m in spec.mixture_layers if spec.is_late(m)} == late
    weights = load_file(os.path.join(case.served, WEIGHTS_FILE))
    if static == "learned":
        logits = tuner.xlora_classifier.single_pass_static.logits.detach()
        torch.testing.assert_close(weights["xlora.single_pass_static.logits"], logits)
        assert not torch.allclose(logits, torch.zeros_like(logits))  # the cases' static logits are not uniform
    else:
        assert "xlora.single_pass_static.logits" not in weights


def test_spec_refuses_classifier_sizes_past_the_bounds(tmp_path):
    # A hostile config.json must not make the model class allocate without limit.
    case = build_case(str(tmp_path))
    _, spec = _read_served(case.served)
    data = spec.to_dict()
    # The bounds are core's (`core.config.check_sizes`), the same as every XLoraConfig's.
    with pytest.raises(XLoraServingError, match="at most 32 linear layers"):
        ServingSpec.from_dict({**data, "classifier_depth": 10**9})
    with pytest.raises(XLoraServingError, match="at most 4096 wide"):
        ServingSpec.from_dict({**data, "classifier_depth": 2, "classifier_width": 10**6})


# ---------------------------------------------------------------------------------------------------- pinned mixtures


def test_pinned_export_holds_what_set_static_scalings_holds(saved_case, tmp_path):
    # A pinned export's spec carries the weights peft-xlora's pinned model uses (float32, gate order), and the weights
    # file holds the experts' factors only: no classifier, no static logits.
    tuner = saved_case.model.base_model
    pins = {
        "dict": {"math": 0.7, "poetry": 1.2},
        "uniform": "uniform",
        "per-layer": torch.softmax(torch.randn(len(tuner.mixture_layer_names), 3), -1),
    }
    try:
        for label, pin in pins.items():
            served = export_vllm(saved_case.checkpoint, tmp_path / label, base_model=saved_case.base, pin=pin)
            _, spec = _read_served(served)
            tuner.set_static_scalings({n: 1 / 3 for n in tuner.expert_names} if pin == "uniform" else pin)
            expected = tuner._static_scalings  # (1|n_layers, n_experts) float32
            assert (spec.routing, spec.classifier_depth) == ("pinned", 0)
            assert torch.equal(torch.tensor(spec.pinned_weights), expected), label
            weights = load_file(os.path.join(served, WEIGHTS_FILE))
            assert weights and all(key.startswith("xlora.experts.") for key in weights)
    finally:
        tuner.set_static_scalings(None)
    # The spec records each adapted module's shape in the base model, for the plugin to check before it allocates.
    assert spec.shapes["model.layers.0.self_attn.q_proj"] == [64, 64]
    assert spec.shapes["model.layers.0.self_attn.k_proj"] == [64, 32]  # one KV head of 32
    assert spec.shapes["model.embed_tokens"] == [97, 64]
    assert sorted(spec.shapes) == sorted(spec.mixture_layers)


@pytest.mark.parametrize(
    ("pin", "match"),
    [
        ("softmax", "`pin` 'softmax' is not understood"),
        ({"nobody": 1.0}, r"unknown experts \['nobody'\]"),
        ({"math": "a lot"}, "weights must be numbers"),
        ([0.5, 0.5], r"shape \(3,\) \(shared\) or \(\d+, 3\)"),
        ([[0.2, 0.3, 0.5]] * 2, r"got \(2, 3\)"),
        ([0.2, float("nan"), 0.5], "finite"),
        (torch.ones(2, 1, 3), "per-row pins"),  # one weight vector per batch row: the table refuses it
    ],
    ids=["word", "unknown-expert", "not-a-number", "too-short", "wrong-rows", "nan", "per-row"],
)
def test_a_malformed_pin_is_refused_before_anything_is_written(saved_case, tmp_path, pin, match):
    with pytest.raises(XLoraServingError, match=match):
        export_vllm(saved_case.checkpoint, tmp_path / "out", base_model=saved_case.base, pin=pin)
    assert not (tmp_path / "out").exists()


def test_a_pin_serves_what_the_gate_cannot(saved_case, tmp_path, capsys):
    # A single pass over every layer (the gate never used; peft-xlora no longer builds one) and prompt mode are refused
    # by the export, each saying what to do; pinned, both serve a fixed mixture (the gate's options are then moot).
    every_layer = _broken_copy(saved_case, tmp_path, "every-layer")
    _write_config(
        every_layer,
        lambda config: config.update(routing="single_pass", scaling_pass_layers=3, single_pass_static="uniform"),
    )
    prompt = _broken_copy(saved_case, tmp_path, "prompt")
    _write_config(prompt, lambda config: config.update(scalings_mode="prompt"))
    refusals = {
        every_layer: "`scaling_pass_layers=3`: no mixture layer comes after decoder layer 3, so the gate would "
        "never be used (peft-xlora no longer builds such a model). To serve a fixed mixture over every layer, export "
        "it pinned: `export_vllm(..., pin='uniform')`",
        prompt: "scalings_mode='prompt' is not served by the vLLM plugin",
    }
    for path, message in refusals.items():
        out = tmp_path / f"out-{os.path.basename(path)}"
        with pytest.raises(XLoraServingError) as refused:
            export_vllm(path, out, base_model=saved_case.base)
        assert message in str(refused.value)
        assert not out.exists()
        served = export_vllm(path, out, base_model=saved_case.base, pin="uniform")
        assert _read_served(served)[1].routing == "pinned"
    # The command line checks the table with --pin as a pin: refused without it, exported with it.
    from peft_xlora.cli.parser import main

    args = ["export", prompt, "--format", "vllm", "--out", str(tmp_path / "cli"), "--base", saved_case.base]
    capsys.readouterr()
    assert main(args) == 2
    assert "scalings_mode='prompt' is not served by the vLLM plugin" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()
    assert main([*args, "--pin", "uniform"]) == 0
    assert _read_served(str(tmp_path / "cli"))[1].routing == "pinned"


def _copy_base_with(case, tmp_path, **changes) -> str:
    import shutil

    base = str(tmp_path / "base-changed")
    shutil.copytree(case.base, base)
    path = os.path.join(base, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return base


def test_the_table_refuses_heads_encoder_decoders_and_expert_variants(saved_case, tmp_path):
    # The vLLM column's other refusals, each from what the files hold, before anything is written.
    from safetensors.torch import save_file

    heads = _broken_copy(saved_case, tmp_path, "heads")
    weights_path = os.path.join(heads, "adapter_model.safetensors")
    weights = load_file(weights_path)
    weights["base_model.model.score.xlora_expert_heads.math.weight"] = torch.zeros(2, 64)
    save_file(weights, weights_path)
    variant = _broken_copy(saved_case, tmp_path, "dora")
    _write_config(variant, lambda config: config["experts"]["math"].update(use_dora=True))
    seq2seq = _copy_base_with(saved_case, tmp_path, is_encoder_decoder=True, architectures=["BartForCausalLM"])
    cases = [
        (heads, saved_case.base, "mixes its experts' classification heads"),
        (variant, saved_case.base, r"expert 'math' \(`use_dora`\) uses a LoRA variant"),
        (saved_case.checkpoint, seq2seq, r"the base model \(BartForCausalLM\) is an encoder-decoder model"),
    ]
    for checkpoint, base, match in cases:
        with pytest.raises(XLoraServingError, match="export_vllm cannot serve this checkpoint") as refused:
            export_vllm(checkpoint, tmp_path / "out", base_model=base)
        assert re.search(match, str(refused.value)), str(refused.value)
        assert not (tmp_path / "out").exists()


def test_cli_exports_a_pinned_mixture(saved_case, tmp_path, capsys):
    from peft_xlora.cli.parser import main

    out = tmp_path / "served"
    args = ["export", saved_case.checkpoint, "--format", "vllm", "--out", str(out), "--base", saved_case.base]
    assert main([*args, "--pin", "math=0.25,code=0.75"]) == 0
    _, spec = _read_served(str(out))
    assert spec.pinned_weights == [[0.25, 0.75, 0.0]]
    assert main([*args, "--pin", "uniform"]) == 0
    assert spec.experts == ["math", "code", "poetry"]
    assert _read_served(str(out))[1].pinned_weights == [[pytest.approx(1 / 3)] * 3]
    capsys.readouterr()
    assert main([*args, "--pin", "nobody=1"]) == 2
    assert "unknown experts ['nobody']" in capsys.readouterr().err
    lora = ["export", saved_case.checkpoint, "--format", "lora", "--out", str(tmp_path / "l"), "--weights", "math=1"]
    assert main([*lora, "--pin", "uniform"]) == 2
    assert "--pin applies to --format vllm only" in capsys.readouterr().err


@pytest.mark.parametrize("topk_compute", ["auto", "sparse"])
def test_export_after_elastic_changes_is_the_export_of_a_model_built_with_those_experts(tmp_path, topk_compute):
    # remove_expert then add_expert, saved: the export describes the model built directly with the experts it now
    # has (the same spec, the same factors), and carries the changed model's classifier. With sparse top-k the plugin
    # builds its sparse layout from these same factors at load, so it serves what the model built directly serves.
    import peft_xlora

    root = str(tmp_path)
    experts = make_experts("llama", root)
    options = {"layerwise_scalings": True, "top_k_lora": 2, "topk_compute": topk_compute}
    case = build_case(root, experts=experts, **options)
    tuner = case.model.base_model
    tuner.remove_expert("code")
    tuner.add_expert("coda", experts["code"])
    changed = os.path.join(root, "changed")
    peft_xlora.save_pretrained(case.model, changed)
    served = export_vllm(changed, tmp_path / "served-changed", base_model=case.base)
    direct_experts = {"math": experts["math"], "poetry": experts["poetry"], "coda": experts["code"]}
    direct = build_case(str(tmp_path / "direct"), experts=direct_experts, **options)
    (_, ours), (_, theirs) = _read_served(served), _read_served(direct.served)
    assert ours.experts == theirs.experts == ["math", "poetry", "coda"]
    assert ours.topk_compute == theirs.topk_compute == topk_compute
    assert ours.scaling_pass_layers == theirs.scaling_pass_layers == 2  # the default: layer 2 of the 3
    assert (ours.mixture_layers, ours.modules, ours.shapes) == (theirs.mixture_layers, theirs.modules, theirs.shapes)
    weights, built = (load_file(os.path.join(path, WEIGHTS_FILE)) for path in (served, direct.served))
    factors = sorted(key for key in built if key.startswith("xlora.experts."))
    assert factors and sorted(key for key in weights if key.startswith("xlora.experts.")) == factors
    for key in factors:
        torch.testing.assert_close(weights[key], built[key], rtol=0, atol=0)
    linears = [m for m in tuner.xlora_classifier.layers if isinstance(m, torch.nn.Linear)]
    for j, linear in enumerate(linears):
        torch.testing.assert_close(weights[f"xlora.classifier.{j}.weight"], linear.weight.detach(), rtol=0, atol=0)


def test_export_resolves_the_recorded_base_model(saved_case, tmp_path, monkeypatch):
    # Without `base_model`, the base model the checkpoint records: a local folder as it is, a Hub id at the recorded
    # revision (resolved through huggingface_hub; here a stand-in that records the call, since nothing may download).
    import filecmp

    import huggingface_hub

    local = _broken_copy(saved_case, tmp_path, "local")
    _write_config(local, lambda config: config.update(base_model_name_or_path=saved_case.base, revision=None))
    served = export_vllm(local, tmp_path / "out-local")
    assert filecmp.cmp(os.path.join(served, "model.safetensors"), os.path.join(saved_case.base, "model.safetensors"))
    hub = _broken_copy(saved_case, tmp_path, "hub")
    _write_config(hub, lambda config: config.update(base_model_name_or_path="org/tiny-base", revision="0123abc"))
    calls = []

    def snapshot_download(repo_id, revision=None):
        calls.append((repo_id, revision))
        return saved_case.base

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    export_vllm(hub, tmp_path / "out-hub")
    assert calls == [("org/tiny-base", "0123abc")]
    export_vllm(hub, tmp_path / "out-given", base_model="org/other-base")  # a base model given: its newest files
    assert calls[-1] == ("org/other-base", None)


def test_spec_refuses_malformed_pins_and_shapes(saved_case):
    # A damaged (or hand-written) spec's pinned weights and module shapes are checked when the spec is read.
    _, spec = _read_served(saved_case.served)
    data = spec.to_dict()
    n_layers = len(spec.mixture_layers)
    pinned = {**data, "routing": "pinned", "classifier_depth": 0, "classifier_width": 0}
    assert ServingSpec.from_dict({**pinned, "pinned_weights": [[0.2, 0.3, 0.5]]}).routing == "pinned"
    assert ServingSpec.from_dict({**pinned, "pinned_weights": [[0.2, 0.3, 0.5]] * n_layers}).routing == "pinned"
    damaged = "The export is damaged: export the checkpoint again"
    for rows in (None, [[0.5, 0.5]], [[0.2, 0.3, 0.5]] * 2, "uniform"):
        with pytest.raises(XLoraServingError, match=damaged):
            ServingSpec.from_dict({**pinned, "pinned_weights": rows})
    with pytest.raises(XLoraServingError, match="finite numbers"):
        ServingSpec.from_dict({**pinned, "pinned_weights": [[0.2, float("inf"), 0.5]]})
    with pytest.raises(XLoraServingError, match="no classifier"):
        ServingSpec.from_dict({**pinned, "classifier_depth": 1, "pinned_weights": [[0.2, 0.3, 0.5]]})
    with pytest.raises(XLoraServingError, match="`pinned_weights` unset with routing='dual_pass'"):
        ServingSpec.from_dict({**data, "pinned_weights": [[0.2, 0.3, 0.5]]})
    shapes = data["shapes"]
    first = spec.mixture_layers[0]
    for broken in (
        {k: v for k, v in shapes.items() if k != first},  # a mixture layer missing
        {**shapes, "lm_head": [64, 97]},  # another module
        {**shapes, first: [97, 0]},
        {**shapes, first: [97]},
    ):
        with pytest.raises(XLoraServingError, match="`shapes` must give"):
            ServingSpec.from_dict({**data, "shapes": broken})
    assert ServingSpec.from_dict({**data, "shapes": None}).shapes is None  # an export from before shapes were kept
