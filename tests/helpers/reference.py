"""Plain reference implementations of the package's fast paths, for the tests to compare against.

Each is a loop over experts, tokens or rows with no stacking or batching, written to be checked by eye.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mixture_reference(
    x: torch.Tensor,
    base_out: torch.Tensor,
    factors: list[tuple[torch.Tensor, torch.Tensor, float]],
    scalings: torch.Tensor,
    is_embedding: bool = False,
) -> torch.Tensor:
    """Plain per-expert loop: base_out + sum_e s_e * scale_e * B_e A_e x. Used by the tests as ground truth.

    Args:
        x: (batch, seq, in) inputs, or (batch, seq) token ids for an embedding.
        base_out: (batch, seq, out) output of the base layer.
        factors: Per expert of this layer: (A (r, in), B (out, r), scale).
        scalings: (batch, seq, n) weights of the same experts.
        is_embedding: Whether `x` holds token ids.
    """
    out = base_out.clone()
    for e, (A, B, scale) in enumerate(factors):
        down = F.embedding(x, A.T) if is_embedding else x @ A.T
        out = out + scalings[..., e : e + 1] * scale * (down @ B.T)
    return out


def gate_reference(
    logits: torch.Tensor,
    temperature: float,
    enable_softmax: bool,
    top_k: int | None,
    softmax_topk: bool,
    global_weight: float,
) -> torch.Tensor:
    """Row-by-row Python version of `gate`, for the tests."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    out = torch.zeros_like(flat)
    for i, row in enumerate(flat):
        z = row / temperature if (enable_softmax or softmax_topk) else row
        values = [float(v) for v in z]
        if enable_softmax:
            denominator = sum(torch.tensor(values).exp())
            probs = [float(torch.tensor(v).exp() / denominator) for v in values]
        else:
            probs = values
        keep = sorted(range(len(values)), key=lambda j: -values[j])[: top_k or len(values)]
        if softmax_topk:
            denominator = sum(torch.tensor([values[j] for j in keep]).exp())
            probs = [
                float(torch.tensor(values[j]).exp() / denominator) if j in keep else 0.0 for j in range(len(values))
            ]
        else:
            probs = [probs[j] if j in keep else 0.0 for j in range(len(values))]
        out[i] = torch.tensor(probs) * global_weight
    return out.reshape(logits.shape)


def router_losses_reference(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Token-by-token Python version of `router_losses`, for the tests."""
    batch, seq, slots, n_experts = logits.shape
    counts, probs_sum, entropy_sum, tokens = [0.0] * n_experts, [0.0] * n_experts, 0.0, 0
    for b in range(batch):
        for t in range(seq):
            if mask is not None and not mask[b, t]:
                continue
            for s in range(slots):
                row = [float(v) / temperature for v in logits[b, t, s]]
                top = max(row)
                exps = [math.exp(v - top) for v in row]
                p = [e / sum(exps) for e in exps]
                for e in sorted(range(n_experts), key=lambda j: -row[j])[: top_k or 1]:
                    counts[e] += 1
                for e in range(n_experts):
                    probs_sum[e] += p[e]
                entropy_sum -= sum(pe * math.log(pe) for pe in p if pe > 0)
                tokens += 1
    k = top_k or 1
    load = n_experts * sum(counts[e] / (tokens * k) * probs_sum[e] / tokens for e in range(n_experts))
    return {"load_balancing": load, "entropy": entropy_sum / tokens}


def distillation_reference(
    model, ids: torch.Tensor, labels: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> float:
    """The router distillation term by separate forwards: one per expert pinned alone, then the gate, token by token.

    Args:
        model: An X-LoRA PeftModel with a dense softmax gate (no top-k, global weight 1), so its scalings are the
            gate's distribution.
        ids: (batch, seq) inputs.
        labels: (batch, seq) labels, -100 where none (shifted by one, as transformers does).
        temperature: The target's temperature.
        mask: (batch, seq) attention mask, or None.
    """
    xlora = model.base_model
    kwargs = {} if mask is None else {"attention_mask": mask}
    losses = []  # per expert: (batch, seq - 1)
    with torch.no_grad():
        for name in xlora.expert_names:
            xlora.set_static_scalings({name: 1.0})
            logits = model(input_ids=ids, **kwargs).logits.float()
            rows = []
            for b in range(ids.shape[0]):
                row = []
                for t in range(ids.shape[1] - 1):
                    label = int(labels[b, t + 1])
                    row.append(0.0 if label == -100 else float(-torch.log_softmax(logits[b, t], -1)[label]))
                rows.append(row)
            losses.append(rows)
        xlora.set_static_scalings(None)
        model(input_ids=ids, **kwargs)
        gate = xlora.get_latest_scalings()  # (batch, seq, n_layers, n_experts)
    total, count = 0.0, 0
    n = len(xlora.expert_names)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if int(labels[b, t + 1]) == -100 or (mask is not None and not mask[b, t + 1]):
                continue
            scores = [-losses[e][b][t] / temperature for e in range(n)]
            top = max(scores)
            exps = [math.exp(v - top) for v in scores]
            target = [v / sum(exps) for v in exps]
            slots = gate.shape[2]
            ce = sum(-target[e] * math.log(float(gate[b, t, s, e])) for s in range(slots) for e in range(n)) / slots
            total += ce
            count += 1
    return total / count
