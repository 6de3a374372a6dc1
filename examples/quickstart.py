"""End to end on a tiny random Llama: make three LoRA experts, gate them with X-LoRA, train the gate, save, reload.

Runs in seconds on a CPU with nothing downloaded. Usage: `python examples/quickstart.py [--out DIR] [--steps N]`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_xlora  # registers X-LoRA with PEFT


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def make_experts(root: Path) -> dict[str, str]:
    """Three LoRA adapters with random weights, as if each had been fine-tuned on its own domain."""
    experts = {}
    for seed, name in enumerate(["math", "code", "poetry"]):
        lora = get_peft_model(
            tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        torch.manual_seed(100 + seed)  # after building: tiny_llama() reseeds
        with torch.no_grad():  # strong random updates, so the experts clearly differ
            for param in lora.parameters():
                if param.requires_grad:  # PEFT leaves only the LoRA factors trainable
                    param.normal_(0.0, 0.3)
        lora.save_pretrained(root / name)
        experts[name] = str(root / name)
    return experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="where to save the X-LoRA model (default: temp dir)")
    parser.add_argument("--steps", type=int, default=20, help="training steps for the gate")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="xlora-quickstart-"))

    experts = make_experts(root / "experts")
    config = peft_xlora.XLoraConfig(task_type="CAUSAL_LM", adapters=experts, xlora_depth=2, xlora_size=32)
    model = get_peft_model(tiny_llama(), config)
    model.print_trainable_parameters()

    # Teach the gate to prefer "code": targets come from the model pinned to that expert.
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    model.set_static_scalings({"code": 1.0})
    with torch.no_grad():
        target = torch.softmax(model(input_ids=ids).logits, -1)
    model.set_static_scalings(None)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(args.steps):
        log_probs = torch.log_softmax(model(input_ids=ids).logits, -1)
        loss = torch.nn.functional.kl_div(log_probs, target, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    mean = model.get_latest_scalings().mean(dim=(0, 1, 2))
    print("mean gate per expert:", dict(zip(experts, [round(v, 3) for v in mean.tolist()])))

    model.save_pretrained(root / "xlora")
    reloaded = PeftModel.from_pretrained(tiny_llama(), root / "xlora").eval()
    with torch.no_grad():
        same = torch.equal(reloaded(input_ids=ids).logits, logits)
    print(f"saved to {root / 'xlora'}; reloaded logits identical: {same}")
    out = reloaded.generate(input_ids=ids[:1, :5], max_new_tokens=8, do_sample=False)
    print("generated token ids:", out[0].tolist())
    if not same:
        raise SystemExit("reloaded model differs from the saved one")


if __name__ == "__main__":
    main()
