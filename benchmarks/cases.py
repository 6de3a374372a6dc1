"""The benchmark's workload: a random Llama, random LoRA experts, and one callable per (method, phase).

Every case is built fresh from the same seed, so the four methods run the same base weights and the same experts:

- ``base``: the plain model (prefill, generation).
- ``lora``: one ordinary PEFT LoRA of the experts' rank (training only): what training costs without any mixture.
- ``floor``: the least work a dual-pass mixture can do: a no-grad pass of the inner model (the scaling pass) plus a
  pass of one PEFT LoRA of rank N * r (all experts' ranks in one adapter).
- ``peft``: PEFT's built-in X-LoRA (experts named "0".."N-1", ``use_cache=False``).
- ``ours``: peft-xlora (the dual pass, a full scaling pass).
- ``wide``: one PEFT LoRA of rank N * r and nothing else: the least work a single-pass mixture can do.
- ``single``: peft-xlora with ``routing="single_pass"`` and ``scaling_pass_layers`` = half the decoder layers.
- ``single_uniform``: the same with ``single_pass_static="uniform"``: nothing before layer k trains, so backward
  stops at layer k.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.utils import logging as hf_logging

import peft_xlora

hf_logging.set_verbosity_error()

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("base", "lora", "wide", "floor", "peft", "ours", "single", "single_uniform")
PHASES = ("prefill", "train", "generate")


@dataclass
class Workload:
    """Sizes of one benchmark run. The defaults are the reference workload of issue 4."""

    vocab_size: int = 8192
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    rank: int = 16
    lora_dropout: float = 0.05
    xlora_depth: int = 2
    xlora_size: int = 256
    prefill_batch: int = 1
    prefill_seq: int = 512
    train_batch: int = 2
    train_seq: int = 256
    gen_prompt: int = 64
    gen_new_tokens: list[int] = field(default_factory=lambda: [128, 512])
    dtype: str = "float32"
    device: str = "cpu"
    arch: str = "llama"  # or "mistral"
    single_pass_layers: int | None = None  # k of the single pass; None: half the decoder layers (4 of 8)

    def llama_config(self) -> LlamaConfig:
        """The random base model's config (a `MistralConfig` of the same sizes when `arch` is "mistral")."""
        config_class = MistralConfig if self.arch == "mistral" else LlamaConfig
        return config_class(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=max(4096, self.prefill_seq, self.gen_prompt + max(self.gen_new_tokens, default=0)),
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            use_cache=False,  # PEFT's built-in X-LoRA refuses True; generation sets it per call
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the JSON record."""
        return asdict(self)


SMOKE = Workload(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    rank=4,
    xlora_size=16,
    prefill_seq=16,
    train_batch=2,
    train_seq=16,
    gen_prompt=8,
    gen_new_tokens=[4],
)


def torch_dtype(work: Workload) -> torch.dtype:
    """The dtype named by the workload."""
    return getattr(torch, work.dtype)


def build_base(work: Workload) -> LlamaForCausalLM:
    """The random base model; the same weights on every call."""
    torch.manual_seed(0)
    model_class = MistralForCausalLM if work.arch == "mistral" else LlamaForCausalLM
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype(work))  # built in the target dtype: no float32 copy of a large model
    try:
        with torch.device(work.device):
            model = model_class(work.llama_config())
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def make_experts(work: Workload, n: int, root: str) -> dict[str, str]:
    """Saves `n` distinct random LoRA experts (rank `work.rank`, all seven projections) under `root`.

    One PEFT model is built and its factors re-drawn per expert, which is much faster than building N models.

    Returns:
        {"0": path, ..., "n-1": path}: numeric names, the only ones PEFT's built-in X-LoRA accepts.
    """
    base = build_base(work)
    config = LoraConfig(
        r=work.rank,
        lora_alpha=2 * work.rank,
        lora_dropout=work.lora_dropout,
        target_modules=TARGETS,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    lora_params = [p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]
    paths = {}
    for i in range(n):
        path = os.path.join(root, f"expert-{i}")
        if not os.path.exists(os.path.join(path, "adapter_model.safetensors")):
            torch.manual_seed(1000 + i)
            with torch.no_grad():
                for p in lora_params:
                    # Kaiming-like scale for A and B, so the updates are of the size trained LoRAs have.
                    p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            model.save_pretrained(path)
        paths[str(i)] = path
    return paths


@dataclass
class Case:
    """A built model and the step to time.

    Attributes:
        step: Runs one timed operation (prefill, training step or generation).
        model: The model, kept so it stays alive while timed.
        info: Facts worth recording (e.g. whether generation used the KV cache).
    """

    step: Callable[[], Any]
    model: torch.nn.Module
    info: dict[str, Any] = field(default_factory=dict)


def _ids(work: Workload, batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, work.vocab_size, (batch, seq), generator=g).to(work.device)


def _build_model(
    work: Workload, method: str, n: int, experts: dict[str, str], train: bool, options: dict[str, Any] | None = None
) -> torch.nn.Module:
    base = build_base(work)
    if method == "base":
        return base
    if method in ("lora", "floor", "wide"):
        rank = work.rank if method == "lora" else n * work.rank
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=work.lora_dropout,
            target_modules=TARGETS,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(base, config)
    if method == "peft":
        from peft import XLoraConfig as PeftXLoraConfig

        config = PeftXLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=work.hidden_size,
            adapters=experts,
            xlora_depth=work.xlora_depth,
            xlora_size=work.xlora_size,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(base, config)
    if method in ("ours", "single", "single_uniform"):
        # `ours` runs the whole model in its scaling pass, as the built-in does: the same work, side by side.
        routing: dict = {"scaling_pass_layers": None}
        if method != "ours":
            k = work.single_pass_layers or max(1, work.num_hidden_layers // 2)
            routing = {"routing": "single_pass", "scaling_pass_layers": k}
            routing["single_pass_static"] = "uniform" if method == "single_uniform" else "learned"
        config = peft_xlora.XLoraConfig(
            task_type="CAUSAL_LM",
            adapters=experts,
            xlora_depth=work.xlora_depth,
            xlora_size=work.xlora_size,
            **{**routing, **(options or {})},
        )
        return get_peft_model(base, config)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM head (what the scaling pass runs), under a PEFT model or not."""
    while hasattr(model, "base_model") and model.base_model is not model:
        model = model.base_model
    while not hasattr(model, "layers") and hasattr(model, "model"):
        model = model.model
    return model


def build_case(
    work: Workload, method: str, phase: str, n: int, experts: dict[str, str], options: dict[str, Any] | None = None
) -> Case:
    """Builds the model of `method` and the timed step of `phase` (`n` experts; ignored by base and lora).

    `options` are extra `XLoraConfig` fields for peft-xlora's methods (e.g. ``{"top_k_lora": 2}``).
    """
    if (method, phase) not in supported(method, phase):
        raise ValueError(f"{method} has no {phase} case")
    train = phase == "train"
    model = _build_model(work, method, n, experts, train, options)
    model.train(train)
    info: dict[str, Any] = {}

    if phase == "prefill":
        ids = _ids(work, work.prefill_batch, work.prefill_seq, seed=1)
        if method == "floor":
            # Only the stack runs in the floor's first pass: the scaling pass needs no logits.
            inner = _inner(model)

            def step():
                with torch.no_grad(), model.disable_adapter():
                    inner(input_ids=ids)
                return model(input_ids=ids).logits

        else:

            def step():
                return model(input_ids=ids).logits

        return Case(_no_grad(step), model, info)

    if phase == "train":
        ids = _ids(work, work.train_batch, work.train_seq, seed=2)
        params = [p for p in model.parameters() if p.requires_grad]
        info["trainable_params"] = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        inner = _inner(model)

        def step():
            if method == "floor":
                with torch.no_grad(), model.disable_adapter():
                    inner(input_ids=ids)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        return Case(step, model, info)

    # generate: greedy, exactly `new` tokens, the KV cache where the method allows it.
    prompt = _ids(work, 1, work.gen_prompt, seed=3)
    # PEFT's built-in X-LoRA refuses the cache: every new token re-runs both its passes over the whole sequence.
    use_cache = method != "peft"
    info["use_cache_requested"] = use_cache

    info["steps"] = {new: generate_step(model, prompt, new, use_cache=use_cache) for new in work.gen_new_tokens}
    return Case(lambda: None, model, info)


def supported(method: str, phase: str) -> set[tuple[str, str]]:
    """The (method, phase) pairs the harness measures."""
    pairs = {(m, "prefill") for m in ("base", "wide", "floor", "peft", "ours", "single")}
    pairs |= {(m, "train") for m in ("lora", "wide", "floor", "peft", "ours", "single", "single_uniform")}
    pairs |= {(m, "generate") for m in ("base", "wide", "peft", "ours", "single")}
    return pairs


def generate_step(model: torch.nn.Module, prompt: torch.Tensor, new: int, **kwargs: Any) -> Callable[[], Any]:
    """A no-grad greedy `generate` of exactly `new` tokens after `prompt` (kwargs go to `generate`)."""

    def step():
        with torch.no_grad():
            return model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                **kwargs,
            )

    return step


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def wrapped():
        with torch.no_grad():
            return fn()

    return wrapped
