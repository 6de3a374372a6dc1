"""`peft-xlora generate`: prompts -> text, optionally with a gating heatmap."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from .common import (
    UserError,
    add_topk_compute,
    load_xlora,
    non_negative_int,
    plot_gate,
    require_supported,
    set_topk_compute,
    weights,
    whole_up_to,
)

#: `--max-new-tokens` at most: refused at parsing, before any model loads. A model that records how many positions it
#: has (`max_position_embeddings`) bounds the prompt plus the new tokens by that number too.
MAX_NEW_TOKENS = 2**20


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Adds the `generate` subcommand to the parser."""
    p = sub.add_parser(
        "generate",
        help="prompt(s) -> text, optionally with a gating heatmap PNG",
        description="Generates a continuation of each prompt with the X-LoRA model.",
    )
    p.add_argument("checkpoint", help="X-LoRA checkpoint folder")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--base", default=None, help="base model folder (default: the one the checkpoint records)")
    p.add_argument(
        "--max-new-tokens",
        type=whole_up_to(MAX_NEW_TOKENS),
        default=40,
        help="tokens to generate per prompt (default 40; with the prompt, at most max_position_embeddings)",
    )
    p.add_argument(
        "--mode",
        choices=["token", "prompt"],
        default=None,
        help="token: a gate per token; prompt: hold the prompt's gate (default: the checkpoint's)",
    )
    p.add_argument(
        "--static",
        type=weights,
        default=None,
        metavar="NAME=W,...",
        help="pin the gate to fixed expert weights (no classifier)",
    )
    add_topk_compute(p, "for this run only; default: the checkpoint's")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument(
        "--heatmap", type=Path, default=None, help="write the gate over the first prompt + its generated text as a PNG"
    )
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=run)


def _apply_static(model: Any, weights: dict[str, float] | None) -> None:
    if weights is None:
        return
    try:
        model.set_static_scalings(weights)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`peft-xlora generate`: a continuation of every prompt."""
    mode = {"scalings_mode": args.mode} if args.mode else {}  # else the checkpoint's own
    require_supported(
        args.checkpoint,
        "generate",
        args.base,
        pins=args.static is not None,
        topk_compute_flag=args.topk_compute,
        **mode,
    )
    model, tokenizer, _ = load_xlora(args.checkpoint, args.base)
    set_topk_compute(model, args.topk_compute)
    _apply_static(model, args.static)
    torch.manual_seed(args.seed)
    encoded = [tokenizer(prompt, return_tensors="pt") for prompt in args.prompt]
    positions = getattr(model.config, "max_position_embeddings", None)
    for i, enc in enumerate(encoded):  # every prompt checked before the first one generates
        length = enc.input_ids.shape[1]
        if length == 0:
            raise UserError(f"Prompt {i + 1} is empty after tokenization.")
        if isinstance(positions, int) and length + args.max_new_tokens > positions:
            raise UserError(
                f"--max-new-tokens {args.max_new_tokens} after prompt {i + 1} ({length} tokens) goes past the "
                f"model's {positions} positions (max_position_embeddings); give at most {max(positions - length, 0)}."
            )
    outputs = []
    for i, (prompt, enc) in enumerate(zip(args.prompt, encoded)):
        try:
            with torch.no_grad():
                ids = model.generate(
                    **enc,
                    max_new_tokens=args.max_new_tokens,
                    do_sample=args.sample,
                    scalings_mode=args.mode,
                    pad_token_id=tokenizer.pad_token_id,
                )
        except ValueError as exc:  # an option this model refuses, e.g. --mode prompt with single-pass routing
            raise UserError(str(exc)) from exc
        text = tokenizer.decode(ids[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
        outputs.append({"prompt": prompt, "continuation": text})
        if not args.json:
            print(
                f"--- prompt {i + 1}\n{prompt}\033[1m{text}\033[0m"
                if _tty()
                else f"--- prompt {i + 1}\n{prompt}{text}"
            )
        if i == 0 and args.heatmap:
            with torch.no_grad():  # one forward over prompt + continuation gives the gate on every token
                model(input_ids=ids[:1], use_cache=False)
            plot_gate(model, tokenizer, ids[0], args.heatmap, "X-LoRA gate over the prompt and its continuation")
            if not args.json:
                print(f"Gating heatmap written to {args.heatmap}")
    return {"generations": outputs}


def _tty() -> bool:

    return sys.stdout.isatty()
