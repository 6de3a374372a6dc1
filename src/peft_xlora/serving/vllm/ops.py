"""The X-LoRA arithmetic of the vLLM plugin as plain torch: the router, the stacked update, the sparse top-k update.

Nothing here imports vLLM, so the main environment's tests check these against plain per-expert loops and against
peft-xlora itself. The gate is peft-xlora's own (`peft_xlora.core.classifier.gate_and_choose`: one implementation in
the project). Every function the trace sees is free of `.item()`, `nonzero` and Python branches on tensor values, so
vLLM can trace the forward once (torch.compile with its guards dropped) and capture it in CUDA graphs; the one
exception, `grouped_update` (group sizes read on the host), runs only inside the opaque op `topk_lora_update`, and
only on CPU.

Tokens arrive flattened, as vLLM runs them: (num_tokens, features), all requests of a step concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core.classifier import gate_and_choose
from ...core.sparse import GATHER_MAX_PAIRS
from .spec import ServingSpec


def classify(hidden: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    """The classifier MLP (linear layers, ReLU between them; no dropout at inference), in the weights' dtype.

    Args:
        hidden: (num_tokens, hidden_size) hidden state the gate reads.
        weights: Per linear layer, (out, in).
        biases: Per linear layer, (out,).

    Returns:
        (num_tokens, n_slots * n_experts) logits.
    """
    x = hidden.to(weights[0].dtype)
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        x = F.linear(x, weight, bias)
        if i < len(weights) - 1:
            x = torch.relu(x)
    return x


class XLoraRouter(nn.Module):
    """The classifier, the gate, and the buffer that hands each token's scalings to the mixed projections.

    The projections run inside vLLM's decoder layers, which pass them nothing but their input, and vLLM traces the
    forward once: a Python attribute set per pass would be frozen into the trace. So `route` writes the scalings in
    place into the `scalings` buffer, and every `MixedProjection` reads its rows of it: an ordinary data dependency
    that tracing, torch.compile and CUDA graphs keep.

    With `top_k_lora` and `sparse` on, it also writes which k experts each token kept in each slot and their
    scalings (`chosen`, `chosen_weights`), which a `SparseLora` projection reads instead of the full scalings.

    Args:
        spec: The served model's spec.
        max_tokens: The most tokens one forward carries (vLLM's `max_num_batched_tokens`).
        sparse: Whether some projection computes the chosen experts only (then the router writes their indices).
    """

    def __init__(self, spec: ServingSpec, max_tokens: int, sparse: bool = False) -> None:
        super().__init__()
        self.spec = spec
        sizes = [spec.hidden_size] + [spec.classifier_width] * (spec.classifier_depth - 1)
        sizes.append(spec.n_slots * spec.n_experts)
        # float32 whatever the serving dtype, so routing decisions are not quantised; buffers, not parameters: vLLM
        # checks that every parameter comes from the base checkpoint, and these come from the X-LoRA weights file.
        for j in range(spec.classifier_depth):
            self.register_buffer(f"weight{j}", torch.zeros(sizes[j + 1], sizes[j], dtype=torch.float32), False)
            self.register_buffer(f"bias{j}", torch.zeros(sizes[j + 1], dtype=torch.float32), False)
        # (max_tokens, n_slots * n_experts): row t holds token t's scalings of the current forward.
        self.register_buffer("scalings", torch.zeros(max_tokens, sizes[-1], dtype=torch.float32), False)
        self.sparse = sparse and spec.top_k_lora is not None and spec.top_k_lora < spec.n_experts
        if self.sparse:
            # (max_tokens, n_slots, k): row t holds the experts token t kept in each slot, and their scalings.
            chosen = (max_tokens, spec.n_slots, spec.top_k_lora)
            self.register_buffer("chosen", torch.zeros(chosen, dtype=torch.long), False)
            self.register_buffer("chosen_weights", torch.zeros(chosen, dtype=torch.float32), False)

    def route(self, hidden: torch.Tensor) -> None:
        """Classifier and gate on the hidden state the gate reads; writes the tokens' scalings into `scalings`.

        Args:
            hidden: (num_tokens, hidden_size).
        """
        spec = self.spec
        depth = spec.classifier_depth
        logits = classify(
            hidden,
            [getattr(self, f"weight{j}") for j in range(depth)],
            [getattr(self, f"bias{j}") for j in range(depth)],
        )  # (T, n_slots * n_experts)
        scalings, kept = gate_and_choose(
            logits.unflatten(-1, (spec.n_slots, spec.n_experts)),
            temperature=spec.softmax_temperature,
            enable_softmax=spec.enable_softmax,
            top_k=spec.top_k_lora,
            softmax_topk=spec.enable_softmax_topk,
            global_weight=spec.global_scaling_weight,
        )  # (T, n_slots, n_experts) float32; kept: the gate's own top-k indices and their scalings, (T, n_slots, k)
        n_tokens = hidden.shape[0]
        self.scalings[:n_tokens].copy_(scalings.flatten(1))
        if self.sparse:
            self.chosen[:n_tokens].copy_(kept[0])
            self.chosen_weights[:n_tokens].copy_(kept[1])

    def extra_repr(self) -> str:
        """One line for `print(model)`: every mixed projection holds the router."""
        return f"experts={self.spec.n_experts}, slots={self.spec.n_slots}, max_tokens={self.scalings.shape[0]}"


@dataclass
class Partition:
    """One output partition of a vLLM projection (e.g. the k part of qkv_proj), as one tensor-parallel shard holds it.

    Attributes:
        out_start: First column of the partition in this shard's output of the projection.
        out_stop: One past its last column.
        rows: (start, stop) rows of the partition, within the partition, that this shard computes (column
            parallelism splits them across ranks; otherwise all of them).
    """

    out_start: int
    out_stop: int
    rows: tuple[int, int]


@dataclass
class Block:
    """One expert's LoRA on one transformers module, as it lands in a vLLM projection.

    Attributes:
        key: Load key, ``<module>.<expert index>``.
        module: The transformers module (a mixture layer).
        expert: The expert's index in the gate order.
        rank: Its rank on this module.
        scale: Its alpha / r (alpha / sqrt(r) with rsLoRA).
        scaling_index: Index of its scaling in a token's flattened (n_slots * n_experts) scalings.
        parts: The projection's output partitions the module covers, in order (one for q_proj in qkv_proj; all of
            them for Phi-3's own fused qkv_proj). Its full B factor stacks the partitions' full rows in this order.
        part_sizes: Full rows of each covered partition, in the same order.
    """

    key: str
    module: str
    expert: int
    rank: int
    scale: float
    scaling_index: int
    parts: list[int]
    part_sizes: list[int]


class StackedLora(nn.Module):
    """All experts' LoRA factors on one vLLM projection, stacked, and the weighted update they add to its output.

    For the projection's input x and per-rank weights w (per token: the scaling of the rank's expert in the rank's
    scaling slot; or one constant vector), the update of output partition p is

        z = x @ A_cat.T                       # (num_tokens, R): every expert's down-projection at once
        out[:, cols_p] += (z * w)[:, ranks_p] @ B_p.T

    where A_cat stacks the A factors of every block and B_p the B rows of partition p of the blocks that cover it,
    each expert's alpha / r folded in. The cost is two matmuls per partition whatever the number of experts, and a
    fused qkv update never multiplies the zero blocks a block-diagonal B would hold.

    Tensor parallelism follows vLLM's sharding of the base projection: a column-parallel shard holds the B rows of its
    output columns and the full A; a row-parallel shard the A columns of its input and the full B (its partial update
    is summed by the projection's all-reduce); the embedding (replicated output) holds everything.

    Args:
        in_features: Width of the input this shard sees (the input shard for row-parallel projections; the vocabulary
            for the embedding).
        a_cols: (start, stop) columns of each full A factor this shard holds.
        partitions: The projection's output partitions in this shard, in output order.
        blocks: The (module, expert) LoRA factors on it.
        dtype: Dtype of the factors (the model's).
        embedding: Whether this is the input embedding: x holds token ids, and A is stored transposed.
    """

    def __init__(
        self,
        in_features: int,
        a_cols: tuple[int, int],
        partitions: list[Partition],
        blocks: list[Block],
        dtype: torch.dtype,
        embedding: bool = False,
    ) -> None:
        super().__init__()
        # Blocks ordered by their first partition: the blocks covering each partition are then contiguous in A_cat
        # (always so for separate q, k, v modules and for Phi-3's fused ones), and a slice picks their ranks.
        self.blocks = sorted(blocks, key=lambda b: b.parts[0])
        self.partitions = partitions
        self.a_cols = a_cols
        self.embedding = embedding
        starts = [sum(b.rank for b in self.blocks[:i]) for i in range(len(self.blocks))]
        self._start = {b.key: s for b, s in zip(self.blocks, starts)}
        total = sum(b.rank for b in self.blocks)
        shape = (in_features, total) if embedding else (total, in_features)  # (vocab, R) or (R, in)
        self.register_buffer("A", torch.zeros(shape, dtype=dtype), persistent=False)
        # Per partition: the ranks of the blocks that cover it, and their B rows (local rows, ranks).
        self._ranks: list[slice | str] = []
        self._rank_lists: list[list[int]] = []
        self._used_parts: list[int] = []
        for p, part in enumerate(partitions):
            ranks = [i for b, s in zip(self.blocks, starts) if p in b.parts for i in range(s, s + b.rank)]
            if not ranks:
                continue
            if ranks == list(range(ranks[0], ranks[-1] + 1)):
                self._ranks.append(slice(ranks[0], ranks[-1] + 1))
            else:
                self.register_buffer(f"ranks{p}", torch.tensor(ranks, dtype=torch.long), persistent=False)
                self._ranks.append(f"ranks{p}")
            self._rank_lists.append(ranks)
            self._used_parts.append(p)
            rows = part.out_stop - part.out_start
            self.register_buffer(f"B{p}", torch.zeros(rows, len(ranks), dtype=dtype), persistent=False)
        index = [b.scaling_index for b in self.blocks for _ in range(b.rank)]
        scale = [b.scale for b in self.blocks for _ in range(b.rank)]
        self.register_buffer("scaling_index", torch.tensor(index, dtype=torch.long), persistent=False)
        self.register_buffer("rank_scale", torch.tensor(scale, dtype=torch.float32), persistent=False)
        self.loaded: set[str] = set()
        self._folded = False

    @property
    def keys(self) -> set[str]:
        """The load keys of every (module, expert) factor pair this stack expects."""
        return {b.key for b in self.blocks}

    def rank_weights(self, weight_of) -> torch.Tensor:
        """(R,) float32 constant weights per rank, from `weight_of(module, expert)` (static weights, scaling pass)."""
        values = [float(weight_of(b.module, b.expert)) for b in self.blocks for _ in range(b.rank)]
        return torch.tensor(values, dtype=torch.float32, device=self.rank_scale.device)

    @torch.no_grad()
    def load(self, key: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copies one expert's full factors on one transformers module into this shard's stack.

        Args:
            key: The block's load key.
            a: (r, in_full) the full A factor.
            b: (out_full, r) the full B factor: the covered partitions' full rows, stacked in partition order.
        """
        block = next(bl for bl in self.blocks if bl.key == key)
        start, rank = self._start[key], block.rank
        if a.shape[0] != rank or b.shape[1] != rank or b.shape[0] != sum(block.part_sizes):
            raise ValueError(
                f"X-LoRA factor {key!r} has shapes A{tuple(a.shape)} B{tuple(b.shape)}; the spec and the projection "
                f"need rank {rank} and {sum(block.part_sizes)} output rows."
            )
        a_part = a[:, self.a_cols[0] : self.a_cols[1]]  # (r, in_shard)
        if self.embedding:
            self.A[:, start : start + rank].copy_(a_part.T)
        else:
            self.A[start : start + rank].copy_(a_part)
        offset = 0
        for p, size in zip(block.parts, block.part_sizes):
            part = self.partitions[p]
            col = self._rank_lists[self._used_parts.index(p)].index(start)  # the block's first column in B_p
            rows = b[offset + part.rows[0] : offset + part.rows[1]]  # (local rows, r)
            getattr(self, f"B{p}")[:, col : col + rank].copy_(rows)
            offset += size
        self.loaded.add(key)

    def _ranks_of(self, j: int) -> slice | torch.Tensor:
        """The ranks of A_cat that used partition j reads: a slice, or an index buffer when they are scattered."""
        ranks = self._ranks[j]
        return ranks if isinstance(ranks, slice) else getattr(self, ranks)

    @torch.no_grad()
    def fold_scales(self) -> None:
        """Multiplies each rank's alpha / r into its B column (once, after loading): one multiply less per token."""
        if self._folded:
            return
        for j, p in enumerate(self._used_parts):
            b = getattr(self, f"B{p}")
            b.copy_((b.float() * self.rank_scale[self._ranks_of(j)]).to(b.dtype))
        self._folded = True

    def weighted_B(self, rank_weights: torch.Tensor) -> list[torch.Tensor]:
        """The partitions' B factors with constant per-rank weights (R,) folded in (for a fixed-weight projection)."""
        out = []
        for j, p in enumerate(self._used_parts):
            b = getattr(self, f"B{p}")
            out.append((b.float() * rank_weights[self._ranks_of(j)]).to(b.dtype))
        return out

    def own_B(self) -> list[torch.Tensor]:
        """The partitions' B factors (scales folded in), in partition order."""
        return [getattr(self, f"B{p}") for p in self._used_parts]

    def add_update(
        self, out: torch.Tensor, x: torch.Tensor, weights: torch.Tensor | None, b_factors: list[torch.Tensor]
    ) -> torch.Tensor:
        """Adds the weighted update to the projection's output, in place.

        Args:
            out: (num_tokens, out_shard) the base projection's output (before any all-reduce).
            x: (num_tokens, in_shard) its input, or (num_tokens,) token ids for the embedding.
            weights: (num_tokens, R) per-token rank weights, or None when they are folded into `b_factors`.
            b_factors: Per used partition, (rows, R_p): `own_B()` or `weighted_B(...)`.

        Returns:
            `out`, updated.
        """
        # (num_tokens, R): a row lookup for token ids, a matmul for activations
        z = F.embedding(x, self.A) if self.embedding else x.to(self.A.dtype) @ self.A.T
        if weights is not None:
            z = z * weights.to(z.dtype)
        for j, p in enumerate(self._used_parts):
            part = self.partitions[p]
            update = z[:, self._ranks_of(j)] @ b_factors[j].T  # (num_tokens, rows_p)
            if part.out_start == 0 and part.out_stop == out.shape[-1]:
                out += update.to(out.dtype)
            else:
                out[:, part.out_start : part.out_stop] += update.to(out.dtype)
        return out


def gathered_update(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The weighted update of each token's chosen experts, their factors gathered per token (fixed shapes, no sync).

    For token t with chosen experts e_t1..e_tk and weights w_t1..w_tk: sum_j w_tj * B_{e_tj} A_{e_tj} x_t. Every
    shape follows from the number of tokens alone (no sort, no group sizes, no host sync), so a CUDA graph can hold
    it; it copies (num_tokens, k, r, in + out) factors, so it suits a few tokens (measured on CPU: the fastest way for
    one token, the slowest for hundreds; benchmarks/vllm_sparse_topk.py).

    Args:
        x: (num_tokens, in) the projection's input, or (num_tokens,) token ids when `A` is an embedding's.
        A: (n_experts, r, in) the experts' A factors padded to rank r with zero rows, or for an embedding
            (vocab * n_experts, r): row ``id * n_experts + e`` is expert e's column of A for token `id`.
        B: (n_experts, r, out) the experts' B factors, transposed and padded the same way (scales folded in).
        indices: (num_tokens, k) long, the experts each token kept.
        weights: (num_tokens, k) their scalings.

    Returns:
        (num_tokens, out) in the factors' dtype.
    """
    n_tokens, k = indices.shape
    rank = B.shape[1]
    flat = indices.reshape(-1)  # (T * k,)
    if x.dim() == 1:  # token ids: the down projection is a row lookup
        z = A.index_select(0, (x.unsqueeze(-1) * B.shape[0] + indices).reshape(-1))  # (T * k, r)
    else:
        a = A.index_select(0, flat).view(n_tokens, k * rank, A.shape[-1])  # (T, k * r, in)
        z = torch.bmm(a, x.to(A.dtype).unsqueeze(-1))  # (T, k * r, 1)
    z = z.view(n_tokens, k, rank) * weights.to(B.dtype).unsqueeze(-1)  # (T, k, r)
    b = B.index_select(0, flat).view(n_tokens, k * rank, B.shape[-1])  # (T, k * r, out)
    return torch.bmm(z.view(n_tokens, 1, k * rank), b).squeeze(1)  # (T, out): the sum over k is the inner dimension


def grouped_update(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The same update as `gathered_update`, with the (token, expert) pairs grouped by expert: two matmuls per expert.

    The pairs are sorted by expert and each chosen expert multiplies its tokens' rows with its own factors as they
    are stored (no copy of factors), as mixture-of-experts layers do; the results are added back to their tokens.
    The group sizes are read on the host, so the shapes inside depend on the routing: `topk_lora_update` wraps it as
    one opaque op of fixed output shape for vLLM's trace. Measured on CPU: several times faster than the per-token
    gather from 16 tokens on, slower for one (benchmarks/vllm_sparse_topk.py).

    Args: as `gathered_update`.

    Returns:
        (num_tokens, out) in the factors' dtype.
    """
    n_tokens, k = indices.shape
    n_experts, _, out_features = B.shape
    expert = indices.reshape(-1)  # (P,) with P = T * k pairs
    order = torch.argsort(expert, stable=True)  # (P,): the pairs grouped by expert
    token = order // k  # (P,): pair p belongs to token p // k
    pair_weights = weights.reshape(-1)[order].to(B.dtype).unsqueeze(-1)  # (P, 1)
    if x.dim() == 1:  # token ids: the down projections are row lookups
        z_all = A.index_select(0, x.index_select(0, token) * n_experts + expert[order])  # (P, r)
    else:
        x_pairs = x.to(A.dtype).index_select(0, token)  # (P, in), in the pairs' order
    counts = torch.bincount(expert, minlength=n_experts).tolist()  # the group sizes, on the host
    ys, start = [], 0
    for e, count in enumerate(counts):
        if not count:
            continue
        stop = start + count
        z = z_all[start:stop] if x.dim() == 1 else x_pairs[start:stop] @ A[e].T  # (count, r)
        ys.append((z * pair_weights[start:stop]) @ B[e])  # (count, out)
        start = stop
    out = torch.zeros(n_tokens, out_features, dtype=B.dtype, device=B.device)
    return out.index_add_(0, token, torch.cat(ys)) if ys else out


@torch.library.custom_op("peft_xlora::topk_lora_update", mutates_args=())
def topk_lora_update(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The chosen experts' update (`gathered_update`'s arguments), as one op that vLLM's trace keeps opaque.

    Its output shape, (num_tokens, out), follows from its inputs' alone, so the traced forward has fixed shapes per
    step whatever each token chose, and the kernel inside may depend on the step's size. On CPU: `gathered_update`
    for at most `GATHER_MAX_PAIRS` (token, expert) pairs (a decode step of a few requests), `grouped_update` for more
    (both measured fastest there: benchmarks/vllm_sparse_topk.py; the same split as peft-xlora's own sparse path). On
    other devices `gathered_update` always: it never synchronises with the host, so CUDA graphs can capture it.
    """
    return gathered_update(x, A, B, indices, weights)


@topk_lora_update.register_kernel("cpu")
def _topk_lora_update_cpu(x, A, B, indices, weights):
    if indices.numel() <= GATHER_MAX_PAIRS:
        return gathered_update(x, A, B, indices, weights)
    return grouped_update(x, A, B, indices, weights)


@topk_lora_update.register_fake
def _topk_lora_update_shape(x, A, B, indices, weights):
    return B.new_empty(indices.shape[0], B.shape[-1])


@dataclass
class _Group:
    """One transformers module's experts in a `SparseLora`: its scaling slot and its columns of the output."""

    module: str
    slot: int
    out_start: int
    out_stop: int


class SparseLora(nn.Module):
    """One projection's experts for sparse top-k: per transformers module, every expert's factors at its gate index.

    Built from a loaded `StackedLora` (its scales folded in), so it holds exactly the shard's factors: a
    column-parallel shard's B rows, a row-parallel shard's A columns (tensor parallelism follows the stack's). Each
    module the projection covers (q, k and v of a fused qkv_proj; one for Phi-3's own qkv_proj) is a group with its own
    scaling slot: with layerwise scalings each reads its own k chosen experts. An expert absent from a module, and the
    ranks past an expert's own, are zero factors, so neither kernel needs a mask and they add exactly 0.

    Args:
        stack: The projection's stacked factors, loaded and with scales folded.
        n_experts: Experts of the model (the gate's width).
    """

    def __init__(self, stack: StackedLora, n_experts: int) -> None:
        super().__init__()
        self.embedding = stack.embedding
        self.groups: list[_Group] = []
        by_module: dict[str, list[Block]] = {}
        for block in stack.blocks:
            by_module.setdefault(block.module, []).append(block)
        for g, (module, blocks) in enumerate(by_module.items()):
            parts = blocks[0].parts
            # vLLM's fused projections put a module's partitions side by side (all of Phi-3's fused qkv_proj, or one)
            assert parts == list(range(parts[0], parts[-1] + 1)), parts
            first, last = stack.partitions[parts[0]], stack.partitions[parts[-1]]
            self.groups.append(_Group(module, blocks[0].scaling_index // n_experts, first.out_start, last.out_stop))
            rank = max(b.rank for b in blocks)
            A_full = stack.A
            dtype, device = A_full.dtype, A_full.device
            out_cols = last.out_stop - first.out_start
            if self.embedding:
                A = torch.zeros(A_full.shape[0], n_experts, rank, dtype=dtype, device=device)  # (vocab, n, r)
            else:
                A = torch.zeros(n_experts, rank, A_full.shape[1], dtype=dtype, device=device)  # (n, r, in)
            B = torch.zeros(n_experts, rank, out_cols, dtype=dtype, device=device)  # (n, r, out)
            for block in blocks:
                start, r, e = stack._start[block.key], block.rank, block.expert
                if self.embedding:
                    A[:, e, :r] = A_full[:, start : start + r]
                else:
                    A[e, :r] = A_full[start : start + r]
                offset = 0
                for p in parts:
                    j = stack._used_parts.index(p)
                    col = stack._rank_lists[j].index(start)  # the block's first column in B_p
                    rows = getattr(stack, f"B{p}")[:, col : col + r]  # (rows_p, r)
                    B[e, :r, offset : offset + rows.shape[0]] = rows.T
                    offset += rows.shape[0]
            self.register_buffer(f"A{g}", A.flatten(0, 1) if self.embedding else A, persistent=False)
            self.register_buffer(f"B{g}", B, persistent=False)

    def add_update(
        self, out: torch.Tensor, x: torch.Tensor, chosen: torch.Tensor, chosen_weights: torch.Tensor
    ) -> torch.Tensor:
        """Adds the chosen experts' update to the projection's output, in place.

        Args:
            out: (num_tokens, out_shard) the base projection's output (before any all-reduce).
            x: (num_tokens, in_shard) its input, or (num_tokens,) token ids for the embedding.
            chosen: (num_tokens, n_slots, k) long, the experts each token kept in each slot (the router's).
            chosen_weights: (num_tokens, n_slots, k) their scalings.

        Returns:
            `out`, updated.
        """
        for g, group in enumerate(self.groups):
            update = topk_lora_update(
                x, getattr(self, f"A{g}"), getattr(self, f"B{g}"), chosen[:, group.slot], chosen_weights[:, group.slot]
            )  # (num_tokens, out_g)
            if group.out_start == 0 and group.out_stop == out.shape[-1]:
                out += update.to(out.dtype)
            else:
                out[:, group.out_start : group.out_stop] += update.to(out.dtype)
        return out
