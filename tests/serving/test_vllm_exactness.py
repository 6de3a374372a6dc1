"""The vLLM plugin computes what peft-xlora computes: greedy tokens equal, log-probabilities within 1e-4 (float32).

Every case builds a tiny random model, X-LoRA over three distinct random experts (different ranks, alphas, rsLoRA,
rank/alpha patterns and targets, the input embedding among them), takes peft-xlora's cached `generate` as the
reference, exports the checkpoint and serves it in an in-process CPU vLLM engine that runs the model as vLLM traces
it (torch.compile's graph, its guards dropped; `xlora_vllm_cases.TRACED`). One engine per case sees everything at
once: requests submitted together and finishing at different steps (continuous batching), prompts longer than the
32-token step budget (chunked prefill beside other requests' decodes), decode, and a second wave of requests whose
first 64 tokens hit the prefix cache.
"""

from __future__ import annotations

import pytest

pytest.importorskip(
    "vllm",
    reason="vLLM is not installed in this environment; scripts/test.sh runs tests/serving with the vLLM env that "
    "scripts/vllm_env.sh creates",
)

import os

import torch
from safetensors.torch import load_file, save_file
from xlora_vllm_cases import (
    SPARSE_EXPERT_SPECS,
    TRACED,
    assert_same_generation,
    build_case,
    make_experts,
    prompts_of_lengths,
    reference_generate,
    vllm_engine,
    vllm_generate,
)

from peft_xlora.serving.vllm import XLoraServingError, export_vllm

SINGLE = {"routing": "single_pass"}
# Every gating option that changes outputs, for both routings, on Llama (the defaults: the eager test below); each
# other architecture traced once per routing, except where vLLM's class for it shares Llama's or Qwen2's decoder
# stack (below).
CASES = {
    "llama-dual-gating": (
        "llama",
        {
            "xlora_depth": 3,
            "xlora_size": 24,
            "layerwise_scalings": True,
            "softmax_temperature": 0.5,
            "top_k_lora": 2,
            "enable_softmax_topk": True,
        },
    ),
    "llama-dual-scaling-pass-no-softmax-top-1": (
        "llama",
        {
            "scaling_pass_value": 0.5,
            "global_scaling_weight": 0.6,
            "scaling_pass_layers": 2,
            "layerwise_scalings": True,
            "enable_softmax": False,
            "top_k_lora": 1,
        },
    ),
    "llama-single-learned-layerwise-top-k": (
        "llama",
        {
            **SINGLE,
            "scaling_pass_layers": 2,
            "layerwise_scalings": True,
            "top_k_lora": 2,
            "topk_compute": "sparse",  # the projections after layer k with more than 2 experts: sparse
            "xlora_depth": 2,
            "xlora_size": 16,
        },
    ),
    "llama-single-uniform-softmax-top-k-temperature": (
        "llama",
        {
            **SINGLE,
            "scaling_pass_layers": 1,
            "single_pass_static": "uniform",
            "top_k_lora": 2,
            "enable_softmax_topk": True,
            "softmax_temperature": 2.0,
            "global_scaling_weight": 1.3,
        },
    ),
}
# Sparse top-k (`topk_compute="sparse"`): each routed projection computes only each token's 2 chosen experts of 4
# (`xlora_vllm_cases.SPARSE_EXPERT_SPECS`: every routed projection, the embedding included, holds more than 2),
# layerwise, so q, k and v of one fused qkv_proj each follow their own choice. The reference is peft-xlora's model
# switched to its dense path after the export (the same mixture computed the other way).
SPARSE_CASE = "llama-dual-sparse-top-k"
CASES[SPARSE_CASE] = (
    "llama",
    {"layerwise_scalings": True, "top_k_lora": 2, "topk_compute": "sparse", "xlora_depth": 2, "xlora_size": 16},
)
# A single pass over every layer (static weights everywhere, the gate never used) is refused at build since the
# table of what combines (issue 22); serving a pinned mixture is exported from a pinned gate instead.
_DUAL = {"layerwise_scalings": True, "top_k_lora": 2, "xlora_depth": 2, "xlora_size": 16}
_SINGLE = {**SINGLE, "scaling_pass_layers": 2, "layerwise_scalings": True, "top_k_lora": 2}
for _arch in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"):
    CASES[f"{_arch}-dual"] = (_arch, _DUAL)
    # The single pass wraps a decoder layer's output, whatever its attention: vLLM's Mistral layer and model are
    # Llama's subclasses, and Qwen3's model is Qwen2's, so their single pass is Llama's and Qwen2's (traced above).
    # Their dual pass, which copies each layer's attention (Qwen3's q/k norms), is traced for each.
    if _arch not in ("mistral", "qwen3"):
        CASES[f"{_arch}-single"] = (_arch, _SINGLE)

# Log-probability tolerance per case (default 1e-4). Gemma 2 scales its embeddings by sqrt(hidden size), and the
# default scaling pass (`scaling_pass_layers="auto"`: layer 2 of 3) feeds the classifier that un-normed residual
# stream, so float32 rounding moves its gate more than with a final norm: measured 1.3e-4 on the 79-token prompt
# served from the prefix cache (4.5e-5 with the whole model in the scaling pass), the same tokens everywhere.
ATOL = {"gemma2-dual": 3e-4}

NEW_TOKENS = [12, 5, 9, 12, 7]  # the requests finish at different steps
FIRST_WAVE = prompts_of_lengths([1, 5, 17, 40, 70])
# The second wave extends the 70-token prompt: its first two 32-token blocks come from the prefix cache.
SECOND_WAVE = [FIRST_WAVE[-1] + tail for tail in prompts_of_lengths([1, 9], seed=4)]


def _assert_not_base_model(case, prompts, references) -> None:
    """The experts change the outputs: otherwise agreement would say nothing about the mixture."""
    with case.model.disable_adapter():
        base = [reference_generate(case.model, p, len(r[0])) for p, r in zip(prompts, references)]
    gaps = [max(abs(a - b) for a, b in zip(r[1], b_[1])) for r, b_ in zip(references, base)]
    assert max(gaps) > 1e-2, f"the X-LoRA model generates like its base model (log-prob gaps {gaps})"


# Cases whose engine also shows the router's buffer after a one-step prefill: each prompt token's scalings, against
# peft-xlora's scalings of the same token (the late layers' rows, in the single pass).
SCALINGS_CHECKED = ("llama-dual-gating", "llama-single-learned-layerwise-top-k")
SCALINGS_PROMPT = prompts_of_lengths([19], seed=5)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_vllm_serves_what_peft_xlora_computes(tmp_path, name):
    arch, options = CASES[name]
    experts = make_experts(arch, str(tmp_path), specs=SPARSE_EXPERT_SPECS) if name == SPARSE_CASE else None
    case = build_case(str(tmp_path), arch=arch, experts=experts, **options)
    sparse_case = options.get("topk_compute") == "sparse"
    if sparse_case:
        case.model.base_model.update_config(topk_compute="dense")  # the reference computes every expert
    new_tokens = NEW_TOKENS + [6] * len(SECOND_WAVE)
    prompts = FIRST_WAVE + SECOND_WAVE
    references = [reference_generate(case.model, p, n) for p, n in zip(prompts, new_tokens)]
    _assert_not_base_model(case, prompts[2:4], references[2:4])
    with vllm_engine(case.served, **TRACED) as llm:
        if name in SCALINGS_CHECKED or sparse_case:
            vllm_generate(llm, [SCALINGS_PROMPT], 1)  # one forward: the prompt's prefill (no full block to cache)
        if name in SCALINGS_CHECKED:
            (scalings,) = llm.apply_model(lambda model: model.xlora.scalings[: len(SCALINGS_PROMPT)].clone())
        if sparse_case:
            (sparse,) = llm.apply_model(_sparse_against_dense)
        first = vllm_generate(llm, FIRST_WAVE, NEW_TOKENS)
        cached: list[int] = []
        second = vllm_generate(llm, SECOND_WAVE, new_tokens[len(FIRST_WAVE) :], cached_tokens=cached)
        assert llm.apply_model(lambda model: model.compiled) == [True]  # traced, not run eagerly
    assert min(cached) >= 64, f"the shared prefix was not served from the cache: {cached} cached tokens"
    for mine, reference in zip(first + second, references):
        assert_same_generation(mine, reference, atol=ATOL.get(name, 1e-4))
    if name in SCALINGS_CHECKED:
        _assert_same_scalings(case, scalings)
    if sparse_case:
        # Dual pass: every projection computed sparsely, the embedding's and each layer's qkv_proj included. Single
        # pass: only those after layer k (2 of 3) with more experts than k: qkv_proj (3 experts; its other
        # projections hold 1 or 2, and the early layers fixed weights). Each one's update equal to the dense plugin
        # path's with the same scalings (the prefill's, on random inputs).
        expected = {"model.layers.2.self_attn.qkv_proj"}
        if name == SPARSE_CASE:
            projections = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
            expected = {"model.embed_tokens"} | {f"model.layers.{i}.{p}" for i in range(3) for p in projections}
        assert set(sparse) == expected, sorted(sparse)
        for path, (ours, dense) in sparse.items():
            assert dense.abs().max() > 1e-2, path  # the experts change this projection
            torch.testing.assert_close(ours, dense, atol=1e-5, rtol=1e-5, msg=lambda m, p=path: f"{p}: {m}")


def _sparse_against_dense(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per sparse projection: its update and the dense stack's, for the scalings of the last prefill's tokens."""
    from peft_xlora.serving.vllm.projections import SparseProjection

    n_tokens = len(SCALINGS_PROMPT)
    router = model.xlora
    generator = torch.Generator(device=router.scalings.device).manual_seed(0)
    out = {}
    for path, module in model.named_modules():
        if not isinstance(module, SparseProjection):
            continue
        stack = module.stack
        if stack.embedding:
            x = torch.randint(0, stack.A.shape[0], (n_tokens,), generator=generator, device=stack.A.device)
        else:
            x = torch.randn(n_tokens, stack.A.shape[1], generator=generator, device=stack.A.device)
        zeros = torch.zeros(n_tokens, sum(p.out_stop - p.out_start for p in stack.partitions), device=stack.A.device)
        ours = module.sparse.add_update(zeros.clone(), x, router.chosen[:n_tokens], router.chosen_weights[:n_tokens])
        weights = router.scalings[:n_tokens].index_select(1, stack.scaling_index)
        out[path] = (ours.cpu(), stack.add_update(zeros.clone(), x, weights, stack.own_B()).cpu())
    return out


def _assert_same_scalings(case, ours: torch.Tensor) -> None:
    """The router's buffer after the prefill of `SCALINGS_PROMPT` holds peft-xlora's scalings of each token."""
    with torch.no_grad():
        case.model(input_ids=torch.tensor([SCALINGS_PROMPT]))
    tuner = case.model.base_model
    reference = tuner.get_latest_scalings()[0]  # (seq, n_layers, n_experts)
    ours = ours.view(len(SCALINGS_PROMPT), -1, reference.shape[-1])  # (seq, n_layers, n_experts)
    late = slice(None)
    if getattr(tuner.router, "late_layers", None) is not None:  # single pass: the gate feeds the layers after k
        late = sorted(tuner.router.late_layers)
        assert late and len(late) < len(tuner.mixture_layer_names)
    torch.testing.assert_close(ours[:, late], reference[:, late].float(), atol=1e-5, rtol=1e-5)


# Pinned mixtures (`export_vllm(..., pin=...)`): one pass with no gate, what peft-xlora's model computes after
# `set_static_scalings` of the same weights (used as given: no softmax, no global weight). "llama-single-uniform" is
# a single-pass checkpoint served at 1 / n on every mixture layer, the embedding included: what a single pass over
# every layer computed before peft-xlora refused to build one whose gate is never used.
# A shared pin is one row used by every mixture layer (its export is checked in test_vllm_export.py).
PINNED = {
    "llama-dual-per-layer": ("llama", {"layerwise_scalings": True, "top_k_lora": 2}, "per-layer"),
    "llama-single-uniform": ("llama", {**SINGLE, "scaling_pass_layers": 2, "global_scaling_weight": 1.3}, "uniform"),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_vllm_serves_a_pinned_mixture_as_set_static_scalings(tmp_path, name):
    arch, options, pin = PINNED[name]
    case = build_case(str(tmp_path), arch=arch, **options)
    tuner = case.model.base_model
    names = tuner.expert_names
    if isinstance(pin, str) and pin == "per-layer":  # one row per mixture layer, not summing to 1
        pin = torch.rand(len(tuner.mixture_layer_names), len(names), generator=torch.Generator().manual_seed(3)) * 1.5
    served = export_vllm(case.checkpoint, os.path.join(str(tmp_path), "pinned"), base_model=case.base, pin=pin)
    tuner.set_static_scalings({n: 1 / len(names) for n in names} if isinstance(pin, str) else pin)
    new_tokens = NEW_TOKENS + [6] * len(SECOND_WAVE)
    prompts = FIRST_WAVE + SECOND_WAVE
    references = [reference_generate(case.model, p, n) for p, n in zip(prompts, new_tokens)]
    _assert_not_base_model(case, prompts[2:4], references[2:4])
    with vllm_engine(served, **TRACED) as llm:
        first = vllm_generate(llm, FIRST_WAVE, NEW_TOKENS)
        cached: list[int] = []
        second = vllm_generate(llm, SECOND_WAVE, new_tokens[len(FIRST_WAVE) :], cached_tokens=cached)
        found = llm.apply_model(lambda model: (model.compiled, model.xlora is None, len(model.xlora_stacks)))
    assert found[0][:2] == (True, True), found  # traced; no router: every projection at fixed weights
    assert min(cached) >= 64, f"the shared prefix was not served from the cache: {cached} cached tokens"
    for mine, reference in zip(first + second, references):
        assert_same_generation(mine, reference)


def test_eager_engine_serves_the_default_xlora(tmp_path):
    # X-LoRA as published (every option at its default: dual pass, one linear classifier, one softmax over the
    # experts), run eagerly by an engine that does not trace it: the same tokens and log-probs.
    case = build_case(str(tmp_path))
    references = [reference_generate(case.model, p, 8) for p in FIRST_WAVE[:4]]
    with vllm_engine(case.served, enforce_eager=True) as llm:
        ours = vllm_generate(llm, FIRST_WAVE[:4], 8)
        assert llm.apply_model(lambda model: model.do_not_compile) == [True]  # not traced
    for mine, reference in zip(ours, references):
        assert_same_generation(mine, reference)


def test_bfloat16_serving_keeps_the_gate_in_float32(tmp_path):
    # vLLM builds the model with the serving dtype as torch's default: the factors follow it, the classifier must not
    # (low-precision logits would quantise the routing decisions).
    case = build_case(str(tmp_path), layerwise_scalings=True, top_k_lora=2, xlora_depth=2, xlora_size=16)

    def dtypes(model):
        return (
            str(model.xlora.weight0.dtype),
            str(model.xlora.scalings.dtype),
            str(model.xlora_stacks["model__layers__0__self_attn__qkv_proj"].A.dtype),
        )

    with vllm_engine(case.served, dtype="bfloat16") as llm:
        found = llm.apply_model(dtypes)
        ours = vllm_generate(llm, FIRST_WAVE[:2], 4)
    assert found == [("torch.float32", "torch.float32", "torch.bfloat16")]
    assert all(len(tokens) == 4 and all(lp <= 0 for lp in logprobs) for tokens, logprobs in ours)


def test_engine_refuses_vllms_own_lora_and_damaged_exports(tmp_path):
    case = build_case(str(tmp_path), top_k_lora=2)
    with pytest.raises(XLoraServingError, match="--enable-lora"), vllm_engine(case.served, enable_lora=True):
        pass
    # An export whose X-LoRA tensors lost one factor says so instead of serving zeros.
    path = os.path.join(case.served, "xlora.safetensors")
    weights = load_file(path)
    del weights[next(k for k in weights if k.endswith(".lora_B"))]
    save_file(weights, path)
    with pytest.raises(XLoraServingError, match="only \\['lora_A'\\]"), vllm_engine(case.served):
        pass


def test_engine_refuses_an_export_for_another_base_model_before_allocating(tmp_path, monkeypatch):
    # A spec whose sizes are within the bounds but not this base model's: a hidden size (the classifier's input) or
    # an adapted module's shape that differs is refused before the classifier or any factor is allocated.
    import json
    import shutil

    from peft_xlora.serving.vllm import model as plugin_model

    case = build_case(str(tmp_path), top_k_lora=2)
    allocated = []
    for name in ("StackedLora", "XLoraRouter"):
        real = getattr(plugin_model, name)
        monkeypatch.setattr(plugin_model, name, lambda *a, _real=real, **k: allocated.append(_real) or _real(*a, **k))

    def edited(label, edit):
        path = str(tmp_path / label)
        shutil.copytree(case.served, path)
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        edit(config)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
        return path

    wide = edited("wide-spec", lambda config: config["xlora"].update(hidden_size=4096))
    narrow_mlp = edited("narrow-mlp", lambda config: config.update(intermediate_size=96))
    refusals = {
        wide: "reads hidden states of width 4096 but the base model's hidden size is 64",
        narrow_mlp: r"adapts 'model\.layers\.0\.mlp\.\w+_proj' as a (64 -> 128|128 -> 64) module, but in this base "
        r"model it maps (64 -> 96|96 -> 64): the export was made for another base model",
    }
    for path, message in refusals.items():
        with pytest.raises(XLoraServingError, match=message), vllm_engine(path):
            pass
    assert allocated == []
