"""Module wrappers that add the experts' update to vLLM's own projections, and the two small modules around them.

The wrappers replace vLLM's projection modules in place (after the weights are loaded: wrapping earlier would rename
the parameters vLLM's loader looks for) and keep their call signature, so each architecture's own decoder layers run
unchanged:

- `MixedProjection`: the per-token mixture, its weights read from the router's `scalings` buffer (the main pass of
  the dual pass; the layers after k of the single pass).
- `SparseProjection`: the same mixture under `top_k_lora`, computing only each token's k chosen experts (the
  router's indices, one op of fixed output shape per adapted module, so vLLM's trace keeps it: `ops.SparseLora`).
- `FixedProjection`: the experts at constant weights folded into the B factors (the scaling pass of the dual pass
  when `scaling_pass_value * global_scaling_weight` is not 0; layers 1..k and the embedding of the single pass).
- `RouteAfterLayer`: the single pass's gate, on decoder layer k's output.
- `ResidualStream`: stands in for the final norm of a dual pass whose scaling pass stops after layer k.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

from .ops import SparseLora, StackedLora, XLoraRouter
from .spec import XLoraServingError

#: vLLM projection classes the wrappers accept (exact types: a subclass may compute more than these do).
COLUMN_PARALLEL = (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear)
ROW_PARALLEL = (RowParallelLinear,)
EMBEDDING = (VocabParallelEmbedding,)


def check_projection(name: str, module: nn.Module) -> None:
    """Refuses a vLLM module the wrappers cannot add to, saying which and why.

    Raises:
        XLoraServingError: Not one of the supported classes, or sharded in a way the update does not follow.
    """
    kind = type(module)
    if kind not in (*COLUMN_PARALLEL, *ROW_PARALLEL, *EMBEDDING):
        raise XLoraServingError(
            f"vLLM's module {name!r} is a {kind.__name__}; the X-LoRA plugin adds experts to ColumnParallelLinear, "
            "MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear and VocabParallelEmbedding only. Use "
            "experts that do not target it."
        )
    if kind in COLUMN_PARALLEL and module.gather_output:
        raise XLoraServingError(f"vLLM's {name!r} gathers its output across ranks, which the plugin does not follow.")
    if kind in ROW_PARALLEL and module.tp_size > 1 and not module.input_is_parallel:
        raise XLoraServingError(
            f"vLLM's {name!r} splits its own input across ranks, which the plugin does not follow."
        )


class _Projection(nn.Module):
    """A vLLM projection with an update added to its output; same call signature and return value as the base."""

    def __init__(self, base_layer: nn.Module, stack: StackedLora) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.stack = stack
        # A row-parallel shard's output is a partial sum until the all-reduce: the update joins it before, so the
        # mixture costs no extra communication (vLLM's own LoRA layers do the same).
        self._before_reduce = type(base_layer) in ROW_PARALLEL and base_layer.tp_size > 1

    def _add(self, out: torch.Tensor, x: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor):
        """The base projection's result, its output plus the update: (num_tokens, in_shard) -> as the base returns."""
        base = self.base_layer
        if not self._before_reduce:
            result = base(x)
            self._add(result[0] if isinstance(result, tuple) else result, x)
            return result
        bias = None if (base.tp_rank > 0 or base.skip_bias_add) else base.bias
        out = base.quant_method.apply(base, x, bias)  # (num_tokens, out): this shard's partial sum
        self._add(out, x)
        if base.reduce_results:
            out = tensor_model_parallel_all_reduce(out)
        if not base.return_bias:
            return out
        return out, (base.bias if base.skip_bias_add else None)


class MixedProjection(_Projection):
    """The per-token mixture: each token's rank weights are its scalings, read from the router's buffer.

    Args:
        base_layer: vLLM's projection.
        stack: Its experts' factors (scales folded in).
        router: Holds the `scalings` buffer written before this projection runs.
    """

    def __init__(self, base_layer: nn.Module, stack: StackedLora, router: XLoraRouter) -> None:
        super().__init__(base_layer, stack)
        self.router = router

    def _add(self, out: torch.Tensor, x: torch.Tensor) -> None:
        scalings = self.router.scalings[: x.shape[0]]  # (num_tokens, n_slots * n_experts) of this forward
        weights = scalings.index_select(1, self.stack.scaling_index)  # (num_tokens, R)
        self.stack.add_update(out, x, weights, self.stack.own_B())


class SparseProjection(_Projection):
    """The per-token top-k mixture from the chosen experts only: the router's (num_tokens, n_slots, k) indices.

    Args:
        base_layer: vLLM's projection.
        stack: Its experts' factors (scales folded in), as the dense mixture holds them.
        sparse: The same factors laid out per expert for the per-token gather (a `SparseLora` built from the stack).
        router: Holds the `chosen` and `chosen_weights` buffers written before this projection runs.
    """

    def __init__(self, base_layer: nn.Module, stack: StackedLora, sparse: SparseLora, router: XLoraRouter) -> None:
        super().__init__(base_layer, stack)
        self.sparse = sparse
        self.router = router

    def _add(self, out: torch.Tensor, x: torch.Tensor) -> None:
        n_tokens = x.shape[0]  # the router wrote these rows in this forward, vLLM's padding rows included
        chosen = self.router.chosen[:n_tokens]  # (num_tokens, n_slots, k)
        self.sparse.add_update(out, x, chosen, self.router.chosen_weights[:n_tokens])


class FixedProjection(_Projection):
    """The experts at constant per-rank weights, folded into copies of the B factors once (no per-token work).

    Args:
        base_layer: vLLM's projection.
        stack: Its experts' factors (scales folded in).
        rank_weights: (R,) float32, the weight of each rank's expert on this rank's module.
    """

    def __init__(self, base_layer: nn.Module, stack: StackedLora, rank_weights: torch.Tensor) -> None:
        super().__init__(base_layer, stack)
        self._n = 0
        for j, b in enumerate(stack.weighted_B(rank_weights)):
            self.register_buffer(f"B{j}", b, persistent=False)
            self._n += 1

    def _add(self, out: torch.Tensor, x: torch.Tensor) -> None:
        self.stack.add_update(out, x, None, [getattr(self, f"B{j}") for j in range(self._n)])


class RouteAfterLayer(nn.Module):
    """Decoder layer k of a single pass, then the gate on its output: the residual stream leaving layer k.

    vLLM's decoder layers return (hidden, residual) with the stream equal to their sum (the next layer's fused
    add-and-norm adds them), which is the hidden state peft-xlora's single pass hands to its classifier.

    Args:
        layer: vLLM's decoder layer k.
        router: Runs the classifier and gate and writes the scalings the later layers read.
    """

    def __init__(self, layer: nn.Module, router: XLoraRouter) -> None:
        super().__init__()
        self.layer = layer
        self.router = router

    def forward(self, *args, **kwargs):
        """The layer's own forward and outputs; the scalings as a side effect into the router's buffer."""
        hidden, residual = self.layer(*args, **kwargs)  # (num_tokens, hidden) each
        self.router.route(hidden + residual)
        return hidden, residual


class ResidualStream(nn.Module):
    """Stands in for the final norm in a copy of the decoder stack: returns the residual stream, not normalised.

    A dual pass with `scaling_pass_layers=k` feeds its classifier the residual stream after layer k, before any norm;
    the stack's own forward calls its norm as ``hidden, _ = norm(hidden, residual)``.
    """

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None):
        """(num_tokens, hidden) x2 -> their sum (and None)."""
        stream = hidden if residual is None else hidden + residual
        return stream, None
