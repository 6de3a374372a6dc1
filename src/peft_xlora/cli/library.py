"""A folder of LoRA experts (`build --adapters-dir`): each subfolder is an expert named after it, in sorted order."""

from __future__ import annotations

import json
from pathlib import Path

from .common import UserError

# Shown at most this many of the subfolders that are not LoRA adapters (the message stays one line).
_SHOWN = 3


def _not_a_lora(folder: Path) -> str | None:
    """Why `folder` is not a LoRA checkpoint folder, or None if it is one."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        return "no adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its adapter_config.json is not JSON"
    except OSError as exc:
        return f"its adapter_config.json cannot be read: {exc.strerror or exc}"
    if not isinstance(config, dict):
        return "its adapter_config.json is not a JSON object"
    if config.get("peft_type") != "LORA":
        return f"a {config.get('peft_type')} adapter, not LORA"
    return None


def adapters_in(directory: str | Path, out: str | Path | None = None) -> dict[str, str]:
    """The LoRA experts of a folder: subfolder name -> subfolder path, sorted by name.

    Every subfolder must be a LoRA checkpoint folder (an `adapter_config.json` with `peft_type` LORA); files beside
    them (a README) are ignored, and so are hidden subfolders (a name starting with ".") and the `out` folder (the
    checkpoint being built, when it lies inside `directory`). Names sort by Unicode code point, the same on every
    file system, so the gate's order does not depend on the order the folder lists its entries in.

    Args:
        directory: The folder given to `--adapters-dir`.
        out: The `--out` folder of the command, skipped if it is a subfolder of `directory`.

    Raises:
        UserError: `directory` is missing, is a file, is itself a LoRA folder, holds no subfolder, or holds a
            subfolder that is not a LoRA checkpoint folder (the message names up to three and why).
    """
    root = Path(directory)
    if not root.exists():
        raise UserError(f"--adapters-dir {root}: no such folder; give the folder that holds one subfolder per LoRA.")
    if not root.is_dir():
        raise UserError(f"--adapters-dir {root} is a file, not a folder; give the folder that holds the LoRAs.")
    if (root / "adapter_config.json").is_file():
        raise UserError(
            f"--adapters-dir {root} is itself an adapter folder (it holds adapter_config.json); give the folder above "
            f"it, which holds one subfolder per LoRA, or name it with --adapter NAME={root}."
        )
    skip = Path(out).resolve() if out is not None else None
    subfolders = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.resolve() != skip),
        key=lambda p: p.name,
    )
    if not subfolders:
        raise UserError(
            f"--adapters-dir {root} holds no subfolder; put each LoRA expert (its adapter_config.json and weights) "
            "in a subfolder of its own, named as the expert should be."
        )
    problems = [(p.name, why) for p in subfolders if (why := _not_a_lora(p)) is not None]
    if problems:
        shown = "; ".join(f"{name}/ ({why})" for name, why in problems[:_SHOWN])
        more = f" and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise UserError(
            f"--adapters-dir {root}: {len(problems)} of its {len(subfolders)} subfolders are not LoRA checkpoint "
            f"folders: {shown}{more}. Every subfolder must be a LoRA expert: move the others out, or name the "
            "experts one by one with --adapter NAME=PATH."
        )
    return {p.name: str(p) for p in subfolders}
