"""The routing benchmark's columns: pure domains, mixed documents, and the tokens after each switch by distance."""

from __future__ import annotations

import torch

from peft_xlora.cli.demo.evaluate import EvalSet, Losses

# Distance from the last domain switch, in predicted tokens: the first token of a new segment is at distance 1.
BUCKETS = {"after 1-4": (1, 4), "after 5-16": (5, 16), "after 17-64": (17, 64), "after 5-64": (5, 64)}
MIXED_COLUMNS = ["mixed", *BUCKETS]


def switch_distance(domains: torch.Tensor) -> torch.Tensor:
    """(n_docs, seq) token domains -> (n_docs, seq - 1) distance of each predicted token from the last switch.

    Position t predicts token t + 1; a switch happens where the predicted token's domain differs from the previous
    token's. Tokens before any switch (the first segment) get a distance larger than any bucket.
    """
    target = domains[:, 1:]  # (n_docs, seq - 1), the domain of each predicted token
    previous = domains[:, :-1]
    switch = target != previous  # (n_docs, seq - 1)
    n, length = target.shape
    far = length + 1_000_000
    positions = torch.arange(length).expand(n, length)
    last = torch.where(switch, positions, torch.full_like(positions, -far))
    last = torch.cummax(last, dim=1).values  # position of the most recent switch at or before t
    return positions - last + 1


def bench_columns(losses: Losses, data: EvalSet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Column -> per-document (loss sum, token count), float64: pure domains, mixed, and the switch buckets."""
    out = {}
    for domain in data.pure:
        values = losses.pure[domain].double()
        out[domain] = (values.sum(1), torch.full((values.shape[0],), float(values.shape[1]), dtype=torch.float64))
    mixed = losses.mixed.double()  # (n_docs, seq - 1)
    out["mixed"] = (mixed.sum(1), torch.full((mixed.shape[0],), float(mixed.shape[1]), dtype=torch.float64))
    distance = switch_distance(data.mixed.domains)
    for name, (low, high) in BUCKETS.items():
        mask = ((distance >= low) & (distance <= high)).double()
        out[name] = ((mixed * mask).sum(1), mask.sum(1))
    return out


def summary(results: dict[str, Losses], data: EvalSet) -> dict[str, dict[str, float]]:
    """Variant -> column -> token-weighted mean loss, with "pure mean" (mean over the pure domains)."""
    table = {}
    for variant, losses in results.items():
        cols = {c: (s.sum() / c_.sum().clamp_min(1.0)).item() for c, (s, c_) in bench_columns(losses, data).items()}
        pure = [cols[d] for d in data.pure]
        table[variant] = {**{d: cols[d] for d in data.pure}, "pure mean": sum(pure) / len(pure)}
        table[variant].update({c: cols[c] for c in MIXED_COLUMNS})
    return table


def gaps(table: dict[str, dict[str, float]], oracle: str) -> dict[str, dict[str, float]]:
    """Variant -> column -> relative gap to the oracle row (0.05 = 5% above), plus "pure max" over the domains."""
    out = {}
    domains = [c for c in table[oracle] if c not in ("pure mean", *MIXED_COLUMNS)]
    for variant, row in table.items():
        g = {c: row[c] / table[oracle][c] - 1 for c in row}
        g["pure max"] = max(g[d] for d in domains)
        g["pure mean gap"] = sum(g[d] for d in domains) / len(domains)
        out[variant] = g
    return out


def check_targets(
    table: dict[str, dict[str, float]],
    paired: dict[str, dict[str, list[float]]],
    ours: str,
    oracle: str,
    rivals: list[str],
) -> list[str]:
    """Issue 25's targets for the row `ours`, each a line starting with PASS or FAIL."""
    lines = []
    gap = gaps(table, oracle)[ours]

    def line(ok: bool, text: str) -> None:
        lines.append(f"{'PASS' if ok else 'FAIL'} {text}")

    domains = [c for c in table[oracle] if c not in ("pure mean", *MIXED_COLUMNS)]
    for d in domains:
        line(gap[d] <= 0.03, f"pure {d}: {100 * gap[d]:+.1f}% vs the right expert (target <= +3%)")
    line(gap["mixed"] <= 0.10, f"mixed: {100 * gap['mixed']:+.1f}% vs the segment oracle (target <= +10%)")
    line(
        gap["after 5-64"] <= 0.10,
        f"tokens 5-64 after a switch: {100 * gap['after 5-64']:+.1f}% vs the segment oracle (target <= +10%)",
    )
    for rival in rivals:
        for col in ("mixed", "after 1-4", "after 5-64"):
            diff, low, high = paired[rival][col]
            line(high < 0, f"{col}: minus {rival} {diff:+.4f} [{low:+.4f}, {high:+.4f}] excludes 0 (and is < 0)")
    return lines
