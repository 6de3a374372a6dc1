"""The gating API of `XLoraModel`: reading the latest scalings, changing gating options, pinning the gate."""

from __future__ import annotations

from typing import Any

import torch

from .attributes import TunerAttributes
from .building import resolve_scaling_pass
from .combinations import check
from .config import AUTO_LAYERS
from .heads import head_mixtures
from .places import situation_of, with_changes
from .sparse import configure_topk


class GatingMixin(TunerAttributes):
    """Getters and setters of the gating options; every setter validates and never leaves a refused value behind."""

    def update_config(self, **changes: Any) -> None:
        """Changes config fields together, validated as a whole; a refused change leaves everything as it was.

        Fields the gate reads at every forward take effect at the next one; `scaling_pass_layers` (dual pass) and
        `xlora_dropout_p` rebuild what they shape, exactly as a model built with the new value;
        `use_trainable_adapters` makes the experts trainable or frozen. Fields that decide the model's parameters
        (`xlora_depth`, `layerwise_scalings`, the experts, ...) are refused: see docs/combinations.md.

        Args:
            **changes: Field name -> new value (e.g. ``global_scaling_weight=0.5``). Saved with the config.

        Raises:
            ValueError: A field is unknown, a value is invalid, or a field cannot change on this model (the config
                and the model are unchanged).
        """
        config = self.xlora_config
        unknown = [name for name in changes if not hasattr(config, name)]
        if unknown:
            raise ValueError(f"XLoraConfig has no field(s) {unknown}.")
        if changes.get("scaling_pass_layers") == AUTO_LAYERS:  # resolved as at build: the value it gets is saved
            changes["scaling_pass_layers"] = resolve_scaling_pass(self.model, AUTO_LAYERS, self.router.mode)
        changed = {name: value for name, value in changes.items() if _differs(getattr(config, name), value)}
        new = with_changes(config, changed)
        check("update_config", situation_of(self, config=new, changes=changed))
        new._check_numbers()  # the values, and the fields that combine within a config (the table's "config" place)
        if "scaling_pass_layers" in changed:
            self.router.check_config(new)
        old = {name: getattr(config, name) for name in changes}
        for name, value in changes.items():
            setattr(config, name, value)
        try:
            self._apply_config_changes(changed, changes)
        except BaseException:
            for name, value in old.items():
                setattr(config, name, value)
            self._apply_config_changes({n: old[n] for n in changed}, {n: old[n] for n in changes})
            raise
        configure_topk(self._layers, config)  # top_k_lora / topk_compute reach the mixture layers

    def _apply_config_changes(self, changed: dict[str, Any], given: dict[str, Any]) -> None:
        """Rebuilds what the changed fields shape (the config already holds their new values)."""
        if "scaling_pass_layers" in changed:
            self.router.rebuild()
        if "xlora_dropout_p" in changed:
            self.xlora_classifier.set_dropout(self.xlora_config.xlora_dropout_p)
        if "use_trainable_adapters" in given:
            self._set_experts_trainable(bool(self.xlora_config.use_trainable_adapters))

    def _set_experts_trainable(self, trainable: bool) -> None:
        for layer in self.mixture_layers():
            for name in layer.adapter_layer_names:
                getattr(layer, name).requires_grad_(trainable)
        for _, head in head_mixtures(self.model):  # the experts' classification heads train with them
            for param in head.expert_parameters():
                param.requires_grad_(trainable)

    def get_latest_scalings(self) -> torch.Tensor | None:
        """Scalings of the last forward, (batch, seq, n_layers, n_experts), detached; None before any forward.

        In single-pass mode the rows of the layers up to k hold their static weights (the same for every token), the
        others the per-token scalings the gate gave from layer k's output.
        """
        return self.router.latest_scalings()

    def get_latest_encoder_scalings(self) -> torch.Tensor | None:
        """Encoder-decoder models: the source tokens' scalings of the last forward, (batch, src, n_layers, n_experts).

        `get_latest_scalings()` gives the target (decoder) tokens'. None before any forward, or for other models.
        """
        return self.router.latest_encoder_scalings()

    def get_latest_router_losses(self) -> dict[str, torch.Tensor] | None:
        """The router regularisers of the last forward (unweighted, detached), for logging; None when they are off.

        The weighted sum is added to the model output's `loss` (when labels are given) and returned as its
        `router_loss` entry.
        """
        return self.router.latest_router_losses()

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

        Only the declared factors (`XLoraLayer.adapter_layer_names`) change, and the experts' classification heads
        where they bring them; the classifier and base model keep their `requires_grad`.
        """
        self.update_config(use_trainable_adapters=bool(use_trainable_adapters))

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
        check("set_static_scalings", situation_of(self, features={"per_row_pins" if per_row else "pins"}))
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


def _differs(old: Any, new: Any) -> bool:
    # A dict's order is meaningful here (`adapters` is the gate's order), and 1 is not True.
    if isinstance(old, dict) and isinstance(new, dict):
        return list(old.items()) != list(new.items())
    return type(old) is not type(new) or old != new


def _number(value: Any) -> Any:
    # What `float` accepts becomes a float; anything else is left for the config's check to refuse with its message.
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
