"""What the subcommands share: the user-error type, argument types, and loading models from folders."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..core.checkpoint import check_config_structure, check_safetensors_file
from ..core.config import XLoraConfig
from ..io.plotting import plot_scalings
from .places import check_command, situation


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``<prog>: error: <message>``, exit status 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Prints the error in one line and exits with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _whole(text: str, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if maximum is not None and not minimum <= value <= maximum:
        raise argparse.ArgumentTypeError(f"expected a whole number from {minimum} to {maximum}, got {text!r}")
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
    return value


def whole_up_to(maximum: int) -> Any:
    """An argument type: a whole number from 1 to `maximum` (a size with a bound, e.g. the classifier's depth)."""

    def parse(text: str) -> int:
        return _whole(text, 1, maximum)

    parse.__name__ = f"whole number from 1 to {maximum}"
    return parse


def scaling_pass_layers(text: str) -> int | str | None:
    """An argument type: ``auto``, ``all`` (None: the whole model) or a whole number >= 1 of decoder layers."""
    if text in ("auto", "all"):
        return None if text == "all" else text
    try:
        return _whole(text, 1)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, all or a whole number >= 1, got {text!r}") from None


scaling_pass_layers.__name__ = "auto, all or a whole number >= 1"


def positive_int(text: str) -> int:
    """An argument type: a whole number >= 1 (steps, sizes, token counts)."""
    return _whole(text, 1)


def non_negative_int(text: str) -> int:
    """An argument type: a whole number >= 0 (a seed)."""
    return _whole(text, 0)


def positive_float(text: str) -> float:
    """An argument type: a finite number > 0 (a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """An argument type: a number in [0, 1) (a share held out)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def folder(text: str) -> Path:
    """An argument type: a folder to write to, which may not exist yet but must not be a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder; give a folder path")
    return path


def load_base(path: str | Path) -> Any:
    """The base model in folder `path`, in float32 and eval mode."""
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{path} is not a base model folder (no config.json); give a folder written by transformers.")
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as exc:  # no weights, a damaged config.json, an unknown model type
        raise UserError(
            f"Cannot load the base model in {path}: {exc} Give a folder written by transformers' save_pretrained."
        ) from exc


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved with the base model in `path`, with a pad token."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"No tokenizer in the base model folder {path} ({exc}); save one there.") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def checkpoint_config(checkpoint: str | Path) -> dict[str, Any]:
    """The `adapter_config.json` of an X-LoRA checkpoint folder, as a dict."""
    path = Path(checkpoint) / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{checkpoint} is not an X-LoRA checkpoint (no adapter_config.json); make one with `build`.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is damaged: not valid JSON ({exc}); save the checkpoint again.") from exc
    if not isinstance(config, dict):
        raise UserError(f"{path} is damaged: it holds a JSON {type(config).__name__}, not an object.")
    if config.get("peft_type") != "PEFT_XLORA":
        raise UserError(f"{checkpoint} holds a {config.get('peft_type')} adapter, not an X-LoRA (PEFT_XLORA) one.")
    try:
        check_config_structure(str(path), config)
    except ValueError as exc:  # CheckpointError
        raise UserError(str(exc)) from exc
    return config


def check_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """Runs every check a checkpoint gets before it is loaded, without loading it; returns its config as a dict.

    The files (`adapter_config.json` readable and well formed, the weights complete) and the config's values
    (`XLoraConfig`: ranges, bounds on sizes, expert order), as `PeftModel.from_pretrained` would check them.
    """
    config = checkpoint_config(checkpoint)
    load_config(checkpoint)
    return config


def load_config(checkpoint: str | Path) -> XLoraConfig:
    """The checkpoint's `XLoraConfig`, after the checks of `check_checkpoint` (files, structure, values)."""
    checkpoint_config(checkpoint)
    try:
        return XLoraConfig.from_pretrained(str(checkpoint))  # check_checkpoint_dir, then the config's own validation
    except ValueError as exc:  # CheckpointError: missing or truncated weights; ValueError: a refused value
        raise UserError(str(exc)) from exc


def local_base(checkpoint: str | Path, base: str | None) -> str | None:
    """The base model folder a command would load, when it is a local one: `--base`, else the recorded one."""
    path = base or checkpoint_config(checkpoint).get("base_model_name_or_path")
    return str(path) if path and Path(path).is_dir() else None


def require_supported(
    checkpoint: str | Path,
    command: str,
    base: str | None,
    loads_model: bool = True,
    exporter: str | None = None,
    **facts: Any,
) -> XLoraConfig:
    """Refuses what the table of what combines refuses for `command` on this checkpoint, before anything loads.

    The checkpoint's files are checked first (`load_config`); then the ``cli`` column, and the exporter's column
    for an export, in the situation the files describe (`places.situation`). Returns the checkpoint's config.
    """
    config = load_config(checkpoint)
    found = situation(config, command, local_base(checkpoint, base), loads_model, **facts)
    try:
        check_command(found, exporter)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    return config


def check_base_config(path: str | Path) -> None:
    """Refuses a local base model folder whose config.json is missing, damaged or not a JSON object, naming it."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise UserError(f"{path} is not a base model folder (no config.json); give a folder written by transformers.")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{config} is damaged: not valid JSON ({exc}). Save the base model again.") from exc
    if not isinstance(data, dict):
        raise UserError(f"{config} is damaged: it holds a JSON {type(data).__name__}, not an object.")


def check_out_folder(out: Path, what: str) -> None:
    """Refuses an --out folder that holds another kind of PEFT adapter, whose files the X-LoRA save would replace."""
    path = out / "adapter_config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        held = f"a {config.get('peft_type')} adapter"
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        config, held = None, "an adapter_config.json that is not a JSON object"
    if not isinstance(config, dict) or config.get("peft_type") != "PEFT_XLORA":
        raise UserError(
            f"--out {out} holds {held}, whose files saving {what} there would replace; give another folder."
        )


def base_of(checkpoint: str | Path, base: str | None) -> str:
    """The base model folder: `--base` if given, else the one the checkpoint records."""
    if base:
        return base
    recorded = checkpoint_config(checkpoint).get("base_model_name_or_path")
    if not recorded or not (Path(recorded) / "config.json").is_file():
        raise UserError(
            f"The checkpoint records the base model {recorded!r}, which is not a local folder here; pass --base."
        )
    return recorded


def load_xlora(checkpoint: str | Path, base: str | None = None, trainable: bool = False) -> tuple[Any, Any, str]:
    """(the X-LoRA PeftModel, its tokenizer, the base folder) of a checkpoint."""
    checkpoint_config(checkpoint)
    base_dir = base_of(checkpoint, base)
    try:
        model = PeftModel.from_pretrained(load_base(base_dir), str(checkpoint), is_trainable=trainable)
    except ValueError as exc:  # CheckpointError, ExpertError: damaged or mismatched files, named in the message
        raise UserError(str(exc)) from exc
    return model, load_tokenizer(base_dir), base_dir


def check_weights_file(path: str | Path) -> None:
    """Refuses a damaged safetensors file (truncated, bad header) in one line."""
    try:
        check_safetensors_file(str(path))
    except ValueError as exc:  # CheckpointError
        raise UserError(str(exc)) from exc


def weights(text: str) -> dict[str, float]:
    """Parses `name=weight,name=weight`."""
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected name=weight[,name=weight...], got {text!r}")
    return out


def adapter(text: str) -> tuple[str, str]:
    """Parses `NAME=PATH`."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (a LoRA checkpoint folder), got {text!r}")
    return name, path


#: `--topk-compute` choices: `XLoraConfig.topk_compute`.
TOPK_COMPUTE = ("auto", "dense", "sparse")


def add_topk_compute(p: argparse.ArgumentParser, default: str) -> None:
    """Adds `--topk-compute` to a subcommand's parser; `default` says what leaving it out does."""
    p.add_argument(
        "--topk-compute",
        choices=TOPK_COMPUTE,
        default=None,
        help="with top-k routing, compute only each token's k experts (sparse), all of them (dense), or pick by the "
        f"number of experts and their rank (auto); the outputs are the same within float tolerance ({default})",
    )


def set_topk_compute(model: Any, value: str | None) -> None:
    """Switches a loaded X-LoRA model to `--topk-compute` `value` (None: keeps the checkpoint's)."""
    if value is None:
        return
    try:
        model.base_model.update_config(topk_compute=value)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def plot_gate(model: Any, tokenizer: Any, ids: torch.Tensor, path: Path, title: str) -> None:
    """Writes the gating heatmap of the model's latest forward over the tokens `ids` to `path`."""
    try:
        plot_scalings(
            model.get_latest_scalings(),
            path,
            tokenizer=tokenizer,
            input_ids=ids,
            expert_names=model.expert_names,
            title=title,
        )
    except (ValueError, ImportError) as exc:
        raise UserError(str(exc)) from exc
    except OSError as exc:  # e.g. the folder of `path` does not exist
        raise UserError(f"Cannot write the plot to {path}: {exc.strerror or exc}.") from exc
