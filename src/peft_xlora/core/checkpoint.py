"""The files of a saved X-LoRA checkpoint, and the checks that run before PEFT reads them.

A saved X-LoRA folder is self-contained:

    adapter_config.json         XLoraConfig: peft_type "PEFT_XLORA", plugin version, expert order, each expert's
                                LoRA config (`experts`), gating options. No absolute paths are needed to load it.
    adapter_model.safetensors   the classifier and every expert's LoRA factors (layout in `state_dict.py`).
    README.md                   model card (written by `peft_xlora.io.card`).

`XLoraConfig.from_pretrained`, the first step of every load path PEFT takes, runs `check_checkpoint`, so a missing,
truncated or pickle-only file is named before any tensor is read.
"""

from __future__ import annotations

import inspect
import json
import os
import struct
from typing import Any

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
CARD_NAME = "README.md"


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, truncated, or does not match the model it should load into."""


def check_safetensors_file(path: str) -> None:
    """Reads a safetensors file's header and checks that the file holds all the bytes the header promises.

    Raises:
        CheckpointError: The file is missing, is not safetensors (including a malformed header), or is truncated;
            the message names the file.
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
    end = max((stop for _, stop in _tensor_offsets(path, header)), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {8 + header_len + end} bytes but the file has {size}. "
            "The save that wrote it was interrupted; use the previous checkpoint or save again."
        )


def _tensor_offsets(path: str, header: Any) -> list[tuple[int, int]]:
    """The (start, stop) byte offsets of every tensor a safetensors header lists, after checking its structure.

    Raises:
        CheckpointError: The header is not an object of tensor entries, each with a dtype, a shape and two
            increasing non-negative offsets; the message names the file and the first bad entry.
    """
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path} is not a valid safetensors file: its header is a JSON {type(header).__name__}, not an object "
            "of tensor entries. The file is damaged or was not written by safetensors."
        )
    offsets = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        where = entry.get("data_offsets") if isinstance(entry, dict) else None
        fine = (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and isinstance(where, list)
            and len(where) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in where)
            and where[0] <= where[1]
        )
        if not fine:
            shown = json.dumps(entry)[:120]
            raise CheckpointError(
                f"{path} is not a valid safetensors file: the header entry of tensor {key!r} is {shown}, not "
                '{"dtype": ..., "shape": [...], "data_offsets": [start, stop]}. The file is damaged or was not '
                "written by safetensors."
            )
        offsets.append((where[0], where[1]))
    return offsets


def check_config_structure(path: str, config: Any) -> None:
    """Checks that an X-LoRA `adapter_config.json` has the JSON types its fields need, before any field is read.

    The values are checked by `XLoraConfig`; this catches a file whose structure was edited or damaged (`experts` a
    list, `expert_order` a string), which would otherwise fail inside the config with a `TypeError` that names
    neither the file nor the field.

    Args:
        path: The file, named in the message.
        config: Its parsed JSON.

    Raises:
        CheckpointError: The file is not a JSON object, or `adapters`, `experts` or `expert_order` has the wrong type.
    """

    def kind(value: Any) -> str:
        return {dict: "an object", list: "a list", str: "a string"}.get(type(value), f"a {type(value).__name__}")

    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds {kind(config)}, not a JSON object; the file is damaged. Save it again.")
    wanted = {
        "adapters": ("an object of expert name -> source", lambda v: isinstance(v, dict)),
        "experts": (
            "an object of expert name -> LoRA config object",
            lambda v: isinstance(v, dict) and all(isinstance(e, dict) for e in v.values()),
        ),
        "expert_order": (
            "a list of expert names",
            lambda v: isinstance(v, list) and all(isinstance(e, str) for e in v),
        ),
    }
    for name, (what, fits) in wanted.items():
        value = config.get(name)
        if value is not None and not fits(value):
            shown = json.dumps(value)[:80]
            raise CheckpointError(
                f"{path}: `{name}` is {shown}, not {what}; the file was edited or damaged. Save the checkpoint again "
                "(or restore the field as `save_pretrained` wrote it)."
            )


def check_checkpoint_dir(path: str, allow_pickle: bool = False) -> None:
    """Checks a local X-LoRA checkpoint folder before PEFT reads it.

    Args:
        path: The folder.
        allow_pickle: Accept `adapter_model.bin` (read by PEFT with `torch.load(weights_only=True)`) when there is no
            safetensors file.

    Raises:
        CheckpointError: A file is missing, truncated or unreadable (a config field of the wrong JSON type
            included), or only a pickle file is present and `allow_pickle` is False.
    """
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path} does not exist: {path} is not a saved X-LoRA checkpoint.")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc}); the file is damaged or truncated.") from exc
    check_config_structure(config_path, config)
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

    For a Hub repo `adapter_config.json` and the weights file are downloaded into the Hub cache (where PEFT then finds
    them) and checked there: the config's structure, as for a folder, and the weights' header.

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
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    names = inspect.signature(hf_hub_download).parameters
    kwargs = {k: v for k, v in hub_kwargs.items() if k in names and k not in ("repo_id", "filename", "subfolder")}
    _check_hub_config(model_id, subfolder, hf_hub_download, kwargs)
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


def _check_hub_config(model_id: str, subfolder: str | None, download: Any, kwargs: dict[str, Any]) -> None:
    """Downloads a Hub checkpoint's `adapter_config.json` and checks its structure (`check_config_structure`).

    A missing file is left to PEFT, whose own error names it; a file that is not JSON, or whose fields have the
    wrong JSON types, is named here (as `<repo>/<subfolder>/adapter_config.json`) before any field is read.
    """
    from huggingface_hub.errors import EntryNotFoundError

    shown = "/".join(part for part in (model_id, subfolder, CONFIG_NAME) if part)
    try:
        path = download(model_id, CONFIG_NAME, subfolder=subfolder, **kwargs)
    except EntryNotFoundError:
        return
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{shown} is not valid JSON ({exc}); the file is damaged or truncated.") from exc
    check_config_structure(shown, config)
