"""Shared helpers of the serving tests: tiny random Llama-family models, X-LoRA checkpoints over distinct random
experts, their vLLM exports, peft-xlora's own reference generations, and in-process vLLM engines.

Not a conftest.py, and independent of tests/conftest.py and its helpers: the rest of the suite imports its conftest
as the module `conftest` (a second one here would shadow it), and the vLLM environment runs these tests with
`--noconftest`, so that nothing the main suite's conftest needs has to exist beside vLLM.

The references come from peft-xlora itself, in the same process: the vLLM environment (scripts/vllm_env.sh) has
peft 0.21.2 and peft-xlora installed beside vLLM's transformers, so each test builds the X-LoRA `PeftModel`, takes its
cached greedy `generate` in float32 as the reference, saves and exports it, and compares vLLM's output with it. No
reference file can go stale, and every option set is checked against the code users train with.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass

# vLLM on these 2-core machines: engine in this process, no thread pinning, 1 GiB of KV cache, never the Hub. The CI
# flag keeps vLLM's CPU default of tracing the model once with torch.compile (guards dropped), but runs the traced
# graph eagerly instead of compiling it with inductor (minutes per engine on 2 cores): every test runs the model as
# vLLM traces it, which is where a design that picks its attention by a Python flag goes wrong.
# On a GPU (PEFT_XLORA_VLLM_DEVICE=cuda, scripts/vllm_gpu.sh: untested) vLLM's own defaults apply: compiled, with
# CUDA graphs.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PEFT_XLORA_VLLM_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_CI_ENV", "1")

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import peft_xlora
from peft_xlora.serving.vllm import export_vllm
from peft_xlora.serving.vllm.ops import Block, Partition, StackedLora

VOCAB = 97
# vLLM's CPU attention needs a head size of at least 32: hidden 64 with 2 heads.
_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# Gemma 2 and 3 alternate sliding-window and full attention, with a window shorter than the longest prompts; Gemma 2
# soft-caps its attention logits and its final logits; Qwen 3 normalises q and k per head; Phi-3 has fused qkv_proj
# and gate_up_proj in transformers too.
_WINDOW = {"sliding_window": 16, "head_dim": 32}
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True, "use_sliding_window": False}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32, "use_sliding_window": False}),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {**_WINDOW, "query_pre_attn_scalar": 32}),
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {**_WINDOW, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    ),
    "phi3": (Phi3Config, Phi3ForCausalLM, {}),
}

# Distinct experts: different ranks, alphas, rsLoRA, rank/alpha patterns and target modules (the embedding too).
EXPERT_SPECS = {
    "math": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "code": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj", "up_proj"], "use_rslora": True},
    "poetry": {
        "r": 8,
        "lora_alpha": 4,
        "target_modules": ["k_proj", "gate_proj", "embed_tokens", "down_proj"],
        "rank_pattern": {"gate_proj": 3},
        "alpha_pattern": {"k_proj": 5},
    },
}

# Four experts for sparse top-k (2 of 4 kept): the fourth adapts every module, and the embedding and o_proj get a third
# expert each, so every projection holds more than 2 experts (each computes sparsely with topk_compute="sparse") and
# mixes different ranks, some experts absent from some of its modules.
_EVERY_MODULE = ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPARSE_EXPERT_SPECS = {
    "math": {**EXPERT_SPECS["math"], "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens"]},
    "code": {**EXPERT_SPECS["code"], "target_modules": ["q_proj", "o_proj", "up_proj", "embed_tokens"]},
    "poetry": EXPERT_SPECS["poetry"],
    "law": {"r": 6, "lora_alpha": 12, "target_modules": _EVERY_MODULE},
}


def expert_specs(arch: str) -> dict:
    """The experts of an architecture: `EXPERT_SPECS`, with Phi-3's fused module names, and none on the embedding for
    Gemma 2 (vLLM's Gemma 2 uses its embedding module as the LM head, so the plugin refuses experts there)."""
    if arch == "phi3":
        return {
            "math": {**EXPERT_SPECS["math"], "target_modules": ["qkv_proj", "down_proj"]},
            "code": {**EXPERT_SPECS["code"], "target_modules": ["qkv_proj", "o_proj", "gate_up_proj"]},
            "poetry": {
                "r": 8,
                "lora_alpha": 4,
                "target_modules": ["gate_up_proj", "embed_tokens", "down_proj"],
                "rank_pattern": {"gate_up_proj": 3},
            },
        }
    if arch == "gemma2":
        poetry = dict(EXPERT_SPECS["poetry"], target_modules=["k_proj", "gate_proj", "down_proj"])
        return {**EXPERT_SPECS, "poetry": poetry}
    return EXPERT_SPECS


def tiny_base(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A random tiny model of `arch` (3 layers, hidden 64), the same weights for the same seed and overrides."""
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**_COMMON, **extra, **overrides})).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary: "<pad>", "<s>", "</s>", then "w3" ... "w96"."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<pad>")


def save_base(arch: str, path: str, **overrides) -> str:
    """Saves the tiny base model with a word-level tokenizer ("w3 w4 ..."), as a model folder users would have."""
    tiny_base(arch, **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_experts(arch: str, root: str, specs: dict | None = None, **overrides) -> dict[str, str]:
    """Saves one random LoRA per spec (A and B both random, a distinct seed each); returns name -> folder."""
    paths = {}
    for seed, (name, spec) in enumerate((specs or expert_specs(arch)).items()):
        torch.manual_seed(1000 + seed)
        model = get_peft_model(
            tiny_base(arch, **overrides), LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **spec)
        )
        with torch.no_grad():  # some layer types zero B even with init_lora_weights=False
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    param.copy_(torch.randn_like(param) * 0.3)
        path = os.path.join(root, f"expert-{name}")
        model.save_pretrained(path)
        paths[name] = path
    return paths


@dataclass
class Case:
    """One exported X-LoRA model: the peft-xlora model (the reference), its checkpoint, base and vLLM folders."""

    model: PeftModel
    checkpoint: str
    base: str
    served: str


def build_case(root: str, arch: str = "llama", experts: dict[str, str] | None = None, base_overrides=None, **options):
    """Builds X-LoRA over the experts (a random classifier, so routing is far from uniform), saves and exports it.

    Args:
        root: A folder for the base, checkpoint and export.
        arch: A key of `ARCHS`.
        experts: Name -> LoRA folder; default: fresh ones from `EXPERT_SPECS`.
        base_overrides: Config overrides of the tiny base model.
        **options: XLoraConfig options.
    """
    base_overrides = base_overrides or {}
    experts = experts or make_experts(arch, root, **base_overrides)
    kwargs = {"task_type": "CAUSAL_LM", "adapters": experts, "classifier_init": "random", **options}
    torch.manual_seed(7)
    model = get_peft_model(tiny_base(arch, **base_overrides), peft_xlora.XLoraConfig(**kwargs)).eval()
    static = getattr(model.base_model.xlora_classifier, "single_pass_static", None)
    if static is not None and static.learned:
        with torch.no_grad():  # trained static weights are far from the uniform start
            static.logits.copy_(torch.randn(static.logits.shape) * 1.5)
    base = save_base(arch, os.path.join(root, "base"), **base_overrides)
    checkpoint = os.path.join(root, "checkpoint")
    peft_xlora.save_pretrained(model, checkpoint)
    served = export_vllm(checkpoint, os.path.join(root, "served"), base_model=base)
    return Case(model, checkpoint, base, served)


# ---------------------------------------------------------------------------------------------------- references


@torch.no_grad()
def reference_generate(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities from `model.generate` (cached, float32).

    Like vLLM's `ignore_eos`, generation runs to `max_new_tokens` and the EOS token may be generated: the stop token
    is one outside the vocabulary. (`min_new_tokens` would instead forbid EOS, and the two would differ wherever EOS
    is the greedy choice; transformers falls back to the model's EOS when the stop token is None.)
    """
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = VOCAB  # ids run 0..VOCAB-1: never generated
    config.pad_token_id = 0
    out = model.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        generation_config=config,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


# ---------------------------------------------------------------------------------------------------- vLLM


#: Engine options of the exactness tests: traced (see the top of this file), a token budget of 32 per step so that
#: longer prompts are prefilled in chunks beside other requests' decodes, and prefix caching with 32-token blocks.
TRACED = {
    "enforce_eager": False,
    "enable_chunked_prefill": True,
    "max_num_batched_tokens": 32,
    "enable_prefix_caching": True,
    "block_size": 32,
}


@contextlib.contextmanager
def vllm_engine(served: str, **kwargs) -> Iterator:
    """An in-process `vllm.LLM` on the export, float32, eager unless told; shut down and freed on exit.

    Args:
        served: The exported folder.
        **kwargs: More `vllm.LLM` options (they override the defaults here).
    """
    from vllm import LLM

    from peft_xlora.serving.vllm import register

    register()  # what the vllm.general_plugins entry point does in every vLLM process
    options = {
        "model": served,
        "dtype": "float32",
        "enforce_eager": True,
        "max_model_len": 128,
        "max_num_seqs": 16,
        "seed": 0,
        "skip_tokenizer_init": True,
    }
    options.update(kwargs)
    llm = LLM(**options)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def vllm_generate(
    llm, prompts: list[list[int]], max_tokens: int | list[int], cached_tokens: list[int] | None = None
) -> list[tuple[list[int], list[float]]]:
    """Greedy generations of all prompts submitted at once (vLLM batches them continuously).

    Args:
        llm: The engine.
        prompts: Token ids per request.
        max_tokens: New tokens per request (one number for all, or one per request).
        cached_tokens: If given, receives each request's number of prompt tokens served from the prefix cache.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, logprobs=1, ignore_eos=True, detokenize=False) for n in lengths
    ]
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    out = []
    for result in results:
        completion = result.outputs[0]
        if cached_tokens is not None:
            cached_tokens.append(result.num_cached_tokens or 0)
        tokens = list(completion.token_ids)
        out.append((tokens, [completion.logprobs[i][t].logprob for i, t in enumerate(tokens)]))
    return out


def assert_same_generation(ours, reference, atol: float = 1e-4) -> None:
    """Same greedy tokens, and log-probabilities within `atol`."""
    tokens, logprobs = ours
    ref_tokens, ref_logprobs = reference
    assert tokens == ref_tokens, f"vLLM generated {tokens}, peft-xlora {ref_tokens}"
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=atol, rtol=0)


def prompts_of_lengths(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Random token-id prompts (ids 3..96: no pad/bos/eos) of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


# ------------------------------------------------------------------ one projection's stacked experts, by hand

# Blocks of a projection: (module, expert) -> (rank, output partitions covered, ...), factors (module, expert) ->
# (A (rank, in), B (rows, rank), scale). The op-level tests of the stacked and the sparse mixture share these builders.


def random_factors(blocks: dict, outs: tuple[int, ...], n_in: int, seed: int, row_parallel: bool, scale) -> dict:
    """Random A and B per block (B over every output row when row-parallel), with `scale(key, block)` as its scale."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (rank, parts, *_) in blocks.items():
        rows = sum(outs) if row_parallel else sum(outs[p] for p in parts)
        a, b = torch.randn(rank, n_in, generator=g), torch.randn(rows, rank, generator=g)
        out[key] = (a, b, scale(key, blocks[key]))
    return out


def shard_stack(
    blocks: dict,
    factors: dict,
    *,
    outs: tuple[int, ...],
    n_in: int,
    n_experts: int,
    slot: dict[str, int],
    shards: int = 1,
    rank: int = 0,
    row_parallel: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """One tensor-parallel shard's loaded StackedLora (column-parallel by default, like gate_up_proj), scales in B."""
    if row_parallel:
        width = n_in // shards
        partitions = [Partition(0, sum(outs), (0, sum(outs)))]
        a_cols, in_features = (rank * width, (rank + 1) * width), width
    else:
        partitions, start = [], 0
        for size in outs:
            local = size // shards
            partitions.append(Partition(start, start + local, (rank * local, (rank + 1) * local)))
            start += local
        a_cols, in_features = (0, n_in), n_in
    stacked = []
    for (module, e), (r, parts, *_) in blocks.items():
        parts = [0] if row_parallel else parts
        sizes = [sum(outs)] if row_parallel else [outs[p] for p in parts]
        scale = factors[(module, e)][2]
        stacked.append(Block(f"{module}.{e}", module, e, r, scale, slot[module] * n_experts + e, parts, sizes))
    stack = StackedLora(in_features, a_cols, partitions, stacked, dtype)
    for (module, e), (a, b, _) in factors.items():
        stack.load(f"{module}.{e}", a.to(dtype), b.to(dtype))
    stack.fold_scales()
    return stack


def join_column_shards(shard_outs: list[torch.Tensor], outs: tuple[int, int]) -> torch.Tensor:
    """Two column-parallel shards' outputs of a two-partition projection, put back in the full output's order."""
    halves = [o // 2 for o in outs]
    first = torch.cat([s[:, : halves[0]] for s in shard_outs], -1)
    second = torch.cat([s[:, halves[0] :] for s in shard_outs], -1)
    return torch.cat([first, second], -1)
