"""The gating classifier: the scaling pass's last hidden state -> per-token expert scalings (paper, section 3)."""

from __future__ import annotations

import torch
from torch import nn

from .config import XLoraConfig


class XLoraClassifier(nn.Module):
    """An MLP of `xlora_depth` linear layers (ReLU and dropout between them) giving one logit per expert.

    Its input is the same tensor PEFT's built-in X-LoRA and the original package read (the last entry of the scaling
    pass's `hidden_states`, after the final norm in Llama-style models), and its layers are stored as `layers.<i>` like
    theirs, so trained classifier weights carry over.

    Args:
        config: The X-LoRA config (depth, width, dropout, gating options).
        hidden_size: Width of the base model's hidden state.
        n_layers: Number of mixture layers (for layerwise scalings).
        n_experts: Number of experts.
        device: Where to build the weights.
        dtype: Their dtype.
    """

    def __init__(
        self,
        config: XLoraConfig,
        hidden_size: int,
        n_layers: int,
        n_experts: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.n_experts = n_experts
        self.layerwise = config.layerwise_scalings
        factory = {"device": device, "dtype": dtype}
        n_out = n_experts * (n_layers if self.layerwise else 1)
        width = config.xlora_size
        layers: list[nn.Module] = []
        in_size = hidden_size
        for _ in range(config.xlora_depth - 1):
            layers.append(nn.Linear(in_size, width, **factory))
            layers.append(nn.ReLU())
            if config.xlora_dropout_p > 0:
                layers.append(nn.Dropout(config.xlora_dropout_p))
            in_size = width
        last = nn.Linear(in_size, n_out, **factory)
        if config.classifier_init == "uniform":
            # Equal logits for every expert: training starts from the uniform mixture, as LoRA starts from B = 0.
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        self.layers = nn.Sequential(*layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits per token: (batch, seq, hidden) -> (batch, seq, n_layers or 1, n_experts)."""
        weight = self.layers[0].weight
        logits = self.layers(hidden.to(device=weight.device, dtype=weight.dtype))  # (batch, seq, L*E or E)
        return logits.unflatten(-1, (-1, self.n_experts))


def gate(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    enable_softmax: bool = True,
    top_k: int | None = None,
    softmax_topk: bool = False,
    global_weight: float = 1.0,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turns classifier logits into scalings, in float32.

    Args:
        logits: (..., n_experts).
        temperature: Divides the logits before a softmax.
        enable_softmax: Softmax over all experts (dense gating); otherwise the raw logits are the scalings.
        top_k: Keep the k largest scalings per row and zero the rest.
        softmax_topk: With `top_k`, the kept scalings become a softmax over their own logits (they sum to 1).
        global_weight: Multiplies the result.
        active: (n_experts,) bool, the experts that may be chosen (`set_active_experts`); the others get 0, and a
            softmax renormalises over the rest. None: all.

    Returns:
        (..., n_experts) float32 scalings.
    """
    z = logits.float()
    if active is not None:  # a masked expert's logit is -inf: it is never in the top k and a softmax skips it
        z = z.masked_fill(~active.to(z.device), float("-inf"))
    if enable_softmax or softmax_topk:
        z = z / temperature
    scalings = torch.softmax(z, dim=-1) if enable_softmax else z
    if active is not None and not enable_softmax:
        scalings = scalings.masked_fill(~active.to(z.device), 0.0)
    if top_k is not None and top_k < scalings.shape[-1]:
        kept = torch.topk(z, top_k, dim=-1).indices  # softmax keeps the order, so rank by logits
        mask = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, kept, True)
        # softmax_topk renormalises: a softmax over the kept logits only. Otherwise the dropped experts are zeroed.
        scalings = torch.softmax(z.masked_fill(~mask, float("-inf")), dim=-1) if softmax_topk else scalings * mask
    elif softmax_topk:
        scalings = torch.softmax(z, dim=-1)
    return scalings * global_weight
