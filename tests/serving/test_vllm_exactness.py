"""The vLLM plugin computes what peft-xlora computes: greedy tokens equal, log-probabilities within 1e-4 (float32).

Every test builds a tiny random model, X-LoRA over three distinct random experts (different ranks, alphas, rsLoRA,
rank/alpha patterns and targets, the input embedding among them), takes peft-xlora's cached `generate` as the
reference, exports the checkpoint and runs it in an in-process CPU vLLM engine.
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
    assert_same_generation,
    build_case,
    match_scaling_pass,
    prompts_of_lengths,
    reference_generate,
    vllm_engine,
    vllm_generate,
)

from peft_xlora.serving.vllm import XLoraServingError

# Every gating option that changes outputs, alone or combined.
OPTION_SETS = {
    "dense": {},
    "deep-layerwise-temperature": {
        "xlora_depth": 3,
        "xlora_size": 24,
        "layerwise_scalings": True,
        "softmax_temperature": 0.5,
    },
    "top-k": {"top_k_lora": 2, "xlora_depth": 2, "xlora_size": 16},
    "softmax-top-k-layerwise": {"top_k_lora": 2, "enable_softmax_topk": True, "layerwise_scalings": True},
    "top-1": {"top_k_lora": 1, "softmax_temperature": 2.0},
    "scaling-pass-value-and-global-weight": {
        "scaling_pass_value": 0.5,
        "global_scaling_weight": 1.7,
        "xlora_depth": 2,
        "xlora_size": 16,
    },
    "scaling-pass-layers": {"scaling_pass_layers": 2, "layerwise_scalings": True, "scaling_pass_value": 0.3},
    "no-softmax": {"enable_softmax": False, "global_scaling_weight": 0.6},
}
PROMPTS = prompts_of_lengths([1, 5, 17, 40])
NEW_TOKENS = 12


def _references(case, prompts, new_tokens):
    config = case.model.base_model.xlora_config
    match_scaling_pass(case.model, config)
    if isinstance(new_tokens, int):
        new_tokens = [new_tokens] * len(prompts)
    return [reference_generate(case.model, p, n) for p, n in zip(prompts, new_tokens)]


def _assert_not_base_model(case, prompts, references) -> None:
    """The experts change the outputs: otherwise agreement would say nothing about the mixture."""
    with case.model.disable_adapter():
        base = [reference_generate(case.model, p, len(r[0])) for p, r in zip(prompts, references)]
    gaps = [max(abs(a - b) for a, b in zip(r[1], b_[1])) for r, b_ in zip(references, base)]
    assert max(gaps) > 1e-2, f"the X-LoRA model generates like its base model (log-prob gaps {gaps})"


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_greedy_generation_equals_peft_xlora(tmp_path, name):
    case = build_case(str(tmp_path), **OPTION_SETS[name])
    references = _references(case, PROMPTS, NEW_TOKENS)
    _assert_not_base_model(case, PROMPTS, references)
    with vllm_engine(case.served) as llm:
        ours = vllm_generate(llm, PROMPTS, NEW_TOKENS)
    for mine, reference in zip(ours, references):
        assert_same_generation(mine, reference)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures_equal_peft_xlora(tmp_path, arch):
    # Qwen2: biased qkv projection and tied embeddings; Mistral: vLLM's Mistral classes.
    case = build_case(str(tmp_path), arch=arch, layerwise_scalings=True, top_k_lora=2, xlora_depth=2, xlora_size=16)
    references = _references(case, PROMPTS, NEW_TOKENS)
    _assert_not_base_model(case, PROMPTS, references)
    with vllm_engine(case.served) as llm:
        ours = vllm_generate(llm, PROMPTS, NEW_TOKENS)
    for mine, reference in zip(ours, references):
        assert_same_generation(mine, reference)


def test_concurrent_requests_each_equal_their_solo_run(tmp_path):
    case = build_case(str(tmp_path), layerwise_scalings=True, top_k_lora=2, xlora_depth=2, xlora_size=16)
    lengths = [1, 3, 8, 13, 21, 34, 2, 5, 55, 9, 30, 17, 44, 6]
    prompts = prompts_of_lengths(lengths, seed=1)
    new_tokens = [3 + (7 * i) % 19 for i in range(len(prompts))]  # requests finish at different steps
    # A small token budget mixes prefills and decodes of different requests in the same steps; no prefix caching,
    # so that each solo run computes its own KV cache.
    options = {"max_num_batched_tokens": 48, "enable_prefix_caching": False}
    with vllm_engine(case.served, **options) as llm:
        together = vllm_generate(llm, prompts, new_tokens)
        solo = [vllm_generate(llm, [p], [n])[0] for p, n in zip(prompts, new_tokens)]
    for mine, alone in zip(together, solo):
        assert_same_generation(mine, alone, atol=1e-5)
    picked = [0, 5, 8, 12]
    references = _references(case, [prompts[i] for i in picked], [new_tokens[i] for i in picked])
    for i, reference in zip(picked, references):
        assert_same_generation(together[i], reference)


def test_chunked_prefill_at_a_small_chunk_size(tmp_path):
    case = build_case(str(tmp_path), layerwise_scalings=True, scaling_pass_value=0.4, xlora_depth=2, xlora_size=16)
    prompts = prompts_of_lengths([70, 45, 23], seed=2)
    references = _references(case, prompts, NEW_TOKENS)
    # 8 tokens per step: each prompt is prefilled over several steps, beside the other requests' chunks and decodes.
    options = {"enable_chunked_prefill": True, "max_num_batched_tokens": 8, "max_num_seqs": 4}
    with vllm_engine(case.served, **options) as llm:
        ours = vllm_generate(llm, prompts, NEW_TOKENS)
    for mine, reference in zip(ours, references):
        assert_same_generation(mine, reference)


def test_prefix_cache_hits_keep_the_scaling_pass_exact(tmp_path):
    # Both passes' KV blocks are cached together; a request whose prefix hits the cache runs the scaling pass only
    # on its new tokens, against the cached scaling-pass keys and values.
    case = build_case(str(tmp_path), layerwise_scalings=True, top_k_lora=2)
    shared = prompts_of_lengths([70], seed=3)[0]  # two full 32-token blocks and a partial one
    tails = prompts_of_lengths([1, 7, 20], seed=4)
    prompts = [shared + tail for tail in tails]
    references = _references(case, [shared, *prompts], NEW_TOKENS)
    with vllm_engine(case.served, enable_prefix_caching=True, block_size=32) as llm:
        first = vllm_generate(llm, [shared], NEW_TOKENS)  # fills the cache with the shared blocks
        cached: list[int] = []
        rest = vllm_generate(llm, prompts, NEW_TOKENS, cached_tokens=cached)
    assert min(cached) >= 64, f"the shared prefix was not served from the cache: {cached} cached tokens"
    for mine, reference in zip(first + rest, references):
        assert_same_generation(mine, reference)


def test_dynamo_traced_forward_equals_peft_xlora(tmp_path, monkeypatch):
    # vLLM's CPU default traces the decoder stack once with torch.compile (@support_torch_compile); the CI flag
    # keeps the traced graph but runs it eagerly instead of through inductor, which is what a GPU's CUDA graphs
    # need first: a forward without graph breaks on tensor values.
    monkeypatch.setenv("VLLM_CPU_CI_ENV", "1")
    case = build_case(str(tmp_path), layerwise_scalings=True, top_k_lora=2, enable_softmax_topk=True)
    references = _references(case, PROMPTS, NEW_TOKENS)
    with vllm_engine(case.served, enforce_eager=False) as llm:
        ours = vllm_generate(llm, PROMPTS, NEW_TOKENS)
        assert llm.apply_model(lambda model: model.model.compiled) == [True]  # traced, not run eagerly
    for mine, reference in zip(ours, references):
        assert_same_generation(mine, reference)


def test_scalings_match_peft_xlora_token_by_token(tmp_path):
    # A direct look at the routing: the plugin's scalings for a prompt (taken from the model inside the engine)
    # equal peft-xlora's get_latest_scalings for the same tokens.
    case = build_case(str(tmp_path), layerwise_scalings=True, top_k_lora=2, xlora_depth=2, xlora_size=16)
    prompt = prompts_of_lengths([19], seed=5)[0]
    with torch.no_grad():
        case.model(input_ids=torch.tensor([prompt]))
    reference = case.model.base_model.get_latest_scalings()[0]  # (seq, n_layers, n_experts)
    captured = []

    def record(model):  # runs inside the engine's worker (in this process: the engine is in-process)
        inner = model.model
        original = inner.xlora_scalings

        def recording(*args, **kwargs):
            out = original(*args, **kwargs)
            captured.append(out.detach().clone())
            return out

        inner.xlora_scalings = recording  # an instance attribute: the forward's self.xlora_scalings finds it first

    with vllm_engine(case.served, enable_prefix_caching=False) as llm:
        llm.apply_model(record)
        vllm_generate(llm, [prompt], 1)
    prefill = next(s for s in captured if s.shape[0] == len(prompt))  # (seq, n_layers * n_experts)
    torch.testing.assert_close(prefill.view_as(reference), reference.float(), atol=1e-5, rtol=1e-5)


def test_bfloat16_serving_keeps_the_gate_in_float32(tmp_path):
    # vLLM builds the model with the serving dtype as torch's default: the factors follow it, the classifier must not
    # (low-precision logits would quantise the routing decisions).
    case = build_case(str(tmp_path), layerwise_scalings=True, top_k_lora=2, xlora_depth=2, xlora_size=16)

    def dtypes(model):
        inner = model.model
        return str(inner.xlora_classifier_w0.dtype), str(inner.xlora_stacks["0_qkv_proj"].A.dtype)

    with vllm_engine(case.served, dtype="bfloat16") as llm:
        found = llm.apply_model(dtypes)
        ours = vllm_generate(llm, PROMPTS[:2], 4)
    assert found == [("torch.float32", "torch.bfloat16")]
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
