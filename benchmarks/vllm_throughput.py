"""Throughput of X-LoRA served by vLLM, beside vLLM's base model, vLLM's own LoRA and peft-xlora's HF `generate`.

One run, one workload (the reference workload of benchmarks/cases.py: a random 8-layer Llama, hidden 512, N random
rank-16 experts on all seven projections), four measurements of the same 16 concurrent greedy requests (prompt 64
random tokens, 128 new tokens each):

- ``vllm_base``: vLLM serving the base model.
- ``vllm_lora``: vLLM serving the base model with one LoRA of rank N * 16 on the same projections (vLLM's own LoRA):
  the cost of the experts' arithmetic at its best, one adapter for every token.
- ``vllm_xlora``: vLLM serving the X-LoRA export through the peft-xlora plugin.
- ``hf_generate``: peft-xlora's cached `generate` of the same X-LoRA model, the 16 requests as one batch.

A dual-pass mixture must at least run the base model once (the scaling pass) and the base model with all experts'
ranks once (the main pass), so its throughput floor inside vLLM is 1 / (1/base + 1/lora). Targets (issue 17):
``vllm_xlora >= 0.85 x floor`` and ``vllm_xlora >= 3 x hf_generate``.

Run it in the vLLM environment (scripts/vllm_env.sh prints its folder)::

    $(bash scripts/vllm_env.sh)/bin/python -m benchmarks.vllm_throughput            # CPU, float32
    python -m benchmarks.vllm_throughput --device cuda                               # GPU: bfloat16, CUDA graphs

On CUDA the vLLM engines run with CUDA graphs and torch.compile (vLLM's defaults, `enforce_eager=False`): the plugin's
forward has no `.item()`, `nonzero` or Python branch on tensor values, so it is captured like the base model's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--experts", type=int, default=8, help="N, the number of rank-16 experts")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per vLLM engine (the median is reported)")
    p.add_argument("--hf-repeats", type=int, default=1, help="timed runs of HF generate (slow on CPU)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for every method")
    p.add_argument("--eager", action="store_true", help="run every vLLM engine eagerly (no torch.compile)")
    p.add_argument("--skip", nargs="*", default=[], choices=["vllm_base", "vllm_lora", "vllm_xlora", "hf_generate"])
    p.add_argument("--smoke", action="store_true", help="a tiny workload, to check that the script runs")
    p.add_argument("--workdir", default=None, help="where models are written (default: a temporary folder)")
    p.add_argument(
        "--out", default=None, help="JSON result (default: benchmarks/results/vllm-throughput-<device>.json)"
    )
    return p.parse_args(argv)


def _environment(args: argparse.Namespace) -> None:
    # Set before torch and vLLM are imported: thread counts and vLLM's CPU settings are read at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: one model at a time
    if args.device == "cpu":
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def _workload(args: argparse.Namespace):
    from benchmarks.cases import SMOKE, Workload

    work = SMOKE if args.smoke else Workload()
    work.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    work.device = "cpu"  # models are built and saved on the CPU; the engines move them
    if args.smoke:
        work.hidden_size, work.num_attention_heads, work.num_key_value_heads = 64, 2, 2  # vLLM's CPU head size >= 32
    return work


def build_models(args: argparse.Namespace, work, root: str) -> dict[str, str]:
    """Writes the base model, the rank N*16 LoRA, and the X-LoRA checkpoint and its vLLM export under `root`."""
    import torch
    from peft import LoraConfig, get_peft_model

    import peft_xlora
    from benchmarks.cases import TARGETS, build_base, make_experts
    from peft_xlora.serving.vllm import export_vllm

    paths = {"base": os.path.join(root, "base"), "lora": os.path.join(root, "lora-rank-big")}
    build_base(work).save_pretrained(paths["base"])
    experts = make_experts(work, args.experts, os.path.join(root, "experts"))

    # One LoRA with all experts' ranks: what vLLM's own LoRA computes at the same total rank.
    rank = args.experts * work.rank
    torch.manual_seed(1)
    lora = get_peft_model(
        build_base(work),
        LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    lora.save_pretrained(paths["lora"])

    torch.manual_seed(2)
    config = peft_xlora.XLoraConfig(
        task_type="CAUSAL_LM",
        adapters=experts,
        xlora_depth=work.xlora_depth,
        xlora_size=work.xlora_size,
        classifier_init="random",
    )
    model = get_peft_model(build_base(work), config).eval()
    paths["checkpoint"] = os.path.join(root, "xlora")
    peft_xlora.save_pretrained(model, paths["checkpoint"])
    paths["served"] = export_vllm(paths["checkpoint"], os.path.join(root, "xlora-vllm"), base_model=paths["base"])
    return paths


def _prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (args.prompt,), generator=g).tolist() for _ in range(args.requests)]


def time_vllm(args: argparse.Namespace, model: str, prompts: list[list[int]], lora: str | None = None) -> dict:
    """Median wall time of generating all requests at once, after one untimed run of the same workload."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from peft_xlora.serving.vllm import register

    register()
    options: dict[str, Any] = {
        "model": model,
        "dtype": _workload_dtype(args),
        "max_model_len": args.prompt + args.new_tokens + 16,
        "max_num_seqs": args.requests,
        "skip_tokenizer_init": True,
        "seed": 0,
        "enforce_eager": args.eager,
    }
    if lora is not None:
        options.update(enable_lora=True, max_loras=1, max_lora_rank=_lora_rank(lora))
    start = time.perf_counter()
    llm = LLM(**options)
    load_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
    request = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    lora_request = LoRARequest("rank-big", 1, lora) if lora is not None else None
    times, cpu_times = [], []
    try:
        for i in range(args.repeats + 1):  # the first run warms up (compilation, CUDA graphs, allocator)
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs = llm.generate(request, params, lora_request=lora_request, use_tqdm=False)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outputs)
            if i > 0:
                times.append(elapsed)
                cpu_times.append(cpu)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return _row(args, times, cpu_times, load_s=load_s)


def _lora_rank(path: str) -> int:
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
        return int(json.load(f)["r"])


def _workload_dtype(args: argparse.Namespace) -> str:
    return args.dtype or ("bfloat16" if args.device == "cuda" else "float32")


def time_hf_generate(args: argparse.Namespace, work, paths: dict[str, str], prompts: list[list[int]]) -> dict:
    """peft-xlora's cached `generate`, all requests in one batch (equal prompt lengths: no padding)."""
    import torch
    from peft import PeftModel

    from benchmarks.cases import build_base

    torch.set_num_threads(args.threads)
    model = PeftModel.from_pretrained(build_base(work), paths["checkpoint"]).eval().to(args.device)
    ids = torch.tensor(prompts, device=args.device)
    kwargs = {
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
    }
    times, cpu_times = [], []
    with torch.no_grad():
        model.generate(ids[:, :8], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        for _ in range(args.hf_repeats):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            model.generate(ids, **kwargs)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return _row(args, times, cpu_times)


def _row(args: argparse.Namespace, times: list[float], cpu_times: list[float], **extra: Any) -> dict:
    """Wall-clock and CPU time (all threads of this process, where the in-process engine runs) of the timed runs.

    On a shared machine, CPU time drifts less than wall time: it does not count the time other processes hold the
    cores. Ratios are given for both.
    """
    median, cpu_median = statistics.median(times), statistics.median(cpu_times)
    tokens = args.requests * args.new_tokens
    return {
        "median_s": median,
        "times_s": times,
        "tokens_per_s": tokens / median,
        "cpu_median_s": cpu_median,
        "cpu_times_s": cpu_times,
        "tokens_per_cpu_s": tokens / cpu_median,
        **extra,
    }


def summarize(rows: dict[str, dict], key: str = "tokens_per_s") -> dict[str, Any]:
    """The ratios of issue 17 and whether they meet its targets, from wall-clock (or CPU-time) throughput."""
    out: dict[str, Any] = {}
    tput = {name: row[key] for name, row in rows.items()}
    if {"vllm_base", "vllm_lora"} <= set(tput):
        out["dual_pass_floor_tokens_per_s"] = 1 / (1 / tput["vllm_base"] + 1 / tput["vllm_lora"])
    if "vllm_xlora" in tput and "dual_pass_floor_tokens_per_s" in out:
        out["xlora_over_floor"] = tput["vllm_xlora"] / out["dual_pass_floor_tokens_per_s"]
        out["xlora_over_floor_target_0.85_met"] = out["xlora_over_floor"] >= 0.85
    if {"vllm_xlora", "hf_generate"} <= set(tput):
        out["xlora_over_hf_generate"] = tput["vllm_xlora"] / tput["hf_generate"]
        out["xlora_over_hf_generate_target_3_met"] = out["xlora_over_hf_generate"] >= 3
    if {"vllm_xlora", "vllm_base"} <= set(tput):
        out["xlora_over_base"] = tput["vllm_xlora"] / tput["vllm_base"]
    return out


def machine(args: argparse.Namespace) -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch
    import transformers
    import vllm

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vllm": vllm.__version__,
        "device": args.device,
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(rows: dict[str, dict], summary: dict[str, Any]) -> str:
    """A markdown table of the four measurements and the ratios."""
    lines = [
        "| method | median wall s | tokens/s | median CPU s | tokens/CPU-s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['median_s']:.2f} | {row['tokens_per_s']:.1f} | {row['cpu_median_s']:.2f} | "
            f"{row['tokens_per_cpu_s']:.1f} |"
        )
    for label, part in summary.items():
        lines.append(f"\n{label}:")
        for key, value in part.items():
            lines.append(f"- {key}: {value:.3f}" if isinstance(value, float) else f"- {key}: {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Builds the models, runs the four measurements, writes the JSON record and prints the table."""
    args = parse_args(argv)
    _environment(args)
    work = _workload(args)
    with tempfile.TemporaryDirectory(prefix="xlora-vllm-bench-") as tmp:
        root = args.workdir or tmp
        start = time.perf_counter()
        paths = build_models(args, work, root)
        build_s = time.perf_counter() - start
        prompts = _prompts(args, work.vocab_size)
        rows: dict[str, dict] = {}
        measured = {
            "vllm_base": lambda: time_vllm(args, paths["base"], prompts),
            "vllm_lora": lambda: time_vllm(args, paths["base"], prompts, lora=paths["lora"]),
            "vllm_xlora": lambda: time_vllm(args, paths["served"], prompts),
            "hf_generate": lambda: time_hf_generate(args, work, paths, prompts),
        }
        for name, run in measured.items():
            if name not in args.skip:
                rows[name] = run()
                print(f"{name}: {rows[name]['tokens_per_s']:.1f} tokens/s", flush=True)
    summary = {"wall clock": summarize(rows), "CPU time": summarize(rows, "tokens_per_cpu_s")}
    result = {
        "workload": {**work.to_dict(), "experts": args.experts, "requests": args.requests, "prompt": args.prompt,
                     "new_tokens": args.new_tokens, "eager": args.eager},
        "machine": machine(args),
        "build_s": build_s,
        "results": rows,
        "summary": summary,
    }  # fmt: skip
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"vllm-throughput-{args.device}.json")
    if not args.smoke:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    print(format_table(rows, summary))
    return result


if __name__ == "__main__":
    main()
