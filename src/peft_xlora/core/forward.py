"""The dual-pass forward: the scaling pass, the classifier and gate, and the routing handed to the main pass.

`XLoraModel` registers `_before_forward` / `_after_forward` on the transformers model: before every forward of it the
scaling pass runs (the model with every expert at `scaling_pass_value * global_scaling_weight`, or the plain base
model when that is 0), the classifier turns its last hidden state into per-token scalings, and the mixture layers of
the main pass read them (times `global_scaling_weight`, applied by the gate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .attributes import TunerAttributes
from .building import embeddings
from .classifier import gate
from .distillation import distillation_term
from .generation import CACHE_KWARGS, XLoraCache, hold_uncached, input_length, prepare_cache
from .regularisers import for_accumulated_batch, router_losses, warn_if_loss_ignores_router
from .routing import Routing, current_routing, pop_routing, push_routing

if TYPE_CHECKING:
    pass

# Keyword arguments of a model's forward that concern only the head, the cache or the output format: the scaling
# pass, which runs the inner model once for its last hidden state, leaves them out.
_NOT_FOR_SCALING_PASS = frozenset(
    {
        "labels",
        "cache",
        "past_key_values",
        "use_cache",
        "cache_position",
        "logits_to_keep",
        "num_logits_to_keep",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "fused_lm_head",  # TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`) and its loss arguments
        "shift_labels",
        "num_items_in_batch",
    }
)


def _check_input_device(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Inputs must be on the device of the input embeddings (accelerate moves them itself under `device_map`)."""
    if getattr(model, "hf_device_map", None):
        return
    inputs = kwargs.get("input_ids", args[0] if args else None)
    name = "input_ids"
    if inputs is None:
        inputs, name = kwargs.get("inputs_embeds"), "inputs_embeds"
    weight = getattr(embeddings(model, "get_input_embeddings"), "weight", None)
    if not isinstance(inputs, torch.Tensor) or not isinstance(weight, torch.Tensor) or inputs.device == weight.device:
        return
    raise ValueError(
        f"`{name}` is on {inputs.device} but the model's input embeddings are on {weight.device}: move the inputs "
        f"first, e.g. `{name}.to(model.device)`."
    )


def _add_router_loss(output: Any, router_loss: torch.Tensor) -> Any:
    """Adds the router regularisers to a transformers output's loss and records them as its `router_loss`."""
    if not isinstance(output, dict):  # return_dict=False: a tuple whose layout depends on the model
        return None
    warn_if_loss_ignores_router(output)
    if output.get("loss") is not None:
        output["loss"] = output["loss"] + router_loss.to(output["loss"].device)
    output["router_loss"] = router_loss
    return output


def _check_hidden(hidden: torch.Tensor, hidden_size: int, inner: nn.Module) -> None:
    """The scaling pass must give a last hidden state (batch, seq, hidden_size) for the classifier."""
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[-1] == hidden_size:
        return
    shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
    raise RuntimeError(
        f"The X-LoRA scaling pass ran {type(inner).__name__} and got {shape}, not a last hidden state of shape "
        f"(batch, seq, {hidden_size}). X-LoRA reads `last_hidden_state` (or the first output) of the model's "
        "`base_model`; this model does not provide one. See docs/models.md for the supported models."
    )


class _ScalingPassExit(Exception):  # control flow, not an error
    """Carries the hidden state out of a scaling pass cut short by `scaling_pass_layers`."""

    def __init__(self, hidden: Any) -> None:
        super().__init__()
        self.hidden = hidden


class ForwardMixin(TunerAttributes):
    """The forward hooks of `XLoraModel`: the scaling pass, the gate, and the router losses."""

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Pushes exactly once, even when routing fails: the always-called `_after_forward` pops.
        outer = current_routing()
        if outer is not None and outer.scaling_pass:
            push_routing(outer)  # the scaling pass called the top model itself (it is its own base model)
            return
        try:
            routing = self._route(args, kwargs)
        except BaseException:
            push_routing(outer)
            raise
        push_routing(routing)

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        routing = current_routing()
        pop_routing()
        if routing is None or routing.scaling_pass:
            return None
        # Single pass: the router losses are known once layer k has run, in the forward's shared state.
        router_loss = routing.single_pass.router_loss if routing.single_pass is not None else routing.router_loss
        if router_loss is None:
            return None
        return _add_router_loss(output, router_loss)

    def _route(self, args: tuple, kwargs: dict) -> Routing | None:
        """Runs the scaling pass and the classifier; returns the routing for the main pass."""
        if not self._enabled or all(layer.disable_adapters for layer in self._layers):
            return None  # PEFT's `disable_adapter()` context, or transformers' `model.disable_adapters()`
        if self._experts_pending:
            raise RuntimeError(
                "The experts' weights were never loaded: this model was built from a saved X-LoRA config. "
                "Load it with `PeftModel.from_pretrained(base_model, checkpoint)` or transformers' "
                "`model.load_adapter(checkpoint)`."
            )
        config = self.xlora_config
        _check_input_device(self.model, args, kwargs)
        if self._static_scalings is not None:
            return self._static_routing(args, kwargs)
        if config.routing == "single_pass":
            return self._route_single_pass(kwargs)  # no scaling pass (single_pass.py)
        # With a KV cache, the scaling pass extends its own cache beside the main one (see generation.py); in prompt
        # mode, decoding steps skip it and reuse the prompt's scalings held in the cache.
        cache, cache_name = prepare_cache(self.model, kwargs, config.scalings_mode)
        if cache is not None and not cache.needs_scaling_pass(input_length(args, kwargs) or 0):
            self._latest_scalings = cache.held_scalings  # (batch, 1, n_layers|1, n_experts)
            self._log_scalings(cache.held_scalings)
            return Routing(cache.held_scalings)
        hidden = self._scaling_pass(args, kwargs, cache, cache_name)  # (batch, seq, hidden)
        # The classifier and the gate run in their own dtype (float32 for a trained classifier) even under
        # torch.autocast: low-precision logits would quantise the routing decisions.
        logits, scalings = self._gate(hidden)  # (batch, seq, n_layers|1, n_experts) each
        self._check_finite(scalings, hidden)
        scalings = cache.record(scalings) if cache is not None else hold_uncached(scalings, config.scalings_mode)
        # Logged from the local tensor: another thread's forward may replace `_latest_scalings` in between.
        latest = scalings.detach()
        self._latest_scalings = latest
        self._log_scalings(latest)
        return Routing(scalings, router_loss=self._router_loss(logits, args, kwargs))

    def _router_loss(self, logits: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The weighted router regularisers of this forward, or None when they are off (the default)."""
        config = self.xlora_config
        coefs = {"load_balancing": config.router_load_balancing_coef, "entropy": config.router_entropy_coef}
        labels = kwargs.get("labels")
        if config.router_distillation_coef and isinstance(labels, torch.Tensor):  # needs the next tokens
            coefs["distillation"] = config.router_distillation_coef
        if not any(coefs.values()):
            return None
        mask = kwargs.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.shape == logits.shape[:2]):
            mask = None  # 4D or absent masks: every token counts
        with torch.autocast(logits.device.type, enabled=False):
            terms = router_losses(logits, config.softmax_temperature, config.top_k_lora, mask)
        if "distillation" in coefs:
            terms["distillation"] = distillation_term(self, logits, args, kwargs, labels)
        self._latest_router_losses = {name: value.detach() for name, value in terms.items()}
        return for_accumulated_batch(sum(coefs[name] * terms[name] for name in coefs), kwargs, self.model)

    def get_latest_router_losses(self) -> dict[str, torch.Tensor] | None:
        """The router regularisers of the last forward (unweighted, detached), for logging; None when they are off.

        The weighted sum is added to the model output's `loss` (when labels are given) and returned as its
        `router_loss` entry.
        """
        return getattr(self, "_latest_router_losses", None)

    def _gate(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier logits and gated scalings of hidden states, (batch, seq, n_layers|1, n_experts) each.

        The classifier and the gate run in their own dtype (float32 for a trained classifier) even under
        torch.autocast: low-precision logits would quantise the routing decisions. Experts masked with
        `set_active_experts` (core/elastic.py) get 0, and a softmax renormalises over the rest.
        """
        config = self.xlora_config
        with torch.autocast(hidden.device.type, enabled=False):
            logits = self.xlora_classifier(hidden)
            scalings = gate(
                logits,
                temperature=config.softmax_temperature,
                enable_softmax=config.enable_softmax,
                top_k=config.top_k_lora,
                softmax_topk=config.enable_softmax_topk,
                global_weight=config.global_scaling_weight,
                active=getattr(self, "_active_experts", None),
            )
        return logits, scalings

    def _scaling_pass_scalings(self) -> torch.Tensor | None:
        """The scaling pass's scalings (1, 1, 1, n_experts): every expert at `scaling_pass_value * global weight`.

        None when that is 0: the scaling pass is then the plain base model. Built where the classifier is (the
        scalings' device), not on the CPU.
        """
        value = self.xlora_config.scaling_pass_value * self.xlora_config.global_scaling_weight
        if value == 0:
            return None
        device = self.xlora_classifier.layers[0].weight.device
        return torch.full((1, 1, 1, len(self.expert_names)), float(value), device=device)

    @torch.no_grad()
    def _scaling_pass(
        self, args: tuple, kwargs: dict, cache: XLoraCache | None = None, cache_name: str | None = None
    ) -> torch.Tensor:
        """The last hidden state of the model with every expert at `scaling_pass_value * global_scaling_weight`.

        The global weight multiplies every expert update in both passes, as in the original X-LoRA, PEFT's built-in
        and mistral.rs, so a checkpoint means the same in all of them.

        Args:
            args: Positional arguments of the model's forward.
            kwargs: Keyword arguments of the model's forward.
            cache: The main pass's cache, whose `scaling_cache` this pass extends; None runs without a cache.
            cache_name: The keyword the model takes its cache under.
        """
        constant = self._scaling_pass_scalings()  # (1, 1, 1, n_experts) or None: the plain base model
        inner = getattr(self.model, "base_model", self.model)
        scaling_kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_FOR_SCALING_PASS}
        if cache is not None:
            scaling_kwargs[cache_name] = cache.scaling_cache  # advances by the same tokens as the main cache
            scaling_kwargs["use_cache"] = True
        elif "use_cache" in kwargs or any(name in kwargs for name in CACHE_KWARGS):
            scaling_kwargs["use_cache"] = False
        with_flag = Routing(constant, scaling_pass=True)
        push_routing(with_flag)
        try:
            out = inner(*args, **scaling_kwargs)
        except _ScalingPassExit as exit_:  # `scaling_pass_layers`: stopped after the k-th decoder layer
            out = exit_.hidden
        finally:
            pop_routing()
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out if isinstance(out, torch.Tensor) else out[0]
        _check_hidden(hidden, self.xlora_config.hidden_size, inner)
        return hidden

    def _exit_scaling_pass(self, module: nn.Module, args: tuple, output: Any) -> None:
        # Forward hook on the k-th decoder layer: in this model's scaling pass, the rest of the stack is not needed.
        routing = current_routing()
        if routing is not None and routing.scaling_pass:
            raise _ScalingPassExit(output)

    def _check_finite(self, scalings: torch.Tensor, hidden: torch.Tensor) -> None:
        """Raises `FloatingPointError` naming the layer, expert and token where the scalings are NaN or infinite."""
        finite = torch.isfinite(scalings)  # (batch, seq, n_layers|1, n_experts)
        if bool(finite.all()):
            return
        row, token, slot, expert = (~finite).nonzero()[0].tolist()
        value = scalings[row, token, slot, expert].item()
        if scalings.shape[2] > 1:
            where = f"mixture layer {slot} ({self.mixture_layer_names[slot]!r})"
        else:
            where = f"all {len(self.mixture_layer_names)} mixture layers (they share one set of scalings)"
        if not bool(torch.isfinite(hidden).all()):
            cause = (
                "the scaling pass's last hidden state already holds NaN/Inf: the base model overflowed on these "
                "inputs (in float16 try bfloat16 or float32; with scaling_pass_value > 0, check the experts' weights)"
            )
        elif not all(bool(torch.isfinite(p).all()) for p in self.xlora_classifier.parameters()):
            cause = "the gating classifier's weights hold NaN/Inf (a diverged training step: lower the learning rate)"
        else:
            cause = "the classifier's logits overflowed (try a larger softmax_temperature or float32)"
        raise FloatingPointError(
            f"X-LoRA scalings are not finite ({value}) in {where}, expert {self.expert_names[expert]!r}, batch row "
            f"{row}, token {token}: {cause}."
        )
