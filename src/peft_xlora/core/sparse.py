"""Sparse top-k mixture: with `top_k_lora=k`, each token computes the LoRA updates of its k chosen experts only.

The dense mixture (`layer.py`) multiplies every token by all N experts' stacked factors and weighs the unchosen ones
by 0, so its cost grows with N. When every token's scalings have at most k non-zero entries, the same sum

    y_t = base(x_t) + sum_{j<k} s_{t,e_tj} * scale_{e_tj} * B_{e_tj} A_{e_tj} x_t

needs only the k chosen experts' factors per token: its cost depends on k and the ranks, not on N. Three ways to
compute it, all exact against the dense path (float tolerance) and selectable for measurement:

- ``"grouped"``: the (token, expert) pairs are sorted by expert, each expert's tokens are gathered into one row
  block padded to the largest block, and two batched matmuls over the experts present do the work; the results are
  scatter-added back to their tokens (what mixture-of-experts layers do). Work ~ n_present * largest_block, so it
  stays flat in N while routing spreads; one host sync per call (the block sizes).
- ``"gather"``: every pair gathers its expert's (r, in) and (r, out) factors and runs a batched matrix-vector
  product: no sort, no host sync, fixed shapes per step, but it materialises (pairs, r, in) factor copies, so it
  is for few tokens (cached generation).
- ``"loop"``: the sort of ``"grouped"``, then one pair of matmuls per expert present: no padding, a Python loop.

`sparse_update` picks ``"gather"`` for a handful of pairs and ``"grouped"`` otherwise (measured on CPU in
`benchmarks/sparse_topk.py`; docs/performance.md has the numbers). Whether a layer takes the sparse path at all is
`XLoraConfig.topk_compute`: ``"dense"``, ``"sparse"``, or ``"auto"`` (sparse once the layer has at least
`SPARSE_FROM[device type]` experts; `use_sparse`).

The chosen experts come from the routing: `routing.chosen` (indices computed once by the gate) where the router
provides it for this layer's scalings, else from the scalings tensor itself, once per tensor (so once per forward,
not per layer): the k entries of largest magnitude, after checking that no row has more than k non-zero entries (a
row with more, e.g. the scaling pass's constant weights, a pinned gate or single-pass static weights, takes the dense
path). The weights are always gathered from the layer's own scalings tensor, so the gradient reaches exactly the
chosen scalings, also through a recomputed checkpointed layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

if TYPE_CHECKING:
    from .layer import XLoraLayer

TopKCompute = Literal["auto", "dense", "sparse"]
SparseMethod = Literal["grouped", "gather", "loop"]

#: `topk_compute="auto"` takes the sparse path in a layer adapted by at least this many experts, per device type.
#: "cpu": the crossover measured on the project's CPU (benchmarks/results/sparse-topk-kernel.json: one mixture layer of
#: the reference workload at k = 2, rank 16, sparse faster than dense from this N on in prefill, training and cached
#: generation). "cuda": NOT measured (no GPU was available); a conservative guess that keeps the dense path, a few
#: large GEMMs a GPU runs at full speed, until the dense work is clearly larger than the sparse path's overhead.
SPARSE_FROM: dict[str, int] = {"cpu": 16, "cuda": 64}
#: Devices without an entry (mps, xpu, ...) use the conservative value.
SPARSE_FROM_DEFAULT = 64
#: At most this many (token, expert) pairs take the ``"gather"`` method; more take ``"grouped"``.
GATHER_MAX_PAIRS = 16


@dataclass(frozen=True)
class TopKSetting:
    """What a mixture layer needs to know of the config to choose its path.

    Attributes:
        k: `top_k_lora`: the most experts a token keeps.
        mode: `topk_compute`.
    """

    k: int
    mode: TopKCompute = "auto"


def configure_topk(layers: list[XLoraLayer], config: Any) -> None:
    """Gives every mixture layer the top-k setting of `config` (None without `top_k_lora`: always dense)."""
    k = getattr(config, "top_k_lora", None)
    setting = None if k is None else TopKSetting(int(k), getattr(config, "topk_compute", "auto"))
    for layer in layers:
        layer.topk = setting


def use_sparse(mode: str, n_experts: int, k: int, device_type: str) -> bool:
    """Whether a layer of `n_experts` experts computes a top-`k` mixture sparsely on `device_type`.

    ``"dense"`` never, ``"sparse"`` whenever fewer than all experts are kept, ``"auto"`` from `SPARSE_FROM`.
    """
    if mode == "dense" or k >= n_experts:
        return False
    if mode == "sparse":
        return True
    return n_experts >= SPARSE_FROM.get(device_type, SPARSE_FROM_DEFAULT)


# Per scalings tensor: its chosen indices (or None: some row has more than k non-zero entries). Keyed weakly by the
# tensor, so an entry lives as long as that forward's scalings.
_CHOSEN: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def chosen_indices(routing: Any, scalings: torch.Tensor, k: int) -> torch.Tensor | None:
    """The experts each token and layer slot keeps, (batch|1, seq|1, n_slots|1, k) long; None if not top-k.

    Args:
        routing: The forward's `Routing`; its `chosen` (indices, weights) is used when it describes `scalings`.
        scalings: (batch|1, seq|1, n_slots|1, n_experts), the tensor the layer applies.
        k: The number of experts kept.

    Returns:
        Indices such that every non-zero scaling of a row is among them, or None when a row has more than k
        non-zero scalings (then only the dense path is exact).
    """
    chosen = getattr(routing, "chosen", None)
    # The router's indices describe `routing.scalings`; an encoder-decoder routing also carries the source tokens'
    # scalings (and swaps them in for cross-attention), so there the indices are derived per tensor instead.
    own = scalings is getattr(routing, "scalings", None) and getattr(routing, "source_scalings", None) is None
    if chosen is not None and own:
        indices = chosen[0]
        if indices.shape[:-1] == scalings.shape[:-1] and indices.shape[-1] <= scalings.shape[-1]:
            return indices
    if scalings in _CHOSEN:
        return _CHOSEN[scalings]
    with torch.no_grad():
        over = bool(((scalings != 0).sum(-1) > k).any())  # one host sync per scalings tensor
        indices = None if over else scalings.abs().topk(k, dim=-1).indices  # (batch|1, seq|1, n_slots|1, k)
    _CHOSEN[scalings] = indices
    return indices


@dataclass
class _Layout:
    """A layer's experts as the sparse path indexes them (built once per layer, model size and device)."""

    local: torch.Tensor  # (n_experts,) long: the layer's position of each model expert, -1 where it adapts none
    scale: torch.Tensor  # (E_l,) float32: alpha / r per expert
    drop_id: torch.Tensor  # (E_l,) long: index into layer.dropouts
    rank: int  # the largest rank; smaller ones are zero-padded
    pad_rows: torch.Tensor | None  # (E_l, rank) long rows of the stacked factors (R = a zero row); None: equal ranks


def _layout(layer: XLoraLayer, n_experts: int, device: torch.device) -> _Layout:
    cache = layer.__dict__.setdefault("_sparse_layouts", {})
    key = (n_experts, str(device))
    if key in cache:
        return cache[key]
    ranks = layer.ranks
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    local = torch.full((n_experts,), -1, dtype=torch.long)
    for position, expert in enumerate(layer.expert_indices):
        if expert < n_experts:
            local[expert] = position
    scale = layer.rank_scale.detach().cpu()[starts].float()
    # Each expert's dropout as an index into `layer.dropouts` (rank_dropout holds them rounded to float32).
    values = torch.tensor(layer.dropouts, dtype=torch.float32)
    drop_id = (layer.rank_dropout.detach().cpu()[starts, None] - values).abs().argmin(-1)
    rank = max(ranks)
    pad_rows = None
    if len(set(ranks)) > 1:
        total = sum(ranks)
        rows = [[s + j if j < r else total for j in range(rank)] for s, r in zip(starts, ranks)]
        pad_rows = torch.tensor(rows, dtype=torch.long, device=device)
    layout = _Layout(local.to(device), scale.to(device), drop_id.to(device), rank, pad_rows)
    cache[key] = layout
    return layout


def _expert_factors(layer: XLoraLayer, layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors per expert: A (E_l, r, in) and B (E_l, r, out), zero-padded to the largest rank.

    Equal ranks: views of the stacked parameters (no copy). Unequal: one gather with a zero row for the padding,
    differentiable, so trainable experts still get their gradients.
    """
    A, B = layer.xlora_A, layer.xlora_B  # (R, in), (out, R)
    n_local = len(layer.ranks)
    if layout.pad_rows is None:
        return A.view(n_local, layout.rank, -1), B.view(B.shape[0], n_local, layout.rank).permute(1, 2, 0)
    A_ext = torch.cat([A, A.new_zeros(1, A.shape[1])])  # (R + 1, in)
    B_ext = torch.cat([B.T, B.new_zeros(1, B.shape[0])])  # (R + 1, out)
    return A_ext[layout.pad_rows], B_ext[layout.pad_rows]


def sparse_mixture(
    layer: XLoraLayer, x: torch.Tensor, scalings: torch.Tensor, indices: torch.Tensor, method: str | None = None
) -> torch.Tensor:
    """The gated update of `layer` computed from the chosen experts only: (*lead, out), before any embed scale.

    Args:
        layer: The mixture layer.
        x: Its input, (*lead, in), or (*lead,) token ids for an embedding.
        scalings: (batch|1, seq|1, n_slots|1, n_experts) scalings the layer applies.
        indices: `chosen_indices` of `scalings`, (batch|1, seq|1, n_slots|1, k).
        method: ``"grouped"``, ``"gather"`` or ``"loop"``; None picks by the number of pairs.
    """
    lead = x.shape if layer.is_embedding else x.shape[:-1]
    scalings = scalings.to(layer.xlora_A.device)
    slot_s = layer._layer_scalings(scalings)  # (batch|1, seq|1, n_experts)
    slot_i = layer._layer_scalings(indices.to(slot_s.device))  # (batch|1, seq|1, k)
    n_experts, k = slot_s.shape[-1], slot_i.shape[-1]
    weights = slot_s.gather(-1, slot_i)  # (batch|1, seq|1, k): the gradient reaches exactly the chosen scalings
    n_tokens = lead.numel()
    pick = layer._per_token(slot_i, lead).expand(*lead, k).reshape(n_tokens, k)  # (tokens, k)
    weights = layer._per_token(weights, lead).expand(*lead, k).reshape(n_tokens, k)  # (tokens, k)
    layout = _layout(layer, n_experts, slot_s.device)
    position = layout.local[pick]  # (tokens, k): the layer's expert, -1 where it adapts none
    present = position >= 0
    position = position.clamp(min=0)
    # alpha / r folded into the weight; a pair whose expert does not adapt this layer weighs 0 (and gets no gradient).
    weights = weights * layout.scale[position] * present
    dtype = layer.xlora_A.dtype
    weights = weights.to(dtype)
    if layer.is_embedding:
        inputs = x.reshape(n_tokens)
    else:
        inputs = _dropped_inputs(layer, x.reshape(n_tokens, x.shape[-1]).to(dtype))  # (n_drop, tokens, in)
    if method is None:
        method = "gather" if n_tokens * k <= GATHER_MAX_PAIRS else "grouped"
    if method == "gather":
        update = _gather(layer, layout, inputs, position, weights)
    elif method in ("grouped", "loop"):
        update = _grouped(layer, layout, inputs, position, present, weights, loop=method == "loop")
    else:
        raise ValueError(f"Unknown sparse method {method!r}; expected 'grouped', 'gather' or 'loop'.")
    return update.reshape(*lead, update.shape[-1])


def _dropped_inputs(layer: XLoraLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer input as each dropout value sees it, (n_dropouts, tokens, in).

    The masks are drawn in the dense path's order (one per distinct dropout value, ascending), so with the same
    random state both paths drop the same entries.
    """
    if not layer.training or layer.dropouts == [0.0]:
        return x[None]
    if len(layer.dropouts) == 1:
        return F.dropout(x, layer.dropouts[0], training=True)[None]
    return torch.stack([F.dropout(x, p, training=True) for p in layer.dropouts])


def _gather(
    layer: XLoraLayer, layout: _Layout, inputs: torch.Tensor, position: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Per (token, expert) pair: its expert's factors gathered, a batched matrix-vector product. (tokens, out)."""
    n_tokens, k = position.shape
    A, B = _expert_factors(layer, layout)  # (E_l, r, in), (E_l, r, out)
    flat = position.reshape(-1)  # (pairs,)
    if layer.is_embedding:
        ids = inputs.repeat_interleave(k)  # (pairs,)
        z = A[flat, :, ids]  # (pairs, r)
    else:
        token = torch.arange(n_tokens, device=flat.device).repeat_interleave(k)
        x_pairs = inputs[layout.drop_id[flat], token]  # (pairs, in)
        z = torch.bmm(A.index_select(0, flat), x_pairs.unsqueeze(-1)).squeeze(-1)  # (pairs, r)
    z = z * weights.reshape(-1, 1)
    y = torch.bmm(z.unsqueeze(1), B.index_select(0, flat)).squeeze(1)  # (pairs, out)
    return y.view(n_tokens, k, -1).sum(1)


def _grouped(
    layer: XLoraLayer,
    layout: _Layout,
    inputs: torch.Tensor,
    position: torch.Tensor,
    present: torch.Tensor,
    weights: torch.Tensor,
    loop: bool = False,
) -> torch.Tensor:
    """Pairs sorted by expert; per expert present, its tokens in one padded block; two batched matmuls. (tokens, out).

    With `loop`, one pair of plain matmuls per expert present instead (no padding).
    """
    n_tokens, k = position.shape
    n_local = len(layer.ranks)
    device = position.device
    # Pairs of experts that do not adapt this layer sort last, into a group of their own that is never computed.
    key = torch.where(present, position, n_local).reshape(-1)  # (pairs,)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n_local + 1)[:n_local].tolist()  # the one host sync
    n_valid = sum(counts)
    out_features = layer.out_features
    dtype = weights.dtype
    if n_valid == 0:  # no token chose an expert that adapts this layer
        return weights.new_zeros(n_tokens, out_features)
    order = order[:n_valid]
    experts = [e for e, c in enumerate(counts) if c > 0]
    block = max(counts)
    sorted_pos = key[order]  # (valid,)
    token = order // k  # (valid,): pair p is token p // k
    pair_w = weights.reshape(-1)[order]  # (valid,)
    A, B = _expert_factors(layer, layout)  # (E_l, r, in), (E_l, r, out)
    if layer.is_embedding:
        ids = inputs[token]
        z_pairs = A[sorted_pos, :, ids]  # (valid, r)
        rows = None
    else:
        rows = layout.drop_id[sorted_pos] * n_tokens + token  # (valid,) rows of the (n_drop * tokens, in) inputs
        flat_inputs = inputs.reshape(-1, inputs.shape[-1])
    if loop:
        out = weights.new_zeros(n_tokens, out_features)
        start = 0
        for e in experts:
            stop = start + counts[e]
            # (count, r)
            z = z_pairs[start:stop] if rows is None else flat_inputs.index_select(0, rows[start:stop]) @ A[e].T
            y = (z * pair_w[start:stop, None]) @ B[e]  # (count, out)
            out = out.index_add(0, token[start:stop], y)
            start = stop
        return out
    n_present = len(experts)
    starts = torch.tensor([0, *counts], device=device).cumsum(0)[:-1]  # (E_l,) first sorted pair of each expert
    compact = torch.full((n_local,), 0, dtype=torch.long)
    compact[experts] = torch.arange(n_present)
    compact = compact.to(device)
    dest = compact[sorted_pos] * block + (torch.arange(n_valid, device=device) - starts[sorted_pos])  # (valid,)
    w_block = weights.new_zeros(n_present * block).index_put((dest,), pair_w).view(n_present, block, 1)
    tok_block = torch.zeros(n_present * block, dtype=torch.long, device=device).index_put_((dest,), token)
    if n_present < n_local:
        experts_t = torch.tensor(experts, device=device)
        A, B = A.index_select(0, experts_t), B.index_select(0, experts_t)
    if layer.is_embedding:
        z = z_pairs.new_zeros(n_present * block, z_pairs.shape[-1]).index_put((dest,), z_pairs)
        z = z.view(n_present, block, -1)  # (present, block, r)
    else:
        row_block = torch.zeros(n_present * block, dtype=torch.long, device=device).index_put_((dest,), rows)
        x_block = flat_inputs.index_select(0, row_block).view(n_present, block, -1)  # (present, block, in)
        z = torch.bmm(x_block, A.transpose(1, 2))  # (present, block, r)
    y = torch.bmm(z * w_block, B)  # (present, block, out); padding rows weigh 0
    return weights.new_zeros(n_tokens, out_features, dtype=dtype).index_add(0, tok_block, y.view(-1, out_features))
