"""The gating API of `XLoraModel`: reading the latest scalings, changing gating options, pinning the gate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .attributes import TunerAttributes
from .heads import head_mixtures
from .routing import Routing
from .sparse import configure_topk

if TYPE_CHECKING:
    from .layer import XLoraLayer


class GatingMixin(TunerAttributes):
    """Getters and setters of the gating options; every setter validates and never leaves a refused value behind."""

    def mixture_layers(self) -> list[XLoraLayer]:
        """The mixture layers (implemented by `XLoraModel`)."""
        raise NotImplementedError

    def update_config(self, **changes: Any) -> None:
        """Changes config fields together, validated as a whole; on a refused value every field keeps its old value.

        Args:
            **changes: Field name -> new value (e.g. ``global_scaling_weight=0.5``). Saved with the config.

        Raises:
            ValueError: A value is invalid (the config is unchanged).
        """
        config = self.xlora_config
        unknown = [name for name in changes if not hasattr(config, name)]
        if unknown:
            raise ValueError(f"XLoraConfig has no field(s) {unknown}.")
        built = [
            name
            for name in ("routing", "single_pass_static")
            if name in changes and changes[name] != getattr(config, name)
        ]
        if built:
            raise ValueError(
                f"{built} cannot change on a built model: they decide which parameters and hooks it has. Build a "
                "new model with the new values (the experts and base model can be reused)."
            )
        old = {name: getattr(config, name) for name in changes}
        for name, value in changes.items():
            setattr(config, name, value)
        try:
            config._check_numbers()
        except BaseException:
            for name, value in old.items():
                setattr(config, name, value)
            raise
        configure_topk(self._layers, config)  # top_k_lora / topk_compute reach the mixture layers

    def get_latest_scalings(self) -> torch.Tensor | None:
        """Scalings of the last forward, (batch, seq, n_layers, n_experts), detached; None before any forward."""
        s = self._latest_scalings
        if s is None:
            return None
        return s.expand(-1, -1, len(self.mixture_layer_names), -1)

    def set_scaling_pass_value(self, value: float | None) -> None:
        """Sets the experts' weight in the scaling pass; None means 1 / n_experts. Saved with the config."""
        self.update_config(scaling_pass_value=1.0 / len(self.expert_names) if value is None else _number(value))

    def set_topk_lora(self, value: int | None) -> None:
        """Keeps only the k largest scalings per token (None: dense). Saved with the config."""
        self.update_config(top_k_lora=value)

    def get_topk_lora(self) -> int | None:
        """The current top-k (None: dense)."""
        return self.xlora_config.top_k_lora

    def set_use_trainable_adapters(self, use_trainable_adapters: bool) -> None:
        """Makes the experts' stacked LoRA factors trainable or frozen. Saved with the config.

        Only the declared factors (`XLoraLayer.adapter_layer_names`) change; the classifier and base model keep their
        `requires_grad`.
        """
        self.update_config(use_trainable_adapters=bool(use_trainable_adapters))
        for layer in self.mixture_layers():
            for name in layer.adapter_layer_names:
                getattr(layer, name).requires_grad_(bool(use_trainable_adapters))
        for _, head in head_mixtures(self.model):  # the experts' classification heads train with them
            for param in head.expert_parameters():
                param.requires_grad_(bool(use_trainable_adapters))

    def get_use_trainable_adapters(self) -> bool:
        """Whether the experts' LoRA factors are trained (the config's `use_trainable_adapters`)."""
        return self.xlora_config.use_trainable_adapters

    def set_global_scaling_weight(self, weight: float) -> None:
        """Multiplies every scaling by `weight`. Saved with the config."""
        self.update_config(global_scaling_weight=_number(weight))

    def get_global_scaling_weight(self) -> float:
        """The global scaling weight."""
        return self.xlora_config.global_scaling_weight

    def set_static_scalings(self, weights: dict[str, float] | torch.Tensor | None, per_row: bool = False) -> None:
        """Pins the gate to fixed weights, skipping the scaling pass; None gives the gate back to the classifier.

        Args:
            weights: Expert name -> weight (missing experts get 0), or a tensor of shape (n_experts,) or
                (n_layers, n_experts). Used as given: no softmax, no global weight.
            per_row: `weights` holds one weight vector per batch row: shape (batch, n_experts) or
                (batch, n_layers, n_experts), and every forward must then have exactly `batch` rows. Scores N
                fixed mixtures (each expert alone, the uniform mixture, ...) of the same text in one batched
                forward: repeat the inputs N times along the batch.
        """
        if weights is None:
            self._static_scalings = None
            return
        n, n_layers = len(self.expert_names), len(self.mixture_layer_names)
        if isinstance(weights, dict):
            if per_row:
                raise ValueError("per_row=True needs a tensor of shape (batch, n_experts), not a dict.")
            unknown = set(weights) - set(self.expert_names)
            if unknown:
                raise ValueError(f"Unknown experts {sorted(unknown)}; this model has {self.expert_names}.")
            weights = torch.tensor([float(weights.get(name, 0.0)) for name in self.expert_names])
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if per_row:
            if weights.dim() == 2:
                weights = weights[:, None]
            if weights.dim() != 3 or weights.shape[0] < 1 or weights.shape[1:] not in ((1, n), (n_layers, n)):
                raise ValueError(
                    f"Per-row static scalings must have shape (batch, {n}) or (batch, {n_layers}, {n}); "
                    f"got {tuple(weights.shape)}."
                )
        else:
            if weights.shape == (n,):
                weights = weights[None]
            if weights.shape not in ((1, n), (n_layers, n)):
                raise ValueError(
                    f"Static scalings must have shape ({n},) or ({n_layers}, {n}); got {tuple(weights.shape)}."
                )
        if not torch.isfinite(weights).all():
            raise ValueError("Static scalings must be finite numbers.")
        # (n_layers|1, n_experts), or (batch, n_layers|1, n_experts) per row
        self._static_scalings = weights.to(self.xlora_classifier.layers[0].weight.device)

    def _static_routing(self, args: tuple, kwargs: dict) -> Routing:
        """The routing of a forward while the gate is pinned: (batch|1, 1, n_layers|1, n_experts) scalings."""
        static = self._static_scalings
        if static.dim() == 2:
            return Routing(static[None, None])
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        rows = inputs.shape[0] if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else None
        if rows is not None and rows != static.shape[0]:
            raise ValueError(
                f"The gate is pinned to {static.shape[0]} per-row weight vectors (set_static_scalings(..., "
                f"per_row=True)) but this batch has {rows} rows: pass exactly one row per weight vector, or pin "
                "shared weights."
            )
        return Routing(static[:, None])


def _number(value: Any) -> Any:
    # What `float` accepts becomes a float; anything else is left for the config's check to refuse with its message.
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
