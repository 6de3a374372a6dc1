"""Registers peft-xlora as a PEFT method, beside (not instead of) PEFT's built-in X-LoRA.

PEFT's `register_peft_method` only accepts members of its closed `PeftType` enum, so the four mapping dicts in
`peft.mapping` are filled directly. The type is a `str` subclass: it hashes and compares like the plain string that
`adapter_config.json` stores, and it exposes `.value` and `.name` like an enum member, which transformers' PEFT
integration reads.
"""

from __future__ import annotations

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner


class PluginPeftType(str):
    """A PEFT type string that also behaves like a `peft.PeftType` enum member."""

    __slots__ = ()

    @property
    def value(self) -> str:
        """The string stored in `adapter_config.json`, like `PeftType.LORA.value`."""
        return str.__str__(self)

    @property
    def name(self) -> str:
        """The member name, like `PeftType.LORA.name`."""
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"<PeftType.{self.name}: '{self.value}'>"

    def __reduce__(self):
        # Unpickles as the canonical instance, so pickled configs compare equal to fresh ones.
        return (PluginPeftType, (str.__str__(self),))


#: The PEFT type of this package. Checkpoints store it as ``"peft_type": "PEFT_XLORA"``.
PEFT_XLORA = PluginPeftType("PEFT_XLORA")

#: Prefix of every parameter that belongs to the method (mixture weights and classifier).
PREFIX = "xlora_"


def register(config_cls: type[PeftConfig], tuner_cls: type[BaseTuner]) -> None:
    """Adds the config and tuner classes to PEFT's mappings.

    Calling it again changes nothing.

    Args:
        config_cls: The `PeftConfig` subclass to build from `adapter_config.json`.
        tuner_cls: The `BaseTuner` subclass that `get_peft_model` instantiates.
    """
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_XLORA] = config_cls
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_XLORA] = tuner_cls
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_XLORA] = PREFIX
