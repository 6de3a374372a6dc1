"""Uploading an X-LoRA checkpoint folder, with its model card, to the Hugging Face Hub."""

from __future__ import annotations

import os
import tempfile

from torch import nn

from .save import save_pretrained


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload X-LoRA adapter",
) -> str:
    """Uploads the whole checkpoint folder and its model card to the Hub in one commit.

    `PeftModel.push_to_hub` goes through transformers' card writer, which can replace the card; this writes the
    folder with `save_pretrained` and uploads exactly that.

    Args:
        model: The X-LoRA `PeftModel`.
        repo_id: ``user/name``; created if missing.
        private: Visibility of a newly created repo.
        token: Hub token; the stored login when None.
        revision: Branch to commit to.
        commit_message: The commit message.

    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "checkpoint")
        save_pretrained(model, folder, card_repo_id=repo_id)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
