"""Gating plots: heatmaps of X-LoRA scalings, tokens x experts or layers x experts.

matplotlib is an optional dependency (peft-xlora's ``plot`` extra); it is imported when a plot is drawn, and
only its object-oriented API is used (no pyplot), so plotting works headless and leaves global state alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch

_FORMATS = (".png", ".svg", ".pdf")
_MAX_ANNOTATED_CELLS = 300
_MAX_TICK_LABELS = 80


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plot_scalings needs matplotlib, which is not installed: pip install matplotlib (peft-xlora's `plot` "
            "extra)."
        ) from err
    return Figure


def _from_model(model: Any) -> tuple[torch.Tensor, list[str], list[str]]:
    scalings = model.get_latest_scalings()
    if scalings is None:
        raise ValueError("The model has no scalings yet: run a forward pass (or `generate`) before plotting.")
    return scalings, list(model.expert_names), list(model.mixture_layer_names)


def _token_labels(
    seq_len: int, batch_index: int, tokens: Sequence[str] | None, tokenizer: Any, input_ids: Any
) -> list[str]:
    if tokens is not None:
        labels = [str(t) for t in tokens]
    elif tokenizer is not None and input_ids is not None:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 2:
            ids = ids[batch_index]
        # One decode per token; repr shows leading spaces and newlines that a plain label would hide.
        labels = [repr(tokenizer.decode([int(i)])) for i in ids.tolist()]
    else:
        return [str(i) for i in range(seq_len)]
    if len(labels) != seq_len:
        raise ValueError(
            f"Got {len(labels)} token labels for scalings of {seq_len} tokens; pass the ids (or tokens) of exactly "
            "the forward whose scalings are plotted."
        )
    return labels


def plot_scalings(
    scalings: torch.Tensor | Any,
    path: str | os.PathLike | None = None,
    *,
    view: Literal["tokens", "layers"] = "tokens",
    layer: int | None = None,
    batch_index: int = 0,
    tokenizer: Any = None,
    input_ids: Any = None,
    tokens: Sequence[str] | None = None,
    expert_names: Sequence[str] | None = None,
    layer_names: Sequence[str] | None = None,
    title: str | None = None,
    annotate: bool | None = None,
    ax: Any = None,
) -> Any:
    """Draws the scalings of one sequence as a heatmap, and writes it to `path` if given.

    Args:
        scalings: (batch, seq, n_layers, n_experts) scalings, e.g. `model.get_latest_scalings()` or an entry of
            `get_scalings_log()`; or (seq, n_layers, n_experts); or the X-LoRA model itself (its latest scalings,
            expert names and layer names are used).
        path: File to write (``.png``, ``.svg`` or ``.pdf``); None only returns the figure.
        view: ``"tokens"``: rows are tokens, columns experts; ``"layers"``: rows are mixture layers, columns
            experts, averaged over the tokens.
        layer: In the tokens view, show this layer's scalings instead of the mean over layers.
        batch_index: Which sequence of the batch to plot.
        tokenizer: With `input_ids`, labels the rows with each token decoded.
        input_ids: The ids of the plotted forward, (seq,) or (batch, seq).
        tokens: Row labels given directly (instead of `tokenizer` and `input_ids`).
        expert_names: Column labels; default "expert 0", "expert 1", ... (or the model's names).
        layer_names: Row labels of the layers view; default the layer index (or the model's module names).
        title: Figure title.
        annotate: Write each value in its cell; default when the grid has at most 300 cells.
        ax: A matplotlib Axes to draw into instead of a new figure.

    Returns:
        The matplotlib `Figure`.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: A shape, index, label count or file extension does not fit.
    """
    Figure = _figure_class()
    model_layer_names: list[str] | None = None
    if not isinstance(scalings, torch.Tensor):
        if not hasattr(scalings, "get_latest_scalings"):
            raise TypeError(f"`scalings` must be a tensor or an X-LoRA model, got {type(scalings).__name__}.")
        scalings, model_experts, model_layer_names = _from_model(scalings)
        expert_names = expert_names if expert_names is not None else model_experts
    if scalings.dim() == 3:
        scalings = scalings[None]
    if scalings.dim() != 4:
        raise ValueError(
            f"`scalings` must be (batch, seq, n_layers, n_experts) or (seq, n_layers, n_experts), got shape "
            f"{tuple(scalings.shape)}."
        )
    batch, seq_len, n_layers, n_experts = scalings.shape
    if not 0 <= batch_index < batch:
        raise ValueError(f"`batch_index` {batch_index} is out of range for a batch of {batch}.")
    data = scalings[batch_index].detach().float().cpu()  # (seq, n_layers, n_experts)
    names = [str(n) for n in expert_names] if expert_names is not None else [f"expert {i}" for i in range(n_experts)]
    if len(names) != n_experts:
        raise ValueError(f"Got {len(names)} expert names for {n_experts} experts.")

    if view == "tokens":
        if layer is None:
            grid = data.mean(dim=1)  # (seq, n_experts)
            what = f"mean over {n_layers} layers"
        else:
            if not -n_layers <= layer < n_layers:
                raise ValueError(f"`layer` {layer} is out of range for {n_layers} layers.")
            grid = data[:, layer]  # (seq, n_experts)
            what = f"layer {layer % n_layers}"
        rows = _token_labels(seq_len, batch_index, tokens, tokenizer, input_ids)
        row_axis = "token"
    elif view == "layers":
        if layer is not None:
            raise ValueError("`layer` selects a layer of the tokens view; the layers view shows every layer.")
        grid = data.mean(dim=0)  # (n_layers, n_experts)
        what = f"mean over {seq_len} tokens"
        rows = [str(n) for n in (layer_names or model_layer_names or range(n_layers))]
        if len(rows) != n_layers:
            raise ValueError(f"Got {len(rows)} layer names for {n_layers} layers.")
        row_axis = "layer"
    else:
        raise ValueError(f"`view` must be 'tokens' or 'layers', got {view!r}.")

    if path is not None and not os.fspath(path).lower().endswith(_FORMATS):
        raise ValueError(f"Cannot tell the image format of {os.fspath(path)!r}: end it with one of {list(_FORMATS)}.")

    if ax is None:
        width = 2.5 + 0.7 * n_experts + 0.12 * max(len(r) for r in rows)
        height = min(1.8 + 0.28 * len(rows), 60.0)
        fig = Figure(figsize=(width, height), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    low = min(0.0, float(grid.min()))
    high = max(float(grid.max()), low + 1e-6)
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=low, vmax=high, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="scaling")
    ax.set_xticks(range(n_experts), names, rotation=30, ha="right")
    step = max(1, -(-len(rows) // _MAX_TICK_LABELS))
    ax.set_yticks(range(0, len(rows), step), rows[::step])
    ax.set_xlabel("expert")
    ax.set_ylabel(row_axis)
    ax.set_title(title if title is not None else f"X-LoRA scalings ({what})")
    if annotate is None:
        annotate = grid.numel() <= _MAX_ANNOTATED_CELLS
    if annotate:
        middle = (low + high) / 2
        for (r, c), value in zip(((r, c) for r in range(grid.shape[0]) for c in range(n_experts)), grid.flatten()):
            color = "black" if float(value) > middle else "white"  # readable on both ends of viridis
            ax.text(c, r, f"{float(value):.2f}", ha="center", va="center", fontsize=7, color=color)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=150)
    return fig
