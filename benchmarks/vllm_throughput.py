"""X-LoRA served by vLLM, beside everything it should be compared with, on the reference workload and on SmolLM2.

One run measures, on each workload, the same concurrent greedy requests (default 8 requests, prompt 64 random
tokens, 64 new tokens each), every method in the same process one after another:

- ``vllm_base``: vLLM serving the base model.
- ``vllm_pinned``: the plugin serving a pinned mixture: the dual-pass checkpoint exported with
  ``pin="uniform"`` (every layer at 1 / N, no classifier): one pass with the full stacked update of all experts, the
  floor for any mixture. (Recorded results before the pinned export measured a single-pass export whose static
  weights covered every layer, k = all layers, uniform: the same computation, which peft-xlora no longer builds.)
- ``vllm_single``: the plugin, single pass (static weights up to layer k, the gate on layer k's output after it).
- ``vllm_dual``: the plugin, dual pass (X-LoRA as published: a full scaling pass, then the main pass).
- ``vllm_lora``: vLLM's own LoRA serving one LoRA of the experts' total rank (N x r) on the same projections.
- ``hf_generate``: peft-xlora's cached `generate` of the dual-pass model, all requests as one batch.

Workloads: ``reference`` is the reference workload of benchmarks/cases.py (a random 8-layer Llama, hidden 512,
N = 8 random rank-16 experts on all seven projections, classifier depth 2 and width 256; single pass k = 4);
``smollm2`` is the demo's base model, SmolLM2-135M (30 layers, hidden 576), with the demo's expert shape (3 experts,
rank 8, all seven projections; random factors: speed does not depend on their values), classifier depth 2 and width
64, layerwise, single pass k = 20 as the demo trains it. It needs the demo's converted base model in its cache.

Targets (issue 23), in tokens per CPU-second: single >= 0.9 x pinned, single >= 1.7 x dual, dual >= 0.9 x pinned / 2.
Each method is timed `--repeats` times after one untimed run of the same workload; the medians are reported, with
the CPU time of this process (where the in-process engine runs: it does not count the time other processes hold
the cores, so it drifts less than wall time on a shared machine) beside the wall time.

Run it in the vLLM environment (scripts/vllm_env.sh prints its folder)::

    $(bash scripts/vllm_env.sh)/bin/python -m benchmarks.vllm_throughput            # CPU, float32
    python -m benchmarks.vllm_throughput --device cuda                               # GPU: bfloat16, CUDA graphs

vLLM's default compilation applies to every engine (on CPU: the model traced once and compiled by inductor; vLLM's own
LoRA forces eager mode on CPU). On CUDA the engines run with CUDA graphs (vLLM's default): the plugin's forward has no
`.item()`, `nonzero` or Python branch on tensor values. The CUDA run is written but has not been run
(scripts/vllm_gpu.sh).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from typing import Any

METHODS = ("vllm_base", "vllm_pinned", "vllm_single", "vllm_dual", "vllm_lora", "hf_generate")
WORKLOADS = ("reference", "smollm2")
TARGETS = {
    "single_over_pinned": 0.9,
    "single_over_dual": 1.7,
    "dual_over_half_pinned": 0.9,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for every method")
    p.add_argument("--eager", action="store_true", help="run every vLLM engine eagerly (no torch.compile)")
    p.add_argument("--skip", nargs="*", default=[], choices=METHODS)
    p.add_argument(
        "--smoke", action="store_true", help="a tiny workload and one repeat, to check that the script runs"
    )
    p.add_argument("--workdir", default=None, help="where models are written (default: a temporary folder)")
    p.add_argument("--out", default=None, help="JSON result (default: benchmarks/results/vllm-serving-<device>.json)")
    return p.parse_args(argv)


def _environment(args: argparse.Namespace) -> None:
    # Set before torch and vLLM are imported: thread counts and vLLM's CPU settings are read at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: one model at a time
    if args.device == "cpu":
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def _dtype(args: argparse.Namespace) -> str:
    return args.dtype or ("bfloat16" if args.device == "cuda" else "float32")


# ---------------------------------------------------------------------------------------------------- models


def _xlora_checkpoints(base_factory, experts: dict[str, str], root: str, options: dict, k_single: int):
    """Saves the dual-pass and single-pass checkpoints under `root` (the pinned export is the dual one, pinned)."""
    import torch
    from peft import get_peft_model

    import peft_xlora

    variants = {
        "dual": {"scaling_pass_layers": None},  # the whole model, as recorded in the result files
        "single": {"routing": "single_pass", "scaling_pass_layers": k_single},
    }
    paths = {}
    for name, extra in variants.items():
        torch.manual_seed(2)
        config = peft_xlora.XLoraConfig(
            task_type="CAUSAL_LM", adapters=experts, classifier_init="random", **options, **extra
        )
        model = get_peft_model(base_factory(), config).eval()
        paths[name] = os.path.join(root, f"xlora-{name}")
        peft_xlora.save_pretrained(model, paths[name])
        del model
    return paths


def _one_big_lora(base_factory, targets: list[str], rank: int, path: str) -> str:
    """One LoRA with the experts' total rank on the same projections: what vLLM's own LoRA serves."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    get_peft_model(base_factory(), config).save_pretrained(path)
    return path


def build_reference(args: argparse.Namespace, root: str) -> dict[str, Any]:
    """The reference workload's base model, LoRA and X-LoRA checkpoints, and their vLLM exports."""
    from benchmarks.cases import SMOKE, TARGETS, Workload, build_base, make_experts

    work = SMOKE if args.smoke else Workload()
    work.dtype, work.device = "float32", "cpu"  # built and saved on the CPU in float32; the engines cast and move
    if args.smoke:
        work.hidden_size, work.num_attention_heads, work.num_key_value_heads = 64, 2, 2  # vLLM's CPU head size >= 32
    n_experts = 2 if args.smoke else 8
    base = os.path.join(root, "base")
    build_base(work).save_pretrained(base)
    experts = make_experts(work, n_experts, os.path.join(root, "experts"))
    options = {"xlora_depth": work.xlora_depth, "xlora_size": work.xlora_size}
    n_layers = work.num_hidden_layers
    k = work.single_pass_layers or n_layers // 2
    checkpoints = _xlora_checkpoints(lambda: build_base(work), experts, root, options, k)
    lora = _one_big_lora(lambda: build_base(work), TARGETS, n_experts * work.rank, os.path.join(root, "lora-big"))
    info = {**work.to_dict(), "experts": n_experts, "single_pass_layers": k, "dual_scaling_pass_layers": None}
    return {"base": base, "lora": lora, "checkpoints": checkpoints, "vocab": work.vocab_size, "info": info}


def build_smollm2(args: argparse.Namespace, root: str) -> dict[str, Any]:
    """SmolLM2-135M (the demo's converted base model) with three random rank-8 experts of the demo's shape."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from peft_xlora.cli.demo.base import default_cache_dir, smollm_base
    from peft_xlora.cli.demo.settings import REAL

    base = str(smollm_base(default_cache_dir()))

    def factory():
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    lora = {k: v for k, v in REAL.lora.items() if k != "lora_dropout"}
    model = get_peft_model(factory(), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora))
    params = [p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]
    experts = {}
    for i, name in enumerate(("shakespeare", "codecs", "pydoc")):
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
        experts[name] = os.path.join(root, f"expert-{name}")
        model.save_pretrained(experts[name])
    del model
    n_layers = AutoConfig.from_pretrained(base).num_hidden_layers
    options = {"xlora_depth": REAL.router_depth, "xlora_size": REAL.router_size, "layerwise_scalings": True}
    k = REAL.scaling_pass_layers or n_layers // 2
    checkpoints = _xlora_checkpoints(factory, experts, root, options, k)
    big = _one_big_lora(factory, lora["target_modules"], 3 * lora["r"], os.path.join(root, "lora-big"))
    info = {"model": "SmolLM2-135M-Instruct", "experts": 3, **lora, **options, "single_pass_layers": k}
    return {"base": base, "lora": big, "checkpoints": checkpoints, "vocab": 49152, "info": info}


# ---------------------------------------------------------------------------------------------------- timing


def _prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (args.prompt,), generator=g).tolist() for _ in range(args.requests)]


def time_vllm(args: argparse.Namespace, model: str, prompts: list[list[int]], lora: str | None = None) -> dict:
    """Median time of generating all requests at once, after one untimed run of the same workload."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from peft_xlora.serving.vllm import register

    register()
    options: dict[str, Any] = {
        "model": model,
        "dtype": _dtype(args),
        "max_model_len": args.prompt + args.new_tokens + 16,
        "max_num_seqs": args.requests,
        "skip_tokenizer_init": True,
        "seed": 0,
        "enforce_eager": args.eager,
        "enable_prefix_caching": False,  # every repeat computes its prompts afresh
    }
    if lora is not None:
        with open(os.path.join(lora, "adapter_config.json"), encoding="utf-8") as f:
            rank = int(json.load(f)["r"])
        # vLLM accepts only some maximum ranks (1, 8, 16, 32, 64, ...): the smallest that holds this LoRA's.
        allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
        options.update(enable_lora=True, max_loras=1, max_lora_rank=min(r for r in allowed if r >= rank))
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


def time_hf_generate(args: argparse.Namespace, base: str, checkpoint: str, prompts: list[list[int]]) -> dict:
    """peft-xlora's cached `generate` of the dual-pass model, all requests in one batch (equal prompt lengths)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, _dtype(args))
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model = PeftModel.from_pretrained(base_model, checkpoint).eval().to(args.device)
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
        for _ in range(args.repeats):
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


def summarize(rows: dict[str, dict], key: str) -> dict[str, Any]:
    """The ratios of issue 23 (and the comparisons beside them) and whether the targets are met."""
    t = {name: row[key] for name, row in rows.items()}
    out: dict[str, Any] = {}

    def ratio(name: str, num: str, den: str, factor: float = 1.0) -> None:
        if {num, den} <= set(t):
            out[name] = t[num] / (t[den] * factor)
            if name in TARGETS:
                out[f"{name}_target_{TARGETS[name]}_met"] = out[name] >= TARGETS[name]

    ratio("single_over_pinned", "vllm_single", "vllm_pinned")
    ratio("single_over_dual", "vllm_single", "vllm_dual")
    ratio("dual_over_half_pinned", "vllm_dual", "vllm_pinned", 0.5)
    ratio("pinned_over_base", "vllm_pinned", "vllm_base")
    ratio("single_over_base", "vllm_single", "vllm_base")
    ratio("dual_over_base", "vllm_dual", "vllm_base")
    ratio("single_over_vllm_lora", "vllm_single", "vllm_lora")
    ratio("dual_over_hf_generate", "vllm_dual", "hf_generate")
    ratio("single_over_hf_generate", "vllm_single", "hf_generate")
    return out


def format_table(workload: str, rows: dict[str, dict], summary: dict[str, Any]) -> str:
    """A markdown table of one workload's measurements and ratios."""
    lines = [
        f"### {workload}",
        "| method | median CPU s | tokens / CPU-s | median wall s | tokens / s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['cpu_median_s']:.2f} | {row['tokens_per_cpu_s']:.1f} | {row['median_s']:.2f} | "
            f"{row['tokens_per_s']:.1f} |"
        )
    for label, part in summary.items():
        lines.append(f"\n{label}:")
        for key, value in part.items():
            lines.append(f"- {key}: {value:.3f}" if isinstance(value, float) else f"- {key}: {value}")
    return "\n".join(lines)


def run_workload(args: argparse.Namespace, workload: str, root: str) -> dict[str, Any]:
    """Builds one workload's models and times every method on it."""
    from peft_xlora.serving.vllm import export_vllm

    start = time.perf_counter()
    built = (build_reference if workload == "reference" else build_smollm2)(args, root)
    served = {
        name: export_vllm(path, os.path.join(root, f"served-{name}"), base_model=built["base"])
        for name, path in built["checkpoints"].items()
    }
    # The floor for any mixture: every layer at 1 / N in one pass, no classifier (`export_vllm(..., pin=...)`).
    served["pinned"] = export_vllm(
        built["checkpoints"]["dual"], os.path.join(root, "served-pinned"), base_model=built["base"], pin="uniform"
    )
    build_s = time.perf_counter() - start
    prompts = _prompts(args, built["vocab"])
    measured = {
        "vllm_base": lambda: time_vllm(args, built["base"], prompts),
        "vllm_pinned": lambda: time_vllm(args, served["pinned"], prompts),
        "vllm_single": lambda: time_vllm(args, served["single"], prompts),
        "vllm_dual": lambda: time_vllm(args, served["dual"], prompts),
        "vllm_lora": lambda: time_vllm(args, built["base"], prompts, lora=built["lora"]),
        "hf_generate": lambda: time_hf_generate(args, built["base"], built["checkpoints"]["dual"], prompts),
    }
    rows: dict[str, dict] = {}
    for name, run in measured.items():
        if name not in args.skip:
            rows[name] = run()
            print(f"{workload} {name}: {rows[name]['tokens_per_cpu_s']:.1f} tokens/CPU-s", flush=True)
    summary = {"CPU time": summarize(rows, "tokens_per_cpu_s"), "wall clock": summarize(rows, "tokens_per_s")}
    return {"workload": built["info"], "build_s": build_s, "results": rows, "summary": summary}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs every workload, writes the result file (benchmarks/provenance.py schema) and prints the tables."""
    args = parse_args(argv)
    _environment(args)
    if args.smoke:
        args.repeats, args.requests, args.new_tokens, args.workloads = 1, 2, 4, ["reference"]
    import torch

    from benchmarks.provenance import provenance, write_result

    torch.set_num_threads(args.threads)
    block = provenance()
    payload: dict[str, Any] = {
        "requests": args.requests,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "dtype": _dtype(args),
        "device": args.device,
        "eager": args.eager,
        "targets": TARGETS,
        "workloads": {},
    }
    with tempfile.TemporaryDirectory(prefix="xlora-vllm-bench-") as tmp:
        for workload in args.workloads:
            root = os.path.join(args.workdir or tmp, workload)
            payload["workloads"][workload] = run_workload(args, workload, root)
            print(
                format_table(
                    workload, payload["workloads"][workload]["results"], payload["workloads"][workload]["summary"]
                )
            )
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"vllm-serving-{args.device}.json")
    if not args.smoke:
        write_result(out, payload, block)
    return payload


if __name__ == "__main__":
    main()
