"""The cheaper scaling pass (`scaling_pass_layers=k`): prefill time and its effect on a routing task.

Usage: `python -m benchmarks.scaling_pass_layers [--n 8] [--reps 5] [--threads 1] [--out FILE]`.

Speed: prefill (batch 1 x 512, no grad) of the reference workload with N experts, for k = all, 4, 2, 1 scaling-pass
layers, repetitions interleaved; medians of wall-clock and of CPU time (`time.process_time`, steadier on a shared
machine) and their ratios to k = all.
Quality: on the same base, the gate is trained to imitate the model pinned to one expert (KL to its next-token
distribution, 40 Adam steps on 4 x 64 random tokens); the final KL and the share of the gate on that expert are
reported per k. Random weights make this a routing test, not a language test.

Writes `benchmarks/results/scaling-pass-layers.json` (`--out`) with the provenance block of `benchmarks/provenance.py`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from peft import get_peft_model

import peft_xlora

from .cases import Workload, build_base, make_experts
from .provenance import module_command, provenance, write_result

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scaling-pass-layers.json")


def build(work: Workload, experts: dict[str, str], k: int | None) -> torch.nn.Module:
    config = peft_xlora.XLoraConfig(
        task_type="CAUSAL_LM",
        adapters=experts,
        xlora_depth=work.xlora_depth,
        xlora_size=work.xlora_size,
        scaling_pass_layers=k,
        xlora_dropout_p=0.0,
    )
    return get_peft_model(build_base(work), config).eval()


def time_prefill(models: dict, ids: torch.Tensor, reps: int) -> dict[int | None, dict[str, list[float]]]:
    """Wall and CPU seconds of every repetition, per k; repetitions interleaved across k."""
    times = {k: {"wall": [], "cpu": []} for k in models}
    with torch.no_grad():
        for model in models.values():
            model(input_ids=ids)  # warm-up
        for _ in range(reps):
            for k, model in models.items():
                wall, cpu = time.perf_counter(), time.process_time()
                model(input_ids=ids)
                times[k]["wall"].append(time.perf_counter() - wall)
                times[k]["cpu"].append(time.process_time() - cpu)
    return times


def routing_task(model: torch.nn.Module, experts: list[str], target_expert: int, vocab: int) -> tuple[float, float]:
    ids = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(0))
    model.set_static_scalings({experts[target_expert]: 1.0})
    with torch.no_grad():
        target = torch.softmax(model(input_ids=ids).logits, -1)
    model.set_static_scalings(None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(40):
        loss = torch.nn.functional.kl_div(
            torch.log_softmax(model(input_ids=ids).logits, -1), target, reduction="batchmean"
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss = torch.nn.functional.kl_div(
            torch.log_softmax(model(input_ids=ids).logits, -1), target, reduction="batchmean"
        )
    share = model.get_latest_scalings()[..., target_expert].mean().item()
    return loss.item(), share


def main(argv: list[str] | None = None) -> dict:
    """Runs both measurements, prints the table and writes the result file; returns its payload."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ks", type=int, nargs="+", default=[0, 4, 2, 1], help="0 means all layers")
    p.add_argument("--smoke", action="store_true", help="tiny sizes")
    p.add_argument("--out", default=DEFAULT_OUT, help="the result file (default: %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    block = provenance(module_command("benchmarks.scaling_pass_layers", argv))
    work = Workload()
    if args.smoke:
        work = Workload(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            xlora_size=16,
            prefill_seq=16,
        )
    with tempfile.TemporaryDirectory() as root:
        experts = make_experts(work, args.n, root)
        ks = [k or None for k in args.ks]
        models = {k: build(work, experts, k) for k in ks}
        ids = torch.randint(0, work.vocab_size, (work.prefill_batch, work.prefill_seq))
        times = time_prefill(models, ids, args.reps)
        del models
        wall = {k: statistics.median(t["wall"]) for k, t in times.items()}
        cpu = {k: statistics.median(t["cpu"]) for k, t in times.items()}
        print(
            f"prefill, N={args.n}, {work.num_hidden_layers} layers, batch 1 x {work.prefill_seq}, "
            f"{args.threads} threads, median of {args.reps}"
        )
        print("| scaling_pass_layers | median s | CPU s | CPU vs all layers | final KL | gate share on target |")
        print("|---|---|---|---|---|---|")
        rows = []
        for k in ks:
            train_model = build(work, experts, k).train()
            kl, share = routing_task(train_model, list(experts), 1, work.vocab_size)
            label = "all" if k is None else str(k)
            rows.append(
                {
                    "layers": label,
                    "median_s": wall[k],
                    "cpu_median_s": cpu[k],
                    "times_s": times[k]["wall"],
                    "cpu_times_s": times[k]["cpu"],
                    "cpu_vs_all": cpu[k] / cpu[None],
                    "wall_vs_all": wall[k] / wall[None],
                    "final_kl": kl,
                    "target_share": share,
                }
            )
            print(f"| {label} | {wall[k]:.3f} | {cpu[k]:.3f} | {cpu[k] / cpu[None]:.2f}x | {kl:.4f} | {share:.3f} |")
    payload = {"workload": work.to_dict(), "n": args.n, "reps": args.reps, "smoke": args.smoke, "rows": rows}
    write_result(args.out, payload, block)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
