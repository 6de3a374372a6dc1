"""Export of an X-LoRA model at fixed expert weights as one plain PEFT LoRA adapter.

With the gate pinned to weights w, every mixture layer computes `sum_e w_e scale_e B_e A_e x`, which is one LoRA of
rank R = sum r_e: A = the stacked A factors, B = the stacked B factors with column block e multiplied by w_e scale_e,
and a LoRA scale of 1 (lora_alpha = r). Experts with weight 0 are left out.

TODO(checkpoint issue): switch the CLI to the checkpoint module's exporter once it lands; this is the CLI's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .layer import XLoraLayer


def export_fixed_lora(model: Any, weights: dict[str, float], out_dir: str | os.PathLike) -> None:
    """Writes a PEFT LoRA folder equal to `model` with its gate pinned to `weights`.

    Args:
        model: An X-LoRA `PeftModel` (or `XLoraModel`).
        weights: Expert name -> weight; experts not named get 0.
        out_dir: Output folder (created).

    Raises:
        ValueError: An unknown expert name, or all weights are 0.
    """
    from peft import LoraConfig

    tuner = getattr(model, "base_model", model)
    names = list(tuner.expert_names)
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"Unknown experts {unknown}; this model has {names}.")
    w = torch.tensor([float(weights.get(n, 0.0)) for n in names])
    if not torch.any(w != 0):
        raise ValueError("Every expert weight is 0: the exported LoRA would do nothing.")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    kinds = set()
    for name, layer in tuner.model.named_modules():
        if not isinstance(layer, XLoraLayer):
            continue
        keep = w[layer.rank_expert.cpu()] != 0  # (R,) rank rows of experts with a weight
        if not keep.any():
            continue
        coef = (w[layer.rank_expert.cpu()] * layer.rank_scale.cpu())[keep]  # (r,)
        A = layer.xlora_A.detach().float().cpu()[keep]  # (r, in)
        B = layer.xlora_B.detach().float().cpu()[:, keep] * coef[None]  # (out, r)
        prefix = f"base_model.model.{name}"
        if layer.is_embedding:
            tensors[f"{prefix}.lora_embedding_A"] = A.contiguous()
            tensors[f"{prefix}.lora_embedding_B"] = B.contiguous()
        else:
            tensors[f"{prefix}.lora_A.weight"] = A.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = B.contiguous()
        ranks[name] = int(keep.sum())
        kinds.add(layer.is_embedding)
    r = max(ranks.values())
    config = LoraConfig(
        task_type=tuner.xlora_config.task_type,
        r=r,
        lora_alpha=r,
        target_modules=sorted(ranks),
        rank_pattern={f"^{k}$": v for k, v in ranks.items() if v != r},
        alpha_pattern={f"^{k}$": v for k, v in ranks.items() if v != r},
        base_model_name_or_path=tuner.xlora_config.base_model_name_or_path,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
