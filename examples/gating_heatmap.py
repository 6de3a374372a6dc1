"""Train a gate that routes by token, then draw its decisions with `peft_xlora.plot_scalings` (the Concepts figure).

A tiny random Llama gets two random LoRA experts. Tokens below 50 should be handled by "math", the others by
"code": the training target at each position is the model pinned to that token's expert. After training, the heatmap
of one mixed sequence shows the gate switching expert token by token. Nothing is downloaded; a few seconds on a CPU.

Usage: `python examples/gating_heatmap.py [--out docs/img/gating.png] [--steps N]`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_xlora

SPLIT = 50  # tokens below go to "math", the rest to "code"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def make_expert(path: Path, seed: int) -> str:
    lora = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"], init_lora_weights=False)
    )
    torch.manual_seed(seed)
    with torch.no_grad():  # strong random updates, so the experts clearly differ
        for param in lora.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.3)
    lora.save_pretrained(path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gating.png"), help="image to write (.png, .svg, .pdf)")
    parser.add_argument("--steps", type=int, default=200, help="training steps for the gate")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="xlora-heatmap-"))
    experts = {"math": make_expert(root / "math", 1), "code": make_expert(root / "code", 2)}
    model = get_peft_model(
        tiny_llama(),
        peft_xlora.XLoraConfig(
            task_type="CAUSAL_LM", adapters=experts, xlora_depth=2, xlora_size=32, xlora_dropout_p=0.0
        ),
    )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (16, 24), generator=generator)
    with torch.no_grad():  # per-token targets: the model pinned to the expert of each token
        targets = {}
        for name in experts:
            model.set_static_scalings({name: 1.0})
            targets[name] = torch.log_softmax(model(input_ids=ids).logits, -1)
        model.set_static_scalings(None)
    target = torch.where((ids < SPLIT).unsqueeze(-1), targets["math"], targets["code"])

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(args.steps):
        log_probs = torch.log_softmax(model(input_ids=ids).logits, -1)
        loss = torch.nn.functional.kl_div(log_probs, target, log_target=True, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    model.eval()
    sample = torch.tensor([[3, 7, 12, 61, 75, 88, 20, 33, 90, 64, 5, 71]])  # math, code, math, code, ...
    with torch.no_grad():
        model(input_ids=sample)
    mean = model.get_latest_scalings()[0].mean(dim=1)  # (seq, n_experts)
    routed = ["math" if m > c else "code" for m, c in mean.tolist()]
    wanted = ["math" if t < SPLIT else "code" for t in sample[0].tolist()]
    print(f"tokens routed to their expert: {sum(r == w for r, w in zip(routed, wanted))} of {len(wanted)}")
    labels = [f"{t} ({w})" for t, w in zip(sample[0].tolist(), wanted)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    peft_xlora.plot_scalings(model, args.out, tokens=labels, title="X-LoRA gate per token (token id, its domain)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
