"""The attributes `XLoraModel` holds, declared once for the mixins that read them (type hints only, no values)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .classifier import XLoraClassifier
    from .config import XLoraConfig
    from .layer import XLoraLayer


class TunerAttributes:
    """What `XLoraModel` (with PEFT's `BaseTuner`) sets up; `ForwardMixin`, `GatingMixin` and the others read it."""

    model: nn.Module
    expert_names: list[str]
    mixture_layer_names: list[str]
    targeted_module_names: list[str]
    active_adapter: str
    xlora_config: XLoraConfig
    xlora_classifier: XLoraClassifier
    _layers: list[XLoraLayer]
    _enabled: bool
    _experts_pending: bool
    _static_scalings: torch.Tensor | None
    _latest_scalings: torch.Tensor | None
