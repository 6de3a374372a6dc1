"""The attributes `XLoraModel` holds, declared once for the mixins and the router that read them (type hints only).

The mixins (`GatingMixin`, `ElasticMixin`, `ScalingsLogMixin`) and the routers (`core/routers/`) call only what is
declared here; none of them overrides another's methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .classifier import XLoraClassifier
    from .config import XLoraConfig
    from .layer import XLoraLayer
    from .routers.base import Router


class TunerAttributes:
    """What `XLoraModel` (with PEFT's `BaseTuner`) sets up; the mixins and the router read it."""

    model: nn.Module
    expert_names: list[str]
    mixture_layer_names: list[str]
    targeted_module_names: list[str]
    active_adapter: str
    xlora_config: XLoraConfig
    xlora_classifier: XLoraClassifier
    router: Router
    _layers: list[XLoraLayer]
    _enabled: bool
    _experts_pending: bool
    #: `set_static_scalings`: (n_layers|1, n_experts), or (batch, n_layers|1, n_experts) per row; None: the gate.
    _static_scalings: torch.Tensor | None
    #: `set_active_experts`: (n_experts,) bool; None: every expert is active.
    _active_experts: torch.Tensor | None
    # Methods of `XLoraModel` and `ScalingsLogMixin` the others call.
    mixture_layers: Callable[[], list[XLoraLayer]]
    _log_scalings: Callable[[torch.Tensor], None]
    _logs_scalings: Callable[[], bool]
