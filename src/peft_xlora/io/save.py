"""The atomic save of an X-LoRA checkpoint folder, model card included, and `PeftModel.save_pretrained` routed to it.

Users and `Trainer` call PEFT's `model.save_pretrained`, which writes the files in place. `import peft_xlora` wraps
`PeftModel.save_pretrained` once (`install`): an X-LoRA model goes through `save_pretrained` here, which runs PEFT's
original method into a staging folder; every other adapter type is saved by PEFT exactly as before.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
from collections.abc import Callable
from typing import Any

from peft import PeftModel
from torch import nn

from ..core.checkpoint import CARD_NAME, CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, check_checkpoint_dir
from ..core.model import XLoraModel
from .card import is_our_card, write_model_card
from .files import fsync_tree, link_others, replace_dir, replace_files, staging_dir

#: The files a checkpoint folder holds; any other file in the folder belongs to the user and is kept.
OWN_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, CARD_NAME})
_MARK = "__peft_xlora_atomic__"


def _peft_save(model: nn.Module) -> Any:
    """PEFT's own `save_pretrained` of `model`, never our wrapper (which would come back here)."""
    method = type(model).save_pretrained
    return getattr(method, "__wrapped__", method) if getattr(method, _MARK, False) else method


def save_pretrained(
    model: nn.Module, save_directory: str | os.PathLike, card_repo_id: str | None = None, **kwargs: Any
) -> None:
    """Saves an X-LoRA `PeftModel` so that the folder holds the complete old or the complete new checkpoint, always.

    Everything is written to a new folder beside `save_directory` by PEFT's own save, checked by reading it back, and
    then swapped into place in one atomic step (`peft_xlora.io.files`), even if the process is killed. Other files in
    `save_directory` (a tokenizer, logs, Trainer state) are kept: they are hard-linked into the new folder before the
    swap. A README.md that peft-xlora did not write is kept as it is, and then no model card is written (see
    docs/checkpoints.md). `model.save_pretrained(...)` lands here for X-LoRA models once `peft_xlora` is imported.

    Args:
        model: The `PeftModel` with X-LoRA.
        save_directory: The checkpoint folder.
        card_repo_id: Hub id named in the model card's usage snippet; a placeholder path when None.
        **kwargs: Passed to PEFT's `PeftModel.save_pretrained` (e.g. `is_main_process`, `state_dict`).
            `safe_serialization=False` is refused: checkpoints are safetensors only.
    """
    if kwargs.get("safe_serialization", True) is False:
        raise ValueError("peft-xlora saves safetensors only; drop `safe_serialization=False`.")
    if not kwargs.get("is_main_process", True):
        return
    kwargs.setdefault("save_embedding_layers", False)  # experts never change base weights (checked at build)

    def write(tmp: str, target: str) -> None:
        _peft_save(model)(model, tmp, **kwargs)
        user_card = os.path.join(target, CARD_NAME)
        # Any README.md but a regular file we wrote is the user's (a pipe or socket included: never opened).
        if os.path.lexists(user_card) and not (os.path.isfile(user_card) and is_our_card(user_card)):
            os.remove(os.path.join(tmp, CARD_NAME))  # PEFT's card: the user's README.md stays instead
        else:
            write_model_card(model, tmp, repo_id=card_repo_id)

    names = kwargs.get("selected_adapters") or list(getattr(model, "peft_config", {"default": None}))
    write_checkpoint(save_directory, write, [name if name != "default" else "" for name in names])


def write_checkpoint(
    save_directory: str | os.PathLike, write: Callable[[str, str], None], checkpoints: list[str] | None = None
) -> None:
    """Writes a checkpoint folder atomically: `write` fills a staging folder, which is checked and swapped into place.

    The machinery of every X-LoRA save (PEFT's `model.save_pretrained`, transformers' `save_pretrained` of a model
    that `load_adapter` built X-LoRA into): the folder holds the complete old or the complete new checkpoint at every
    instant, and the user's other files in it are kept (see `save_pretrained`).

    Args:
        save_directory: The checkpoint folder (a link to a folder: the folder is replaced, the link kept).
        write: ``write(staging, target)`` writes the checkpoint's files into `staging`; `target` is the real path of
            `save_directory`, to look at what it holds.
        checkpoints: Subfolders of the staging folder that must each hold a complete checkpoint once written
            (``""`` for the folder itself, the default).

    Raises:
        ValueError: `save_directory` is a file.
        peft_xlora.CheckpointError: What `write` wrote is not a complete checkpoint (nothing is replaced then).
    """
    target = os.path.realpath(os.fspath(save_directory))  # a link to a folder: replace the folder, keep the link
    if os.path.isfile(target):
        raise ValueError(f"{target} is a file; give a folder to save the checkpoint in.")
    tmp = staging_dir(target)
    try:
        write(tmp, target)
        for sub in [""] if checkpoints is None else checkpoints:
            check_checkpoint_dir(os.path.join(tmp, sub) if sub else tmp)
        if os.path.isdir(target) and not link_others(target, tmp, skip=OWN_FILES - {CARD_NAME}):
            # No hard links here (another device, a file system without them): replace the checkpoint's files one
            # by one, weights first and config last; an interruption can leave new weights beside the old config.
            fsync_tree(tmp)
            replace_files(tmp, target, order=(WEIGHTS_NAME, CONFIG_NAME, CARD_NAME), remove=(PICKLE_WEIGHTS_NAME,))
            return
        fsync_tree(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def install() -> None:
    """Wraps `PeftModel.save_pretrained` once so that X-LoRA models save atomically; other models as before.

    Idempotent: a second call (a re-import) finds the wrapper and leaves it.
    """
    original = PeftModel.save_pretrained
    if getattr(original, _MARK, False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def peft_save_pretrained(self: PeftModel, *args: Any, **kwargs: Any) -> None:
        if not isinstance(getattr(self, "base_model", None), XLoraModel):
            return original(self, *args, **kwargs)
        call = signature.bind(self, *args, **kwargs).arguments  # only what the caller gave: our defaults apply
        call.pop("self")
        extra = call.pop("kwargs", {})
        return save_pretrained(self, call.pop("save_directory"), **call, **extra)

    setattr(peft_save_pretrained, _MARK, True)
    PeftModel.save_pretrained = peft_save_pretrained
