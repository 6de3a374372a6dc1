"""Held-out evaluation of the demo: per-token losses of every variant, the oracles, and the results table."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import MixedBatch

SWITCH_WINDOW = 16  # tokens right after a domain switch, reported on their own: where routing is won or lost


@dataclass
class EvalSet:
    """Held-out tokens: pure windows per domain and mixed-domain documents."""

    pure: dict[str, torch.Tensor]  # domain -> (n, seq_len)
    mixed: MixedBatch


@dataclass
class Losses:
    """Per-token losses of one variant: token t is the loss of predicting token t + 1."""

    pure: dict[str, torch.Tensor] = field(default_factory=dict)  # domain -> (n, seq_len - 1)
    mixed: torch.Tensor | None = None  # (n_docs, seq_len - 1)


@torch.no_grad()
def token_losses(model: nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cross-entropy of every next token, (n, seq_len - 1), in float32."""
    out = []
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits.float()  # (b, seq, vocab)
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")  # (b, seq - 1)
        out.append(loss)
    return torch.cat(out)


def evaluate(model: nn.Module, data: EvalSet, batch_size: int, desc: str, quiet: bool = False) -> Losses:
    """Per-token losses of `model` on every held-out set."""
    model.eval()
    losses = Losses()
    jobs = [*data.pure.items(), ("mixed", data.mixed.input_ids)]
    for name, ids in tqdm(jobs, desc=desc, disable=quiet, leave=False, dynamic_ncols=True):
        result = token_losses(model, ids, batch_size)
        if name == "mixed":
            losses.mixed = result
        else:
            losses.pure[name] = result
    return losses


def oracles(expert_losses: dict[str, Losses], data: EvalSet) -> Losses:
    """The right expert on each pure domain; on mixed documents, each token scored by its own domain's expert."""
    names = list(expert_losses)
    pure = {domain: expert_losses[domain].pure[domain] for domain in data.pure}
    stacked = torch.stack([expert_losses[name].mixed for name in names])  # (n_experts, n_docs, seq - 1)
    target_domain = data.mixed.domains[:, 1:]  # the domain of the predicted token, (n_docs, seq - 1)
    mixed = stacked.gather(0, target_domain[None]).squeeze(0)
    return Losses(pure=pure, mixed=mixed)


def switch_mask(domains: torch.Tensor, window: int = SWITCH_WINDOW) -> torch.Tensor:
    """(n_docs, seq - 1) bool: predicted tokens within `window` tokens after a domain switch (the switch included)."""
    target = domains[:, 1:]
    switch = torch.zeros_like(target, dtype=torch.bool)
    switch[:, 1:] = target[:, 1:] != target[:, :-1]
    switch[:, 0] = domains[:, 0] != domains[:, 1]
    mask = torch.zeros_like(switch)
    for shift in range(window):
        mask[:, shift:] |= switch[:, : switch.shape[1] - shift]
    return mask


def summarise(results: dict[str, Losses], data: EvalSet) -> dict[str, dict[str, float]]:
    """Mean losses per variant: one column per pure domain, their mean, mixed, and mixed right after switches."""
    mask = switch_mask(data.mixed.domains)
    table = {}
    for variant, losses in results.items():
        row = {domain: losses.pure[domain].mean().item() for domain in data.pure}
        row["pure mean"] = sum(row[d] for d in data.pure) / len(data.pure)
        row["mixed"] = losses.mixed.mean().item()
        row["after switch"] = losses.mixed[mask].mean().item()
        table[variant] = row
    return table


def check_targets(table: dict[str, dict[str, float]], domains: list[str], ours: str, oracle: str) -> list[str]:
    """The issue's quality targets, each as a line starting with PASS or FAIL."""
    lines = []
    for d in domains:
        gap = table[ours][d] / table[oracle][d] - 1
        lines.append(f"{'PASS' if gap <= 0.03 else 'FAIL'} {d}: X-LoRA {100 * gap:+.1f}% vs oracle (target <= +3%)")
    mixed = table[ours]["mixed"]
    gap = mixed / table[oracle]["mixed"] - 1
    lines.append(
        f"{'PASS' if gap <= 0.10 else 'FAIL'} mixed: X-LoRA {100 * gap:+.1f}% vs segment oracle (target <= +10%)"
    )
    for variant, row in table.items():
        if variant in (ours, oracle) or variant == "base model" or variant.startswith("uniform"):
            continue
        ok = mixed < row["mixed"]
        lines.append(f"{'PASS' if ok else 'FAIL'} mixed: X-LoRA {mixed:.4f} below {variant} {row['mixed']:.4f}")
    return lines


def markdown_table(table: dict[str, dict[str, float]], oracle: str) -> str:
    """The table as Markdown: mean next-token loss (nats), and in brackets the gap to the oracle."""
    columns = list(next(iter(table.values())))
    head = "| variant | " + " | ".join(columns) + " |"
    rule = "| --- |" + " ---: |" * len(columns)
    rows = []
    for variant, row in table.items():
        cells = []
        for col in columns:
            ref = table[oracle][col]
            gap = "" if variant == oracle else f" ({100 * (row[col] / ref - 1):+.1f}%)"
            cells.append(f"{row[col]:.3f}{gap}")
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])
