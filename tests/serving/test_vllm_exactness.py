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
    TRACED,
    assert_same_generation,
    build_case,
    prompts_of_lengths,
    reference_generate,
    vllm_engine,
    vllm_generate,
)

from peft_xlora.serving.vllm import XLoraServingError

SINGLE = {"routing": "single_pass"}
# Every gating option that changes outputs, for both routings, on Llama; each other architecture once per routing.
CASES = {
    "llama-dual-dense": ("llama", {}),
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
# A single pass over every layer (static weights everywhere, the gate never used) is refused at build since the
# table of what combines (issue 22); serving a pinned mixture is exported from a pinned gate instead.
_DUAL = {"layerwise_scalings": True, "top_k_lora": 2, "xlora_depth": 2, "xlora_size": 16}
_SINGLE = {**SINGLE, "scaling_pass_layers": 2, "layerwise_scalings": True, "top_k_lora": 2}
for _arch in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"):
    CASES[f"{_arch}-dual"] = (_arch, _DUAL)
    CASES[f"{_arch}-single"] = (_arch, _SINGLE)

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


@pytest.mark.parametrize("name", list(CASES))
def test_vllm_serves_what_peft_xlora_computes(tmp_path, name):
    arch, options = CASES[name]
    case = build_case(str(tmp_path), arch=arch, **options)
    new_tokens = NEW_TOKENS + [6] * len(SECOND_WAVE)
    prompts = FIRST_WAVE + SECOND_WAVE
    references = [reference_generate(case.model, p, n) for p, n in zip(prompts, new_tokens)]
    _assert_not_base_model(case, prompts[2:4], references[2:4])
    with vllm_engine(case.served, **TRACED) as llm:
        first = vllm_generate(llm, FIRST_WAVE, NEW_TOKENS)
        cached: list[int] = []
        second = vllm_generate(llm, SECOND_WAVE, new_tokens[len(FIRST_WAVE) :], cached_tokens=cached)
        assert llm.apply_model(lambda model: model.compiled) == [True]  # traced, not run eagerly
    assert min(cached) >= 64, f"the shared prefix was not served from the cache: {cached} cached tokens"
    for mine, reference in zip(first + second, references):
        assert_same_generation(mine, reference)


@pytest.mark.parametrize("routing", ["dual_pass", "single_pass"])
def test_scalings_match_peft_xlora_token_by_token(tmp_path, routing):
    # A direct look at the routing: the router's buffer after a one-step prefill holds, for each prompt token,
    # peft-xlora's scalings of the same token (the late layers' rows, in the single pass).
    options = {"layerwise_scalings": True, "top_k_lora": 2, "xlora_depth": 2, "xlora_size": 16}
    if routing == "single_pass":
        options.update(routing="single_pass", scaling_pass_layers=2)
    case = build_case(str(tmp_path), **options)
    prompt = prompts_of_lengths([19], seed=5)[0]
    with torch.no_grad():
        case.model(input_ids=torch.tensor([prompt]))
    reference = case.model.base_model.get_latest_scalings()[0]  # (seq, n_layers, n_experts)
    with vllm_engine(case.served, **TRACED) as llm:
        vllm_generate(llm, [prompt], 1)  # one forward: the prompt's prefill
        (ours,) = llm.apply_model(lambda model: model.xlora.scalings[: len(prompt)].clone())
    ours = ours.view(len(prompt), -1, reference.shape[-1])  # (seq, n_layers, n_experts)
    late = slice(None)
    if routing == "single_pass":
        tuner = case.model.base_model
        late = sorted(tuner.router.late_layers)
        assert late and len(late) < len(tuner.mixture_layer_names)
    torch.testing.assert_close(ours[:, late], reference[:, late].float(), atol=1e-5, rtol=1e-5)


def test_eager_and_traced_engines_agree(tmp_path):
    # The same dual-pass model, run eagerly by an engine that does not trace it: the same tokens and log-probs.
    case = build_case(str(tmp_path), layerwise_scalings=True, scaling_pass_value=0.3, top_k_lora=2)
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
