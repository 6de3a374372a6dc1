"""Training loops of the demo: LoRA experts, and the gate of an X-LoRA model (ours or PEFT's built-in)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


def recipe_key(recipe: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able recipe: cached artefacts are reused only for the same recipe."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]


def train_steps(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    steps: int,
    lr: float,
    desc: str,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    quiet: bool = False,
) -> list[float]:
    """Trains the parameters of `model` that require grad with AdamW and a linear warm-up then decay.

    Args:
        model: Model whose forward takes `input_ids` and `labels` and returns `.loss`.
        batches: Yields (batch, seq_len) token ids, at least `steps` times.
        steps: Optimiser steps.
        lr: Peak learning rate.
        desc: Label of the progress bar.
        loss_fn: Computes the loss of a batch; default: the model's language-modelling loss.
        quiet: No progress bar.

    Returns:
        The loss of every step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{desc}: the model has no trainable parameters.")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min((i + 1) / warmup, max(0.1, (steps - i) / max(1, steps - warmup)))
    )
    model.train()
    losses = []
    bar = tqdm(total=steps, desc=desc, disable=quiet, leave=False, dynamic_ncols=True)
    for _, ids in zip(range(steps), batches):
        loss = loss_fn(model, ids) if loss_fn else model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        # Under an enclosing autocast, the next forward must not reuse the casts of the weights before this update.
        torch.clear_autocast_cache()
        schedule.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    model.eval()
    if len(losses) < steps:
        raise ValueError(f"{desc}: the data ran out after {len(losses)} of {steps} steps.")
    return losses


def train_lora_expert(
    base: nn.Module,
    data: Iterable[torch.Tensor],
    out_dir: Path,
    steps: int,
    lr: float,
    lora: dict[str, Any],
    desc: str,
    quiet: bool = False,
) -> list[float]:
    """Trains one PEFT LoRA adapter on `base` and saves it to `out_dir` (a standard PEFT LoRA checkpoint).

    The LoRA layers are removed from `base` afterwards, so the same base model serves the next expert.
    """
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora))
    losses = train_steps(model, data, steps, lr, desc, quiet=quiet)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    (tmp / "train_losses.json").write_text(json.dumps(losses))
    tmp.replace(out_dir)
    model.unload()
    return losses


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of `model`, by name (how the built-in X-LoRA's gate is cached)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads what `trainable_state` saved; every saved name must exist."""
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params]
    if missing:
        raise KeyError(f"Cached gate weights do not fit this model: {missing[:3]} ... are missing.")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
