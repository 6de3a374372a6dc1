"""The gating classifier: the scaling pass's last hidden state -> per-token expert scalings (paper, section 3)."""

from __future__ import annotations

import torch
from torch import nn

from .changes import ExpertChange, take
from .config import XLoraConfig
from .routing import Chosen


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

    def set_dropout(self, p: float) -> None:
        """Sets the dropout between the layers, adding or removing the `nn.Dropout` modules a build with `p` has.

        A classifier built with p = 0 has no dropout modules (so its `layers.<i>` indices, and checkpoint keys, are
        those of a model built with p = 0); the linear layers are kept as they are.
        """
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        layers: list[nn.Module] = []
        for linear in linears[:-1]:
            layers += [linear, nn.ReLU()]
            if p > 0:
                layers.append(nn.Dropout(p))
        layers.append(linears[-1])
        fresh = nn.Sequential(*layers)
        fresh.train(self.layers.training)
        self.layers = fresh

    @torch.no_grad()
    def remap_outputs(self, change: ExpertChange, new_offset: float | None) -> None:
        """Gives the last layer one output per expert and layer slot after `change` (see `core.changes`).

        Kept experts keep their rows; a new layer's slot (layerwise scalings) starts as a copy of slot 0; a new
        expert's row is the mean of the other experts' rows of its slot minus `new_offset` (in logits), or zero
        when `new_offset` is None, so that its scaling starts where it changes nothing (see `core.elastic`).

        Args:
            change: The experts and mixture layers, new to old.
            new_offset: Distance below the mean logit for new experts; None for zero rows.
        """
        old = self.layers[-1]
        n_old = self.n_experts
        weight = old.weight.detach().unflatten(0, (-1, n_old))  # (old_slots, E_old, in)
        bias = old.bias.detach().unflatten(0, (-1, n_old))  # (old_slots, E_old)
        if self.layerwise:  # new layers' slots start from slot 0's outputs
            slots = tuple(0 if i is None else i for i in change.layers)
            weight, bias = take(weight, slots, 0, 0.0), take(bias, slots, 0, 0.0)
        if new_offset is None:
            new_w, new_b = 0.0, 0.0
        else:
            new_w = weight.mean(dim=1, keepdim=True)  # (slots, 1, in)
            new_b = bias.mean(dim=1, keepdim=True) - new_offset  # (slots, 1)
        weight = take(weight, change.experts, 1, new_w).flatten(0, 1)  # (slots * E_new, in)
        bias = take(bias, change.experts, 1, new_b).flatten(0, 1)
        new = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        new.weight.copy_(weight)
        new.bias.copy_(bias)
        new.requires_grad_(old.weight.requires_grad)
        new.train(old.training)
        self.layers[-1] = new
        self.n_experts = len(change.experts)
        self.n_layers = len(change.layers)


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
    options = {"temperature": temperature, "enable_softmax": enable_softmax, "top_k": top_k}
    return gate_and_choose(logits, **options, softmax_topk=softmax_topk, global_weight=global_weight, active=active)[0]


def gate_and_choose(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    enable_softmax: bool = True,
    top_k: int | None = None,
    softmax_topk: bool = False,
    global_weight: float = 1.0,
    active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Chosen | None]:
    """`gate`, and the experts each row kept under top-k with their scalings (`routing.Chosen`).

    Returns:
        (..., n_experts) float32 scalings, and (indices, weights), each (..., k), when `top_k` is below the number
        of experts; None otherwise (every expert may have a scaling). The weights are the scalings at the indices.
    """
    z = logits.float()
    if active is not None:  # a masked expert's logit is -inf: it is never in the top k and a softmax skips it
        z = z.masked_fill(~active.to(z.device), float("-inf"))
    if enable_softmax or softmax_topk:
        z = z / temperature
    scalings = torch.softmax(z, dim=-1) if enable_softmax else z
    if active is not None and not enable_softmax:
        scalings = scalings.masked_fill(~active.to(z.device), 0.0)
    kept = None
    if top_k is not None and top_k < scalings.shape[-1]:
        kept = torch.topk(z, top_k, dim=-1).indices  # softmax keeps the order, so rank by logits
        mask = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, kept, True)
        # softmax_topk renormalises: a softmax over the kept logits only. Otherwise the dropped experts are zeroed.
        scalings = torch.softmax(z.masked_fill(~mask, float("-inf")), dim=-1) if softmax_topk else scalings * mask
    elif softmax_topk:
        scalings = torch.softmax(z, dim=-1)
    scalings = scalings * global_weight
    return scalings, (None if kept is None else (kept, scalings.gather(-1, kept)))
