"""Tiny sequence classifiers (Llama-style `score`, BERT-style `classifier`) and SEQ_CLS LoRA experts with heads."""

from __future__ import annotations

import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

from peft_xlora import XLoraConfig
from peft_xlora.core.heads import XLoraHead

VOCAB, BATCH, SEQ = 61, 3, 7
LLAMA = {
    "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64, "pad_token_id": 0,
    "num_labels": 3,
}  # fmt: skip
BERT = {
    "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "max_position_embeddings": 64, "num_labels": 3, "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}  # fmt: skip
ARCHS = {
    "llama": (tf.LlamaConfig, tf.LlamaForSequenceClassification, LLAMA, (["q_proj", "v_proj"], ["o_proj", "up_proj"])),
    "bert": (tf.BertConfig, tf.BertForSequenceClassification, BERT, (["query", "value"], ["intermediate.dense"])),
}
HEAD = {"llama": "score", "bert": "classifier"}


def build(arch: str, **overrides) -> torch.nn.Module:
    config_cls, model_cls, config, _ = ARCHS[arch]
    torch.manual_seed(0)
    return model_cls(config_cls(**{**config, **overrides})).eval()


def save_expert(arch: str, path, seed: int, targets: list[str], task_type: str | None = "SEQ_CLS", **lora) -> str:
    """A LoRA expert with random factors and, for SEQ_CLS, a random head of its own (distinct per seed)."""
    num_labels = lora.pop("num_labels", None)
    model = build(arch, **({"num_labels": num_labels} if num_labels else {}))
    torch.manual_seed(100 + seed)
    peft_model = get_peft_model(
        model, LoraConfig(task_type=task_type, r=2 + seed, lora_alpha=4, target_modules=targets, **lora)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    peft_model.save_pretrained(path)
    return str(path)


def xlora(arch: str, paths: dict, **overrides):
    kwargs = {
        "task_type": "SEQ_CLS", "adapters": paths, "xlora_depth": 2, "xlora_size": 8, "xlora_dropout_p": 0.0,
        "classifier_init": "random",
    }  # fmt: skip
    return get_peft_model(build(arch), XLoraConfig(**{**kwargs, **overrides})).eval()


def inputs(arch: str) -> dict:
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, -2:] = 0  # right padding: the Llama-style head reads row 1's token SEQ - 3
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def head_of(model) -> XLoraHead:
    return model.get_base_model().get_submodule(HEAD[model.get_base_model().config.model_type])


def expert_heads(head: XLoraHead) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    bias = head.xlora_head_bias
    return [(w.detach(), None if bias is None else bias[e].detach()) for e, w in enumerate(head.xlora_head_weight)]


def save_experts(root) -> dict[str, dict[str, str]]:
    """Per architecture: two SEQ_CLS experts with their own heads, on different modules and ranks."""
    return {
        arch: {f"e{i}": save_expert(arch, root / f"{arch}{i}", i, targets) for i, targets in enumerate(spec[3])}
        for arch, spec in ARCHS.items()
    }
