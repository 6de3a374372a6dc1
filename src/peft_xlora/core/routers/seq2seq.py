"""The encoder-decoder router (BART, T5): each stack gated by its own tokens' scalings (see `core/seq2seq.py`).

Hooks: the model's forward (the decoder's scaling pass and gate), the encoder's forward (its own scaling pass and gate,
so that `generate`'s separate encoder call is routed too; its output carries what the decoder needs), and every
cross-attention key/value mixture layer of the decoder, which reads the source tokens and so their scalings. The pins,
the gate and the router losses are the base router's, for both stacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..forward import _check_hidden, _check_input_device
from ..generation import _cache_kwarg_name
from ..routing import Routing, current_routing, pop_routing, push_routing, use_routing
from ..seq2seq import (
    CHOSEN_INDICES,
    CHOSEN_WEIGHTS,
    LOGITS,
    SCALING_HIDDEN,
    SCALINGS,
    EncoderRouting,
    XLoraEncoderDecoderCache,
    prepare_seq2seq_cache,
    reads_source,
)
from .base import Router

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle


def _pass_source(module: nn.Module, args: tuple) -> None:
    # Pre-hook of a cross-attention key/value mixture layer: it reads the source tokens, so their scalings apply.
    routing = current_routing()
    push_routing(routing.for_source() if routing is not None else None)


def _pop(module: nn.Module, args: tuple, output: Any) -> None:
    pop_routing()


class Seq2SeqRouter(Router):
    """Encoder-decoder models: the dual pass once per stack, with one classifier."""

    mode = "encoder_decoder"

    def __init__(self, tuner: Any) -> None:
        super().__init__(tuner)
        self._latest_encoder: torch.Tensor | None = None

    def mode_hooks(self, model: nn.Module) -> list[RemovableHandle]:
        """The encoder's hooks, and the source hooks of the decoder's cross-attention key/value mixture layers."""
        encoder = model.get_encoder()
        hooks = [
            encoder.register_forward_pre_hook(self._before_encoder, with_kwargs=True),
            encoder.register_forward_hook(self._after_encoder, always_call=True),
        ]
        for name in self.tuner.mixture_layer_names:
            if reads_source(name):
                layer = model.get_submodule(name)
                hooks += [
                    layer.register_forward_pre_hook(_pass_source),
                    layer.register_forward_hook(_pop, always_call=True),
                ]
        return hooks

    def pinned_routing(self, scalings: torch.Tensor) -> Routing:
        """Both stacks use the pinned weights."""
        return Routing(scalings, source_scalings=scalings)

    def latest_encoder_scalings(self) -> torch.Tensor | None:
        """The source tokens' scalings of the last forward, (batch, src, n_layers, n_experts); None before one."""
        s = self._latest_encoder
        return None if s is None else s.expand(-1, -1, len(self.tuner.mixture_layer_names), -1)

    # ------------------------------------------------------------------ the decoder

    def route_gated(self, args: tuple, kwargs: dict) -> Routing:
        """The decoder's dual pass over the target tokens, after the encoder's (which its hooks route)."""
        model = self.tuner.model
        if len(args) > 1:
            raise ValueError(
                "X-LoRA on an encoder-decoder model takes its inputs by keyword (input_ids=..., attention_mask=..., "
                "decoder_input_ids=...); got more than one positional argument."
            )
        if kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
            if kwargs.get("labels") is None:
                raise ValueError(
                    f"X-LoRA on {type(model).__name__} needs the decoder's input: pass `decoder_input_ids` (or "
                    "`decoder_inputs_embeds`), or `labels` to derive them from. The scaling pass runs the decoder on "
                    "the same tokens as the main pass, so they must be known before the forward."
                )
            kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=kwargs["labels"])
        encoded = kwargs.get("encoder_outputs")
        if encoded is None:
            source = {"input_ids": args[0] if args else kwargs.get("input_ids")}
            for key in ("attention_mask", "inputs_embeds", "output_attentions", "output_hidden_states"):
                if kwargs.get(key) is not None:
                    source[key] = kwargs[key]
            encoded = model.get_encoder()(**source, return_dict=True)  # the encoder's hook routes it
            kwargs["encoder_outputs"] = encoded
        if not isinstance(encoded, dict) or encoded.get(SCALING_HIDDEN) is None:
            raise ValueError(
                "These `encoder_outputs` were not computed by the X-LoRA encoder (with the adapter enabled), so the "
                "decoder's scaling pass lacks the encoder's scaling-pass output. Compute them with "
                "`model.get_encoder()(input_ids, return_dict=True)` on the X-LoRA model, or pass `input_ids` instead."
            )
        source_chosen = None
        if encoded.get(CHOSEN_INDICES) is not None:
            source_chosen = (encoded[CHOSEN_INDICES], encoded[CHOSEN_WEIGHTS])
        cache = prepare_seq2seq_cache(model, kwargs)
        hidden = self._decoder_scaling_pass(kwargs, encoded[SCALING_HIDDEN], cache)  # (batch, tgt, hidden)
        logits, scalings, chosen = self.gate(hidden)
        self.report(scalings)
        stacks = [(encoded.get(LOGITS), kwargs.get("attention_mask")), (logits, kwargs.get("decoder_attention_mask"))]
        return Routing(
            scalings,
            source_scalings=encoded[SCALINGS],
            router_loss=self.router_loss(stacks, kwargs),
            chosen=chosen,
            source_chosen=source_chosen,
        )

    @torch.no_grad()
    def _decoder_scaling_pass(
        self, kwargs: dict, encoder_hidden: torch.Tensor, cache: XLoraEncoderDecoderCache | None
    ) -> torch.Tensor:
        """The decoder's last hidden state, every expert at the scaling-pass weight, over the scaling-pass source."""
        decoder = self.tuner.model.get_decoder()
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
        with use_routing(self.scaling_pass_routing()):
            out = decoder(**target)
        hidden = getattr(out, "last_hidden_state", None)
        hidden = out[0] if hidden is None else hidden
        _check_hidden(hidden, self.tuner.xlora_config.hidden_size, decoder)
        return hidden

    # ------------------------------------------------------------------ the encoder

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
        if not self.routes():
            return None
        _check_input_device(self.tuner.model, args, kwargs)
        if self.tuner._static_scalings is not None:
            return Routing(self.pinned(args, kwargs))
        plain = {k: v for k, v in kwargs.items() if k not in ("output_attentions", "output_hidden_states")}
        with torch.no_grad(), use_routing(self.scaling_pass_routing()):
            out = encoder(*args, **{**plain, "return_dict": True})
        hidden = getattr(out, "last_hidden_state", None)
        hidden = out[0] if hidden is None else hidden  # (batch, src, hidden)
        _check_hidden(hidden, self.tuner.xlora_config.hidden_size, encoder)
        logits, scalings, chosen = self.gate(hidden)
        self._latest_encoder = scalings.detach()
        config = self.tuner.xlora_config
        keep_logits = bool(config.router_load_balancing_coef or config.router_entropy_coef)
        return EncoderRouting(scalings, chosen=chosen, scaling_hidden=hidden, logits=logits if keep_logits else None)

    def _after_encoder(self, module: nn.Module, args: tuple, output: Any) -> Any:
        routing = current_routing()
        pop_routing()
        if not isinstance(routing, EncoderRouting) or not isinstance(output, dict):
            return None
        # Tensors with a leading batch dim, so generation's beam expansion repeats them with the encoder's output.
        output[SCALING_HIDDEN] = routing.scaling_hidden
        output[SCALINGS] = routing.scalings
        if routing.chosen is not None:
            output[CHOSEN_INDICES], output[CHOSEN_WEIGHTS] = routing.chosen
        if routing.logits is not None:
            output[LOGITS] = routing.logits
        return output
