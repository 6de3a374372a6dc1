"""`save_pretrained`: the atomic save of an X-LoRA checkpoint folder, model card included."""

from __future__ import annotations

import os
import shutil
from typing import Any

from torch import nn

from ..core.checkpoint import CARD_NAME, CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, check_checkpoint_dir
from .card import write_model_card
from .files import fsync_tree, replace_dir, replace_files, staging_dir

#: The files a checkpoint folder holds; any other file in the folder belongs to the user and is kept.
OWN_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, CARD_NAME})


def save_pretrained(
    model: nn.Module, save_directory: str | os.PathLike, card_repo_id: str | None = None, **kwargs: Any
) -> None:
    """Saves an X-LoRA `PeftModel` so that a failure at any point leaves the folder's previous contents intact.

    Everything is written to a new folder beside `save_directory`, checked by reading it back, and only then renamed
    into place. If `save_directory` existed, it is first renamed to a backup that is deleted once the new folder is in
    place; should the process die between the two renames, the backup (``<dir>.xlora-old-*``) holds the old checkpoint.
    A `save_directory` that also holds other files (a tokenizer, logs) keeps them: the checkpoint's files are then
    replaced one by one, each atomically, weights first and config last.

    Args:
        model: The `PeftModel` with X-LoRA.
        save_directory: The checkpoint folder.
        card_repo_id: Hub id named in the model card's usage snippet; a placeholder path when None.
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
    tmp = staging_dir(target)
    try:
        model.save_pretrained(tmp, **kwargs)
        write_model_card(model, tmp, repo_id=card_repo_id)
        check_checkpoint_dir(tmp)
        fsync_tree(tmp)
        if os.path.isdir(target) and not set(os.listdir(target)) <= OWN_FILES:
            # The folder also holds other things (a tokenizer, logs): keep them. Weights go first and the config
            # last, so an interruption leaves either the old pair or new weights beside the old config, which
            # loading refuses as a mismatch.
            replace_files(tmp, target, order=(WEIGHTS_NAME, CONFIG_NAME, CARD_NAME), remove=(PICKLE_WEIGHTS_NAME,))
        else:
            replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
