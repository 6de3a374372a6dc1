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

In single-pass mode (see `single_pass.py`) a forward's per-token scalings exist only once decoder layer k has run:
the `Routing` then holds a mutable `single_pass` state that layer k's hook fills, and each carrier passes a snapshot
of what was known when its layer was called, so a recomputed layer sees the same tensors as its first run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

_ROUTING_KWARG = "_xlora_routing"


#: A token's choice under top-k: (indices, weights), each (batch|1, seq|1, n_slots|1, k); the indices long, the
#: weights the scalings of those experts (float32, global weight applied). Zeros stand where a mask left fewer than k.
Chosen = tuple[torch.Tensor, torch.Tensor]

# The tensors a carrier passes positionally, in this order: single tensors, then (indices, weights) pairs.
_TENSORS = ("scalings", "source_scalings", "late_scalings")
_CHOICES = ("chosen", "source_chosen", "late_chosen")


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
        single_pass: Single-pass mode only: the forward's `SinglePassState` (the late layers' indices, and their
            per-token scalings once layer k has run); `scalings` are then the static weights of the early layers.
        late_scalings: The late layers' scalings as a carrier saw them when its layer was called (a snapshot of
            `single_pass.late`), so that a checkpointed layer's recomputation reuses the same tensor.
        chosen: With `top_k_lora` below the number of experts: the experts each token chose, computed once by the
            gate, for `scalings` (see `Chosen`); None when the scalings are dense (no top-k, a pinned gate, held
            prompt scalings). A layer that computes only the chosen experts reads it with `chosen_for`; the dense
            mixture ignores it.
        source_chosen: The same for `source_scalings`.
        late_chosen: The same for `late_scalings` (a snapshot of `single_pass.late_chosen`).
    """

    scalings: torch.Tensor | None
    scaling_pass: bool = False
    router_loss: torch.Tensor | None = None
    source_scalings: torch.Tensor | None = None
    single_pass: Any = None
    late_scalings: torch.Tensor | None = None
    chosen: Chosen | None = None
    source_chosen: Chosen | None = None
    late_chosen: Chosen | None = None

    def scalings_for(self, layer_index: int) -> torch.Tensor | None:
        """The scalings mixture layer `layer_index` applies in this forward."""
        state = self.single_pass
        if state is None or layer_index not in state.late_layers:
            return self.scalings
        late = self.late_scalings if self.late_scalings is not None else state.late
        if late is None:
            raise RuntimeError(
                f"X-LoRA single pass: mixture layer {layer_index} runs after decoder layer k (scaling_pass_layers) in "
                "the model's layout, but it ran before layer k gave the per-token scalings. This model does not run "
                "its layers in the order it registers them; use routing='dual_pass'."
            )
        return late

    def chosen_for(self, layer_index: int) -> Chosen | None:
        """The experts each token chose for mixture layer `layer_index` (see `chosen`), or None: dense scalings."""
        state = self.single_pass
        if state is None or layer_index not in state.late_layers:
            return self.chosen
        return self.late_chosen if self.late_chosen is not None else state.late_chosen

    def for_source(self) -> Routing:
        """The routing of a layer that reads the source tokens: their scalings and choice (encoder-decoder models)."""
        if self.source_scalings is None:
            return self
        return replace(self, scalings=self.source_scalings, chosen=self.source_chosen)

    def snapshot(self) -> Routing:
        """This routing with the single pass's late scalings known so far fixed in `late_scalings`."""
        if self.single_pass is None or self.single_pass.late is None or self.late_scalings is not None:
            return self
        return replace(self, late_scalings=self.single_pass.late, late_chosen=self.single_pass.late_chosen)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors a carrier passes positionally (so reentrant checkpointing differentiates them)."""
        singles = [getattr(self, name) for name in _TENSORS]
        pairs = [t for name in _CHOICES if (pair := getattr(self, name)) is not None for t in pair]
        return (*(t for t in singles if t is not None), *pairs)

    def with_tensors(self, tensors: tuple[torch.Tensor, ...]) -> Routing:
        """The same routing holding `tensors` (those `tensors()` gave, possibly a recomputation's) instead.

        The router loss stays behind: the layer does not need it, and a recomputation must not hold the graph.
        """
        it = iter(tensors)
        fields: dict[str, Any] = {"router_loss": None}
        for name in _TENSORS:
            fields[name] = next(it) if getattr(self, name) is not None else None
        for name in _CHOICES:
            fields[name] = (next(it), next(it)) if getattr(self, name) is not None else None
        return replace(self, **fields)


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
            if routing is not None:
                routing = routing.snapshot()
                args = (*args, *routing.tensors())
            kwargs[_ROUTING_KWARG] = routing
            return super().__call__(*args, **kwargs)

        def forward(self, *args, **kwargs):
            if _ROUTING_KWARG not in kwargs:  # forward called directly, not through __call__
                return super().forward(*args, **kwargs)
            routing = kwargs.pop(_ROUTING_KWARG)
            if routing is not None:
                n = len(routing.tensors())
                if n:
                    routing = routing.with_tensors(tuple(args[-n:]))  # the (possibly recomputation's) tensors
                    args = args[:-n]
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
