"""What the router regularisers change, on a small task: expert usage, routing entropy and loss after training.

A tiny random Llama (head scaled up so that its next-token distributions are peaked) and three random LoRA experts.
The training text is sampled from the model pinned to "math" (3/4 of the sequences) and to "code" (1/4); "poetry" is
never the source. The gate is trained with and without the regularisers and the routing is measured on the training
text. Runs in about a minute on a laptop CPU with nothing downloaded: `python examples/router_regularisers.py`;
`--result FILE` also keeps the table as a result file with provenance (`benchmarks/provenance.py`), which
docs/training.md is generated from.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_xlora
from peft_xlora.core.regularisers import router_losses

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
        model.lm_head.weight.mul_(20.0)  # peaked next-token distributions: the experts' differences show in the loss
    return model


def make_experts(root: Path) -> dict[str, str]:
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


def build(experts: dict[str, str], **coefs: float):
    torch.manual_seed(0)
    config = peft_xlora.XLoraConfig(
        task_type="CAUSAL_LM", adapters=experts, xlora_depth=2, xlora_size=32, xlora_dropout_p=0.0, **coefs
    )
    return get_peft_model(tiny_llama(), config)


def sample(model, expert: str, n: int, seed: int) -> torch.Tensor:
    model.set_static_scalings({expert: 1.0})
    torch.manual_seed(seed)
    prompts = torch.randint(0, VOCAB, (n, 1))
    with torch.no_grad():
        out = model.generate(input_ids=prompts, do_sample=True, top_k=0, max_new_tokens=23, min_new_tokens=23)
    model.set_static_scalings(None)
    return out


def run(experts, data, steps: int, **coefs: float) -> dict[str, float]:
    model = build(experts, **coefs)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        batch = data[(step * 8) % len(data) :][:8]
        loss = model(input_ids=batch, labels=batch).loss  # includes the regularisers when they are on
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    seen = {}
    model.base_model.xlora_classifier.register_forward_hook(lambda m, a, o: seen.update(logits=o))
    with torch.no_grad():
        lm_loss = model(input_ids=data, labels=data).loss.item() - (
            0.0 if not any(coefs.values()) else model(input_ids=data).router_loss.item()
        )
        terms = router_losses(seen["logits"])
        top1 = seen["logits"].argmax(-1).flatten()
        usage = torch.bincount(top1, minlength=len(experts)).float() / top1.numel()
        mean_scalings = model.get_latest_scalings().mean(dim=(0, 1, 2))
    return {
        "lm_loss": lm_loss,
        "load_balancing": terms["load_balancing"].item(),
        "entropy": terms["entropy"].item(),
        **{f"top1 {name}": u for name, u in zip(experts, usage.tolist())},
        **{f"mean s {name}": s for name, s in zip(experts, mean_scalings.tolist())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--result", type=Path, help="also write the table to this result file")
    args = parser.parse_args()
    if args.result:  # the repository's result-file schema, from its benchmarks/ folder
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks.provenance import provenance, write_result

        block = provenance("python examples/router_regularisers.py " + shlex.join(sys.argv[1:]))
    root = Path(tempfile.mkdtemp(prefix="xlora-regularisers-"))
    experts = make_experts(root)
    teacher = build(experts)
    data = torch.cat([sample(teacher, "math", 24, 1), sample(teacher, "code", 8, 2)])
    data = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))]
    settings = {
        "none": {},
        "load balancing 0.1": {"router_load_balancing_coef": 0.1},
        "load balancing 1.0": {"router_load_balancing_coef": 1.0},
        "entropy 0.1": {"router_entropy_coef": 0.1},
    }
    rows = {label: run(experts, data, args.steps, **coefs) for label, coefs in settings.items()}
    columns = list(next(iter(rows.values())))
    print("| setting | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    if args.result:
        payload = {"steps": args.steps, "rows": [{"setting": k, **v} for k, v in rows.items()]}
        write_result(str(args.result), payload, block)


if __name__ == "__main__":
    main()
