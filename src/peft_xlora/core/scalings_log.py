"""The scalings log: every gate prediction an X-LoRA model makes, kept on CPU, bucketed, written and read back.

`ScalingsLogMixin` gives `XLoraModel` (and, through PEFT's attribute forwarding, the `PeftModel` around it) the
logging methods of the original xlora package and of PEFT's built-in X-LoRA. The model's router (core/routers/) calls
`_log_scalings` with the scalings of each forward that predicted them: a whole sequence without a KV cache, only the
new tokens of each cached generation step.

File layout written by `save_scalings_log` (``path`` has no extension):

* every entry has the same shape and dtype: ``<path>.safetensors`` holding one tensor ``scalings`` of shape
  (num_logged, batch, seq_len, n_layers, n_experts);
* otherwise one ``<path>.seq<seq_len>.safetensors`` per group of entries that stack (same sequence length, and same
  batch size and dtype; a second group of one length gets ``.seq<seq_len>.<k>``), each holding (n_in_file, batch,
  seq_len, n_layers, n_experts), and ``<path>.json`` listing, for each file, the log positions of its rows.

`load_scalings_log` reads either layout back into the list `get_scalings_log` returned.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_FORMAT = "peft_xlora.scalings_log"
_VERSION = 1
_TENSOR_KEY = "scalings"
_EXTENSIONS = (".safetensors", ".json", ".npy", ".pt")


def _check_base_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if path.endswith(_EXTENSIONS):
        raise ValueError(
            f"The scalings log path {path!r} ends with a file extension; give it without one (e.g. 'logs/run1'): "
            "the log writes '<path>.safetensors', or '<path>.seq<N>.safetensors' files and '<path>.json'."
        )
    if not os.path.basename(path):
        raise ValueError(f"The scalings log path {path!r} names a folder; give a file name without extension.")
    return path


def bucket_by_seq_len(log: list[torch.Tensor]) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
    """Groups log entries by sequence length.

    Args:
        log: Entries of shape (batch, seq_len, n_layers, n_experts).

    Returns:
        seq_len -> (the entries' positions in `log`, the entries), both in log order.
    """
    buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    for position, entry in enumerate(log):
        positions, entries = buckets.setdefault(entry.shape[1], ([], []))
        positions.append(position)
        entries.append(entry)
    return buckets


def _stackable_groups(log: list[torch.Tensor]) -> list[tuple[list[int], list[torch.Tensor]]]:
    # Within one sequence length, batch size or dtype may still differ (e.g. a last, smaller batch): such entries
    # cannot share a stacked tensor, so they get a group (and a file) of their own.
    groups: dict[tuple, tuple[list[int], list[torch.Tensor]]] = {}
    for position, entry in enumerate(log):
        positions, entries = groups.setdefault((entry.shape[1], tuple(entry.shape), entry.dtype), ([], []))
        positions.append(position)
        entries.append(entry)
    return list(groups.values())


def _as_saved(entries: list[torch.Tensor]) -> torch.Tensor:
    # Detached and contiguous: safetensors stores plain storage, whatever autograd state or view the entry had.
    return torch.stack([e.detach().cpu() for e in entries]).contiguous()


def save_scalings_log(log: list[torch.Tensor], path: str | os.PathLike) -> list[str]:
    """Writes a scalings log in the layout described in the module docstring.

    Args:
        log: Entries of shape (batch, seq_len, n_layers, n_experts), any dtype, on any device.
        path: Where to write, without extension; parent folders are created.

    Returns:
        The paths of the files written.

    Raises:
        ValueError: The log is empty, an entry is not 4-dimensional, or `path` has an extension.
    """
    path = _check_base_path(path)
    if not log:
        raise ValueError(
            "The scalings log is empty: call `enable_scalings_logging()` and run forward passes before flushing."
        )
    for position, entry in enumerate(log):
        if not isinstance(entry, torch.Tensor) or entry.dim() != 4:
            shape = tuple(entry.shape) if isinstance(entry, torch.Tensor) else type(entry).__name__
            raise ValueError(
                f"Scalings log entry {position} has shape {shape}; entries must be (batch, seq_len, n_layers, "
                "n_experts) tensors."
            )
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    metadata = {"format": _FORMAT, "version": str(_VERSION)}
    groups = _stackable_groups(log)
    single, manifest = f"{path}.safetensors", f"{path}.json"
    if len(groups) == 1:
        save_file({_TENSOR_KEY: _as_saved(log)}, single, metadata=metadata)
        _remove_if_ours(manifest)  # a manifest left by an earlier flush would shadow the new file
        return [single]

    files, written, used = [], [], set()
    for positions, entries in groups:
        seq_len = entries[0].shape[1]
        name, k = f"{os.path.basename(path)}.seq{seq_len}.safetensors", 1
        while name in used:
            name, k = f"{os.path.basename(path)}.seq{seq_len}.{k}.safetensors", k + 1
        used.add(name)
        target = os.path.join(folder, name)
        save_file({_TENSOR_KEY: _as_saved(entries)}, target, metadata=metadata)
        files.append({"file": name, "positions": positions})
        written.append(target)
    with open(manifest, "w", encoding="utf-8") as f:
        # File names are relative to the manifest's folder, so the log can be moved as a whole.
        json.dump({"format": _FORMAT, "version": _VERSION, "num_logged": len(log), "files": files}, f, indent=1)
    if os.path.exists(single):
        os.remove(single)  # the loader would otherwise find two logs under one name
    written.append(manifest)
    return written


def _remove_if_ours(manifest: str) -> None:
    if not os.path.exists(manifest):
        return
    try:
        with open(manifest, encoding="utf-8") as f:
            ours = json.load(f).get("format") == _FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if ours:
        os.remove(manifest)


def _read_stack(file: str) -> torch.Tensor:
    with safe_open(file, framework="pt") as f:
        if _TENSOR_KEY not in f.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
            raise ValueError(f"{file} holds no '{_TENSOR_KEY}' tensor; it was not written by `flush_log_scalings`.")
        return f.get_tensor(_TENSOR_KEY)


def load_scalings_log(path: str | os.PathLike, verbose: bool = False) -> list[torch.Tensor]:
    """Reads a log written by `flush_log_scalings` / `save_scalings_log`, in the original order.

    Args:
        path: The path given when the log was written (no extension).
        verbose: Print each file as it is read.

    Returns:
        The entries, each (batch, seq_len, n_layers, n_experts), with the dtype they were written in.

    Raises:
        FileNotFoundError: Neither layout exists under `path`.
        ValueError: The manifest does not describe a complete log.
    """
    path = _check_base_path(path)
    single, manifest = f"{path}.safetensors", f"{path}.json"
    if os.path.exists(manifest):
        return _load_bucketed(manifest, verbose)
    if os.path.exists(single):
        if verbose:
            print(f"Reading scalings log {single}")
        return list(_read_stack(single).unbind(0))
    raise FileNotFoundError(
        f"No scalings log at {path!r}: neither {single} nor {manifest} exists. Pass the same path (without "
        "extension) that was given to `flush_log_scalings`."
    )


def _load_bucketed(manifest: str, verbose: bool) -> list[torch.Tensor]:
    with open(manifest, encoding="utf-8") as f:
        info: dict[str, Any] = json.load(f)
    if info.get("format") != _FORMAT:
        raise ValueError(f"{manifest} is not a peft-xlora scalings log manifest.")
    folder = os.path.dirname(manifest)
    out: list[torch.Tensor | None] = [None] * int(info["num_logged"])
    for item in info["files"]:
        file = os.path.join(folder, item["file"])
        if verbose:
            print(f"Reading scalings log {file} ({len(item['positions'])} entries)")
        stack = _read_stack(file)  # (n_in_file, batch, seq_len, n_layers, n_experts)
        if stack.shape[0] != len(item["positions"]):
            raise ValueError(f"{file} holds {stack.shape[0]} entries but {manifest} lists {len(item['positions'])}.")
        for position, entry in zip(item["positions"], stack.unbind(0)):
            out[position] = entry
    missing = [i for i, entry in enumerate(out) if entry is None]
    if missing:
        raise ValueError(f"{manifest} does not cover log positions {missing[:10]}; the log's files are incomplete.")
    return out  # type: ignore[return-value]


class ScalingsLogMixin:
    """Scalings logging for `XLoraModel`: the methods of the original xlora package and of PEFT's X-LoRA.

    Expects the host class to provide `mixture_layer_names` and `expert_names`. The log holds one entry per forward
    that predicted scalings (static scalings set by `set_static_scalings` are not predictions and are not logged).
    """

    # Plain attributes created on first use, so the host's constructor needs no call for them.
    def _log_state(self) -> dict[str, Any]:
        state = self.__dict__.get("_scalings_log_state")
        if state is None:
            state = {"enabled": False, "entries": [], "print_left": 0}
            self.__dict__["_scalings_log_state"] = state
        return state

    def _log_scalings(self, scalings: torch.Tensor) -> None:
        """Records one prediction. `scalings` is (batch, seq, n_layers|1, n_experts); called by the forward."""
        state = self._log_state()
        if not state["enabled"] and state["print_left"] <= 0:
            return
        entry = scalings.detach().to("cpu", copy=True)  # a copy: the log never shares memory with the graph
        if state["enabled"]:
            state["entries"].append(entry)
        if state["print_left"] > 0:
            state["print_left"] -= 1
            print(f"X-LoRA scalings (batch, seq, n_layers, n_experts), experts {self.expert_names}:")
            print(self._full_layers(entry))

    def _logs_scalings(self) -> bool:
        """Whether `_log_scalings` records anything now (so a caller can skip building an entry)."""
        state = self._log_state()
        return state["enabled"] or state["print_left"] > 0

    def _full_layers(self, entry: torch.Tensor) -> torch.Tensor:
        # Without layerwise scalings one row serves every layer: hand it out as a broadcast view.
        return entry.expand(-1, -1, len(self.mixture_layer_names), -1)

    def enable_scalings_logging(self) -> None:
        """Starts logging: every later forward that predicts scalings appends them to the log."""
        self._log_state()["enabled"] = True

    def disable_scalings_logging(self, clear: bool = False) -> None:
        """Stops logging. Keeps the log (as PEFT's X-LoRA does) unless `clear=True` (as the original package did).

        Args:
            clear: Also empty the log.
        """
        state = self._log_state()
        state["enabled"] = False
        if clear:
            state["entries"].clear()

    def clear_scalings_log(self) -> None:
        """Empties the log; logging stays on or off as it was."""
        self._log_state()["entries"].clear()

    def is_scalings_logging_enabled(self) -> bool:
        """Whether forwards are being logged."""
        return self._log_state()["enabled"]

    def get_scalings_log(self) -> list[torch.Tensor]:
        """A new list of the logged entries; changing the list does not change the log.

        Returns:
            Entries of shape (batch, seq_len, n_layers, n_experts), detached, on CPU, float32, in forward order.
            Without layerwise scalings every layer holds the same values and the entry is a broadcast view
            (`.clone()` it before writing into it).
        """
        return [self._full_layers(e) for e in self._log_state()["entries"]]

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log grouped by sequence length.

        Returns:
            seq_len -> (positions in the log, entries of shape (batch, seq_len, n_layers, n_experts)).
        """
        return bucket_by_seq_len(self.get_scalings_log())

    def flush_log_scalings(self, path: str | os.PathLike) -> list[str]:
        """Writes the log to files (see `save_scalings_log`); the log itself is kept.

        Args:
            path: File path without extension.

        Returns:
            The paths of the files written.
        """
        return save_scalings_log(self.get_scalings_log(), path)

    def print_scalings_predictions(self, n_predictions_lifetime: int) -> None:
        """Prints the scalings predicted by each of the next `n_predictions_lifetime` forwards (0 stops)."""
        if not isinstance(n_predictions_lifetime, int) or n_predictions_lifetime < 0:
            raise ValueError(f"`n_predictions_lifetime` must be an int >= 0, got {n_predictions_lifetime!r}.")
        self._log_state()["print_left"] = n_predictions_lifetime
