"""What every router's forward shares (see `core/routers/`).

The input checks, the scaling pass's checks, and the one place where the router losses are added to the model's
output (`_add_router_loss`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .building import embeddings
from .regularisers import router_loss_left_to_trainer, warn_if_loss_ignores_router

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
    """Adds the router regularisers to a transformers output's loss and records them as its `router_loss`.

    Under a trainer that adds `router_loss` to its loss itself (`RouterLossMixin`), the loss is left alone, so that a
    trainer that also reads `output.loss` counts the regularisers once.
    """
    if not isinstance(output, dict):  # return_dict=False: a tuple whose layout depends on the model
        return None
    warn_if_loss_ignores_router(output)
    if output.get("loss") is not None and not router_loss_left_to_trainer():
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
