"""Your LoRAs -> X-LoRA -> a trained gate -> saved, pushed, served: the README's path in one script.

    python examples/own_xlora.py --base BASE --expert math=./lora-math --expert code=./lora-code \
        --data notes.txt corpus.txt --out my-xlora [--push you/my-xlora] [--vllm-out my-xlora-vllm]

BASE is the base model the experts were trained on (a folder or a Hub id, with its tokenizer); each expert is a
folder written by PEFT's `save_pretrained` of a LoRA model (or a Hub id). The script builds X-LoRA over the experts,
trains only its gate with transformers' `Trainer` on the text files, saves one self-contained checkpoint, reloads it
into a fresh base model and checks that the logits are the same, generates a few tokens, and optionally pushes the
checkpoint to the Hub and writes the folder `vllm serve` loads. `tests/contract/test_own_xlora.py` runs it on a tiny
random Llama, with PEFT LoRA folders and a Hub look-alike on 127.0.0.1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import peft_xlora  # registers X-LoRA with PEFT: import it before any PEFT call that should know it


def windows(tokenizer, paths: list[Path], seq_len: int) -> list[dict[str, torch.Tensor]]:
    """The text files as one token stream, cut into training windows of `seq_len` tokens."""
    ids: list[int] = []
    for path in paths:
        ids += tokenizer(path.read_text(encoding="utf-8"))["input_ids"] + [tokenizer.eos_token_id]
    rows = [torch.tensor(ids[i : i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if not rows:
        raise SystemExit(f"the data holds {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    return [{"input_ids": row, "labels": row} for row in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="base model folder or Hub id (with its tokenizer)")
    p.add_argument("--expert", action="append", required=True, metavar="NAME=PATH", help="a LoRA expert (repeat)")
    p.add_argument("--data", nargs="+", required=True, type=Path, help="text files to train the gate on")
    p.add_argument("--out", required=True, type=Path, help="folder for the trained X-LoRA checkpoint")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--push", metavar="REPO", help="also upload the checkpoint to this Hub repository")
    p.add_argument("--vllm-out", type=Path, help="also write the folder that `vllm serve` loads")
    args = p.parse_args()
    experts = dict(spec.split("=", 1) for spec in args.expert)

    # 1. Your LoRAs -> X-LoRA: the experts stay frozen, only the gating classifier trains.
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    config = peft_xlora.XLoraConfig(task_type="CAUSAL_LM", adapters=experts, xlora_depth=2, xlora_size=256)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.base), config)
    model.print_trainable_parameters()

    # 2. Train the gate on your text.
    training = TrainingArguments(
        output_dir=str(args.out / "checkpoints"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    Trainer(model=model, args=training, train_dataset=windows(tokenizer, args.data, args.seq_len)).train()

    # 3. Save one self-contained folder (config, gate and every expert), then reload it into a fresh base model.
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.base), args.out).eval()
    prompt = tokenizer(args.data[0].read_text(encoding="utf-8")[:200], return_tensors="pt")
    with torch.no_grad():
        same = torch.equal(model(**prompt).logits, reloaded(**prompt).logits)
    print(f"saved {args.out}; reloaded logits identical: {same}")
    if not same:
        raise SystemExit("the reloaded model differs from the saved one")
    output = reloaded.generate(**prompt, max_new_tokens=8, do_sample=False)
    print("generated:", tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True))
    print("mean gate per expert:", dict(zip(experts, reloaded.get_latest_scalings().mean(dim=(0, 1, 2)).tolist())))

    # 4. Push it to the Hub (model card included); load it anywhere with PeftModel.from_pretrained(base, REPO).
    if args.push:
        peft_xlora.push_to_hub(reloaded, args.push)
        print(f"pushed to {args.push}")

    # 5. Serve it with vLLM: the export reads the saved files only and needs no vLLM in this environment.
    if args.vllm_out:
        from peft_xlora.serving.vllm import export_vllm

        export_vllm(args.out, args.vllm_out, base_model=args.base)
        print(f"wrote {args.vllm_out}; serve it with: vllm serve {args.vllm_out}")


if __name__ == "__main__":
    main()
