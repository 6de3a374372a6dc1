"""Measures what gradient checkpointing saves when training the X-LoRA gate: activation memory, peak RSS, step time.

Each mode runs in a fresh process on a random Llama (6 layers, hidden 384) with three LoRA experts, batch 2 x 512
tokens. "Saved activations" counts the bytes autograd keeps for backward during the forward (distinct storages, via
`torch.autograd.graph.saved_tensors_hooks`); "peak RSS" is the process's peak resident memory during one training
step (weights included: the same in every mode); time is the median of 3 steps. CPU only; nothing is downloaded.

Usage: `python examples/measure_checkpointing.py [--result FILE]` (prints a Markdown table; `--result` also keeps it
as a result file with provenance, `benchmarks/provenance.py`, which docs/training.md is generated from).
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_xlora

MODES = ["none", "non_reentrant", "reentrant"]
# The test suite sets PEFT_XLORA_EXAMPLE_SMOKE=1: a tiny model and batch, only to check that the script runs.
SMOKE = os.environ.get("PEFT_XLORA_EXAMPLE_SMOKE") == "1"
HIDDEN, LAYERS, SEQ = (32, 2, 16) if SMOKE else (384, 6, 512)


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=HIDDEN,
        intermediate_size=3 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config)


def make_experts(root: Path) -> dict[str, str]:
    experts = {}
    for seed, name in enumerate(["a", "b", "c"]):
        lora = get_peft_model(
            base_model(), LoraConfig(r=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
        )
        torch.manual_seed(seed)
        lora.save_pretrained(root / name)
        experts[name] = str(root / name)
    return experts


def measure(mode: str, experts: dict[str, str]) -> dict[str, float]:
    torch.manual_seed(0)
    config = peft_xlora.XLoraConfig(task_type="CAUSAL_LM", adapters=experts, xlora_depth=2, xlora_size=256)
    model = get_peft_model(base_model(), config)
    if mode != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    model.train()
    ids = torch.randint(0, 1000, (2, SEQ), generator=torch.Generator().manual_seed(0))

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    saved = sum(storages.values())
    loss.backward()
    model.zero_grad(set_to_none=True)
    del loss

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB; the peak so far, after a warm-up step
    times, cpu_times = [], []
    for _ in range(3):
        start, cpu = time.perf_counter(), time.process_time()
        model(input_ids=ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
        model.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "saved_mb": saved / 2**20,
        "peak_rss_mb": peak / 1024,
        "rss_growth_mb": (peak - rss_before) / 1024,
        "step_s": statistics.median(times),
        "step_cpu_s": statistics.median(cpu_times),
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in MODES:  # child: one mode
        print(json.dumps(measure(sys.argv[1], json.loads(sys.argv[2]))))
        return
    result = None
    if sys.argv[1:2] == ["--result"] and len(sys.argv) == 3:  # the repository's result-file schema
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks.provenance import provenance, write_result

        result, block = sys.argv[2], provenance("python examples/measure_checkpointing.py " + shlex.join(sys.argv[1:]))
    root = Path(tempfile.mkdtemp(prefix="xlora-gc-"))
    experts = make_experts(root)
    rows = {}
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, __file__, mode, json.dumps(experts)], capture_output=True, text=True, check=True
        )
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print("| checkpointing | saved activations (MB) | peak RSS (MB) | step time (s) | step CPU time (s) |")
    print("| --- | --- | --- | --- | --- |")
    for mode, r in rows.items():
        print(f"| {mode} | {r['saved_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['step_s']:.2f} | {r['step_cpu_s']:.2f} |")
    if result:
        payload = {"hidden": HIDDEN, "layers": LAYERS, "seq": SEQ, "smoke": SMOKE, "rows": rows}
        write_result(result, payload, block)


if __name__ == "__main__":
    main()
