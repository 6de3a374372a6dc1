"""Tiny random transformers models built from configs, distinct random LoRA experts, and X-LoRA over them."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import peft_xlora

VOCAB = 97


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A 2-layer random Llama (hidden 32), the same weights for the same seed."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer random GPT-2 (Conv1D layers, hidden 32)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}

# Expert recipes per architecture: different ranks, alphas, rsLoRA and target modules.
EXPERT_SPECS = {
    "llama": {
        "math": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "code": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj", "up_proj"], "use_rslora": True},
        "poetry": {"r": 8, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "gate_proj", "embed_tokens"]},
    },
    "gpt2": {
        "math": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"]},
        "code": {"r": 2, "lora_alpha": 2, "target_modules": ["c_attn", "c_fc"]},
        "poetry": {"r": 6, "lora_alpha": 12, "target_modules": ["c_attn", "wte"]},
    },
}


def make_expert(arch: str, spec: dict, seed: int, path: str) -> str:
    """Trains nothing: saves a LoRA with random (non-zero) A and B, distinct per seed."""
    base = BUILDERS[arch]()
    torch.manual_seed(1000 + seed)
    cfg = LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **spec)
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # B is zero-initialised in some layer types even with init_lora_weights=False
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    model.save_pretrained(path)
    return path


def build_xlora(arch: str, expert_dirs: dict, **overrides):
    """A PeftModel with X-LoRA over the three experts of `arch`."""
    # A random gate routes every token differently, so tests of the mixture see distinct, non-uniform scalings.
    kwargs = {
        "task_type": "CAUSAL_LM",
        "adapters": expert_dirs[arch],
        "xlora_depth": 2,
        "xlora_size": 16,
        "classifier_init": "random",
    }
    kwargs.update(overrides)
    config = peft_xlora.XLoraConfig(**kwargs)
    return get_peft_model(BUILDERS[arch](), config)


def input_ids(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def tiny_bart(seed: int = 0):
    """A 1+1-layer random BART (d_model 16): the encoder-decoder model of the combination tests."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
    )  # fmt: skip
    return BartForConditionalGeneration(config).eval()


def make_seq2seq_expert(targets: list[str], seed: int, path: str, r: int = 2) -> str:
    """A distinct random SEQ_2_SEQ_LM LoRA over `tiny_bart`, saved to `path`."""
    base = tiny_bart()
    torch.manual_seed(2000 + seed)
    cfg = LoraConfig(task_type="SEQ_2_SEQ_LM", r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(base, cfg)
    model.save_pretrained(path)
    return path


def seq2seq_inputs(batch: int = 2, src: int = 7, tgt: int = 5, seed: int = 0) -> dict:
    """Source ids, its attention mask and decoder ids of different lengths, for `tiny_bart`."""
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, VOCAB, (batch, src), generator=g),
        "attention_mask": torch.ones(batch, src, dtype=torch.long),
        "decoder_input_ids": torch.randint(3, VOCAB, (batch, tgt), generator=g),
    }
