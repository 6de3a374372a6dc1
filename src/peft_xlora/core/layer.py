"""The mixture layer: a base layer plus all its experts' LoRA factors, stacked, gated per token.

For a module adapted by experts e = 1..E with ranks r_e, the A factors are stacked into one (R, in) matrix and the B
factors into one (out, R) matrix, R = sum r_e. With per-token scalings s (batch, seq, E) the gated update

    sum_e s_e * scale_e * B_e A_e x

is two matmuls and one elementwise product whatever E is:

    z = x @ A_cat.T                       # (batch, seq, R)
    y = base(x) + (z * s[..., expert_of_rank] * scale_of_rank) @ B_cat.T
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .devices import execution_device
from .experts import ModuleLora
from .routing import current_routing
from .sparse import TopKSetting, chosen_indices, sparse_mixture, use_sparse

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


def module_kind(module: nn.Module) -> tuple[str, int, int] | None:
    """The kind and (in, out) sizes of a module X-LoRA can adapt, or None.

    Returns:
        ("linear", in_features, out_features), ("embedding", num_embeddings, embedding_dim), or None.
    """
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2: weight is (in, out)
        return "linear", module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Embedding):
        return "embedding", module.num_embeddings, module.embedding_dim
    return None


class XLoraLayer(nn.Module, BaseTunerLayer):
    """Wraps a Linear, Conv1D or Embedding layer and adds the gated sum of its experts' LoRA updates.

    Args:
        base_layer: The layer being adapted; kept as `self.base_layer`.
        layer_index: Position of this layer among all mixture layers (its slot in layerwise scalings).
        expert_indices: Index (in the model's expert list) of each expert that adapts this layer, in order.
        loras: The LoRA factors of those experts, in the same order.
        requires_grad: Whether the stacked factors train (`use_trainable_adapters`).
    """

    adapter_layer_names = ("xlora_A", "xlora_B")
    other_param_names = ("rank_expert", "rank_scale", "rank_dropout")
    #: `top_k_lora` and `topk_compute` of the model's config (set by `sparse.configure_topk`); None: always dense.
    topk: TopKSetting | None = None

    def __init__(
        self,
        base_layer: nn.Module,
        layer_index: int,
        expert_indices: list[int],
        loras: list[ModuleLora],
        requires_grad: bool = False,
    ) -> None:
        super().__init__()
        kind = module_kind(base_layer)
        if kind is None:
            raise TypeError(f"X-LoRA cannot adapt {type(base_layer).__name__}; supported: Linear, Conv1D, Embedding.")
        self.base_layer = base_layer
        self.is_embedding = kind[0] == "embedding"
        self.in_features, self.out_features = kind[1], kind[2]
        self.layer_index = layer_index
        self._active_adapter = "default"
        weight = base_layer.weight
        device = execution_device(base_layer)  # not meta when accelerate offloads the base layer
        factory = {"device": device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}

        ranks = [lora.rank for lora in loras]
        total = sum(ranks)
        # (R, in) and (out, R): every expert's factors side by side.
        self.xlora_A = nn.Parameter(torch.zeros(total, self.in_features, **factory), requires_grad=requires_grad)
        self.xlora_B = nn.Parameter(torch.zeros(self.out_features, total, **factory), requires_grad=requires_grad)
        # Per rank row: which expert it belongs to, its alpha/r, its dropout. Derived from the config, not saved.
        expert_of_rank = [e for e, r in zip(expert_indices, ranks) for _ in range(r)]
        self.register_buffer(
            "rank_expert", torch.tensor(expert_of_rank, dtype=torch.long, device=device), persistent=False
        )
        scale_of_rank = [lora.scale for lora, r in zip(loras, ranks) for _ in range(r)]
        self.register_buffer(
            "rank_scale", torch.tensor(scale_of_rank, dtype=torch.float32, device=device), persistent=False
        )
        self.dropouts = sorted({lora.dropout for lora in loras})
        dropout_of_rank = [lora.dropout for lora, r in zip(loras, ranks) for _ in range(r)]
        self.register_buffer("rank_dropout", torch.tensor(dropout_of_rank, dtype=torch.float32), persistent=False)
        self.expert_indices = list(expert_indices)
        self.ranks = ranks
        self.set_factors(loras)

    @torch.no_grad()
    def set_factors(self, loras: list[ModuleLora]) -> None:
        """Copies the experts' factors (where given) into the stacked matrices."""
        start = 0
        for lora in loras:
            stop = start + lora.rank
            if lora.A is not None:
                self.xlora_A[start:stop].copy_(lora.A)
                self.xlora_B[:, start:stop].copy_(lora.B)
            start = stop

    def expert_factors(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A, B) factors of the `position`-th expert of this layer, as views of the stacked matrices."""
        start = sum(self.ranks[:position])
        stop = start + self.ranks[position]
        return self.xlora_A[start:stop], self.xlora_B[:, start:stop]

    def _rank_weights(self, scalings: torch.Tensor, lead_shape: torch.Size) -> torch.Tensor:
        """Per-rank weights s[expert_of_rank] * scale_of_rank, shaped to broadcast against (*lead_shape, R)."""
        s = self._layer_scalings(scalings)  # (batch|1, seq|1, n_experts)
        w = s.index_select(-1, self.rank_expert.to(s.device)) * self.rank_scale.to(s.device)  # (batch|1, seq|1, R)
        return self._per_token(w, lead_shape)

    def _expert_weights(self, scalings: torch.Tensor, lead_shape: torch.Size) -> torch.Tensor:
        """Per-expert weights s[expert] * scale_of_expert of this layer's experts, to broadcast against (*lead, E_l).

        Only for layers whose experts all have the same rank: then every expert's ranks are one contiguous block of
        that size, and the weights are applied per block, so the (tokens, R) per-rank weights are never built.
        """
        s = self._layer_scalings(scalings)  # (batch|1, seq|1, n_experts)
        rank = self.ranks[0]
        if self.expert_indices != list(range(s.shape[-1])):  # this layer is adapted by some experts only
            s = s.index_select(-1, self.rank_expert[::rank].to(s.device))
        w = s * self.rank_scale[::rank].to(s.device)  # (batch|1, seq|1, E_l): the same products as `_rank_weights`
        return self._per_token(w, lead_shape)

    def _layer_scalings(self, scalings: torch.Tensor) -> torch.Tensor:
        slot = self.layer_index if scalings.shape[2] > 1 else 0
        return scalings[:, :, slot, :]  # (batch|1, seq|1, n_experts)

    def _per_token(self, w: torch.Tensor, lead_shape: torch.Size) -> torch.Tensor:
        """(batch|1, seq|1, K) -> a tensor that broadcasts against (*lead_shape, K)."""
        n_rows, n_tokens, k = w.shape
        if n_rows * n_tokens == 1:
            return w.reshape((1,) * len(lead_shape) + (k,))
        if len(lead_shape) == 2 and n_rows in (1, lead_shape[0]) and n_tokens in (1, lead_shape[1]):
            return w
        if n_rows * n_tokens == lead_shape.numel():  # the model flattened (batch, seq)
            return w.reshape(*lead_shape, k)
        raise RuntimeError(
            f"X-LoRA scalings cover {(n_rows, n_tokens)} tokens but layer {self.layer_index} sees input of shape "
            f"{tuple(lead_shape)}; the model reshapes tokens in a way X-LoRA does not support."
        )

    def _weigh(self, z: torch.Tensor, scalings: torch.Tensor) -> torch.Tensor:
        """Each rank's activation z times its expert's scaling and alpha / r: (*lead, R)."""
        lead = z.shape[:-1]
        # Under a device_map the scalings live beside the classifier, not necessarily on this layer's device.
        scalings = scalings.to(z.device)
        # Without autograd z is ours alone (fresh from `_project_down`): weigh it in place, saving a (tokens, R)
        # tensor.
        in_place = not (torch.is_grad_enabled() and (z.requires_grad or scalings.requires_grad))
        if len(set(self.ranks)) == 1:
            w = self._expert_weights(scalings, lead).to(z.dtype).unsqueeze(-1)  # (*lead|1, E_l, 1)
            blocks = z.unflatten(-1, (len(self.ranks), self.ranks[0]))  # (*lead, E_l, r)
            return (blocks.mul_(w) if in_place else blocks * w).flatten(-2)
        w = self._rank_weights(scalings, lead).to(z.dtype)  # (*lead|1, R)
        return z.mul_(w) if in_place else z * w

    def _project_down(self, x: torch.Tensor) -> torch.Tensor:
        """Computes z = dropout(x) @ A_cat.T, (..., R); each rank row sees its own expert's dropout while training."""
        A = self.xlora_A
        if self.is_embedding:
            return F.embedding(x, A.T)
        x = x.to(A.dtype)
        if not self.training or self.dropouts == [0.0]:
            return x @ A.T
        if len(self.dropouts) == 1:
            return F.dropout(x, self.dropouts[0], training=True) @ A.T
        z = x.new_empty(*x.shape[:-1], A.shape[0])
        for p in self.dropouts:
            rows = (self.rank_dropout == p).nonzero().squeeze(-1).to(A.device)
            z[..., rows] = F.dropout(x, p, training=True) @ A[rows].T
        return z

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base layer output plus the gated expert updates of the current routing."""
        result = self.base_layer(x, *args, **kwargs)
        routing = current_routing()
        if self.disable_adapters or routing is None or self.xlora_A.shape[0] == 0:
            return result
        scalings = routing.scalings_for(self.layer_index)
        if scalings is None:
            return result
        chosen = self._sparse_indices(routing, scalings, x)
        if chosen is not None:  # top-k: only the chosen experts' updates (sparse.py), added to `result` in place
            embed_scale = self._get_embed_scale() if self.is_embedding else None
            return sparse_mixture(self, x, scalings, chosen, into=result, embed_scale=embed_scale)
        z = self._project_down(x)  # (*lead, R)
        update = self._weigh(z, scalings) @ self.xlora_B.T  # (*lead, out)
        if self.is_embedding:
            embed_scale = self._get_embed_scale()
            if embed_scale is not None:
                update = update * embed_scale.to(update.dtype)
        return result + update.to(result.dtype)

    def _sparse_indices(self, routing: Any, scalings: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """The experts each token keeps, (batch|1, seq|1, n_slots|1, k), when this call computes sparsely; else None.

        Sparse only with `top_k_lora`, where `topk_compute` (and, for "auto", the number of experts here, of tokens
        in `x`, the device and the experts' largest rank) says so, and where no row of these scalings has more than k
        non-zero entries (the scaling pass's constant weights, a pinned gate or single-pass static weights may):
        there the dense path runs.
        """
        topk = self.topk
        if topk is None or getattr(routing, "scaling_pass", False):
            return None
        n_tokens = x.numel() if self.is_embedding else x.numel() // x.shape[-1]
        device = self.xlora_A.device.type
        if not use_sparse(topk.mode, len(self.ranks), topk.k, device, n_tokens, rank=max(self.ranks)):
            return None
        return chosen_indices(routing, scalings, topk.k, self.layer_index)

    # transformers' adapter API (`model.enable_adapters()`, `disable_adapters()`, `set_adapter()`, `delete_adapter()`)
    # calls these on every tuner layer. PEFT's versions expect per-adapter ModuleDicts; X-LoRA has one adapter.

    def enable_adapters(self, enabled: bool) -> None:
        """Turns this layer's expert updates on or off; `requires_grad` stays as it is."""
        self._disable_adapters = not enabled

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """X-LoRA has one adapter; only its own name is accepted."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if names != [self._active_adapter]:
            raise ValueError(f"This X-LoRA model has one adapter, {self._active_adapter!r}; got {adapter_names!r}.")

    def delete_adapter(self, adapter_name: str) -> None:
        """Not possible layer by layer: the experts, classifier and hooks go together."""
        raise ValueError(
            "X-LoRA cannot delete its adapter layer by layer. On a PeftModel call `model.unload()`; on a transformers "
            "model that `load_adapter` built X-LoRA into, call `peft_xlora.unload_adapter(model)`."
        )

    def __repr__(self) -> str:
        return f"xlora.{super().__repr__()}"

    def extra_repr(self) -> str:
        """The layer's position among the mixture layers, its experts and their ranks, for `print(model)`."""
        return f"layer_index={self.layer_index}, experts={self.expert_indices}, ranks={self.ranks}"
