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


def head_mixture_reference(
    hidden: torch.Tensor, heads: list[tuple[torch.Tensor, torch.Tensor | None]], scalings: torch.Tensor
) -> torch.Tensor:
    """Plain loop over rows (and tokens) and experts: sum_e s_e * (W_e h + b_e), one state vector at a time.

    Args:
        hidden: The head's input, (batch, hidden) pooled or (batch, seq, hidden) per token.
        heads: Per expert: (weight (labels, hidden), bias (labels,) or None).
        scalings: The gate of the token each state comes from: (batch, n_experts) or (batch, seq, n_experts).

    Returns:
        (batch, labels) or (batch, seq, labels).
    """
    states = hidden.reshape(-1, hidden.shape[-1])
    gates = scalings.reshape(-1, scalings.shape[-1])
    rows = []
    for h, s in zip(states, gates):
        row = torch.zeros(heads[0][0].shape[0], dtype=hidden.dtype)
        for e, (weight, bias) in enumerate(heads):
            logits = weight @ h + (bias if bias is not None else 0.0)
            row = row + s[e] * logits
        rows.append(row)
    return torch.stack(rows).reshape(*hidden.shape[:-1], -1)


def lora_factors_reference(folder: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]]:
    """A saved PEFT LoRA adapter read by hand: module name -> (A (r, in), B (out, r), scale, is_embedding).

    Scale is alpha / r (alpha / sqrt(r) with rsLoRA); rank and alpha patterns are not read (the tests' experts have
    none).
    """
    import json
    import os

    from safetensors.torch import load_file

    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        for part_a, part_b, is_embedding in (
            ("lora_A.weight", "lora_B.weight", False),
            ("lora_embedding_A", "lora_embedding_B", True),
        ):
            if key.endswith("." + part_a):
                module = key.removeprefix("base_model.model.").removesuffix("." + part_a)
                out[module] = (a.float(), tensors[key.replace(part_a, part_b)].float(), scale, is_embedding)
    return out


def xlora_logits_reference(
    base: torch.nn.Module,
    experts: list[dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]]],
    classifier: list[tuple[torch.Tensor, torch.Tensor]],
    input_ids: torch.Tensor,
    *,
    scaling_pass_value: float = 0.0,
    global_weight: float = 1.0,
    enable_softmax: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    softmax_topk: bool = False,
    scaling_pass_layers: int | None = None,
) -> torch.Tensor:
    """The original X-LoRA's two passes, written out: the logits (batch, seq, vocab) of `base` with the experts.

    Every adapted module computes ``base(x) + global_weight * sum_e s_e * scale_e * B_e A_e x``. In the scaling pass
    s_e = scaling_pass_value for every expert and token; the classifier (ReLU between its linear layers) reads the
    last hidden state (or the output of decoder layer k with `scaling_pass_layers=k`) and the gate (softmax, top-k,
    without the global weight, which the formula applies) gives the main pass's per-token s_e. Scalings are shared
    by all layers (no layerwise scalings).

    Args:
        base: A fresh transformers model (no adapters); forward hooks are added for the call and removed.
        experts: Per expert, in gate order: `lora_factors_reference` of its folder.
        classifier: The classifier's linear layers in order, as (weight (out, in), bias (out,)).
        input_ids: (batch, seq) token ids.
        scaling_pass_value: The experts' weight in the scaling pass.
        global_weight: Multiplies every expert update, in both passes.
        enable_softmax: As in `gate_reference`.
        temperature: As in `gate_reference`.
        top_k: As in `gate_reference`.
        softmax_topk: As in `gate_reference`.
        scaling_pass_layers: Read the classifier's input after this many decoder layers (None: the last hidden state).
    """
    current: dict[str, torch.Tensor] = {}  # "s": (batch, seq, n_experts), the weights of the running pass

    def hook(name: str):
        def add_updates(module, args, output):
            x = args[0]
            out = output
            for e, factors in enumerate(experts):
                if name not in factors:
                    continue
                A, B, scale, is_embedding = factors[name]
                down = F.embedding(x, A.T) if is_embedding else x.float() @ A.T
                out = out + global_weight * current["s"][..., e : e + 1] * scale * (down @ B.T)
            return out

        return add_updates

    names = sorted({name for factors in experts for name in factors})
    handles = [base.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            batch, seq = input_ids.shape
            current["s"] = torch.full((batch, seq, len(experts)), float(scaling_pass_value))
            states = base.base_model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
            k = scaling_pass_layers
            h = (states.last_hidden_state if k is None else states.hidden_states[k]).float()
            for i, (weight, bias) in enumerate(classifier):
                h = h @ weight.float().T + bias.float()
                if i < len(classifier) - 1:
                    h = torch.relu(h)
            scalings = gate_reference(h, temperature, enable_softmax, top_k, softmax_topk, global_weight=1.0)
            current["s"] = scalings  # (batch, seq, n_experts)
            return base(input_ids=input_ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def single_pass_reference(
    model: torch.nn.Module,
    experts: dict[str, str],
    ids: torch.Tensor,
    k: int,
    static_logits: dict[str, torch.Tensor],
    gate_fn=None,
) -> torch.Tensor:
    """Single-pass X-LoRA on a Llama `PeftModel`, written out: decoder layer by layer, expert by expert, no stacking.

    Mixture layers registered before decoder layer k+1 (the input embedding, layers 1..k) use softmax(static logits),
    the classifier reads the output of layer k, and the later mixture layers use `gate_fn(classifier logits)`.

    Args:
        model: The single-pass X-LoRA `PeftModel` (its base layers, norms and classifier are used; not its mixture).
        experts: Expert name -> saved LoRA folder, in gate order (the factors are read from the files).
        ids: (batch, seq) token ids, no padding.
        k: The decoder layer whose output feeds the classifier.
        static_logits: Mixture layer name -> (n_experts,) logits of the early layers.
        gate_fn: Classifier logits (batch, seq, n_layers|1, n_experts) -> scalings; default a plain softmax.

    Returns:
        (batch, seq, vocab) logits.
    """
    from peft_xlora.core.layer import XLoraLayer

    loras = [lora_factors_reference(path) for path in experts.values()]
    llama = model.base_model.model
    inner = llama.model
    mixture = {name: m for name, m in llama.named_modules() if isinstance(m, XLoraLayer)}
    index = {name: i for i, name in enumerate(mixture)}
    phase: dict[str, torch.Tensor | None] = {"late": None}

    def mixed(name: str, layer: XLoraLayer):
        def forward(x, *args, **kwargs):
            out = layer.base_layer(x, *args, **kwargs)
            if phase["late"] is None:  # before layer k's output: static weights
                weights = torch.softmax(static_logits[name].float(), dim=-1)[None, None].expand(*x.shape[:2], -1)
            else:
                s = phase["late"]
                weights = s[:, :, index[name] if s.shape[2] > 1 else 0]  # (batch, seq, n_experts)
            for e, lora in enumerate(loras):
                if name in lora:
                    a, b, scale, embedding = lora[name]
                    down = F.embedding(x, a.T) if embedding else x @ a.T
                    out = out + weights[..., e : e + 1] * scale * (down @ b.T)
            return out

        return forward

    for name, layer in mixture.items():
        layer.forward = mixed(name, layer)
    try:
        hidden = inner.embed_tokens(ids)
        seq = ids.shape[1]
        positions = torch.arange(seq)[None]
        rotary = inner.rotary_emb(hidden, positions)
        mask = torch.full((seq, seq), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        for i, decoder_layer in enumerate(inner.layers):
            hidden = decoder_layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
            hidden = hidden if isinstance(hidden, torch.Tensor) else hidden[0]
            if i + 1 == k:
                logits = llama.xlora_classifier(hidden)  # (batch, seq, n_layers|1, n_experts)
                phase["late"] = gate_fn(logits) if gate_fn else torch.softmax(logits, dim=-1)
        return llama.lm_head(inner.norm(hidden))
    finally:
        for layer in mixture.values():
            del layer.forward


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


def restricted_classifier_state(original, reference, kept: list[str], k: int | None = None) -> dict[str, torch.Tensor]:
    """The classifier weights a model built with only the `kept` experts gets from `original`: removal, by hand.

    The hidden layers are copied; of the last layer, the rows of the kept experts in the slots the reference has
    (matched by mixture layer name when scalings are layerwise); of single-pass static logits (Llama layout, decoder
    layer k), the kept experts' columns of the early layers the reference has. Under a softmax this is the gate that
    renormalises over the kept experts' logits, which is what removing (and masking) an expert means.

    Args:
        original: The `XLoraModel` with every expert.
        reference: The `XLoraModel` built directly with the kept experts only.
        kept: Names of the kept experts, in the reference's gate order.
        k: The single pass's decoder layer k (None: no static logits).
    """
    source = original.xlora_classifier.state_dict()
    names = list(original.expert_names)
    columns = [names.index(name) for name in kept]
    target = reference.xlora_classifier.state_dict()
    last = max(int(key.split(".")[1]) for key in target if key.startswith("layers."))
    layerwise = original.xlora_config.layerwise_scalings
    old_slots = original.mixture_layer_names if layerwise else [None]
    new_slots = reference.mixture_layer_names if layerwise else [None]
    out = {}
    for key in target:
        if key.startswith(f"layers.{last}."):
            rows = []
            for slot in new_slots:
                for column in columns:
                    rows.append(source[key][old_slots.index(slot) * len(names) + column])
            out[key] = torch.stack(rows)
        elif key.endswith("single_pass_static.logits"):
            old_early = _early_layers(original.mixture_layer_names, k)
            new_early = _early_layers(reference.mixture_layer_names, k)
            out[key] = torch.stack([source[key][old_early.index(n)][columns] for n in new_early])
        else:
            out[key] = source[key].clone()
    return out


def _early_layers(names: list[str], k: int) -> list[str]:
    """Mixture layers before decoder layer k+1 of a Llama: the embedding and those inside layers 1..k, in order."""
    early = []
    for name in names:
        parts = name.split(".")
        inside = int(parts[2]) if parts[:2] == ["model", "layers"] else None
        if inside is None and name != "model.embed_tokens":
            continue  # registered after the stack (an LM head): late
        if inside is None or inside < k:
            early.append(name)
    return early


def pinned_reference(
    base: torch.nn.Module,
    experts: list[dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]]],
    weights: torch.Tensor,
    slots: dict[str, int],
    input_ids: torch.Tensor,
) -> torch.Tensor:
    """The experts mixed at fixed weights, written out: the logits (batch, seq, vocab) of `base` with the experts.

    Every adapted module computes ``base(x) + sum_e w[row, slot, e] * scale_e * B_e A_e x``, expert by expert: a
    pinned gate (`set_static_scalings`), with no scaling pass, classifier or static weights.

    Args:
        base: A fresh transformers model (no adapters); forward hooks are added for the call and removed.
        experts: Per expert, in gate order: `lora_factors_reference` of its folder.
        weights: (rows|1, n_slots|1, n_experts): per batch row (per-row pins) or shared, per mixture layer or one.
        slots: Adapted module name -> its slot (its index among the model's mixture layers).
        input_ids: (batch, seq) token ids.
    """

    def hook(name: str):
        def add_updates(module, args, output):
            x = args[0]
            out = output
            w = weights[:, slots[name] if weights.shape[1] > 1 else 0]  # (rows|1, n_experts)
            for e, factors in enumerate(experts):
                if name not in factors:
                    continue
                A, B, scale, is_embedding = factors[name]
                down = F.embedding(x, A.T) if is_embedding else x.float() @ A.T
                out = out + w[:, e].reshape(-1, *[1] * (out.dim() - 1)) * scale * (down @ B.T)
            return out

        return add_updates

    names = sorted({name for factors in experts for name in factors})
    handles = [base.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            return base(input_ids=input_ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def topk_mixture_reference(
    x: torch.Tensor,
    base_out: torch.Tensor,
    factors: list[tuple[torch.Tensor, torch.Tensor, float]],
    expert_ids: list[int],
    indices: torch.Tensor,
    weights: torch.Tensor,
    is_embedding: bool = False,
) -> torch.Tensor:
    """Plain loop over tokens and the experts each chose: base_out[t] + sum_j w_tj * scale_e * B_e A_e x_t, e = i_tj.

    Only the chosen experts are computed, one token and one expert at a time; an expert that does not adapt this
    layer adds nothing.

    Args:
        x: (tokens, in) inputs, or (tokens,) token ids for an embedding.
        base_out: (tokens, out) output of the base layer.
        factors: Per expert of this layer: (A (r, in), B (out, r), scale).
        expert_ids: The model's index of each expert in `factors`.
        indices: (tokens, k) the model's indices of the experts each token chose.
        weights: (tokens, k) their scalings.
    """
    position = {expert: i for i, expert in enumerate(expert_ids)}
    rows = []
    for t in range(base_out.shape[0]):
        row = base_out[t]
        for j in range(indices.shape[1]):
            expert = int(indices[t, j])
            if expert not in position:
                continue
            A, B, scale = factors[position[expert]]
            down = A[:, x[t]] if is_embedding else A @ x[t]  # (r,)
            row = row + weights[t, j] * scale * (B @ down)
        rows.append(row)
    return torch.stack(rows)
