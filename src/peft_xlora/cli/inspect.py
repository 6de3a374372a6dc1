"""`peft-xlora inspect`: a checkpoint's experts, ranks, targets, parameter counts and config; its gate on a text."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .common import UserError, check_weights_file, checkpoint_config, load_xlora, plot_gate, require_supported


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Adds the `inspect` subcommand to the parser."""
    p = sub.add_parser(
        "inspect",
        help="experts, ranks, target modules, parameter counts, config; gating plot",
        description="Describes an X-LoRA checkpoint; with --text, plots the gate on that text.",
    )
    p.add_argument("checkpoint", help="X-LoRA checkpoint folder")
    p.add_argument("--base", default=None, help="base model folder (default: the one the checkpoint records)")
    p.add_argument("--text", default=None, help="a text to route; prints the mean gate per expert")
    p.add_argument("--plot", type=Path, default=None, help="with --text: write the gating heatmap (PNG/SVG/PDF)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)


def describe(checkpoint: str | Path) -> dict[str, Any]:
    """Experts, ranks, target modules and gating options of a checkpoint, from its files only."""
    config = checkpoint_config(checkpoint)
    experts = {}
    saved = config.get("experts") or {}
    # The JSON file has sorted keys; `expert_order` is the order of the gate's outputs.
    for name in config.get("expert_order") or list(saved):
        lora = saved.get(name) or {}
        experts[name] = {
            "r": lora.get("r"),
            "lora_alpha": lora.get("lora_alpha"),
            "use_rslora": lora.get("use_rslora", False),
            "rank_pattern": lora.get("rank_pattern") or {},
            "target_modules": lora.get("target_modules"),
            "head": (lora.get("modules_to_save") or [None])[0],  # a SEQ_CLS expert's own classification head
        }
    counts = {"classifier": 0, "experts": 0, "heads": 0}
    weights = Path(checkpoint) / "adapter_model.safetensors"
    if weights.is_file():
        check_weights_file(weights)
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                n = 1
                for size in f.get_slice(key).get_shape():
                    n *= size
                if ".xlora_classifier." in key:
                    counts["classifier"] += n
                elif ".xlora_expert_heads." in key or ".xlora_shared_head." in key:
                    counts["heads"] += n
                else:
                    counts["experts"] += n
    options = {
        k: config.get(k)
        for k in (
            "xlora_depth",
            "xlora_size",
            "xlora_dropout_p",
            "enable_softmax",
            "softmax_temperature",
            "top_k_lora",
            "layerwise_scalings",
            "scaling_pass_value",
            "global_scaling_weight",
            "scalings_mode",
            "hidden_size",
            "trainable_head",
        )
    }
    return {
        "checkpoint": str(checkpoint),
        "base_model": config.get("base_model_name_or_path"),
        "expert_order": config.get("expert_order"),
        "experts": experts,
        "parameters": counts,
        "config": options,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`peft-xlora inspect`: what a checkpoint holds; with --text, the gate on that text."""
    info = describe(args.checkpoint)
    if args.plot and not args.text:
        raise UserError("--plot needs --text: the text whose gate is plotted.")
    if args.text is not None and not args.text.strip():
        raise UserError("--text is empty (or only spaces): give a text to route.")
    if args.text:
        require_supported(args.checkpoint, "inspect", args.base)
        model, tokenizer, _ = load_xlora(args.checkpoint, args.base)
        ids = tokenizer(args.text, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise UserError(f"--text {args.text!r} is empty after tokenization: give a text to route.")
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        mean = model.get_latest_scalings()[0].float().mean(dim=(0, 1))  # (n_experts,)
        info["mean_gate"] = dict(zip(model.expert_names, [round(v, 4) for v in mean.tolist()]))
        if args.plot:
            plot_gate(model, tokenizer, ids[0], args.plot, "X-LoRA gate")
            info["plot"] = str(args.plot)
    if not args.json:
        print(f"X-LoRA checkpoint {info['checkpoint']} (base model: {info['base_model']})")
        for name, e in info["experts"].items():
            head = f" head={e['head']}" if e["head"] else ""
            print(
                f"  expert {name}: r={e['r']} alpha={e['lora_alpha']} rslora={e['use_rslora']} "
                f"targets={e['target_modules']}{head}"
            )
        p = info["parameters"]
        heads = f", classification heads {p['heads']:,}" if p["heads"] else ""
        print(f"  parameters: classifier {p['classifier']:,}, experts {p['experts']:,}{heads}")
        print("  config: " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
        if "mean_gate" in info:
            print("  mean gate on the text: " + ", ".join(f"{k} {v:.3f}" for k, v in info["mean_gate"].items()))
        if "plot" in info:
            print(f"  gating plot written to {info['plot']}")
    return info
