"""`peft-xlora train`: trains the gate on text or JSONL files with transformers' `Trainer`."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, set_seed

from .common import (
    UserError,
    add_topk_compute,
    check_out_folder,
    folder,
    fraction,
    load_xlora,
    non_negative_int,
    positive_float,
    positive_int,
    require_supported,
    set_topk_compute,
)
from .demo.data import chunks, token_stream


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Adds the `train` subcommand to the parser."""
    p = sub.add_parser(
        "train",
        help="train the gating classifier on text or JSONL data",
        description="Trains the gate with transformers' Trainer: train/eval split, eval loss, "
        "checkpoints every --save-steps, --resume from the last one.",
    )
    p.add_argument("checkpoint", help="X-LoRA checkpoint folder (from `build` or an earlier `train`)")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        type=Path,
        help=".txt files (one document each) or .jsonl files (one JSON object per line)",
    )
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--out", required=True, type=folder, help="folder for the trained checkpoint (and checkpoints/)")
    p.add_argument("--base", default=None, help="base model folder (default: the one the checkpoint records)")
    p.add_argument("--steps", type=positive_int, default=100, help="optimiser steps (default 100)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per training window (default 128)")
    p.add_argument("--eval-fraction", type=fraction, default=0.1, help="share of windows held out (default 0.1)")
    p.add_argument(
        "--eval-steps", type=positive_int, default=None, help="evaluate every N steps (default: at the end)"
    )
    p.add_argument("--save-steps", type=positive_int, default=None, help="save a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in OUT/checkpoints")
    p.add_argument("--seed", type=non_negative_int, default=0)
    add_topk_compute(p, "trained with it and saved in OUT; default: the checkpoint's")
    p.set_defaults(func=run)


def read_texts(paths: list[Path], text_field: str) -> list[str]:
    """Documents from .txt files (one each) and .jsonl files (one per line, `text_field`)."""
    texts = []
    for path in paths:
        if not path.is_file():
            raise UserError(f"Data file {path} does not exist.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(
                f"Data file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to UTF-8."
            ) from exc
        if path.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{n}: not valid JSON ({exc.msg}).") from exc
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise UserError(f"{path}:{n}: no string field {text_field!r} (set --text-field).")
                texts.append(record[text_field])
        else:
            texts.append(text)
    if not any(t.strip() for t in texts):
        raise UserError("The data files hold no text.")
    return texts


def _windows(tokenizer: Any, texts: list[str], seq_len: int) -> torch.Tensor:
    windows = chunks(token_stream(tokenizer, texts, 10**12), seq_len)  # (n, seq_len)
    if windows.shape[0] < 2:
        raise UserError(
            f"The data gives {windows.shape[0]} window(s) of {seq_len} tokens; give more text or a smaller --seq-len."
        )
    return windows


class _Windows(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def _last_checkpoint(checkpoints: Path) -> str:
    """The Trainer checkpoint `--resume` continues from: the `checkpoint-<step>` folder of the highest step."""
    found = sorted(
        (p for p in checkpoints.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()),
        key=lambda p: int(p.name.split("-", 1)[1]),
    )  # other names (a `checkpoint-best` copy) are not Trainer's step checkpoints
    if not found:
        raise UserError(f"--resume: no checkpoint-<step> folder in {checkpoints}; train once with --save-steps first.")
    if not (found[-1] / "trainer_state.json").is_file():
        raise UserError(
            f"--resume: {found[-1]} has no trainer_state.json, so it is not a complete Trainer checkpoint (an "
            "interrupted save?). Delete it to resume from the one before, or train without --resume."
        )
    return str(found[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`peft-xlora train`: trains the gate with transformers' Trainer and saves the result to OUT."""
    set_seed(args.seed)
    check_out_folder(args.out, "the trained checkpoint")
    require_supported(args.checkpoint, "train", args.base, topk_compute_flag=args.topk_compute)
    checkpoints = args.out / "checkpoints"
    resume = _last_checkpoint(checkpoints) if args.resume else None
    model, tokenizer, base_dir = load_xlora(args.checkpoint, args.base, trainable=True)
    set_topk_compute(model, args.topk_compute)
    windows = _windows(tokenizer, read_texts(args.data, args.text_field), args.seq_len)
    order = list(range(windows.shape[0]))
    random.Random(args.seed).shuffle(order)
    n_eval = max(1, round(args.eval_fraction * len(order))) if args.eval_fraction > 0 else 0
    if n_eval >= len(order):
        raise UserError(
            f"--eval-fraction {args.eval_fraction} holds out all {len(order)} windows of {args.seq_len} tokens, "
            "leaving none to train on; lower it, give more text or a smaller --seq-len."
        )
    eval_set = _Windows(windows[order[:n_eval]]) if n_eval else None
    train_set = _Windows(windows[order[n_eval:]])
    targs = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=max(1, args.steps // 10),
        logging_steps=max(1, min(10, args.steps // 5)),
        eval_strategy="steps" if (args.eval_steps and eval_set is not None) else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        seed=args.seed,
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_set, eval_dataset=eval_set)
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = {"train_loss": result.training_loss, "steps": result.global_step}
    if eval_set is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    model.base_model.model.name_or_path = base_dir
    model.peft_config["default"].base_model_name_or_path = base_dir
    model.save_pretrained(args.out)
    (args.out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    line = f"Trained {metrics['steps']} steps: train loss {metrics['train_loss']:.4f}"
    if "eval_loss" in metrics:
        line += f", eval loss {metrics['eval_loss']:.4f} on {n_eval} held-out windows"
    print(f"{line}. Saved to {args.out}")
    return metrics
