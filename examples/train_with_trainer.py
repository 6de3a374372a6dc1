"""Train the X-LoRA gate with transformers' Trainer on a causal-LM dataset (tiny random model, runs in seconds).

The recipe is the same for a real model: build the X-LoRA model with `get_peft_model`, hand it to `Trainer` with a
dataset of `input_ids`/`labels`, train, `save_pretrained`. Here the text is sampled from the model pinned to the
"code" expert, so a gate that learns to pick "code" lowers the loss.

Usage:
    python examples/train_with_trainer.py [--steps 30] [--gradient-checkpointing] [--bf16] [--train-experts]

On several processes (one per GPU, or CPU processes with gloo), the same script runs under
`accelerate launch --num_processes 2 examples/train_with_trainer.py` or
`torchrun --nproc_per_node 2 examples/train_with_trainer.py` (see docs/training.md).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import peft_xlora
from peft_xlora import optimizer_param_groups

VOCAB = 128


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # a random head gives near-uniform outputs; scaled, the experts differ
    return model


def make_experts(root: Path) -> dict[str, str]:
    """Three LoRA adapters with random weights, standing in for adapters fine-tuned on three domains."""
    experts = {}
    for seed, name in enumerate(["math", "code", "poetry"]):
        lora = get_peft_model(
            tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        torch.manual_seed(100 + seed)
        with torch.no_grad():
            for param in lora.parameters():
                if param.requires_grad:
                    param.normal_(0.0, 0.3)
        lora.save_pretrained(root / name)
        experts[name] = str(root / name)
    return experts


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, sequences: torch.Tensor) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.sequences[i], "labels": self.sequences[i]}  # the model shifts the labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (on CPU too)")
    parser.add_argument("--train-experts", action="store_true", help="also train the experts, at a 10x lower lr")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="xlora-trainer-"))

    experts = make_experts(root / "experts")
    config = peft_xlora.XLoraConfig(
        task_type="CAUSAL_LM",
        adapters=experts,
        xlora_depth=2,
        xlora_size=32,
        use_trainable_adapters=args.train_experts,
    )
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), config)
    model.print_trainable_parameters()

    # Training text: sampled from the model pinned to the "code" expert.
    model.set_static_scalings({"code": 1.0})
    torch.manual_seed(1)
    with torch.no_grad():
        text = model.generate(
            input_ids=torch.randint(0, VOCAB, (64, 1)), do_sample=True, top_k=0, max_new_tokens=31, min_new_tokens=31
        )
    model.set_static_scalings(None)
    data = TokenDataset(text)

    # Separate learning rates for the classifier and (when trained) the experts.
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, classifier_lr=1e-2, experts_lr=1e-3))
    training_args = TrainingArguments(
        output_dir=str(root / "trainer"),
        per_device_train_batch_size=8,
        max_steps=args.steps,
        logging_steps=5,
        lr_scheduler_type="constant",
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=args.bf16,
        report_to=[],
        save_strategy="no",
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=data, eval_dataset=data, optimizers=(optimizer, None)
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"eval loss: {before:.3f} -> {after:.3f}")

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=text[:4]).logits
    mean = model.get_latest_scalings().mean(dim=(0, 1, 2))
    print("mean gate per expert:", {name: round(v, 3) for name, v in zip(experts, mean.tolist())})

    if trainer.is_world_process_zero():
        model.save_pretrained(root / "xlora")
        reloaded = PeftModel.from_pretrained(tiny_llama(), root / "xlora").eval()
        with torch.no_grad():
            same = torch.equal(reloaded(input_ids=text[:4]).logits, logits)
        print(f"saved to {root / 'xlora'}; reloaded logits identical: {same}")
        if not same:
            raise SystemExit("the reloaded model differs from the trained one")


if __name__ == "__main__":
    main()
