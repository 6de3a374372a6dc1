"""What each `peft-xlora` subcommand does (the parser is in cli.py)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------- loading


def _load_base(path: str | Path) -> Any:
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{path} is not a base model folder (no config.json); give a folder written by transformers.")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"No tokenizer in the base model folder {path} ({exc}); save one there.") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _checkpoint_config(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{checkpoint} is not an X-LoRA checkpoint (no adapter_config.json); make one with `build`.")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "PEFT_XLORA":
        raise UserError(f"{checkpoint} holds a {config.get('peft_type')} adapter, not an X-LoRA (PEFT_XLORA) one.")
    return config


def _base_of(checkpoint: str | Path, base: str | None) -> str:
    if base:
        return base
    recorded = _checkpoint_config(checkpoint).get("base_model_name_or_path")
    if not recorded or not (Path(recorded) / "config.json").is_file():
        raise UserError(
            f"The checkpoint records the base model {recorded!r}, which is not a local folder here; pass --base."
        )
    return recorded


def load_xlora(checkpoint: str | Path, base: str | None = None, trainable: bool = False) -> tuple[Any, Any, str]:
    """(the X-LoRA PeftModel, its tokenizer, the base folder) of a checkpoint."""
    from peft import PeftModel  # the method is registered: this module is inside the imported package

    _checkpoint_config(checkpoint)
    base_dir = _base_of(checkpoint, base)
    model = PeftModel.from_pretrained(_load_base(base_dir), str(checkpoint), is_trainable=trainable)
    return model, _load_tokenizer(base_dir), base_dir


# ---------------------------------------------------------------------------------------------------- build


def build(args: argparse.Namespace) -> dict[str, Any]:
    """`peft-xlora build`: an X-LoRA checkpoint over the given LoRA experts."""
    from peft import get_peft_model

    from .config import XLoraConfig

    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        raise UserError("Two --adapter arguments have the same name; expert names must be unique.")
    for name, path in adapters.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise UserError(f"Expert {name!r}: {path} is not a LoRA checkpoint folder (no adapter_config.json).")
    try:
        config = XLoraConfig(
            task_type="CAUSAL_LM",
            adapters=adapters,
            xlora_depth=args.depth,
            xlora_size=args.size,
            xlora_dropout_p=args.dropout,
            top_k_lora=args.top_k,
            softmax_temperature=args.temperature,
            layerwise_scalings=args.layerwise,
            scaling_pass_value=args.scaling_pass_value,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    torch.manual_seed(args.seed)
    base = _load_base(args.base)
    base.name_or_path = str(Path(args.base).resolve())  # recorded in the checkpoint, so later commands find it
    try:
        model = get_peft_model(base, config)
    except ValueError as exc:  # ExpertError is a ValueError
        raise UserError(str(exc)) from exc
    model.save_pretrained(args.out)
    trainable, total = model.get_nb_trainable_parameters()
    print(
        f"Built X-LoRA over {len(adapters)} experts ({', '.join(adapters)}); {trainable:,} trainable of "
        f"{total:,} parameters. Saved to {args.out}"
    )
    return {"out": str(args.out), "experts": list(adapters), "trainable": trainable}


# ---------------------------------------------------------------------------------------------------- train


def read_texts(paths: list[Path], text_field: str) -> list[str]:
    """Documents from .txt files (one each) and .jsonl files (one per line, `text_field`)."""
    texts = []
    for path in paths:
        if not path.is_file():
            raise UserError(f"Data file {path} does not exist.")
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
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
            texts.append(path.read_text(encoding="utf-8"))
    if not any(t.strip() for t in texts):
        raise UserError("The data files hold no text.")
    return texts


def _windows(tokenizer: Any, texts: list[str], seq_len: int) -> torch.Tensor:
    from .demo.data import chunks, token_stream

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


def train(args: argparse.Namespace) -> dict[str, Any]:
    """`peft-xlora train`: trains the gate with transformers' Trainer and saves the result to OUT."""
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(args.seed)
    model, tokenizer, base_dir = load_xlora(args.checkpoint, args.base, trainable=True)
    windows = _windows(tokenizer, read_texts(args.data, args.text_field), args.seq_len)
    order = list(range(windows.shape[0]))
    random.Random(args.seed).shuffle(order)
    n_eval = max(1, round(args.eval_fraction * len(order))) if args.eval_fraction > 0 else 0
    eval_set = _Windows(windows[order[:n_eval]]) if n_eval else None
    train_set = _Windows(windows[order[n_eval:]])
    checkpoints = args.out / "checkpoints"
    resume = None
    if args.resume:
        found = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        if not found:
            raise UserError(f"--resume: no checkpoint in {checkpoints}; train once with --save-steps first.")
        resume = str(found[-1])
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


# ---------------------------------------------------------------------------------------------------- generate


def _apply_static(model: Any, weights: dict[str, float] | None) -> None:
    if weights is None:
        return
    try:
        model.set_static_scalings(weights)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def _plot(model: Any, tokenizer: Any, ids: torch.Tensor, path: Path, title: str) -> None:
    from .plotting import plot_scalings

    try:
        plot_scalings(
            model.get_latest_scalings(),
            path,
            tokenizer=tokenizer,
            input_ids=ids,
            expert_names=model.expert_names,
            title=title,
        )
    except (ValueError, ImportError) as exc:
        raise UserError(str(exc)) from exc


def generate(args: argparse.Namespace) -> dict[str, Any]:
    """`peft-xlora generate`: a continuation of every prompt."""
    model, tokenizer, _ = load_xlora(args.checkpoint, args.base)
    _apply_static(model, args.static)
    torch.manual_seed(args.seed)
    outputs = []
    for i, prompt in enumerate(args.prompt):
        enc = tokenizer(prompt, return_tensors="pt")
        if enc.input_ids.shape[1] == 0:
            raise UserError(f"Prompt {i + 1} is empty after tokenization.")
        with torch.no_grad():
            ids = model.generate(
                **enc,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.sample,
                scalings_mode=args.mode,
                pad_token_id=tokenizer.pad_token_id,
            )
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
            _plot(model, tokenizer, ids[0], args.heatmap, "X-LoRA gate over the prompt and its continuation")
            if not args.json:
                print(f"Gating heatmap written to {args.heatmap}")
    return {"generations": outputs}


def _tty() -> bool:
    import sys

    return sys.stdout.isatty()


# ---------------------------------------------------------------------------------------------------- inspect


def describe(checkpoint: str | Path) -> dict[str, Any]:
    """Experts, ranks, target modules and gating options of a checkpoint, from its files only."""
    from safetensors import safe_open

    config = _checkpoint_config(checkpoint)
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
        }
    counts = {"classifier": 0, "experts": 0}
    weights = Path(checkpoint) / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                n = 1
                for size in f.get_slice(key).get_shape():
                    n *= size
                counts["classifier" if ".xlora_classifier." in key else "experts"] += n
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


def inspect(args: argparse.Namespace) -> dict[str, Any]:
    """`peft-xlora inspect`: what a checkpoint holds; with --text, the gate on that text."""
    info = describe(args.checkpoint)
    if args.plot and not args.text:
        raise UserError("--plot needs --text: the text whose gate is plotted.")
    if args.text:
        model, tokenizer, _ = load_xlora(args.checkpoint, args.base)
        ids = tokenizer(args.text, return_tensors="pt").input_ids
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        mean = model.get_latest_scalings()[0].float().mean(dim=(0, 1))  # (n_experts,)
        info["mean_gate"] = dict(zip(model.expert_names, [round(v, 4) for v in mean.tolist()]))
        if args.plot:
            _plot(model, tokenizer, ids[0], args.plot, "X-LoRA gate")
            info["plot"] = str(args.plot)
    if not args.json:
        print(f"X-LoRA checkpoint {info['checkpoint']} (base model: {info['base_model']})")
        for name, e in info["experts"].items():
            print(
                f"  expert {name}: r={e['r']} alpha={e['lora_alpha']} rslora={e['use_rslora']} "
                f"targets={e['target_modules']}"
            )
        p = info["parameters"]
        print(f"  parameters: classifier {p['classifier']:,}, experts {p['experts']:,}")
        print("  config: " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
        if "mean_gate" in info:
            print("  mean gate on the text: " + ", ".join(f"{k} {v:.3f}" for k, v in info["mean_gate"].items()))
        if "plot" in info:
            print(f"  gating plot written to {info['plot']}")
    return info


# ---------------------------------------------------------------------------------------------------- export


def export(args: argparse.Namespace) -> dict[str, Any]:
    """`peft-xlora export`: a plain LoRA at fixed weights, or the mistral.rs layout (see `peft_xlora.export`)."""
    from .export import export_lora, export_mistralrs

    if args.format == "lora" and not args.weights:
        raise UserError("--format lora needs --weights NAME=W,... (the fixed expert weights of the exported LoRA).")
    if args.format == "mistralrs" and args.weights:
        raise UserError("--weights applies to --format lora only; the mistral.rs layout keeps the learned gate.")
    model, _, _ = load_xlora(args.checkpoint, args.base)
    try:
        if args.format == "lora":
            export_lora(model, args.out, weights=args.weights)
            print(f"Exported a plain PEFT LoRA equal to the mixture at {args.weights} to {args.out}")
        else:
            export_mistralrs(model, args.out)
            print(f"Exported the mistral.rs X-LoRA layout to {args.out} (pass --order {args.out}/xlora-ordering.json)")
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    return {"out": str(args.out)}


def demo(args: argparse.Namespace) -> dict[str, Any]:
    """`peft-xlora demo`: the end-to-end demo (see docs/demo.md)."""
    from .demo import Demo, DemoSetupError, default_cache_dir, preset
    from .demo.data import DataError

    if args.tiny and args.threads is None:
        # The tiny model is too small to gain from threads, and loses much when cores are busy.
        torch.set_num_threads(1)
    settings = preset(args.tiny, expert_steps=args.expert_steps, router_steps=args.router_steps, seed=args.seed)
    cache = args.cache_dir or default_cache_dir()
    print(f"Cache: {cache} (reused between runs); results: {args.out}")
    try:
        report = Demo(settings, cache, args.out, quiet=args.quiet).run()
    except (DemoSetupError, DataError) as exc:
        raise UserError(str(exc)) from exc
    print()
    print((args.out / "results.md").read_text())
    return report
