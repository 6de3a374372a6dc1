"""Held-out evaluation of the demo: per-token losses of every variant, the oracles, and the results table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...core.model import find_tuner
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


def _next_token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(rows, seq, vocab) logits, (rows, seq) ids -> (rows, seq - 1) float32 cross-entropy of every next token."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")


@torch.no_grad()
def token_losses(model: nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cross-entropy of every next token, (n, seq_len - 1), in float32."""
    out = []
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size]
        out.append(_next_token_losses(model(input_ids=batch, use_cache=False).logits, batch))
    return torch.cat(out)


@torch.no_grad()
def pinned_token_losses(model: nn.Module, ids: torch.Tensor, weights: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Every row of `ids` under every fixed mixture of `weights`, in one batched forward per `batch_size` rows.

    Args:
        model: An X-LoRA model; its gate is pinned per row (`set_static_scalings(..., per_row=True)`) and then
            given back as it was.
        ids: (n, seq_len) token ids.
        weights: (n_mixtures, n_experts) expert weights in the model's gate order.
        batch_size: Rows of `ids` per forward (each repeated once per mixture).

    Returns:
        (n_mixtures, n, seq_len - 1) float32 losses.
    """
    xlora = find_tuner(model)
    saved = xlora._static_scalings
    n_mix = weights.shape[0]
    out = []
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size]  # (b, seq)
            rows = batch.repeat(n_mix, 1)  # mixture-major: row m * b + i is row i under mixture m
            xlora.set_static_scalings(weights.repeat_interleave(batch.shape[0], dim=0), per_row=True)
            losses = _next_token_losses(model(input_ids=rows, use_cache=False).logits, rows)  # (n_mix * b, seq - 1)
            out.append(losses.view(n_mix, batch.shape[0], -1))
    finally:
        xlora._static_scalings = saved
    return torch.cat(out, dim=1)


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


def evaluate_pinned(
    model: nn.Module, data: EvalSet, weights: dict[str, torch.Tensor], batch_size: int, quiet: bool = False
) -> dict[str, Losses]:
    """Per-token losses of several fixed mixtures (variant name -> (n_experts,) weights), scored together."""
    model.eval()
    names = list(weights)
    stacked = torch.stack([weights[name] for name in names])  # (n_variants, n_experts)
    out = {name: Losses() for name in names}
    jobs = [*data.pure.items(), ("mixed", data.mixed.input_ids)]
    for job, ids in tqdm(jobs, desc="fixed mixtures", disable=quiet, leave=False, dynamic_ncols=True):
        result = pinned_token_losses(model, ids, stacked, batch_size)  # (n_variants, n, seq - 1)
        for name, losses in zip(names, result):
            if job == "mixed":
                out[name].mixed = losses
            else:
                out[name].pure[job] = losses
    return out


def oracles(expert_losses: dict[str, Losses], data: EvalSet) -> tuple[Losses, Losses]:
    """The segment oracle and the per-token oracle.

    Segment oracle: on each pure domain its own expert; on mixed documents each token scored by its own domain's
    expert. Per-token oracle: every token scored by the expert that predicts it best, a lower bound for any routing
    that picks one expert per token.
    """
    names = list(expert_losses)
    pure = {domain: expert_losses[domain].pure[domain] for domain in data.pure}
    stacked = torch.stack([expert_losses[name].mixed for name in names])  # (n_experts, n_docs, seq - 1)
    target_domain = data.mixed.domains[:, 1:]  # the domain of the predicted token, (n_docs, seq - 1)
    segment = Losses(pure=pure, mixed=stacked.gather(0, target_domain[None]).squeeze(0))
    best = {
        domain: torch.stack([expert_losses[name].pure[domain] for name in names]).min(0).values for domain in data.pure
    }
    per_token = Losses(pure=best, mixed=stacked.min(0).values)
    return segment, per_token


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


def doc_sums(losses: Losses, data: EvalSet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per column, the loss sum and token count of every document, ((n_docs,), (n_docs,)) float64."""
    mask = switch_mask(data.mixed.domains)
    out = {}
    for domain in data.pure:
        values = losses.pure[domain].double()
        out[domain] = (values.sum(1), torch.full((values.shape[0],), float(values.shape[1]), dtype=torch.float64))
    mixed = losses.mixed.double()
    out["mixed"] = (mixed.sum(1), torch.full((mixed.shape[0],), float(mixed.shape[1]), dtype=torch.float64))
    out["after switch"] = ((mixed * mask).sum(1), mask.sum(1).double())
    return out


def summarise(results: dict[str, Losses], data: EvalSet) -> dict[str, dict[str, float]]:
    """Mean losses per variant: one column per pure domain, their mean, mixed, and mixed right after switches."""
    table = {}
    for variant, losses in results.items():
        sums = doc_sums(losses, data)
        row = {col: (s.sum() / c.sum()).item() for col, (s, c) in sums.items()}
        table[variant] = {
            **{d: row[d] for d in data.pure},
            "pure mean": sum(row[d] for d in data.pure) / len(data.pure),
            "mixed": row["mixed"],
            "after switch": row["after switch"],
        }
    return table


class Bootstrap:
    """Bootstrap over documents: every variant is resampled with the same documents, so differences are paired.

    Each replicate draws, per column, as many documents as it has with replacement (pure domains independently; the
    mixed and after-switch columns share their draw, being the same documents), and takes the token-weighted mean.

    Args:
        data: The held-out set.
        n_boot: Replicates.
        seed: Seed of the draws.
        columns: (losses, data) -> column -> per-document (loss sums, token counts), like `doc_sums` (the default);
            columns other than the pure domains are columns of the mixed documents and share their draw.
    """

    def __init__(self, data: EvalSet, n_boot: int = 2000, seed: int = 0, columns: Callable | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = data
        self.columns = columns or doc_sums
        self.index = {
            d: torch.randint(ids.shape[0], (n_boot, ids.shape[0]), generator=g) for d, ids in data.pure.items()
        }
        n_mixed = data.mixed.input_ids.shape[0]
        self.index["mixed"] = self.index["after switch"] = torch.randint(n_mixed, (n_boot, n_mixed), generator=g)

    def replicates(self, losses: Losses) -> dict[str, torch.Tensor]:
        """Column -> (n_boot,) resampled means, columns as in `summarise`."""
        out = {}
        for col, (sums, counts) in self.columns(losses, self.data).items():
            idx = self.index.get(col, self.index["mixed"])  # (n_boot, n_docs); other columns: the mixed documents
            out[col] = sums[idx].sum(1) / counts[idx].sum(1).clamp_min(1.0)
        domains = list(self.data.pure)
        out["pure mean"] = torch.stack([out[d] for d in domains]).mean(0)
        return out

    def intervals(self, results: dict[str, Losses], level: float = 0.95) -> dict[str, dict[str, list[float]]]:
        """Variant -> column -> [low, high], the percentile interval of the mean."""
        return {variant: _percentiles(self.replicates(losses), level) for variant, losses in results.items()}

    def paired(
        self, results: dict[str, Losses], ours: str, rivals: list[str], level: float = 0.95
    ) -> dict[str, dict[str, list[float]]]:
        """Rival -> column -> [mean difference, low, high] of ours minus the rival (negative: ours is better)."""
        mine = self.replicates(results[ours])
        means = {name: _means(self.columns(results[name], self.data), self.data) for name in [ours, *rivals]}
        out = {}
        for rival in rivals:
            theirs = self.replicates(results[rival])
            bounds = _percentiles({col: mine[col] - theirs[col] for col in mine}, level)
            out[rival] = {col: [means[ours][col] - means[rival][col], *bounds[col]] for col in bounds}
        return out


def _means(sums: dict[str, tuple[torch.Tensor, torch.Tensor]], data: EvalSet) -> dict[str, float]:
    """Column -> token-weighted mean, plus "pure mean" (the mean over the pure domains), as `replicates` gives."""
    out = {col: (s.sum() / c.sum().clamp_min(1.0)).item() for col, (s, c) in sums.items()}
    out["pure mean"] = sum(out[d] for d in data.pure) / len(data.pure)
    return out


def _percentiles(replicates: dict[str, torch.Tensor], level: float) -> dict[str, list[float]]:
    tail = (1 - level) / 2
    q = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    return {col: torch.quantile(values, q).tolist() for col, values in replicates.items()}


def _gap(value: float, reference: float) -> float:
    return value / reference - 1


def check_targets(
    table: dict[str, dict[str, float]],
    paired: dict[str, dict[str, list[float]]],
    domains: list[str],
    names: dict[str, str | list[str]],
) -> list[str]:
    """The issue's quality targets, each as a line starting with PASS or FAIL.

    Args:
        table: Mean losses, from `summarise`.
        paired: Ours minus each rival, from `Bootstrap.paired`.
        domains: The pure domains (each has an expert "expert: <domain>").
        names: Row names: "ours", "oracle" (segment oracle), "base", "arrow" (list: the best of them on each column
            is the rival), "builtin".
    """
    ours, oracle, base, builtin = names["ours"], names["oracle"], names["base"], names["builtin"]
    lines = []

    def line(ok: bool, text: str) -> None:
        lines.append(f"{'PASS' if ok else 'FAIL'} {text}")

    for d in domains:
        gain = -_gap(table[f"expert: {d}"][d], table[base][d])
        line(gain >= 0.10, f"expert {d}: {100 * gain:.1f}% below the base model on its own domain (target >= 10%)")
    for d in domains:
        gap = _gap(table[ours][d], table[oracle][d])
        line(gap <= 0.02, f"{d}: X-LoRA {100 * gap:+.1f}% vs oracle (target <= +2%)")
    mixed = table[ours]["mixed"]
    for d in domains:
        expert = table[f"expert: {d}"]["mixed"]
        line(mixed < expert, f"mixed: X-LoRA {mixed:.4f} below expert: {d} {expert:.4f}")
    rivals = [best_of(table, names["arrow"], "mixed"), builtin]
    ours_gap = _gap(mixed, table[oracle]["mixed"])
    for rival in rivals:
        gap = _gap(table[rival]["mixed"], table[oracle]["mixed"])
        line(
            ours_gap <= 0.5 * gap,
            f"mixed: X-LoRA's gap to the segment oracle {100 * ours_gap:+.2f}% <= half of {rival}'s {100 * gap:+.2f}%",
        )
    for rival in rivals:
        diff, low, high = paired[rival]["mixed"]
        line(high < 0, f"mixed: X-LoRA minus {rival} {diff:+.4f} [{low:+.4f}, {high:+.4f}] excludes zero")
    after = table[ours]["after switch"]
    for rival in [best_of(table, names["arrow"], "after switch"), builtin]:
        theirs = table[rival]["after switch"]
        line(after < theirs, f"after switch: X-LoRA {after:.4f} below {rival} {theirs:.4f}")
    return lines


def best_of(table: dict[str, dict[str, float]], variants: list[str], column: str) -> str:
    """The variant with the lowest loss on `column` (the strongest rival among several settings of one method)."""
    return min(variants, key=lambda v: table[v][column])


def markdown_table(
    table: dict[str, dict[str, float]], oracle: str, intervals: dict[str, dict[str, list[float]]] | None = None
) -> str:
    """The table as Markdown: mean next-token loss (nats), its 95% interval, and in brackets the gap to the oracle."""
    columns = list(next(iter(table.values())))
    head = "| variant | " + " | ".join(columns) + " |"
    rule = "| --- |" + " ---: |" * len(columns)
    rows = []
    for variant, row in table.items():
        cells = []
        for col in columns:
            ref = table[oracle][col]
            gap = "" if variant == oracle else f" ({100 * (row[col] / ref - 1):+.1f}%)"
            ci = ""
            if intervals and variant in intervals:
                low, high = intervals[variant][col]
                ci = f" [{low:.3f}, {high:.3f}]"
            cells.append(f"{row[col]:.3f}{ci}{gap}")
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def markdown_paired(paired: dict[str, dict[str, list[float]]], ours: str, columns: list[str]) -> str:
    """Ours minus each rival on `columns`: the mean difference and its paired 95% interval (negative: ours better)."""
    head = "| difference | " + " | ".join(columns) + " |"
    rule = "| --- |" + " ---: |" * len(columns)
    rows = []
    for rival, cols in paired.items():
        cells = [f"{cols[c][0]:+.4f} [{cols[c][1]:+.4f}, {cols[c][2]:+.4f}]" for c in columns]
        rows.append(f"| {ours} minus {rival} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])
