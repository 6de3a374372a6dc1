"""Sparse top-k mixture: with `top_k_lora=k`, each token computes the LoRA updates of its k chosen experts only.

The dense mixture (`layer.py`) multiplies every token by all N experts' stacked factors and weighs the unchosen ones
by 0, so its cost grows with N. When every token's scalings have at most k non-zero entries, the same sum

    y_t = base(x_t) + sum_{j<k} s_{t,e_tj} * scale_{e_tj} * B_{e_tj} A_{e_tj} x_t

needs only the k chosen experts' factors per token: its cost depends on k and the ranks, not on N. Three ways to
compute it, all exact against the dense path (float tolerance), selectable for measurement:

- ``"grouped"``: the (token, expert) pairs are sorted by expert; each expert's tokens are gathered into padded tiles
  and two batched matmuls over the tiles do the work; the results are scatter-added back to their tokens (what
  mixture-of-experts layers do). `_tile_size` picks the layout from the group sizes: one tile per expert over the
  stacked factors as they are, smaller tiles (less padding, a factor copy per tile) when routing is skewed, or one
  pair of plain matmuls per expert present when few experts are chosen. One host sync per call (the group sizes).
- ``"gather"``: every token gathers its k experts' factors and runs two batched matrix-vector products: no sort, no
  host sync, fixed shapes for a given number of tokens, but it copies (pairs, r, in + out) factors, so it is for a
  handful of tokens (cached generation).
- ``"loop"``: the sort of ``"grouped"``, then one pair of matmuls per expert present, always.

`sparse_mixture` takes ``"gather"`` for at most `GATHER_MAX_PAIRS` (token, expert) pairs and ``"grouped"`` otherwise.
On a GPU the same split holds, with other kernels: a grouped GEMM over the sorted pairs (no padding, the scatter-add
fused into it) for prefill and training, and the per-token gather (as multi-LoRA serving kernels do) for decoding,
where it is also what CUDA graphs and torch.compile need (fixed shapes, no host sync). Whether a layer takes the
sparse path at all is `XLoraConfig.topk_compute`: ``"dense"``, ``"sparse"``, or ``"auto"``: sparse in a layer adapted
by at least a measured number of experts per kept expert, which depends on the experts' rank (`SPARSE_FROM_RANK`,
`SPARSE_FROM`, `use_sparse`).

The chosen experts come from the routing: `routing.chosen_for(layer)` (indices the gate computed once, for the
scalings this layer applies) where the router has them, else from the scalings tensor itself, once per tensor (so
once per forward, not per layer): the k entries of largest magnitude, after checking that no row has more than k
non-zero entries (a row with more, e.g. the scaling pass's constant weights, a pinned gate or single-pass static
weights, takes the dense path; held prompt scalings take this way too). The weights are always gathered from the
layer's own scalings tensor, so the gradient reaches exactly the chosen scalings, also through a recomputed
checkpointed layer. (Derived from the scalings, a chosen expert whose scaling is exactly 0, possible only without
softmax, may be swapped for another zero: the outputs stay exact, but the gate's gradient lacks that expert's term;
the router's own indices avoid it.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

# The mixture layer (`layer.XLoraLayer`, which imports this module): typed by its base class here.
XLoraLayer = nn.Module

TopKCompute = Literal["auto", "dense", "sparse"]
SparseMethod = Literal["grouped", "gather", "loop"]

#: `topk_compute="auto"` takes the sparse path in a layer adapted by at least `n * k` experts, where n is the first
#: entry here for a call of many tokens (prefill, training) and the second for one of at most `GATHER_MAX_PAIRS`
#: (token, expert) pairs (cached decoding), per device type. "cpu": measured on the project's CPU
#: (benchmarks/results/sparse-topk-kernel.json, one decoder layer of the reference workload, rank 16): sparse beats
#: dense from N = 8 / 8 / 16 (k = 1 / 2 / 4) in prefill, 8 / 8 / 32 in training steps and 16 / 32 / 64 when decoding
#: one token. "cuda": NOT measured (no GPU was available): a conservative guess that keeps the dense path, a few
#: large GEMMs a GPU runs well, to larger N.
SPARSE_FROM: dict[str, tuple[int, int]] = {"cpu": (8, 16), "cuda": (32, 64)}
#: Devices without an entry (mps, xpu, ...) use the conservative values.
SPARSE_FROM_DEFAULT = (32, 64)
#: The same thresholds when the experts' rank is known, per device type and rank: {device: {rank: (many, few)}}.
#: A lower rank makes the dense mixture cheaper next to the sparse path's fixed costs (sorting, gathering the
#: inputs, adding the updates back), so sparse wins later. "cpu": measured at top-2 on the project's CPU
#: (benchmarks/results/sparse-topk-crossover-cpu.json, its "sparse_from_rank": one decoder layer of the reference
#: workload, N from 4 to 128): sparse from N = 32 / 12 / 6 in prefill and training at ranks 8 / 16 / 32, and from
#: 32 / 24 / 16 when decoding one token. A rank between two entries takes the lower rank's entry (the later
#: threshold); one below the table scales the smallest rank's entry by (smallest rank / rank), as the dense work
#: shrinks with the rank (the measurement: N x rank at the crossover about constant); one above takes the largest
#: rank's. Devices without an entry ignore the rank and use `SPARSE_FROM`.
SPARSE_FROM_RANK: dict[str, dict[int, tuple[int, int]]] = {"cpu": {8: (16, 16), 16: (6, 12), 32: (3, 8)}}
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


def use_sparse(
    mode: str, n_experts: int, k: int, device_type: str, n_tokens: int | None = None, *, rank: int | None = None
) -> bool:
    """Whether a layer of `n_experts` experts computes a top-`k` mixture of `n_tokens` tokens sparsely.

    ``"dense"`` never, ``"sparse"`` whenever fewer than all experts are kept, ``"auto"`` from the measured thresholds:
    the dense work grows with the number of experts and the sparse work with k, so the crossover is a number of
    experts per kept expert (higher for a handful of tokens, where fixed costs weigh more, and for a lower rank).

    Args:
        mode: ``"auto"``, ``"dense"`` or ``"sparse"`` (`XLoraConfig.topk_compute`).
        n_experts: The experts the layer mixes.
        k: The most experts a token keeps.
        device_type: Where the layer runs (``"cpu"``, ``"cuda"``, ...).
        n_tokens: Tokens of the call; None counts as many.
        rank: The experts' rank in the layer (the largest, where they differ). None, or a device without a
            `SPARSE_FROM_RANK` table: `SPARSE_FROM`, the rank-16 measurement.
    """
    if mode == "dense" or k >= n_experts:
        return False
    if mode == "sparse":
        return True
    many, few = sparse_from(device_type, rank)
    per_kept = few if n_tokens is not None and n_tokens * k <= GATHER_MAX_PAIRS else many
    return n_experts >= per_kept * k


def sparse_from(device_type: str, rank: int | None = None) -> tuple[int, int]:
    """The (many tokens, few tokens) experts per kept expert from which "auto" goes sparse; see `use_sparse`."""
    table = SPARSE_FROM_RANK.get(device_type) if rank is not None else None
    if not table:
        return SPARSE_FROM.get(device_type, SPARSE_FROM_DEFAULT)
    below = [r for r in table if r <= rank]
    if below:
        return table[max(below)]
    smallest = min(table)
    many, few = table[smallest]
    return -(-many * smallest // rank), -(-few * smallest // rank)  # rounded up: later, not earlier


# Per scalings tensor: its chosen indices (or None: some row has more than k non-zero entries). Keyed weakly by the
# tensor, so an entry lives as long as that forward's scalings.
_CHOSEN: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def chosen_indices(
    routing: Any, scalings: torch.Tensor, k: int, layer_index: int | None = None
) -> torch.Tensor | None:
    """The experts each token and layer slot keeps, (batch|1, seq|1, n_slots|1, k) long; None if not top-k.

    Args:
        routing: The forward's `Routing`: the gate's own choice for mixture layer `layer_index` (`chosen_for`) is
            used when it has one.
        scalings: (batch|1, seq|1, n_slots|1, n_experts), the tensor the layer applies.
        k: The number of experts kept.
        layer_index: The mixture layer asking; None derives the choice from `scalings`.

    Returns:
        Indices such that every non-zero scaling of a row is among them, or None when a row has more than k
        non-zero scalings (then only the dense path is exact).
    """
    chosen_for = getattr(routing, "chosen_for", None)
    chosen = chosen_for(layer_index) if chosen_for is not None and layer_index is not None else None
    if chosen is not None and chosen[0].shape[:-1] == scalings.shape[:-1]:
        return chosen[0]  # computed once by the gate (routing.Chosen): no derivation, no host sync
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

    position: torch.Tensor  # (n_experts,) long: each model expert's position in the layer; n_local where it is absent
    scale: torch.Tensor  # (n_experts,) float32: each model expert's alpha / r here; 0 where it adapts none
    drop_id: torch.Tensor  # (n_local + 1,) long: each position's index into layer.dropouts (the absent slot: 0)
    rank: int  # the largest rank
    rows: torch.Tensor  # (n_local, rank) long: each expert's rows of the stacked factors (a smaller rank repeats one)
    rank_mask: torch.Tensor | None  # (n_local, rank): 1 on an expert's own ranks, 0 on padding; None: equal ranks


def _layout(layer: XLoraLayer, n_experts: int, device: torch.device) -> _Layout:
    cache = layer.__dict__.setdefault("_sparse_layouts", {})
    key = (n_experts, str(device))
    if key in cache:
        return cache[key]
    ranks, n_local = layer.ranks, len(layer.ranks)
    starts = [sum(ranks[:i]) for i in range(n_local)]
    rank_scale = layer.rank_scale.detach().cpu()
    position = torch.full((n_experts,), n_local, dtype=torch.long)
    scale = torch.zeros(n_experts, dtype=torch.float32)
    for local, expert in enumerate(layer.expert_indices):
        if expert < n_experts:
            position[expert] = local
            scale[expert] = rank_scale[starts[local]]
    # Each expert's dropout as an index into `layer.dropouts` (rank_dropout holds them rounded to float32).
    values = torch.tensor(layer.dropouts, dtype=torch.float32)
    drop_id = (layer.rank_dropout.detach().cpu()[starts, None] - values).abs().argmin(-1)
    drop_id = torch.cat([drop_id, drop_id.new_zeros(1)])
    rank = max(ranks)
    # A smaller rank is padded with its first row again, masked to 0: no zero row needs concatenating per call.
    rows = torch.tensor([[s + (j if j < r else 0) for j in range(rank)] for s, r in zip(starts, ranks)])
    mask = None
    if len(set(ranks)) > 1:
        mask = torch.tensor([[float(j < r) for j in range(rank)] for r in ranks]).to(device, layer.xlora_A.dtype)
    layout = _Layout(position.to(device), scale.to(device), drop_id.to(device), rank, rows.to(device), mask)
    cache[key] = layout
    return layout


def _expert_factors(
    layer: XLoraLayer, layout: _Layout, experts: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Factors per expert, padded to the largest rank: A (E, r, in), B (E, r, out) and the rank mask (E, r) or None.

    Args:
        layer: The mixture layer.
        layout: Its `_layout`.
        experts: (E,) positions to take (repeats allowed), or None for all the layer's experts in order.

    Equal ranks and all experts: views of the stacked parameters (no copy). Otherwise a gather of A's rows and of B's
    columns: B is stored (out, R), so its columns are gathered where they lie (a gather of (E, r, out) blocks would
    transpose, several times slower). Differentiable either way, so trainable experts get their gradients. An
    embedding's A (R, vocabulary) is never gathered whole: None, the caller indexes it.
    """
    A, B = layer.xlora_A, layer.xlora_B  # (R, in), (out, R)
    n_local, rank = len(layer.ranks), layout.rank
    if experts is None and layout.rank_mask is None:
        A3 = None if layer.is_embedding else A.view(n_local, rank, A.shape[1])  # (E_l, r, in)
        return A3, B.view(B.shape[0], n_local, rank).permute(1, 2, 0), None  # B: (E_l, r, out), strided
    rows = layout.rows if experts is None else layout.rows.index_select(0, experts)  # (E, r)
    n = rows.shape[0]
    A_t = None if layer.is_embedding else A.index_select(0, rows.reshape(-1)).view(n, rank, A.shape[1])
    B_t = B.index_select(1, rows.reshape(-1)).view(B.shape[0], n, rank).permute(1, 2, 0)  # (E, r, out)
    mask = None
    if layout.rank_mask is not None:
        mask = layout.rank_mask if experts is None else layout.rank_mask.index_select(0, experts)
    return A_t, B_t, mask


def sparse_mixture(
    layer: XLoraLayer,
    x: torch.Tensor,
    scalings: torch.Tensor,
    indices: torch.Tensor,
    method: str | None = None,
    into: torch.Tensor | None = None,
    embed_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gated update of `layer` computed from the chosen experts only.

    Args:
        layer: The mixture layer.
        x: Its input, (*lead, in), or (*lead,) token ids for an embedding.
        scalings: (batch|1, seq|1, n_slots|1, n_experts) scalings the layer applies.
        indices: `chosen_indices` of `scalings`, (batch|1, seq|1, n_slots|1, k).
        method: ``"grouped"``, ``"gather"`` or ``"loop"``; None picks by the number of pairs.
        into: The base layer's output (*lead, out): the update is added to it in place (saving a zero-filled
            buffer and a sum the size of the output) and it is returned. None returns the update alone.
        embed_scale: An embedding's output scale (Gemma's), applied to the update.

    Returns:
        (*lead, out): `into` plus the update, or the update.
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
    # alpha / r folded into the weight; a pair whose expert does not adapt this layer weighs 0 (and gets no gradient).
    dtype = layer.xlora_A.dtype
    weights = weights * layout.scale[pick]
    if embed_scale is not None:
        weights = weights * embed_scale.to(weights.device, weights.dtype)
    weights = weights.to(dtype)
    position = layout.position[pick]  # (tokens, k): the layer's expert; len(layer.ranks) where it adapts none
    if layer.is_embedding:
        inputs = x.reshape(n_tokens)
    else:
        inputs = _dropped_inputs(layer, x.reshape(n_tokens, x.shape[-1]).to(dtype))  # (n_drop * tokens, in)
    out = None
    if into is not None and into.is_contiguous() and not torch.is_grad_enabled():
        # Without autograd, into the base output directly. With it, in-place ops on this view would each make
        # autograd copy the whole output's gradient in backward (CopySlices): a fresh buffer is added once instead.
        out = into.view(n_tokens, into.shape[-1])  # (tokens, out), shares memory with `into`
    if method is None:
        method = "gather" if n_tokens * k <= GATHER_MAX_PAIRS else "grouped"
    if method == "gather":
        update = _gather(layer, layout, inputs, position, weights)
        if out is not None:
            out.add_(update.to(out.dtype))
    elif method in ("grouped", "loop"):
        update = _grouped(layer, layout, inputs, position, weights, loop=method == "loop", out=out)
    else:
        raise ValueError(f"Unknown sparse method {method!r}; expected 'grouped', 'gather' or 'loop'.")
    if out is not None:
        return into
    update = update.reshape(*lead, update.shape[-1])
    return update if into is None else into + update.to(into.dtype)


def _dropped_inputs(layer: XLoraLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer input as each dropout value sees it, stacked: (n_dropouts * tokens, in).

    The masks are drawn in the dense path's order (one per distinct dropout value, ascending), so with the same
    random state both paths drop the same entries.
    """
    if not layer.training or layer.dropouts == [0.0]:
        return x
    if len(layer.dropouts) == 1:
        return F.dropout(x, layer.dropouts[0], training=True)
    return torch.cat([F.dropout(x, p, training=True) for p in layer.dropouts])


def _embedding_down(layer: XLoraLayer, layout: _Layout, ids: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The down projection z = A_e[:, id] of (id, expert) pairs, (pairs, r): for an embedding, a lookup."""
    rows = layout.rows.index_select(0, experts)  # (pairs, r)
    z = layer.xlora_A[rows, ids.unsqueeze(-1)]  # (pairs, r)
    return z if layout.rank_mask is None else z * layout.rank_mask.index_select(0, experts)


def _gather(
    layer: XLoraLayer, layout: _Layout, inputs: torch.Tensor, position: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Per token: its k experts' factors gathered side by side, two batched matrix-vector products. (tokens, out).

    No sort and no host sync: fixed shapes for a given number of tokens. The sum over the k experts is part of the
    second product, whose inner dimension is k * r.
    """
    n_tokens, k = position.shape
    flat = position.reshape(-1).clamp(max=len(layer.ranks) - 1)  # (pairs,); absent experts weigh 0
    A, B, mask = _expert_factors(layer, layout, flat)  # (pairs, r, in), (pairs, r, out), (pairs, r)
    rank = layout.rank
    if layer.is_embedding:
        z = _embedding_down(layer, layout, inputs.repeat_interleave(k), flat)  # (pairs, r)
    elif inputs.shape[0] == n_tokens:  # one input row per token (at most one dropout value)
        z = torch.bmm(A.view(n_tokens, k * rank, -1), inputs.unsqueeze(-1))  # (tokens, k * r, 1)
    else:  # each expert's own dropout: one input row per pair
        token = torch.arange(n_tokens, device=flat.device).repeat_interleave(k)  # (pairs,)
        x_pairs = F.embedding(layout.drop_id[flat] * n_tokens + token, inputs)  # (pairs, in)
        z = torch.bmm(A, x_pairs.unsqueeze(-1))  # (pairs, r, 1)
    z = z.reshape(n_tokens, k, rank)
    if mask is not None and not layer.is_embedding:
        z = z * mask.view(n_tokens, k, rank)
    z = z * weights.unsqueeze(-1)  # (tokens, k, r)
    B = B.reshape(n_tokens, k, rank, -1).reshape(n_tokens, k * rank, -1)  # (tokens, k * r, out)
    return torch.bmm(z.view(n_tokens, 1, k * rank), B).squeeze(1)  # (tokens, out)


#: Candidate tile sizes of the grouped method (besides one tile per expert, as large as its largest group). Smaller
#: tiles pad less but measured slower on CPU: batched matmuls of fewer than 32 rows run well below their peak.
_TILES = (32, 64, 128, 256)
#: The per-expert cost of the loop layout (a handful of small ops per expert present, and their autograd nodes when
#: training), in padded rows of an inference forward: fitted to the kernel benchmark's layouts on CPU
#: (benchmarks/results/sparse-topk-kernel.json, N = 64 and 128, balanced and skewed routing).
_LOOP_ROWS = 28
_LOOP_ROWS_TRAINING = 80
LOOP = -1


def _tile_size(counts: list[int], rank: int, n_in: int, n_out: int, views: bool, training: bool = False) -> int:
    """The layout of the grouped method, from the pairs each expert got: rows per tile, 0 or `LOOP`.

    0 is one tile per layer expert, as large as the largest group: the stacked factors are used as they are (`views`:
    equal ranks), but every expert is padded to the largest group. A tile size pads less but copies one factor block
    per tile. `LOOP` computes each expert present with its own matmuls: no padding, no copy, a fixed cost per expert.
    Measured on CPU, a padded row costs about 2 (in + out) element moves (input gathered, output written and read
    back; twice that when autograd records, for the backward), a tile's copy of B's r columns about 2 r out (a strided
    gather; A's rows are cheap; no backward for frozen experts): the estimate compares those, in padded rows.
    """
    largest = max(counts)
    present = sum(1 for c in counts if c)
    row = 2 if training else 1
    copy = rank * n_out / (n_in + n_out)  # a tile's factor copy, in padded rows
    best_cost, best = sum(counts) * row + present * (_LOOP_ROWS_TRAINING if training else _LOOP_ROWS), LOOP
    if views and len(counts) * largest * row < best_cost:
        best_cost, best = len(counts) * largest * row, 0
    for size in (*_TILES, largest):
        if size > largest or (size == largest and views):
            continue
        tiles = sum(-(-c // size) for c in counts)
        cost = tiles * size * row + tiles * copy
        if cost < best_cost:
            best_cost, best = cost, size
    return best


class _AddRows(torch.autograd.Function):
    """out.index_add(0, index, source) whose backward keeps only the index.

    torch's index_add saves `source` for its backward (to shape the gradient); here that is the (padded pairs, out)
    product of the up projection, the largest tensor of the layer: saving it made the sparse path's training step
    hold more memory than the dense one. The gradient of `source` is the output's gradient gathered at `index`.
    """

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        return out.index_add(0, index, source)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        (index,) = ctx.saved_tensors
        return grad, None, grad.index_select(0, index)


def _add_rows(out: torch.Tensor, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`out` with row `index[i]` increased by `source[i]`; in place without autograd, else without saving `source`."""
    source = source.to(out.dtype)
    if torch.is_grad_enabled() and (out.requires_grad or source.requires_grad):
        return _AddRows.apply(out, index, source)
    return out.index_add_(0, index, source)


def _grouped(
    layer: XLoraLayer,
    layout: _Layout,
    inputs: torch.Tensor,
    position: torch.Tensor,
    weights: torch.Tensor,
    loop: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pairs sorted by expert, cut into padded tiles of one expert each, two batched matmuls. (tokens, out).

    `_tile_size` picks the tiles, or one pair of plain matmuls per expert present (no padding, a Python loop: best
    when few experts are chosen); `loop` forces the latter. The update is added into `out` in place when given (and
    `out` returned).
    """
    n_tokens, k = position.shape
    n_local = len(layer.ranks)
    device = position.device
    out_features = layer.out_features
    if out is None:
        out = weights.new_zeros(n_tokens, out_features)
    # Pairs whose expert does not adapt this layer have key n_local: they sort last and are never computed.
    key = position.reshape(-1)  # (pairs,)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n_local + 1)[:n_local].tolist()  # the one host sync
    n_valid = sum(counts)
    if n_valid == 0:  # no token chose an expert that adapts this layer
        return out
    order = order[:n_valid]
    sorted_pos = key[order]  # (valid,)
    token = order // k  # (valid,): pair p belongs to token p // k
    pair_w = weights.reshape(-1)[order]  # (valid,)
    if layer.is_embedding:
        z_pairs = _embedding_down(layer, layout, inputs[token], sorted_pos)  # (valid, r)
    else:
        rows = token  # (valid,) rows of the inputs: one per token, or per dropout value and token
        if inputs.shape[0] > n_tokens:
            rows = layout.drop_id[sorted_pos] * n_tokens + token
    views = layout.rank_mask is None
    n_in = layer.in_features if not layer.is_embedding else layout.rank
    training = torch.is_grad_enabled() and (
        inputs.requires_grad or weights.requires_grad or layer.xlora_A.requires_grad
    )
    size = LOOP if loop else _tile_size(counts, layout.rank, n_in, out_features, views, training)
    if size == LOOP:
        A_all, B_all, mask = _expert_factors(layer, layout)
        start, ys = 0, []
        for e, count in enumerate(counts):
            if not count:
                continue
            stop = start + count
            if layer.is_embedding:
                z = z_pairs[start:stop]  # (count, r)
            else:
                z = F.embedding(rows[start:stop], inputs) @ A_all[e].T  # (count, r)
                z = z if mask is None else z * mask[e]
            ys.append((z * pair_w[start:stop, None]) @ B_all[e])  # (count, out)
            start = stop
        return _add_rows(out, token, torch.cat(ys))
    if size == 0:  # one tile per layer expert, the stacked factors as they are
        size, tiles_of = max(counts), [1] * n_local
    else:
        tiles_of = [-(-c // size) for c in counts]  # tiles per expert
    n_tiles = sum(tiles_of)
    first_pair = torch.tensor([0, *counts[:-1]], device=device).cumsum(0)  # (E_l,) first sorted pair per expert
    first_tile = torch.tensor([0, *tiles_of[:-1]], device=device).cumsum(0)  # (E_l,) first tile per expert
    within = torch.arange(n_valid, device=device) - first_pair[sorted_pos]  # (valid,) rank inside the group
    dest = (first_tile[sorted_pos] + within // size) * size + within % size  # (valid,) row in the tiles
    w_tiles = weights.new_zeros(n_tiles * size).index_put((dest,), pair_w).view(n_tiles, size, 1)
    tok_tiles = torch.zeros(n_tiles * size, dtype=torch.long, device=device).index_put_((dest,), token)
    # The stacked factors as they are only when tile e is expert e: as many tiles as experts is not enough (an
    # expert with no pairs and another with two tiles make the same count).
    if views and tiles_of == [1] * n_local:  # (E_l, r, in) and (E_l, r, out) views
        A, B, _ = _expert_factors(layer, layout)
        down = lambda x: torch.bmm(x, A.transpose(1, 2))  # noqa: E731
        up = lambda z: torch.bmm(z, B)  # noqa: E731
        mask = None
    else:  # each tile's factors gathered; the backward gathers them again rather than keeping the copies
        tile_expert = torch.repeat_interleave(torch.arange(n_local), torch.tensor(tiles_of)).to(device)
        tile_rows = layout.rows.index_select(0, tile_expert)  # (tiles, r)
        down = lambda x: _TileMatmul.apply(x, layer.xlora_A, tile_rows, _gather_A)  # noqa: E731
        up = lambda z: _TileMatmul.apply(z, layer.xlora_B, tile_rows, _gather_B)  # noqa: E731
        mask = None if layout.rank_mask is None else layout.rank_mask.index_select(0, tile_expert)
    if layer.is_embedding:
        z = z_pairs.new_zeros(n_tiles * size, z_pairs.shape[-1]).index_put((dest,), z_pairs)
        z = z.view(n_tiles, size, -1)  # (tiles, size, r)
    else:
        row_tiles = torch.zeros(n_tiles * size, dtype=torch.long, device=device).index_put_((dest,), rows)
        x_tiles = F.embedding(row_tiles, inputs).view(n_tiles, size, -1)  # (tiles, size, in)
        z = down(x_tiles)  # (tiles, size, r)
        if mask is not None:
            z = z * mask.unsqueeze(1)
    y = up(z * w_tiles)  # (tiles, size, out); padding rows weigh 0
    return _add_rows(out, tok_tiles, y.view(-1, out_features))


def _gather_A(A: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(R, in) factors, (tiles, r) rows -> (tiles, in, r), the right operand of the down projection."""
    n, rank = rows.shape
    return A.index_select(0, rows.reshape(-1)).view(n, rank, A.shape[1]).transpose(1, 2)


def _gather_B(B: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(out, R) factors, (tiles, r) rows -> (tiles, r, out): B's columns gathered where they lie (no transpose)."""
    n, rank = rows.shape
    return B.index_select(1, rows.reshape(-1)).view(B.shape[0], n, rank).permute(1, 2, 0)


class _TileMatmul(torch.autograd.Function):
    """bmm(left, gather(factor, rows)) whose backward gathers the factor's tiles again instead of keeping a copy.

    A plain bmm would save the gathered (tiles, r, in or out) copy for the backward: one more copy of the experts'
    factors per layer held through a training step (measured: more peak memory than the dense path at N = 128).
    `left` is kept only when the factor trains.
    """

    @staticmethod
    def forward(ctx: Any, left: torch.Tensor, factor: torch.Tensor, rows: torch.Tensor, gather: Any) -> torch.Tensor:
        ctx.gather = gather
        ctx.save_for_backward(left if factor.requires_grad else None, factor, rows)
        return torch.bmm(left, gather(factor, rows))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        left, factor, rows = ctx.saved_tensors
        grad_left = grad_factor = None
        if ctx.needs_input_grad[0]:
            grad_left = torch.bmm(grad, ctx.gather(factor, rows).transpose(1, 2))
        if ctx.needs_input_grad[1]:
            with torch.enable_grad():
                leaf = factor.detach().requires_grad_(True)
                tiles = ctx.gather(leaf, rows)
                (grad_factor,) = torch.autograd.grad(tiles, leaf, torch.bmm(left.transpose(1, 2), grad))
        return grad_left, grad_factor, None, None
