"""The X-LoRA arithmetic of the vLLM plugin as plain torch: gate, classifier, and the stacked gated LoRA update.

Nothing here imports vLLM, so the main environment's tests check these functions against peft-xlora itself. Every
function is free of `.item()`, `nonzero` and Python branches on tensor values: the forward can be captured by CUDA
graphs and traced by torch.compile.

Tokens arrive flattened, as vLLM runs them: (num_tokens, features), all requests of a step concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def gate(
    logits: torch.Tensor,
    *,
    temperature: float,
    enable_softmax: bool,
    top_k: int | None,
    softmax_topk: bool,
    global_weight: float,
) -> torch.Tensor:
    """Classifier logits -> expert scalings, in float32, exactly as peft-xlora's gate.

    Args:
        logits: (..., n_experts).
        temperature: Divides the logits before any softmax.
        enable_softmax: Softmax over all experts; otherwise the (unscaled) logits are the scalings.
        top_k: Keep the k largest per row (ranked by logit) and zero the rest; None keeps all.
        softmax_topk: With `top_k`, the kept experts get a softmax over their own logits (they sum to 1).
        global_weight: Multiplies the result.

    Returns:
        (..., n_experts) float32 scalings.
    """
    z = logits.float()
    if enable_softmax or softmax_topk:
        z = z / temperature
    scalings = torch.softmax(z, dim=-1) if enable_softmax else z
    if top_k is not None and top_k < scalings.shape[-1]:
        kept = torch.topk(z, top_k, dim=-1).indices  # softmax keeps the order, so ranking by logit is the same
        mask = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, kept, True)
        scalings = torch.softmax(z.masked_fill(~mask, float("-inf")), dim=-1) if softmax_topk else scalings * mask
    elif softmax_topk:
        scalings = torch.softmax(z, dim=-1)
    return scalings * global_weight


def classify(hidden: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    """The classifier MLP (linear layers, ReLU between them; no dropout at inference), in the weights' dtype.

    Args:
        hidden: (num_tokens, hidden_size) hidden state of the scaling pass.
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


@dataclass
class Segment:
    """One sub-projection of a fused projection (e.g. the q part of qkv_proj) and the experts on it.

    Attributes:
        out_start: First output column of the sub-projection in this shard's output of the fused projection.
        out_stop: One past its last output column.
        b_rows: (start, stop) rows of each expert's full B factor that this shard holds (column parallelism
            splits the output rows across tensor-parallel ranks; without it, all rows).
        experts: Per expert on this sub-projection: (load key, rank, scaling index, scale), in gate order. The
            scaling index points into the flattened (n_slots * n_experts) scalings of a token.
    """

    out_start: int
    out_stop: int
    b_rows: tuple[int, int]
    experts: list[tuple[str, int, int, float]] = field(default_factory=list)

    @property
    def rank(self) -> int:
        """Sum of the ranks of the experts on this sub-projection."""
        return sum(rank for _, rank, _, _ in self.experts)


class StackedLora(nn.Module):
    """All experts' LoRA factors on one fused projection, stacked, and the gated update they add.

    For the input x of the projection and per-token, per-rank weights w (the scaling of the rank's expert, in the
    rank's scaling slot, times the expert's alpha / r), the update of sub-projection j is

        z = x @ A_cat.T                   # (num_tokens, R): every expert's down-projection at once
        out[:, cols_j] += (z * w)[:, ranks_j] @ B_j.T

    so the cost is two matmuls whatever the number of experts. A_cat stacks the A factors of every expert on every
    sub-projection; each B_j stacks the B factors of the experts on sub-projection j (a fused qkv update never
    multiplies by the zero blocks a block-diagonal B would hold).

    Tensor parallelism follows vLLM's sharding of the base projection: for a column-parallel one (qkv, gate_up)
    the shard holds the B rows of its output columns and the full A; for a row-parallel one (o, down) it holds the
    A columns of its input shard and the full B, and its partial update is summed by the projection's all-reduce.

    Args:
        in_features: Width of the input this shard sees (the input shard for row-parallel projections).
        a_cols: (start, stop) columns of each full A factor this shard holds.
        segments: The sub-projections, in output order.
        scaling_pass_weight: The constant expert weight of the scaling pass (0 skips the update there).
        dtype: Dtype of the factors (the model's).
        embedding: Whether this is the input embedding: x holds token ids, and A is stored transposed.
    """

    def __init__(
        self,
        in_features: int,
        a_cols: tuple[int, int],
        segments: list[Segment],
        scaling_pass_weight: float,
        dtype: torch.dtype,
        embedding: bool = False,
    ) -> None:
        super().__init__()
        self.segments = [s for s in segments if s.experts]
        self.a_cols = a_cols
        self.embedding = embedding
        self.scaling_pass_active = scaling_pass_weight != 0.0
        total = sum(s.rank for s in self.segments)
        # (vocab, R) for the embedding (a row lookup per token id), else (R, in).
        shape = (in_features, total) if embedding else (total, in_features)
        self.register_buffer("A", torch.zeros(shape, dtype=dtype), persistent=False)
        # Where each expert's factors go: load key -> (segment index, first rank row in the stack, rank).
        self._slots: dict[str, tuple[int, int, int]] = {}
        self._rank_spans: list[tuple[int, int]] = []
        scaling_index, scale = [], []
        start = 0
        for j, seg in enumerate(self.segments):
            seg_start = start
            for key, rank, index, expert_scale in seg.experts:
                self._slots[key] = (j, start, rank)
                scaling_index += [index] * rank
                scale += [expert_scale] * rank
                start += rank
            self._rank_spans.append((seg_start, start))
            self.register_buffer(
                f"B{j}", torch.zeros(seg.out_stop - seg.out_start, seg.rank, dtype=dtype), persistent=False
            )
        # Per rank row: its index in a token's flattened scalings, and its expert's alpha / r.
        self.register_buffer("scaling_index", torch.tensor(scaling_index, dtype=torch.long), persistent=False)
        self.register_buffer("rank_scale", torch.tensor(scale, dtype=torch.float32), persistent=False)
        # The scaling pass weighs every rank by the same constant times its scale: one (R,) vector.
        pass_weight = torch.tensor(scale, dtype=torch.float32) * scaling_pass_weight
        self.register_buffer("scaling_pass_rank_weight", pass_weight, persistent=False)
        self.loaded: set[str] = set()

    @property
    def keys(self) -> set[str]:
        """The load keys of every (module, expert) factor pair this stack expects."""
        return set(self._slots)

    @torch.no_grad()
    def load(self, key: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copies one expert's full factors on one sub-projection into this shard's stack.

        Args:
            key: The load key given in the segment's `experts`.
            a: (r, in_full) the full A factor.
            b: (out_full, r) the full B factor.
        """
        j, start, rank = self._slots[key]
        seg = self.segments[j]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"X-LoRA factor {key!r} has rank {a.shape[0]}/{b.shape[1]}, the spec says {rank}.")
        a_part = a[:, self.a_cols[0] : self.a_cols[1]]  # (r, in_shard)
        if self.embedding:
            self.A[:, start : start + rank].copy_(a_part.T)
        else:
            self.A[start : start + rank].copy_(a_part)
        b_part = b[seg.b_rows[0] : seg.b_rows[1]]  # (out_shard, r)
        seg_start = self._rank_spans[j][0]
        getattr(self, f"B{j}")[:, start - seg_start : start - seg_start + rank].copy_(b_part)
        self.loaded.add(key)

    def forward(self, out: torch.Tensor, x: torch.Tensor, scalings: torch.Tensor | None) -> torch.Tensor:
        """Adds the gated update to the projection's output, in place.

        Args:
            out: (num_tokens, out_shard) the base projection's output (before any all-reduce).
            x: (num_tokens, in_shard) its input, or (num_tokens,) token ids for the embedding.
            scalings: (num_tokens, n_slots * n_experts) float32 scalings of the main pass, or None for the
                scaling pass (every expert at the constant scaling-pass weight).

        Returns:
            `out`, updated.
        """
        if scalings is None and not self.scaling_pass_active:
            return out
        # (num_tokens, R): a row lookup for token ids, a matmul for activations
        z = F.embedding(x, self.A) if self.embedding else x.to(self.A.dtype) @ self.A.T
        if scalings is None:
            w = self.scaling_pass_rank_weight  # (R,)
        else:
            w = scalings.index_select(-1, self.scaling_index) * self.rank_scale  # (num_tokens, R)
        z = z * w.to(z.dtype)
        for j, seg in enumerate(self.segments):
            r0, r1 = self._rank_spans[j]
            update = z[:, r0:r1] @ getattr(self, f"B{j}").T  # (num_tokens, out_j)
            out[:, seg.out_start : seg.out_stop] += update.to(out.dtype)
        return out
