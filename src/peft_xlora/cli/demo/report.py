"""The demo's gating heatmap: X-LoRA's scalings per token and expert, with the true domain of each token beside.

Unlike `peft_xlora.plotting.plot_scalings` (used by the CLI), it lays tokens along the x axis of a long document and
adds the strip of true domains that the demo knows.
"""

from __future__ import annotations

from pathlib import Path

import torch


def gating_heatmap(
    scalings: torch.Tensor, tokens: list[str], experts: list[str], domains: torch.Tensor, path: Path
) -> None:
    """Writes a PNG: one row per expert (its scaling on every token) and a bottom strip with each token's domain.

    Args:
        scalings: (seq, n_experts) gate values.
        tokens: The seq decoded tokens (shown on the x axis when there are few).
        experts: Expert names, in gate order; domain index i is expert i.
        domains: (seq,) index of the domain each token comes from.
        path: Output file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq, n = scalings.shape
    fig, (ax, strip) = plt.subplots(
        2,
        1,
        figsize=(min(24, 4 + seq / 12), 1.2 + 0.5 * n),
        sharex=True,
        gridspec_kw={"height_ratios": [n, 1]},
    )
    image = ax.imshow(
        scalings.T.float().cpu().numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest"
    )
    ax.set_yticks(range(n), experts)
    ax.set_title("X-LoRA gate per token (mean over layers); bottom: the domain each token comes from")
    strip.imshow(domains[None].cpu().numpy(), aspect="auto", cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    strip.set_yticks([0], ["domain"])
    for i, name in enumerate(experts):  # label each domain segment once, at its start
        starts = [t for t in range(seq) if int(domains[t]) == i and (t == 0 or int(domains[t - 1]) != i)]
        for t in starts:
            strip.text(t + 0.5, 0, name, va="center", ha="left", fontsize=8, color="white")
    if seq <= 80:
        strip.set_xticks(range(seq), [repr(t)[1:-1][:6] for t in tokens], rotation=90, fontsize=6)
    else:
        strip.set_xlabel("token position")
    fig.colorbar(image, ax=[ax, strip], fraction=0.02, pad=0.01)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
