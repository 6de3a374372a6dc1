"""The model card (README.md) of an X-LoRA checkpoint."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from torch import nn

from .._version import __version__
from ..core.checkpoint import CARD_NAME

if TYPE_CHECKING:
    from ..core.config import XLoraConfig

#: The line that marks a README.md as our model card. A save rewrites a card that has it and leaves any other
#: README.md as it is: deleting the line makes the card the user's own.
CARD_MARK = "<!-- peft-xlora model card: rewritten on every save; delete this line to keep your own text -->"


def is_our_card(path: str) -> bool:
    """Whether the file at `path` is a model card that peft-xlora wrote (and may rewrite)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return CARD_MARK in f.read()
    except OSError:
        return False


def write_model_card(model: nn.Module, directory: str, repo_id: str | None = None) -> None:
    """Writes (or rewrites) README.md with the metadata and usage of an X-LoRA checkpoint.

    Args:
        model: The X-LoRA `PeftModel`.
        directory: The checkpoint folder.
        repo_id: Hub id used in the usage snippet; the folder path when None.
    """
    from huggingface_hub import ModelCard, ModelCardData

    config = model.peft_config[getattr(model, "active_adapter", "default")]
    base_model = model.get_base_model()
    base = (
        config.base_model_name_or_path
        or getattr(base_model, "name_or_path", None)
        or getattr(getattr(base_model, "config", None), "name_or_path", None)
        or None
    )
    location = repo_id or "path/to/this/checkpoint"
    tags = ["peft", "peft-xlora", "x-lora", "lora", "mixture-of-experts"]
    data = ModelCardData(library_name="peft", base_model=base, tags=tags, pipeline_tag=_pipeline_tag(config))
    experts = "\n".join(f"- `{name}`" for name in config.adapters)
    usage = "\n".join(
        [
            "```python",
            "import peft_xlora  # registers X-LoRA with PEFT; import it before loading",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base or "<base model>"}")',
            f'model = PeftModel.from_pretrained(base, "{location}")',
            "```",
        ]
    )
    text = (
        f"---\n{data.to_yaml()}\n---\n\n{CARD_MARK}\n\n# X-LoRA adapter\n\n"
        f"An X-LoRA mixture of {len(config.adapters)} LoRA experts over `{base}`, saved with peft-xlora "
        f"{__version__}. The folder holds the gating classifier and every expert's weights; loading it needs no "
        f"other files.\n\n## Experts\n\n{experts}\n\n## Usage\n\n{usage}\n"
    )
    ModelCard(text).save(os.path.join(directory, CARD_NAME))


def _pipeline_tag(config: XLoraConfig) -> str | None:
    task = getattr(config.task_type, "value", config.task_type)
    return "text-generation" if task == "CAUSAL_LM" else None
