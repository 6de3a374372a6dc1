"""How scalings reach the mixture layers: a context variable, carried through gradient checkpointing.

Each forward of the X-LoRA model sets a `Routing` in a `contextvars.ContextVar` for the duration of the base model's
forward; mixture layers read it. A context variable is private to its thread (and asyncio task), so concurrent
forwards on one model do not see each other's scalings.

Gradient checkpointing recomputes a decoder layer during backward, after that forward has returned and its context is
gone (on CUDA even on another thread). transformers' `GradientCheckpointingLayer` checkpoints the layer's `forward`
with the keyword arguments it was called with, so the routing is passed as one of them: each checkpointed layer that
holds a mixture layer is given a subclass (as FSDP2's `fully_shard` does) whose `__call__` adds the current routing to
the keyword arguments and whose `forward` sets it again around the original forward. The recomputation replays those
arguments and so sees exactly the scalings of its own forward, even with several forwards before one backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

_ROUTING_KWARG = "_xlora_routing"


@dataclass(frozen=True)
class Routing:
    """The gating of one forward.

    Attributes:
        scalings: Per-token expert weights, (batch|1, seq|1, n_layers|1, n_experts), global weight applied; a size-1
            dim broadcasts. None runs the base layers alone.
        scaling_pass: True while the scaling pass runs, so a nested call of the top model does not route again.
        router_loss: The weighted router regularisers of this forward (a scalar with grad), added to the model's
            loss after the forward; None when they are off.
        source_scalings: Encoder-decoder models, in the decoder: the source tokens' scalings, read by the
            cross-attention key/value layers (see seq2seq.py); None otherwise.
    """

    scalings: torch.Tensor | None
    scaling_pass: bool = False
    router_loss: torch.Tensor | None = None
    source_scalings: torch.Tensor | None = None


def _routing_tensors(routing: Routing | None) -> tuple[torch.Tensor, ...]:
    """The scalings a checkpointed layer must receive as positional arguments (see `_carrier_class`)."""
    if routing is None:
        return ()
    return tuple(t for t in (routing.scalings, routing.source_scalings) if t is not None)


# A stack, so nested forwards restore what was current before them. Tuples, never mutated: a copied context (a new
# thread or asyncio task) must not share a mutable list with its parent.
_STACK: ContextVar[tuple[Routing | None, ...]] = ContextVar("peft_xlora_routing", default=())


def current_routing() -> Routing | None:
    """The routing of the forward running in this context, or None outside any X-LoRA forward."""
    stack = _STACK.get()
    return stack[-1] if stack else None


def push_routing(routing: Routing | None) -> None:
    """Makes `routing` current until the matching `pop_routing`."""
    _STACK.set((*_STACK.get(), routing))


def pop_routing() -> None:
    """Restores the routing that was current before the last `push_routing`."""
    stack = _STACK.get()
    if stack:
        _STACK.set(stack[:-1])


@contextlib.contextmanager
def use_routing(routing: Routing | None) -> Iterator[None]:
    """Makes `routing` current for the enclosed code."""
    push_routing(routing)
    try:
        yield
    finally:
        pop_routing()


_CARRIER_CLASSES: dict[type, type] = {}


def _carrier_class(cls: type[nn.Module]) -> type[nn.Module]:
    if cls in _CARRIER_CLASSES:
        return _CARRIER_CLASSES[cls]

    class Carrier(cls):  # type: ignore[misc, valid-type]
        # The scalings go in as the last positional argument: reentrant checkpointing differentiates only positional
        # tensors, so this is how the classifier gets its gradient through a recomputed layer.
        def __call__(self, *args, **kwargs):
            routing = current_routing()
            args = (*args, *_routing_tensors(routing))
            kwargs[_ROUTING_KWARG] = routing
            return super().__call__(*args, **kwargs)

        def forward(self, *args, **kwargs):
            if _ROUTING_KWARG not in kwargs:  # forward called directly, not through __call__
                return super().forward(*args, **kwargs)
            routing = kwargs.pop(_ROUTING_KWARG)
            n = len(_routing_tensors(routing))
            if n:
                args, tensors = args[:-n], list(args[-n:])  # the (possibly recomputation's) tensors
                scalings = tensors.pop(0) if routing.scalings is not None else None
                source = tensors.pop(0) if routing.source_scalings is not None else None
                routing = dataclasses.replace(routing, scalings=scalings, source_scalings=source, router_loss=None)
            with use_routing(routing):
                return super().forward(*args, **kwargs)

    # The original class's name: accelerate finds the layers to shard or keep whole by class name (FSDP's
    # `transformer_cls_names_to_wrap`, the model's `_no_split_modules` under `device_map`).
    Carrier.__name__ = cls.__name__
    Carrier.__qualname__ = f"XLora{cls.__qualname__}"
    Carrier.__module__ = __name__
    Carrier._xlora_original_class = cls
    _CARRIER_CLASSES[cls] = Carrier
    return Carrier


def install_carriers(model: nn.Module, holds_mixture: set[str]) -> int:
    """Gives every checkpointable layer of `model` that contains a mixture layer the routing carrier.

    Args:
        model: The base model.
        holds_mixture: Names (relative to `model`) of the mixture layers.

    Returns:
        The number of layers converted.
    """
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, GradientCheckpointingLayer) or hasattr(type(module), "_xlora_original_class"):
            continue
        prefix = f"{name}." if name else ""
        if any(m.startswith(prefix) for m in holds_mixture):
            module.__class__ = _carrier_class(type(module))
            _rebind_accelerate_forward(module)
            count += 1
    return count


def _rebind_accelerate_forward(module: nn.Module) -> None:
    # accelerate's hooks (device_map, offload) replace the instance's `forward` with a wrapper that calls the
    # `_old_forward` bound when the hook was added: the original class's forward, which would receive the carrier's
    # extra arguments. Point it at the class's current forward (the carrier's, or the original's again on removal).
    if "_old_forward" in module.__dict__:
        module._old_forward = type(module).forward.__get__(module)


def remove_carriers(model: nn.Module) -> None:
    """Restores the original classes of the layers converted by `install_carriers`."""
    for module in model.modules():
        original = getattr(type(module), "_xlora_original_class", None)
        if original is not None:
            module.__class__ = original
            _rebind_accelerate_forward(module)
