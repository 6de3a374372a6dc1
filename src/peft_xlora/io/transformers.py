"""transformers' own adapter API (`model.load_adapter`, `from_pretrained(<adapter dir>)`) for X-LoRA checkpoints.

transformers 5 loads an adapter's weights with its own loader, which maps each checkpoint key to one model key. An
X-LoRA checkpoint stores every expert's factors separately while the model holds them stacked per module (see
core/state_dict.py): no such renaming can build the stacks. So `import peft_xlora` wraps transformers'
`PeftAdapterMixin.load_adapter` (the `load_adapter` of every `PreTrainedModel`). For a checkpoint whose `peft_type` is
``"PEFT_XLORA"`` it builds X-LoRA into the model with PEFT's `inject_adapter_in_model` and loads the weights with
PEFT's `set_peft_model_state_dict`, the path `PeftModel.from_pretrained` takes: the same file checks run, the same
errors are raised, and the logits are the same. Every other adapter goes to transformers' loader, untouched.
`AutoModelForCausalLM.from_pretrained(<X-LoRA folder>)` calls `load_adapter`, so it loads X-LoRA checkpoints too.

`import peft_xlora` also wraps `PreTrainedModel.save_pretrained`: a model that `load_adapter` built X-LoRA into saves
its adapter atomically, with the machinery of PEFT's `model.save_pretrained` (`io/save.py`); every other model and
adapter is saved by transformers exactly as before.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any

from peft import PeftConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from torch import nn

from ..core.config import XLoraConfig
from ..core.model import find_tuners
from ..core.registration import PEFT_XLORA
from .save import write_checkpoint

#: Download options that locate an adapter's files (transformers' `DownloadKwargs`, as PEFT's loaders accept them).
_HUB_KEYS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
_MARK = "__peft_xlora_wrapped__"


def install() -> None:
    """Wraps transformers' `load_adapter` and `save_pretrained` once (see the module docstring). Idempotent."""
    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError:  # transformers without its PEFT integration: nothing to extend
        return
    _install_save()
    original = PeftAdapterMixin.load_adapter
    if getattr(original, _MARK, False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        extra = dict(call.pop("kwargs", {}) or {})
        load_config = call.get("load_config")
        model_id = call.get("peft_model_id") or getattr(load_config, "pretrained_model_name_or_path", None)
        hub = _hub_kwargs(load_config, call, extra)
        if not _is_xlora(model_id, call.get("peft_config"), hub):
            return original(self, *args, **kwargs)
        return load_xlora_adapter(
            self,
            model_id,
            adapter_name=call.get("adapter_name"),
            peft_config=call.get("peft_config"),
            adapter_state_dict=call.get("adapter_state_dict"),
            is_trainable=bool(call.get("is_trainable")),
            hotswap=call.get("hotswap"),
            expert_sources=extra.pop("expert_sources", None),
            allow_pickle=bool(extra.pop("allow_pickle", False)),
            **hub,
        )

    setattr(load_adapter, _MARK, True)
    PeftAdapterMixin.load_adapter = load_adapter


def _install_save() -> None:
    """Wraps `PreTrainedModel.save_pretrained` once: a model with X-LoRA from `load_adapter` saves atomically."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained
    if getattr(original, _MARK, False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        call = bound.arguments
        if not (
            getattr(self, "_hf_peft_config_loaded", False)
            and find_tuners(self)
            and _writes_here(self, call["is_main_process"])
            and not call.get("distributed_checkpoint")
        ):
            return original(self, *args, **kwargs)  # other adapters, plain models, ranks that do not write: as before
        return save_bare_model(self, original, *args, **kwargs)

    setattr(save_pretrained, _MARK, True)
    PreTrainedModel.save_pretrained = save_pretrained


def _writes_here(model: nn.Module, is_main_process: bool) -> bool:
    """Whether transformers' save writes files in this process (the main one; with tensor parallelism, rank 0)."""
    should = getattr(model, "should_save_on_this_rank", None)  # knows tensor parallelism
    return bool(should(is_main_process)) if should is not None else bool(is_main_process)


def save_bare_model(model: nn.Module, save: Any, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """Saves a model with X-LoRA from `load_adapter` by transformers' `save_pretrained`, atomically like PEFT's save.

    transformers writes the adapter's files (adapter_config.json, adapter_model.safetensors, generation_config.json)
    in place; here it writes them into a staging folder that `write_checkpoint` checks and swaps into place, so the
    folder holds the complete old or the complete new checkpoint at every instant and keeps the user's other files.

    Args:
        model: The transformers model.
        save: transformers' own `save_pretrained` (unbound).
        save_directory: The checkpoint folder.
        *args: Its other arguments.
        **kwargs: Its other keyword arguments. With `push_to_hub`, the files are uploaded from the staging folder
            before the swap, to the repo named after `save_directory` unless `repo_id` is given.
    """
    if kwargs.get("push_to_hub"):  # transformers names the repo after the folder it writes: the staging one here
        kwargs.setdefault("repo_id", os.path.basename(os.path.realpath(os.fspath(save_directory))))
    write_checkpoint(save_directory, lambda tmp, target: save(model, tmp, *args, **kwargs))


def _hub_kwargs(load_config: Any, call: dict, extra: dict) -> dict[str, Any]:
    # As transformers does: the load config's download options, then the call's, then `adapter_kwargs`.
    merged: dict[str, Any] = dict(getattr(load_config, "download_kwargs", None) or {})
    merged.update(extra)
    if call.get("local_files_only"):
        merged["local_files_only"] = True
    merged.update(call.get("adapter_kwargs") or {})
    return {k: v for k, v in merged.items() if k in _HUB_KEYS and v is not None and v != ""}


def _is_xlora(model_id: Any, peft_config: Any, hub: dict[str, Any]) -> bool:
    """Whether the adapter to load is an X-LoRA checkpoint (its config's `peft_type` is "PEFT_XLORA")."""
    if peft_config is not None:
        peft_type = peft_config.get("peft_type") if isinstance(peft_config, dict) else peft_config.peft_type
        return peft_type == PEFT_XLORA
    if model_id is None:
        return False
    from transformers.utils import find_adapter_config_file

    try:
        path = find_adapter_config_file(str(model_id), **hub)
    except Exception:  # transformers' own loader then reports what is wrong with the source
        return False
    if path is None:
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("peft_type") == PEFT_XLORA
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False  # transformers' loader gives its own error for an unreadable config


def load_xlora_adapter(
    model: nn.Module,
    model_id: Any = None,
    adapter_name: str | None = None,
    peft_config: Any = None,
    adapter_state_dict: dict | None = None,
    is_trainable: bool = False,
    hotswap: bool | str | None = None,
    expert_sources: dict[str, str] | None = None,
    allow_pickle: bool = False,
    **hub_kwargs: Any,
) -> Any:
    """Builds X-LoRA into a bare transformers model and loads a checkpoint into it (what `model.load_adapter` runs).

    Args:
        model: The transformers model; X-LoRA is built into it in place.
        model_id: Checkpoint folder or Hub id (not needed when `peft_config` and `adapter_state_dict` are given).
        adapter_name: Name of the X-LoRA adapter (default ``"default"``).
        peft_config: An `XLoraConfig` (or its dict) to use instead of the checkpoint's.
        adapter_state_dict: Checkpoint tensors to use instead of the checkpoint's file.
        is_trainable: Load for training (classifier trainable) instead of inference (eval mode, all frozen).
        hotswap: Must not be True: hot-swapping exists for LoRA only.
        expert_sources: Expert name -> LoRA folder or Hub id, read instead of the checkpoint's copy of that expert.
        allow_pickle: Accept a checkpoint that has only `adapter_model.bin`.
        **hub_kwargs: Download options (revision, token, cache_dir, local_files_only, subfolder, ...).

    Returns:
        transformers' `LoadStateDictInfo` (nothing missing or unexpected: any such tensor raises instead).

    Raises:
        peft_xlora.CheckpointError: A file is missing, truncated or pickle-only, or tensors are missing,
            unexpected or misshapen; the model is then left without X-LoRA.
    """
    adapter_name = adapter_name or "default"
    if hotswap is True:
        raise ValueError(
            "hotswap=True is supported for LoRA adapters only; load the X-LoRA checkpoint into a fresh base model."
        )
    if getattr(model, "_hf_peft_config_loaded", False) and adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    if peft_config is None:
        if model_id is None:
            raise ValueError("Pass the X-LoRA checkpoint's folder or Hub id to `load_adapter`.")
        config = XLoraConfig.from_pretrained(
            str(model_id), expert_sources=expert_sources, allow_pickle=allow_pickle, **hub_kwargs
        )
    else:
        config = PeftConfig.from_peft_type(**peft_config) if isinstance(peft_config, dict) else peft_config
    config.inference_mode = not is_trainable

    had_peft_config = hasattr(model, "peft_config")
    try:
        inject_adapter_in_model(config, model, adapter_name)
        if adapter_state_dict is None:
            if model_id is None:
                raise ValueError("Pass `adapter_state_dict` with `peft_config`, or the checkpoint's folder or Hub id.")
            adapter_state_dict = load_peft_weights(str(model_id), device="cpu", **hub_kwargs)
        result = set_peft_model_state_dict(model, adapter_state_dict, adapter_name)
    except BaseException:
        # A failed load leaves the model as it was, not with a half-built adapter whose forward would raise.
        for tuner in find_tuners(model):
            tuner.unload()
        peft_configs = model.__dict__.get("peft_config")
        if peft_configs is not None:
            peft_configs.pop(adapter_name, None)
            if not had_peft_config:
                del model.peft_config
        raise
    model._hf_peft_config_loaded = True
    if config.inference_mode:
        model.eval()
    return _loading_info(unexpected=set(getattr(result, "unexpected_keys", ())))


def _loading_info(unexpected: set[str]) -> Any:
    """The loading report transformers returns (and `from_pretrained(..., output_loading_info=True)` gives)."""
    from transformers.utils.loading_report import LoadStateDictInfo

    fields = {
        "missing_keys": set(),
        "unexpected_keys": unexpected,
        "mismatched_keys": set(),
        "error_msgs": [],
        "conversion_errors": {},
        "skipped_pp_keys": set(),
    }
    names = inspect.signature(LoadStateDictInfo).parameters
    return LoadStateDictInfo(**{k: v for k, v in fields.items() if k in names})


def unload_adapter(model: nn.Module) -> nn.Module:
    """Removes X-LoRA from a transformers model that `model.load_adapter` built it into.

    The mixture layers, the classifier, the forward hooks and the adapter's config go; the model computes as the plain
    base model again. (transformers' `model.delete_adapter` cannot do this: it deletes adapters layer by layer.)

    Args:
        model: The transformers model.

    Returns:
        The same model, without X-LoRA.

    Raises:
        ValueError: `model` is a `PeftModel` (use its `unload()`), or has no X-LoRA adapter.
    """
    if isinstance(model, PeftModel):
        raise ValueError("This is a PeftModel: call `model.unload()` to get the base model back.")
    tuners = find_tuners(model)
    if not tuners:
        raise ValueError(f"This {type(model).__name__} has no X-LoRA adapter to unload.")
    for tuner in tuners:
        names = list(tuner.peft_config)
        tuner.unload()
        peft_configs = model.__dict__.get("peft_config", {})
        for name in names:
            peft_configs.pop(name, None)
    if not model.__dict__.get("peft_config"):
        model.__dict__.pop("peft_config", None)
        model._hf_peft_config_loaded = False
    return model
