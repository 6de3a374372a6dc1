"""The routers: one per routing mode, chosen when the model is built (see `base.Router`).

Adding a routing mode is one router file, one entry in `ROUTERS`, and its row in the table of what combines
(`core/places.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..seq2seq import is_encoder_decoder
from .base import Router
from .dual_pass import DualPassRouter
from .seq2seq import Seq2SeqRouter
from .single_pass import SinglePassRouter

if TYPE_CHECKING:
    from ..config import XLoraConfig

#: Routing mode -> router class.
ROUTERS: dict[str, type[Router]] = {
    DualPassRouter.mode: DualPassRouter,
    SinglePassRouter.mode: SinglePassRouter,
    Seq2SeqRouter.mode: Seq2SeqRouter,
}


def routing_mode(model: nn.Module, config: XLoraConfig) -> str:
    """The router a model gets: the encoder-decoder one for encoder-decoder models, else the config's `routing`."""
    return Seq2SeqRouter.mode if is_encoder_decoder(model) else config.routing


__all__ = ["ROUTERS", "DualPassRouter", "Router", "Seq2SeqRouter", "SinglePassRouter", "routing_mode"]
