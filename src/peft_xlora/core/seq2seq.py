"""Encoder-decoder models (BART, T5): each stack is gated by the scalings of its own tokens.

An encoder-decoder model runs two sequences: the source through the encoder, the target through the decoder. X-LoRA
runs the dual pass once per stack, with one shared classifier:

* the encoder: its scaling pass (every expert at `scaling_pass_value * global_scaling_weight`) gives the encoder's
  last hidden state, the classifier turns it into per-source-token scalings, and the encoder's mixture layers read
  them. A forward pre-hook on the encoder does this, so it also happens when `generate` calls the encoder alone. The
  encoder's output carries the
  scaling pass's hidden state and the scalings (`SCALING_HIDDEN`, `SCALINGS`), which the decoder needs.
* the decoder: its scaling pass reads the target tokens and cross-attends to the encoder's *scaling-pass* output (so it
  is exactly the scaling pass of the whole model); its last hidden state gives per-target-token scalings for the
  decoder's mixture layers. The key and value projections of the decoder's cross-attention read the source tokens, so
  they use the source tokens' scalings.

With a KV cache, the scaling pass keeps its own `EncoderDecoderCache` (self-attention and cross-attention) inside the
main one, `XLoraEncoderDecoderCache`, which follows every reordering transformers' generation applies, as
`generation.XLoraCache` does for decoder-only models.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from .generation import CACHE_KWARGS, _cache_kwarg_name, sync_scaling_cache
from .routing import Routing

#: Keys X-LoRA adds to the encoder's output: the scaling pass's last hidden state (batch, src, hidden), the source
#: tokens' scalings (batch, src, n_layers|1, n_experts), under top-k the experts they chose (indices and weights,
#: (batch, src, n_layers|1, k) each) and, when the router regularisers are on, their logits.
SCALING_HIDDEN = "xlora_scaling_hidden"
SCALINGS = "xlora_scalings"
CHOSEN_INDICES = "xlora_chosen_indices"
CHOSEN_WEIGHTS = "xlora_chosen_weights"
LOGITS = "xlora_logits"

# A decoder mixture layer reads the source tokens when it is a key or value projection of a cross-attention block:
# BART-style models name the block `encoder_attn`, T5 `EncDecAttention`, BERT-style decoders `crossattention`.
_CROSS_ATTENTION = frozenset({"encoder_attn", "EncDecAttention", "crossattention"})
_KEY_VALUE = frozenset({"k_proj", "v_proj", "k", "v", "key", "value"})


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether `model` is a transformers encoder-decoder model."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def reads_source(name: str) -> bool:
    """Whether the mixture layer at `name` reads the source tokens: a cross-attention key or value projection."""
    *parents, leaf = name.split(".")
    return leaf in _KEY_VALUE and any(part in _CROSS_ATTENTION for part in parents)


@dataclasses.dataclass(frozen=True)
class EncoderRouting(Routing):
    """The routing of the encoder's main pass, with what the decoder needs from its scaling pass.

    Attributes:
        scaling_hidden: The encoder's scaling-pass last hidden state, (batch, src, hidden).
        logits: The classifier's logits over the source tokens, (batch, src, n_layers|1, n_experts); None when the
            router regularisers are off.
    """

    scaling_hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class XLoraEncoderDecoderCache(EncoderDecoderCache):
    """The main pass's `EncoderDecoderCache` that also holds the decoder scaling pass's own.

    Attributes:
        scaling_cache: The scaling pass's `EncoderDecoderCache` (self-attention over the target, cross-attention over
            the encoder's scaling-pass output), always the same length as this one.
    """

    def __init__(self, *caches: Any, config: Any = None) -> None:
        super().__init__(*caches)
        self._init_xlora(config)

    def _init_xlora(self, config: Any) -> None:
        self._model_config = config
        self.scaling_cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))

    @classmethod
    def fresh(cls, config: Any) -> XLoraEncoderDecoderCache:
        """An empty cache of dynamic caches, as transformers' generation makes one."""
        return cls(DynamicCache(config=config), DynamicCache(config=config), config=config)

    @classmethod
    def upgrade(cls, cache: EncoderDecoderCache, config: Any) -> XLoraEncoderDecoderCache:
        """Turns an empty `EncoderDecoderCache` of dynamic caches into this class, in place (see `XLoraCache`)."""
        cache.__class__ = cls
        cache._init_xlora(config)
        return cache

    def sync_scaling_cache(self) -> None:
        """Crops the scaling cache back to this cache's length (a failed main pass leaves it ahead)."""
        sync_scaling_cache(self, self.scaling_cache)

    def reset(self) -> None:
        """Empties both caches."""
        super().reset()
        self.scaling_cache.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorders both caches along the batch for beam search."""
        super().reorder_cache(beam_idx)
        self.scaling_cache.reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        """Removes tokens from the self-attention part of both caches."""
        super().crop(tokens_to_remove)
        self.scaling_cache.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeats every row `repeats` times in both caches."""
        super().batch_repeat_interleave(repeats)
        self.scaling_cache.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps only the rows `indices` in both caches."""
        super().batch_select_indices(indices)
        self.scaling_cache.batch_select_indices(indices)


def _is_dynamic(cache: EncoderDecoderCache) -> bool:
    return type(cache.self_attention_cache) is DynamicCache and type(cache.cross_attention_cache) is DynamicCache


def prepare_seq2seq_cache(model: nn.Module, kwargs: dict) -> XLoraEncoderDecoderCache | None:
    """Finds or makes the `XLoraEncoderDecoderCache` of a forward of `model` (written into `kwargs`).

    Raises:
        ValueError: The caller passed a cache X-LoRA cannot extend.
    """
    config = model.config
    name = next((key for key in CACHE_KWARGS if kwargs.get(key) is not None), None)
    if name is None:
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(config, "use_cache", False)
        # Training, or a loss (BART then turns the cache off): no cache to extend later.
        if model.training or kwargs.get("labels") is not None or not use_cache:
            return None
        cache = XLoraEncoderDecoderCache.fresh(config)
        kwargs[_cache_kwarg_name(model)] = cache
        return cache
    cache = kwargs[name]
    if isinstance(cache, XLoraEncoderDecoderCache):
        cache.sync_scaling_cache()
        return cache
    if type(cache) is EncoderDecoderCache and _is_dynamic(cache) and cache.get_seq_length() == 0:
        return XLoraEncoderDecoderCache.upgrade(cache, config)
    raise ValueError(
        f"X-LoRA cannot cache an encoder-decoder model with this {type(cache).__name__}: its scaling pass keeps a "
        "second cache, which only an empty EncoderDecoderCache of dynamic caches (transformers' default) can carry. "
        "Pass no cache (or an empty EncoderDecoderCache) to the first forward and reuse the one it returns, or "
        "generate with use_cache=False."
    )
