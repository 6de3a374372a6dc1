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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from .attributes import TunerAttributes
from .forward import _check_hidden, _check_input_device
from .generation import CACHE_KWARGS, _cache_kwarg_name, requested_scalings_mode, sync_scaling_cache
from .regularisers import for_accumulated_batch, router_losses
from .routing import Routing, current_routing, pop_routing, push_routing, use_routing

if TYPE_CHECKING:
    from .config import XLoraConfig

#: Keys X-LoRA adds to the encoder's output: the scaling pass's last hidden state (batch, src, hidden), the source
#: tokens' scalings (batch, src, n_layers|1, n_experts) and, when the router regularisers are on, their logits.
SCALING_HIDDEN = "xlora_scaling_hidden"
SCALINGS = "xlora_scalings"
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


def check_seq2seq_supported(model: nn.Module, config: XLoraConfig) -> None:
    """Refuses, before anything is built, the options an encoder-decoder model cannot take."""
    name = type(model).__name__
    if config.scaling_pass_layers is not None:
        raise ValueError(
            f"`scaling_pass_layers` is not supported for encoder-decoder models ({name}): the decoder's scaling pass "
            "needs the whole encoder's output. Leave scaling_pass_layers=None."
        )
    if config.scalings_mode != "token":
        raise ValueError(_PROMPT_MODE.format(name=name))
    if config.router_distillation_coef:
        raise ValueError(
            f"`router_distillation_coef` is not supported for encoder-decoder models ({name}) yet: the experts' "
            "per-token losses are scored for decoder-only models. Set router_distillation_coef=0."
        )


_PROMPT_MODE = (
    "scalings_mode='prompt' is not supported for encoder-decoder models ({name}): the source is routed per token "
    "by the encoder, and the decoder has no prompt to hold. Use scalings_mode='token'."
)


@dataclasses.dataclass(frozen=True)
class EncoderRouting(Routing):
    """The routing of the encoder's main pass, with what the decoder needs from its scaling pass.

    Attributes:
        scaling_hidden: The encoder's scaling-pass last hidden state, (batch, src, hidden).
        logits: The classifier's logits over the source tokens, (batch, src, n_layers|1, n_experts).
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


def _pass_source(module: nn.Module, args: tuple) -> None:
    # Pre-hook of a cross-attention key/value mixture layer: it reads the source tokens, so their scalings apply.
    routing = current_routing()
    source = getattr(routing, "source_scalings", None)
    push_routing(dataclasses.replace(routing, scalings=source) if source is not None else routing)


def _pop(module: nn.Module, args: tuple, output: Any) -> None:
    pop_routing()


class Seq2SeqMixin(TunerAttributes):
    """The routing of `XLoraModel` for encoder-decoder models; decoder-only and encoder-only models pass through."""

    _seq2seq_hooks: list

    def _install_seq2seq(self, model: nn.Module) -> None:
        """Hooks the encoder (its own dual pass) and the decoder's cross-attention key/value mixture layers."""
        encoder = model.get_encoder()
        hooks = [
            encoder.register_forward_pre_hook(self._before_encoder, with_kwargs=True),
            encoder.register_forward_hook(self._after_encoder, always_call=True),
        ]
        for name in self.mixture_layer_names:
            if reads_source(name):
                layer = model.get_submodule(name)
                hooks += [
                    layer.register_forward_pre_hook(_pass_source),
                    layer.register_forward_hook(_pop, always_call=True),
                ]
        self._seq2seq_hooks = hooks
        self._latest_encoder_scalings: torch.Tensor | None = None

    def _remove_seq2seq(self) -> None:
        for hook in getattr(self, "_seq2seq_hooks", []):
            hook.remove()
        self._seq2seq_hooks = []

    def get_latest_encoder_scalings(self) -> torch.Tensor | None:
        """Encoder-decoder models: the source tokens' scalings of the last forward, (batch, src, n_layers, n_experts).

        `get_latest_scalings()` gives the target (decoder) tokens'. None before any forward, or for other models.
        """
        s = getattr(self, "_latest_encoder_scalings", None)
        return None if s is None else s.expand(-1, -1, len(self.mixture_layer_names), -1)

    # ------------------------------------------------------------------ routing

    def _route(self, args: tuple, kwargs: dict) -> Routing | None:
        if not getattr(self, "_seq2seq_hooks", None):
            return super()._route(args, kwargs)  # type: ignore[misc]
        if not self._routes():
            return None
        _check_input_device(self.model, args, kwargs)
        if self._static_scalings is not None:
            pinned = self._static_scalings[None, None]
            return Routing(pinned, source_scalings=pinned)
        if len(args) > 1:
            raise ValueError(
                "X-LoRA on an encoder-decoder model takes its inputs by keyword (input_ids=..., attention_mask=..., "
                "decoder_input_ids=...); got more than one positional argument."
            )
        if kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
            if kwargs.get("labels") is None:
                raise ValueError(
                    f"X-LoRA on {type(self.model).__name__} needs the decoder's input: pass `decoder_input_ids` (or "
                    "`decoder_inputs_embeds`), or `labels` to derive them from. The scaling pass runs the decoder on "
                    "the same tokens as the main pass, so they must be known before the forward."
                )
            kwargs["decoder_input_ids"] = self.model.prepare_decoder_input_ids_from_labels(labels=kwargs["labels"])
        encoded = kwargs.get("encoder_outputs")
        if encoded is None:
            source = {"input_ids": args[0] if args else kwargs.get("input_ids")}
            for key in ("attention_mask", "inputs_embeds", "output_attentions", "output_hidden_states"):
                if kwargs.get(key) is not None:
                    source[key] = kwargs[key]
            encoded = self.model.get_encoder()(**source, return_dict=True)  # the encoder's hook routes it
            kwargs["encoder_outputs"] = encoded
        scaling_hidden, source_scalings, source_logits = self._encoder_extras(encoded)
        cache = prepare_seq2seq_cache(self.model, kwargs)
        hidden = self._decoder_scaling_pass(kwargs, scaling_hidden, cache)  # (batch, tgt, hidden)
        logits, scalings = self._gate(hidden)
        self._check_finite(scalings, hidden)  # type: ignore[attr-defined]
        latest = scalings.detach()  # logged from the local tensor, as in forward.py
        self._latest_scalings = latest
        self._log_scalings(latest)  # type: ignore[attr-defined]
        loss = self._seq2seq_router_loss(
            [(source_logits, kwargs.get("attention_mask")), (logits, kwargs.get("decoder_attention_mask"))]
        )
        loss = for_accumulated_batch(loss, kwargs, self.model)  # a micro-batch's share (regularisers.py)
        return Routing(scalings, source_scalings=source_scalings, router_loss=loss)

    def _routes(self) -> bool:
        """Whether this forward is gated (not disabled); raises if the experts were never loaded."""
        if not self._enabled or all(layer.disable_adapters for layer in self._layers):
            return False
        if self._experts_pending:
            raise RuntimeError(
                "The experts' weights were never loaded: this model was built from a saved X-LoRA config. "
                "Load it with `PeftModel.from_pretrained(base_model, checkpoint)` or transformers' "
                "`model.load_adapter(checkpoint)`."
            )
        if (requested_scalings_mode() or self.xlora_config.scalings_mode) != "token":  # also after `update_config`
            raise ValueError(_PROMPT_MODE.format(name=type(self.model).__name__))
        return True

    def _scaling_routing(self) -> Routing:
        return Routing(self._scaling_pass_scalings(), scaling_pass=True)  # as the decoder-only scaling pass

    def _before_encoder(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Pushes exactly once, as `_before_forward` does; `_after_encoder` pops.
        outer = current_routing()
        if outer is not None and outer.scaling_pass:
            push_routing(outer)
            return
        try:
            routing = self._route_encoder(module, args, kwargs)
        except BaseException:
            push_routing(outer)
            raise
        push_routing(routing)

    def _route_encoder(self, encoder: nn.Module, args: tuple, kwargs: dict) -> Routing | None:
        """The encoder's dual pass: its scaling pass and the classifier give the source tokens' scalings."""
        if not self._routes():
            return None
        _check_input_device(self.model, args, kwargs)
        if self._static_scalings is not None:
            return Routing(self._static_scalings[None, None])
        plain = {k: v for k, v in kwargs.items() if k not in ("output_attentions", "output_hidden_states")}
        with torch.no_grad(), use_routing(self._scaling_routing()):
            out = encoder(*args, **{**plain, "return_dict": True})
        hidden = getattr(out, "last_hidden_state", None)
        hidden = out[0] if hidden is None else hidden  # (batch, src, hidden)
        _check_hidden(hidden, self.xlora_config.hidden_size, encoder)
        logits, scalings = self._gate(hidden)
        self._check_finite(scalings, hidden)  # type: ignore[attr-defined]
        self._latest_encoder_scalings = scalings.detach()
        keep_logits = self._router_coefs() is not None
        return EncoderRouting(scalings, scaling_hidden=hidden, logits=logits if keep_logits else None)

    def _after_encoder(self, module: nn.Module, args: tuple, output: Any) -> Any:
        routing = current_routing()
        pop_routing()
        if not isinstance(routing, EncoderRouting) or not isinstance(output, dict):
            return None
        # Tensors with a leading batch dim, so generation's beam expansion repeats them with the encoder's output.
        output[SCALING_HIDDEN] = routing.scaling_hidden
        output[SCALINGS] = routing.scalings
        if routing.logits is not None:
            output[LOGITS] = routing.logits
        return output

    def _encoder_extras(self, encoded: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The scaling-pass hidden state, scalings and logits the X-LoRA encoder added to its output."""
        if not isinstance(encoded, dict) or encoded.get(SCALING_HIDDEN) is None:
            raise ValueError(
                "These `encoder_outputs` were not computed by the X-LoRA encoder (with the adapter enabled), so the "
                "decoder's scaling pass lacks the encoder's scaling-pass output. Compute them with "
                "`model.get_encoder()(input_ids, return_dict=True)` on the X-LoRA model, or pass `input_ids` instead."
            )
        return encoded[SCALING_HIDDEN], encoded[SCALINGS], encoded.get(LOGITS)

    @torch.no_grad()
    def _decoder_scaling_pass(
        self, kwargs: dict, encoder_hidden: torch.Tensor, cache: XLoraEncoderDecoderCache | None
    ) -> torch.Tensor:
        """The decoder's last hidden state, every expert at the scaling-pass weight, over the scaling-pass source."""
        decoder = self.model.get_decoder()
        target = {
            "input_ids": kwargs.get("decoder_input_ids"),
            "inputs_embeds": kwargs.get("decoder_inputs_embeds"),
            "attention_mask": kwargs.get("decoder_attention_mask"),
            "encoder_hidden_states": encoder_hidden,
            "encoder_attention_mask": kwargs.get("attention_mask"),
            "use_cache": cache is not None,
        }
        if cache is not None:
            target[_cache_kwarg_name(decoder)] = cache.scaling_cache  # advances by the same tokens as the main cache
        with use_routing(self._scaling_routing()):
            out = decoder(**target)
        hidden = getattr(out, "last_hidden_state", None)
        hidden = out[0] if hidden is None else hidden
        _check_hidden(hidden, self.xlora_config.hidden_size, decoder)
        return hidden

    def _router_coefs(self) -> dict[str, float] | None:
        config = self.xlora_config
        coefs = {"load_balancing": config.router_load_balancing_coef, "entropy": config.router_entropy_coef}
        return coefs if any(coefs.values()) else None

    def _seq2seq_router_loss(self, stacks: list[tuple[torch.Tensor | None, Any]]) -> torch.Tensor | None:
        """The router regularisers summed over the stacks, each over its own tokens and mask."""
        coefs = self._router_coefs()
        if coefs is None:
            return None
        totals: dict[str, torch.Tensor] = {}
        for logits, mask in stacks:
            if logits is None:  # encoder outputs passed in (e.g. by `generate`): the encoder's loss is not here
                continue
            if not (isinstance(mask, torch.Tensor) and mask.shape == logits.shape[:2]):
                mask = None
            with torch.autocast(logits.device.type, enabled=False):
                terms = router_losses(
                    logits, self.xlora_config.softmax_temperature, self.xlora_config.top_k_lora, mask
                )
            for name, value in terms.items():
                totals[name] = totals[name] + value if name in totals else value
        self._latest_router_losses = {name: value.detach() for name, value in totals.items()}
        return sum(coefs[name] * totals[name] for name in coefs)
