"""What changes when experts are added or removed: one map of experts and one of mixture layers, new to old.

`add_expert` and `remove_expert` (elastic.py) describe their change once, as an `ExpertChange`, and every part that
holds something per expert or per mixture layer follows it: the classifier's last layer, the single pass's static
logits, the classification heads, the pinned weights and the mask. Each takes the rows it keeps from the old tensor
and fills the new ones, so a part cannot keep a stale width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertChange:
    """The experts and mixture layers after a change, each as the index it had before (None: new).

    Attributes:
        experts: For each expert after the change, in gate order, its index before, or None for an added expert.
        layers: For each mixture layer after the change, in layer order, its index before, or None for a new one.
        logit_offset: How far (in logits) below the mean of the others an added expert's learned logits start.
    """

    experts: tuple[int | None, ...]
    layers: tuple[int | None, ...]
    logit_offset: float = 16.0

    @property
    def kept_experts(self) -> list[int]:
        """Positions (after the change) of the experts that were there before."""
        return [i for i, old in enumerate(self.experts) if old is not None]


def take(tensor: torch.Tensor, index: tuple[int | None, ...], dim: int, fill: torch.Tensor | float) -> torch.Tensor:
    """Rebuilds `tensor` along `dim`: position i holds old position `index[i]`, or `fill` where that is None.

    Args:
        tensor: The tensor before the change.
        index: New position -> old position, or None.
        dim: The axis of experts or layers.
        fill: A value, or a tensor shaped like one slice of `tensor` along `dim` (size 1 there), for new positions.

    Returns:
        A new tensor with `len(index)` entries along `dim` (same dtype and device).
    """
    dim = dim % tensor.dim()
    shape = list(tensor.shape)
    shape[dim] = 1
    if not isinstance(fill, torch.Tensor):
        fill = torch.full(shape, fill, dtype=tensor.dtype, device=tensor.device)
    parts = [fill.to(tensor) if old is None else tensor.narrow(dim, old, 1) for old in index]
    if not parts:
        shape[dim] = 0
        return tensor.new_zeros(shape)
    return torch.cat(parts, dim=dim)
