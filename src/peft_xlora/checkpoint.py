"""Checkpoint I/O: the saved layout, strict loading, atomic saves, model cards and the Hub.

A saved X-LoRA folder is self-contained:

    adapter_config.json         XLoraConfig: peft_type "PEFT_XLORA", plugin version, expert order, each expert's
                                LoRA config (`experts`), gating options. No absolute paths are needed to load it.
    adapter_model.safetensors   the classifier and every expert's LoRA factors, one pair of tensors per expert and
                                module (see below).
    README.md                   model card (library_name: peft, base model, tags, usage starting `import peft_xlora`;
                                written by `hub.write_model_card`).

Tensor keys (relative to the `PeftModel`):

    base_model.xlora_classifier.layers.<i>.{weight,bias}                    classifier, as PEFT's built-in X-LoRA
    base_model.model.<module>.xlora_experts.<expert>.lora_A   (r, in)       an expert's factors on one module
    base_model.model.<module>.xlora_experts.<expert>.lora_B   (out, r)

The model itself holds each module's experts stacked (`XLoraLayer.xlora_A`, (R, in)); saving splits the stacks per
expert and loading joins them again. Per-expert keys let an expert be replaced at load time by one of another rank or
other target modules, and let the experts be exported as plain LoRA adapters. Keys are built from the module and expert
names, never parsed, so expert names may contain any character.

The classifier is a submodule of the transformers model (``base_model.model.xlora_classifier`` in the `PeftModel`),
so that transformers' `model.load_adapter`, which keeps only the transformers model, has it too. Its checkpoint keys
stay ``base_model.xlora_classifier.*`` (the layout of every checkpoint written so far): saving and loading map between
the two. Loading also accepts ``base_model.model.xlora_classifier.*``, which transformers' `save_pretrained` of a bare
model writes (it prefixes every key of the model with ``base_model.model.``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .layer import XLoraLayer

if TYPE_CHECKING:
    from .config import XLoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
CARD_NAME = "README.md"
CLASSIFIER_PREFIX = "base_model.xlora_classifier."
EXPERT_INFIX = "xlora_experts"
PEFT_PREFIX = "base_model.model."


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, truncated, or does not match the model it should load into."""


# ---------------------------------------------------------------------------------------------------- the layout


def expert_key(module_key: str, expert: str, part: str) -> str:
    """The checkpoint key of one expert's factor on one module.

    Args:
        module_key: The module's key prefix, e.g. ``base_model.model.model.layers.0.self_attn.q_proj``.
        expert: The expert's name.
        part: ``"A"`` or ``"B"``.
    """
    return f"{module_key}.{EXPERT_INFIX}.{expert}.lora_{part}"


def rank_bounds(layer: XLoraLayer, position: int) -> tuple[int, int]:
    """Rows (of `xlora_A`) / columns (of `xlora_B`) that hold the `position`-th expert of `layer`."""
    start = sum(layer.ranks[:position])
    return start, start + layer.ranks[position]


def _mixture_layers(model: nn.Module) -> Iterator[tuple[str, XLoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, XLoraLayer):
            yield name, module


def _expert_names(model: nn.Module, config: XLoraConfig) -> list[str]:
    # The tuner's list is the order the mixture layers index into; the config's is the same unless it was edited.
    from .model import attached_tuners

    for tuner in attached_tuners(model):
        return list(tuner.expert_names)
    return list(config.adapters)


def split_experts(
    model: nn.Module, config: XLoraConfig, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Model state dict (stacked experts) -> checkpoint state dict (one A/B pair per expert and module).

    Args:
        model: The `PeftModel` (or any module holding the mixture layers under the names used in `state_dict`).
        config: Its X-LoRA config.
        state_dict: The X-LoRA entries of the model's state dict (classifier and stacked factors).

    Returns:
        The checkpoint entries: classifier entries unchanged, stacked factors split per expert.
    """
    names = _expert_names(model, config)
    out = dict(state_dict)
    for model_key, saved_key, _ in _classifier_keys(model):
        if model_key in out:
            out[saved_key] = out.pop(model_key)
    for module_key, layer in _mixture_layers(model):
        stacked_a = out.pop(f"{module_key}.xlora_A", None)
        stacked_b = out.pop(f"{module_key}.xlora_B", None)
        if stacked_a is None or stacked_b is None:
            continue  # not part of this state dict (e.g. a partial one)
        for position, index in enumerate(layer.expert_indices):
            start, stop = rank_bounds(layer, position)
            # clone: safetensors refuses views that share storage with other saved tensors
            out[expert_key(module_key, names[index], "A")] = stacked_a[start:stop].clone()  # (r, in)
            out[expert_key(module_key, names[index], "B")] = stacked_b[:, start:stop].clone()  # (out, r)
    return out


def classifier_entries(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The classifier's entries of `model`'s state dict, under the model's keys."""
    return {key: state_dict[key] for key, _, _ in _classifier_keys(model) if key in state_dict}


def join_experts(
    model: nn.Module,
    config: XLoraConfig,
    state_dict: dict[str, torch.Tensor],
    replaced: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Checkpoint state dict -> model state dict, checking that it holds exactly what the model needs.

    Args:
        model: The `PeftModel` the weights are loaded into, or the bare transformers model after transformers'
            `model.load_adapter` built X-LoRA into it.
        config: Its X-LoRA config.
        state_dict: The checkpoint's tensors.
        replaced: Expert name -> `Expert` (from `experts.load_expert`) for experts whose source was swapped at load
            time: their factors come from there, and the checkpoint's tensors for them are ignored.

    Returns:
        The model's keys -> tensors: the classifier entries and one stacked (A, B) pair per mixture layer.

    Raises:
        CheckpointError: Tensors are missing, unexpected, or have the wrong shape.
    """
    replaced = replaced or {}
    names = _expert_names(model, config)
    remaining = dict(state_dict)
    for name in replaced:  # the checkpoint's copy of a replaced expert is not used
        infix = f".{EXPERT_INFIX}.{name}.lora_"
        for key in [k for k in remaining if infix in k]:
            del remaining[key]
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    wrong_shape: list[str] = []
    prefixed = any(k.startswith(PEFT_PREFIX) for k in state_dict)
    for module_key, layer in _mixture_layers(model):
        # Keys are saved relative to the PeftModel; a model without that wrapper sees them without the prefix.
        ckpt_module = module_key if module_key.startswith("base_model.") or not prefixed else PEFT_PREFIX + module_key
        module_name = module_key.removeprefix(PEFT_PREFIX)
        parts_a, parts_b = [], []
        problems_before = len(missing) + len(wrong_shape)
        for position, index in enumerate(layer.expert_indices):
            name = names[index]
            start, stop = rank_bounds(layer, position)
            if name in replaced:
                lora = replaced[name].modules[module_name]
                a, b = lora.A, lora.B
            else:
                key_a, key_b = expert_key(ckpt_module, name, "A"), expert_key(ckpt_module, name, "B")
                a, b = remaining.pop(key_a, None), remaining.pop(key_b, None)
                for key, tensor, shape in (
                    (key_a, a, (stop - start, layer.in_features)),
                    (key_b, b, (layer.out_features, stop - start)),
                ):
                    if tensor is None:
                        missing.append(key)
                    elif tuple(tensor.shape) != shape:
                        wrong_shape.append(f"{key}: {tuple(tensor.shape)} in the checkpoint, {shape} in the model")
                if a is None or b is None:
                    continue
            parts_a.append(a)
            parts_b.append(b)
        if len(missing) + len(wrong_shape) == problems_before:  # every factor of this layer is present and fits
            dtype = parts_a[0].dtype if parts_a else layer.xlora_A.dtype
            out[f"{module_key}.xlora_A"] = torch.cat([p.to(dtype) for p in parts_a], dim=0)  # (R, in)
            out[f"{module_key}.xlora_B"] = torch.cat([p.to(dtype) for p in parts_b], dim=1)  # (out, R)

    for model_key, _, loadable in _classifier_keys(model):
        found = [k for k in loadable if k in remaining]  # a second layout of the same tensor stays "unexpected"
        tensor = remaining.pop(found[0]) if found else None
        if tensor is None:
            missing.append(loadable[0])
        else:
            expected = tuple(model.get_parameter(model_key).shape)
            if tuple(tensor.shape) != expected:
                wrong_shape.append(f"{found[0]}: {tuple(tensor.shape)} in the checkpoint, {expected} in the model")
            out[model_key] = tensor
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {missing[:3]})")
    if remaining:
        problems.append(f"{len(remaining)} unexpected tensors (e.g. {sorted(remaining)[:3]})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with the wrong shape ({'; '.join(wrong_shape[:3])})")
    if problems:
        raise CheckpointError(
            f"The X-LoRA weights do not match the model that {CONFIG_NAME} describes: " + ", ".join(problems) + ". "
            f"Was {WEIGHTS_NAME} or {CONFIG_NAME} replaced, truncated, or written for another base model?"
        )
    return out


def _classifier_keys(model: nn.Module) -> list[tuple[str, str, list[str]]]:
    """For each classifier parameter: its key in `model`, the key it is saved under, the keys it may be loaded from.

    In a `PeftModel` the classifier is ``base_model.model.xlora_classifier``, saved as ``base_model.xlora_classifier``.
    In a bare transformers model (transformers' PEFT integration) it is ``xlora_classifier`` and is saved under that
    key, relative to the model like every other key there. Either loads from ``base_model.xlora_classifier.*`` (what
    this package writes), ``base_model.model.xlora_classifier.*`` (what transformers' `save_pretrained` writes) and,
    into a bare model, the unprefixed key.
    """
    from .classifier import XLoraClassifier

    for name, module in model.named_modules():
        if isinstance(module, XLoraClassifier):
            wrapped = name.startswith(PEFT_PREFIX)
            out = []
            for rel, _ in module.named_parameters():
                model_key = f"{name}.{rel}"
                canonical = CLASSIFIER_PREFIX + rel
                loadable = [canonical, PEFT_PREFIX + model_key.removeprefix(PEFT_PREFIX)]
                if not wrapped:
                    loadable.append(model_key)
                out.append((model_key, canonical if wrapped else model_key, loadable))
            return out
    return []


def restore_saved_dtypes(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Gives each X-LoRA parameter the dtype it was saved in, so that a reload is bit-exact.

    A model trained on a bf16 base keeps its trainable weights in float32 (PEFT's `autocast_adapter_dtype`); loading
    that checkpoint for inference would otherwise round them to bf16.
    """
    for key, tensor in state_dict.items():
        try:
            param = model.get_parameter(key)
        except AttributeError:
            continue
        if param.dtype != tensor.dtype and tensor.is_floating_point():
            param.data = param.data.to(tensor.dtype)


# ---------------------------------------------------------------------------------------------------- checking files


def check_safetensors_file(path: str) -> None:
    """Reads a safetensors file's header and checks that the file holds all the bytes the header promises.

    Raises:
        CheckpointError: The file is missing, is not safetensors, or is truncated; the message names the file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, not even a safetensors header.")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {header_len} bytes but the file "
                f"has {size}."
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is not a valid safetensors file (unreadable header: {exc}).") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {8 + header_len + end} bytes but the file has {size}. "
            "The save that wrote it was interrupted; use the previous checkpoint or save again."
        )


def check_checkpoint_dir(path: str, allow_pickle: bool = False) -> None:
    """Checks a local X-LoRA checkpoint folder before PEFT reads it.

    Args:
        path: The folder.
        allow_pickle: Accept `adapter_model.bin` (read by PEFT with `torch.load(weights_only=True)`) when there is no
            safetensors file.

    Raises:
        CheckpointError: A file is missing, truncated or unreadable, or only a pickle file is present and
            `allow_pickle` is False.
    """
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path} does not exist: {path} is not a saved X-LoRA checkpoint.")
    try:
        with open(config_path, encoding="utf-8") as f:
            json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc}); the file is damaged or truncated.") from exc
    weights = os.path.join(path, WEIGHTS_NAME)
    if os.path.exists(weights):
        check_safetensors_file(weights)
        return
    if os.path.exists(os.path.join(path, PICKLE_WEIGHTS_NAME)):
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds only {PICKLE_WEIGHTS_NAME}, a pickle file, which can run code when read. peft-xlora "
                f"reads only safetensors by default. If you trust its origin, pass `allow_pickle=True` (it is then "
                "read with torch.load(weights_only=True)), or convert it to safetensors."
            )
        return
    raise CheckpointError(f"{weights} does not exist: the checkpoint has a config but no weights.")


def check_checkpoint(
    model_id: str, subfolder: str | None = None, allow_pickle: bool = False, **hub_kwargs: Any
) -> None:
    """Checks a checkpoint folder or Hub repo before PEFT reads it (see `check_checkpoint_dir`).

    For a Hub repo the weights file is downloaded into the Hub cache (where PEFT then finds it) and checked there.

    Args:
        model_id: Local folder or Hub id.
        subfolder: Subfolder inside it.
        allow_pickle: Accept a pickle-only checkpoint.
        **hub_kwargs: Options for `hf_hub_download` (revision, token, cache_dir, ...); others are ignored.
    """
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local):
        check_checkpoint_dir(local, allow_pickle=allow_pickle)
        return
    import inspect

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    names = inspect.signature(hf_hub_download).parameters
    kwargs = {k: v for k, v in hub_kwargs.items() if k in names and k not in ("repo_id", "filename", "subfolder")}
    try:
        path = hf_hub_download(model_id, WEIGHTS_NAME, subfolder=subfolder, **kwargs)
    except EntryNotFoundError:
        if not allow_pickle:
            raise CheckpointError(
                f"{model_id} has no {WEIGHTS_NAME}. peft-xlora reads only safetensors by default; if the repo holds "
                f"a {PICKLE_WEIGHTS_NAME} you trust, pass `allow_pickle=True`."
            ) from None
        return
    check_safetensors_file(path)


def replace_experts(config: XLoraConfig, sources: dict[str, str]) -> None:
    """Makes a loaded checkpoint config take some experts from other LoRA adapters instead of the checkpoint.

    The replacement may have another rank or other target modules; its LoRA config replaces the saved one, and its
    weights are used when the checkpoint is loaded (`join_experts`).

    Args:
        config: The config just read from the checkpoint.
        sources: Expert name -> LoRA folder or Hub id.

    Raises:
        ValueError: A name is not an expert of the checkpoint.
    """
    from .experts import load_expert

    unknown = sorted(set(sources) - set(config.adapters))
    if unknown:
        raise ValueError(
            f"`expert_sources` names {unknown}, which are not experts of this checkpoint; its experts are "
            f"{list(config.adapters)}."
        )
    replaced = dict(getattr(config, "_replaced_experts", {}))
    for name, source in sources.items():
        expert = load_expert(name, os.fspath(source))
        config.adapters[name] = os.fspath(source)
        config.experts[name] = expert.config_dict()
        replaced[name] = expert
    config._replaced_experts = replaced


# ---------------------------------------------------------------------------------------------------- saving


def save_pretrained(model: nn.Module, save_directory: str, **kwargs: Any) -> None:
    """Saves an X-LoRA `PeftModel` so that a failure at any point leaves the folder's previous contents intact.

    Everything is written to a new folder beside `save_directory`, checked by reading it back, and only then renamed
    into place. If `save_directory` existed, it is first renamed to a backup that is deleted once the new folder is in
    place; should the process die between the two renames, the backup (``<dir>.xlora-old-*``) holds the old checkpoint.
    A `save_directory` that also holds other files (a tokenizer, logs) keeps them: the checkpoint's files are then
    replaced one by one, each atomically, weights first and config last.

    Args:
        model: The `PeftModel` with X-LoRA.
        save_directory: The checkpoint folder.
        **kwargs: Passed to `PeftModel.save_pretrained` (e.g. `is_main_process`). `safe_serialization=False` is
            refused: checkpoints are safetensors only.
    """
    if kwargs.get("safe_serialization", True) is False:
        raise ValueError("peft-xlora saves safetensors only; drop `safe_serialization=False`.")
    if not kwargs.get("is_main_process", True):
        return
    kwargs.setdefault("save_embedding_layers", False)  # experts never change base weights (checked at build)
    target = os.path.abspath(os.fspath(save_directory))
    if os.path.isfile(target):
        raise ValueError(f"{target} is a file; give a folder to save the checkpoint in.")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.xlora-tmp-", dir=parent)
    try:
        model.save_pretrained(tmp, **kwargs)
        from .hub import write_model_card

        write_model_card(model, tmp)
        check_checkpoint_dir(tmp)
        _fsync_tree(tmp)
        if os.path.isdir(target) and not set(os.listdir(target)) <= _OWN_FILES:
            _replace_files(tmp, target)  # the folder also holds other things (a tokenizer, logs): keep them
        else:
            _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(path: str) -> None:
    # The rename must not reach the disk before the data it points to.
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            fd = os.open(full, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


_OWN_FILES = {CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, CARD_NAME}


def _replace_files(new: str, target: str) -> None:
    """Moves the files of `new` into `target` one by one, each replacing its old version atomically.

    Used when `target` holds files that are not part of the checkpoint. The weights go first and the config last, so
    an interruption leaves either the old pair, or new weights beside the old config; loading checks that they match.
    """
    order = [WEIGHTS_NAME, CONFIG_NAME, CARD_NAME]
    for name in sorted(os.listdir(new), key=lambda n: order.index(n) if n in order else len(order)):
        os.replace(os.path.join(new, name), os.path.join(target, name))
    if os.path.exists(os.path.join(target, PICKLE_WEIGHTS_NAME)):
        os.remove(os.path.join(target, PICKLE_WEIGHTS_NAME))  # an older pickle save would shadow nothing but confuse
    shutil.rmtree(new, ignore_errors=True)


def _replace_dir(new: str, target: str) -> None:
    if not os.path.exists(target):
        os.rename(new, target)
        return
    backup = f"{target}.xlora-old-{uuid.uuid4().hex[:8]}"
    os.rename(target, backup)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
