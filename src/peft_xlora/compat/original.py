"""The original xlora package's global API on top of PEFT: `xLoRAConfig`, `add_xlora_to_model`, `from_pretrained`.

Code written for the original package (``import xlora``) runs with ``import peft_xlora as xlora``: these functions
build and load the same `PeftModel` that `peft.get_peft_model` and `PeftModel.from_pretrained` give, so every model
method (scalings log, gating setters, trainable parameters) is reachable from what they return. Deliberate differences
are listed in docs/api.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from ..core.config import XLoraConfig
from ..io.migration import from_peft_builtin, from_xlora_package


class XLoraCompatWarning(UserWarning):
    """A call of the original xlora API was accepted, but a part of it has no effect here."""


@dataclass
class xLoRAConfig:
    """The original package's config, kept for its call sites; becomes an `XLoraConfig` once the experts are known.

    The original took the experts separately (`add_xlora_to_model(..., adapters=...)`), so this object can exist
    without them; `to_xlora_config(adapters)` makes the PEFT config.

    Args:
        hidden_size: Hidden size of the base model (checked against the model when it is built).
        base_model_id: Name or path of the base model; stored as the config's `base_model_name_or_path`.
        device: Where the original put the classifier. Here the classifier is built beside the model's last
            parameters (where its input is); a different device only warns.
        adapters: Expert name -> LoRA checkpoint, if already known.
        enable_softmax: As in `XLoraConfig`.
        enable_softmax_topk: As in `XLoraConfig`.
        layerwise_scalings: As in `XLoraConfig`.
        xlora_depth: As in `XLoraConfig`.
        xlora_size: As in `XLoraConfig`.
        enable_relu_and_dropout: Must be True: the classifier always has ReLU and dropout between its layers.
        use_bias: Must be True: the classifier's linear layers always have a bias.
        xlora_dropout_p: As in `XLoraConfig`.
        stop_token_id: Must be None: scalings are computed per token, not from one position chosen by a stop token.
        use_trainable_adapters: As in `XLoraConfig`.
        softmax_temperature: As in `XLoraConfig`.
        top_k_lora: As in `XLoraConfig`.
        scaling_pass_value: As in `XLoraConfig`.
        global_scaling_weight: As in `XLoraConfig`.
        use_mean_pool: Must be False: scalings are per token, nothing is pooled.
    """

    hidden_size: int | None = None
    base_model_id: str | None = None
    device: torch.device | str | None = None
    adapters: dict[str, str] | None = None
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    enable_relu_and_dropout: bool = True
    use_bias: bool = True
    xlora_dropout_p: float = 0.2
    stop_token_id: int | None = None
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0
    use_mean_pool: bool = False

    def __post_init__(self) -> None:
        unsupported = {
            "enable_relu_and_dropout": (self.enable_relu_and_dropout, True),
            "use_bias": (self.use_bias, True),
            "stop_token_id": (self.stop_token_id, None),
            "use_mean_pool": (self.use_mean_pool, False),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(
                    f"xLoRAConfig({name}={value!r}) is not supported: peft-xlora's classifier is per token, with "
                    f"bias, ReLU and dropout between layers. Leave `{name}` at {supported!r} (set xlora_dropout_p=0 "
                    "to remove dropout)."
                )

    def to_xlora_config(self, adapters: dict[str, str] | None = None, **overrides: Any) -> XLoraConfig:
        """The equivalent `XLoraConfig`.

        Args:
            adapters: Expert name -> LoRA checkpoint; needed unless given to this config.
            **overrides: Further `XLoraConfig` fields (e.g. `task_type`).

        Raises:
            ValueError: Experts given twice or not at all, or an invalid value.
        """
        if adapters is not None and self.adapters is not None and dict(adapters) != dict(self.adapters):
            raise ValueError("Experts were given both in xLoRAConfig(adapters=...) and as `adapters`, differently.")
        adapters = adapters if adapters is not None else self.adapters
        if not adapters:
            raise ValueError(
                "No experts: pass `adapters` (expert name -> LoRA checkpoint), e.g. "
                "add_xlora_to_model(model, config, adapters={'math': './lora-math'})."
            )
        skip = {"device", "adapters", "base_model_id", *self._unsupported_fields()}
        kwargs = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        kwargs["base_model_name_or_path"] = self.base_model_id
        kwargs["scaling_pass_layers"] = None  # the original package's scaling pass runs the whole model
        kwargs.update(overrides)
        return XLoraConfig(adapters=dict(adapters), **kwargs)

    @staticmethod
    def _unsupported_fields() -> tuple[str, ...]:
        return ("enable_relu_and_dropout", "use_bias", "stop_token_id", "use_mean_pool")


def _task_type(model: nn.Module) -> str | None:
    """PEFT task type for a transformers model, so that the returned model can `generate` like the original's."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    if config is None or not (callable(can_generate) and can_generate()):
        return None
    return "SEQ_2_SEQ_LM" if getattr(config, "is_encoder_decoder", False) else "CAUSAL_LM"


def _check_device(model: nn.Module, device: torch.device | str | None) -> None:
    if device is None:
        return
    params = list(model.parameters())
    if not params:
        return
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError):  # e.g. a device_map such as "auto": nothing to compare
        return
    actual = params[-1].device
    same = wanted.type == actual.type and (wanted.index is None or wanted.index == actual.index)
    if not same:
        warnings.warn(
            f"device={str(wanted)!r} is ignored: the X-LoRA classifier is built on {actual}, where the model's last "
            "layers (its input) are. Move the model itself to change it.",
            XLoraCompatWarning,
            stacklevel=3,
        )


def add_xlora_to_model(
    model: nn.Module,
    xlora_config: xLoRAConfig | XLoraConfig,
    adapters: dict[str, str] | None = None,
    verbose: bool = False,
) -> PeftModel:
    """Converts a transformers model into an X-LoRA model over the given LoRA experts (the original's entry point).

    Args:
        model: The base model; it is modified in place (its target modules become mixture layers).
        xlora_config: An `xLoRAConfig` (original spelling) or an `XLoraConfig`.
        adapters: Expert name -> LoRA checkpoint (folder or Hub id). Required unless the config holds them.
        verbose: Print what was built.

    Returns:
        The `PeftModel` (`PeftModelForCausalLM` for a causal LM when the config names no task type).
    """
    if isinstance(xlora_config, xLoRAConfig):
        _check_device(model, xlora_config.device)
        config = xlora_config.to_xlora_config(adapters, task_type=_task_type(model))
    elif isinstance(xlora_config, XLoraConfig):
        config = xlora_config
        if adapters is not None and dict(adapters) != dict(config.adapters):
            raise ValueError(
                "Experts were given both in XLoraConfig(adapters=...) and as `adapters`, differently; give them once."
            )
        if config.task_type is None:
            config = dataclasses.replace(config, task_type=_task_type(model))  # the caller's config stays as it is
    else:
        raise TypeError(f"`xlora_config` must be an xLoRAConfig or XLoraConfig, got {type(xlora_config).__name__}.")
    peft_model = get_peft_model(model, config)
    if verbose:
        _describe(peft_model, "Converted the model to X-LoRA")
    return peft_model


def _describe(peft_model: PeftModel, what: str) -> None:
    tuner = peft_model.base_model
    print(f"{what}: {len(tuner.expert_names)} experts {tuner.expert_names}, {len(tuner.mixture_layer_names)} layers.")
    peft_model.print_trainable_parameters()


def _migrate_foreign(
    path: str, model: nn.Module, adapters: list[str] | dict[str, str] | None, is_trainable: bool
) -> PeftModel | None:
    """The migrated model when `path` is a local checkpoint of the original package or PEFT's built-in; else None."""
    sources = dict(adapters) if isinstance(adapters, dict) else None
    if os.path.isfile(os.path.join(path, "xlora_config.json")):
        peft_model = from_xlora_package(model, path, adapters=sources, is_trainable=is_trainable)
    elif _peft_type(os.path.join(path, "adapter_config.json")) == "XLORA":
        peft_model = from_peft_builtin(model, path, expert_sources=sources, is_trainable=is_trainable)
    else:
        return None
    names = peft_model.base_model.expert_names
    if isinstance(adapters, (list, tuple)) and sorted(adapters) != sorted(names):
        raise ValueError(f"`adapters` names {list(adapters)}, but the checkpoint's experts are {names}.")
    return peft_model


def _peft_type(config_path: str) -> str | None:
    try:
        with open(config_path, encoding="utf-8") as f:
            return json.load(f).get("peft_type")
    except (OSError, ValueError, AttributeError):  # missing, not JSON, not an object: not PEFT's built-in
        return None


def from_pretrained(
    load_directory: str | os.PathLike,
    model: nn.Module,
    adapters: list[str] | dict[str, str] | None = None,
    device: torch.device | str | None = None,
    verbose: bool = False,
    from_safetensors: bool = True,
    is_trainable: bool = False,
    **kwargs: Any,
) -> PeftModel:
    """Loads a trained X-LoRA checkpoint onto a base model (the original's loader).

    A peft-xlora checkpoint always holds its experts, so:

    * `adapters=None` or a list of the checkpoint's expert names: the experts come from the checkpoint. A list must
      name exactly the checkpoint's experts (in any order; the checkpoint's order is the gate's order).
    * a dict of name -> LoRA checkpoint: those experts are read from the given sources instead (the original's way
      of loading a model trained with frozen experts); names must be experts of the checkpoint.

    A local checkpoint of the original package (`xlora_config.json`) or of PEFT's built-in X-LoRA (`peft_type`
    ``"XLORA"``) is migrated on the way, as `peft_xlora.migrate` does (with the same `MigrationWarning`s); save the
    result with `save_pretrained` to get a peft-xlora checkpoint. A dict `adapters` then gives the experts' LoRA
    folders (`adapters` / `expert_sources` of the migration).

    Args:
        load_directory: The saved X-LoRA folder (or Hub id).
        model: The base model the checkpoint was trained on.
        adapters: See above.
        device: Checked against the model's device; the checkpoint is loaded where the model is.
        verbose: Print what was loaded.
        from_safetensors: False also accepts a checkpoint that has only `adapter_model.bin` (pickle).
        is_trainable: Load for further training (classifier trainable) instead of inference.
        **kwargs: Passed to `PeftModel.from_pretrained`.

    Returns:
        The loaded `PeftModel`.
    """
    _check_device(model, device)
    if adapters is not None and not isinstance(adapters, (list, tuple, dict)):
        raise TypeError(f"`adapters` must be a list of names, a dict of name -> source, or None; got {adapters!r}.")
    migrated = _migrate_foreign(os.fspath(load_directory), model, adapters, is_trainable)
    if migrated is not None:
        if verbose:
            _describe(migrated, f"Migrated X-LoRA from {os.fspath(load_directory)}")
        return migrated
    config = XLoraConfig.from_pretrained(os.fspath(load_directory), allow_pickle=not from_safetensors)
    saved = list(config.adapters)
    names = list(adapters) if adapters is not None else saved
    if isinstance(adapters, (list, tuple)) and sorted(names) != sorted(saved):
        raise ValueError(f"`adapters` names {names}, but the checkpoint's experts are {saved}.")
    if isinstance(adapters, dict):
        unknown = sorted(set(adapters) - set(saved))
        if unknown:
            raise ValueError(f"`adapters` names {unknown}, which are not experts of the checkpoint ({saved}).")
        if config.use_trainable_adapters:
            warnings.warn(
                "This checkpoint was trained with trainable experts; the `adapters` dict replaces their trained "
                "weights by the given sources. Pass a list of names (or nothing) to use the trained experts.",
                XLoraCompatWarning,
                stacklevel=2,
            )
        kwargs["expert_sources"] = dict(adapters)
    if not from_safetensors:
        kwargs["allow_pickle"] = True
    peft_model = PeftModel.from_pretrained(model, os.fspath(load_directory), is_trainable=is_trainable, **kwargs)
    if verbose:
        _describe(peft_model, f"Loaded X-LoRA from {os.fspath(load_directory)}")
    return peft_model
