"""Sparse top-k in the vLLM plugin: which trace-safe way to compute only each token's k chosen experts, and its gain.

Part 1 (``kernels``) times, for one projection of `hidden -> hidden` with N experts of rank r and top-k = 2, the
update added to the projection's output by six ways of computing it, side by side in one run (CPU-time medians of
`--repeats`, 1 thread, the methods interleaved), after checking that each equals the dense one:

- ``dense``: the plugin's dense mixture (`ops.StackedLora`): every expert, the unchosen at weight 0; two matmuls of
  inner size N * r.
- ``gather``: per token, its k experts' A and B factors gathered ((T, k * r, in) and (T, k * r, out)) and two batched
  matrix-vector products (`ops.gathered_update`). Fixed shapes, no host sync: the plugin's way off the CPU.
- ``dense_down``: the down projection of every expert as one matmul (x A_cat^T, (T, N * r)), then the k chosen
  experts' columns of it and their gathered B factors: half the dense work, half the copies.
- ``grouped_mm``: the (token, expert) pairs sorted by expert, the inputs gathered in that order, and torch's grouped
  GEMM (`torch._grouped_mm`, the group offsets as data) over the stacked factors, then an index-add back to the
  tokens: fixed shapes, but torch 2.13's shape function for tracing accepts bfloat16 only.
- ``grouped``: the same sort, then two plain matmuls per chosen expert, the group sizes read on the host
  (`ops.grouped_update`).
- ``plugin``: what the plugin runs on CPU, `ops.topk_lora_update`: one opaque custom op for vLLM's trace, which
  runs ``gather`` for at most 16 (token, expert) pairs and ``grouped`` for more.

Part 2 (``engine``, `--engine`): tokens per CPU-second of a real vLLM engine (in-process, traced as vLLM does by
default on CPU but the trace run as is, not compiled by inductor; 1 thread, float32) serving a tiny random Llama
(hidden 512, 4 layers) with N = 32 and 64 experts of rank 16 on all seven projections, top-2, dual pass, exported
once with ``topk_compute="dense"`` and once with ``"sparse"``: the same concurrent greedy requests, whose
generations are compared.

Run from the repository root (part 2 in the vLLM environment, `scripts/vllm_env.sh`)::

    python -m benchmarks.vllm_sparse_topk                       # part 1 only
    $(bash scripts/vllm_env.sh)/bin/python -m benchmarks.vllm_sparse_topk --engine   # both

The result goes to benchmarks/results/vllm-sparse-topk-cpu.json, with only what this run measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "vllm-sparse-topk-cpu.json")
METHODS = ("dense", "gather", "dense_down", "grouped_mm", "grouped", "plugin")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[576, 2048])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512])
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per method (the median is reported)")
    p.add_argument("--min-time", type=float, default=0.05, help="CPU seconds each repeat runs at least")
    p.add_argument("--engine", action="store_true", help="also part 2 (needs vLLM)")
    p.add_argument("--engine-experts", type=int, nargs="+", default=[32, 64])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--engine-repeats", type=int, default=3)
    p.add_argument("--skip-kernels", action="store_true", help="part 2 only")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat: checks that the script runs")
    p.add_argument("--out", default=RESULT)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- part 1


def _problem(hidden: int, rank: int, n: int, k: int, tokens: int, seed: int = 0) -> dict[str, Any]:
    """Random factors of N experts on one projection, inputs, and a top-k routing (softmax over the kept)."""
    import torch

    from peft_xlora.core.classifier import gate_and_choose
    from peft_xlora.serving.vllm.ops import Block, Partition, SparseLora, StackedLora

    g = torch.Generator().manual_seed(seed)
    blocks = [Block(f"m.{e}", "m", e, rank, 1.0, e, [0], [hidden]) for e in range(n)]
    stack = StackedLora(hidden, (0, hidden), [Partition(0, hidden, (0, hidden))], blocks, torch.float32)
    for e in range(n):
        a = torch.randn(rank, hidden, generator=g) / hidden**0.5
        b = torch.randn(hidden, rank, generator=g) / rank**0.5
        stack.load(f"m.{e}", a, b)
    stack.fold_scales()
    sparse = SparseLora(stack, n)
    x = torch.randn(tokens, hidden, generator=g)
    scalings, (chosen, weights) = gate_and_choose(torch.randn(tokens, 1, n, generator=g), top_k=k, softmax_topk=True)
    return {
        "stack": stack,
        "A_cat": stack.A,  # (N * r, in)
        "A": sparse.A0,  # (N, r, in)
        "B": sparse.B0,  # (N, r, out)
        "x": x,
        "rank_weights": scalings.flatten(1).index_select(1, stack.scaling_index),  # (T, N * r)
        "chosen": chosen[:, 0],  # (T, k)
        "weights": weights[:, 0],  # (T, k)
        "out": torch.zeros(tokens, hidden),
    }


def _dense(p: dict[str, Any]):
    stack = p["stack"]
    return stack.add_update(p["out"].clone(), p["x"], p["rank_weights"], stack.own_B())


def _gather(p: dict[str, Any]):
    from peft_xlora.serving.vllm.ops import gathered_update

    return p["out"] + gathered_update(p["x"], p["A"], p["B"], p["chosen"], p["weights"])


def _dense_down(p: dict[str, Any]):
    import torch

    x, A_cat, B, chosen = p["x"], p["A_cat"], p["B"], p["chosen"]
    n, rank, out_features = B.shape
    tokens, k = chosen.shape
    z = (x @ A_cat.T).view(tokens, n, rank)  # (T, N, r): every expert's down projection
    z = z.gather(1, chosen.unsqueeze(-1).expand(tokens, k, rank)) * p["weights"].unsqueeze(-1)  # (T, k, r)
    b = B.index_select(0, chosen.reshape(-1)).view(tokens, k * rank, out_features)  # (T, k * r, out)
    return p["out"] + torch.bmm(z.view(tokens, 1, k * rank), b).squeeze(1)


def _grouped_mm(p: dict[str, Any]):
    import torch

    x, A, B, chosen = p["x"], p["A"], p["B"], p["chosen"]
    n, k = A.shape[0], chosen.shape[1]
    expert = chosen.reshape(-1)  # (T * k,)
    order = torch.argsort(expert, stable=True)  # (T * k,): pairs grouped by expert
    token = order // k
    ends = (expert.unsqueeze(-1) < torch.arange(1, n + 1)).sum(0).to(torch.int32)  # (N,) cumulative group ends
    xs = x.index_select(0, token)  # (T * k, in)
    z = torch._grouped_mm(xs, A.transpose(1, 2), offs=ends)  # (T * k, r)
    z = z * p["weights"].reshape(-1)[order].unsqueeze(-1)
    y = torch._grouped_mm(z, B, offs=ends)  # (T * k, out)
    return p["out"].index_add(0, token, y)


def _grouped(p: dict[str, Any]):
    from peft_xlora.serving.vllm.ops import grouped_update

    return p["out"] + grouped_update(p["x"], p["A"], p["B"], p["chosen"], p["weights"])


def _plugin(p: dict[str, Any]):
    from peft_xlora.serving.vllm.ops import topk_lora_update

    return p["out"] + topk_lora_update(p["x"], p["A"], p["B"], p["chosen"], p["weights"])


_FUNCTIONS = {
    "dense": _dense,
    "gather": _gather,
    "dense_down": _dense_down,
    "grouped_mm": _grouped_mm,
    "grouped": _grouped,
    "plugin": _plugin,
}


def _cpu_time(fn, min_time: float) -> float:
    """CPU seconds per call: calls repeated until `min_time` has passed, after one warm-up call."""
    fn()
    calls, start = 0, time.process_time()
    while True:
        fn()
        calls += 1
        spent = time.process_time() - start
        if spent >= min_time:
            return spent / calls


def run_kernels(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Part 1: every shape of the grid, every method, side by side."""
    import torch

    rows = []
    for hidden in args.hidden:
        for rank in args.ranks:
            for n in args.experts:
                for tokens in args.tokens:
                    p = _problem(hidden, rank, n, args.k, tokens)
                    reference = _dense(p)
                    for method in METHODS[1:]:
                        torch.testing.assert_close(_FUNCTIONS[method](p), reference, rtol=1e-4, atol=1e-4)
                    times: dict[str, list[float]] = {m: [] for m in METHODS}
                    for _ in range(args.repeats):  # interleaved, so a change of load hits every method alike
                        for method in METHODS:
                            times[method].append(_cpu_time(lambda m=method, p=p: _FUNCTIONS[m](p), args.min_time))
                    median = {m: statistics.median(t) for m, t in times.items()}
                    row = {
                        "hidden": hidden,
                        "rank": rank,
                        "experts": n,
                        "k": args.k,
                        "tokens": tokens,
                        "cpu_s_median": median,
                        "cpu_s": times,
                        "over_dense": {m: median[m] / median["dense"] for m in METHODS},
                    }
                    rows.append(row)
                    print(
                        f"hidden {hidden:5d} r {rank:2d} N {n:3d} T {tokens:4d}: "
                        + "  ".join(f"{m} {median[m] * 1e3:8.3f} ms" for m in METHODS),
                        flush=True,
                    )
    return rows


# ---------------------------------------------------------------------------------------------------- part 2


def run_engine(args: argparse.Namespace, root: str, n_experts: int) -> dict[str, Any]:
    """Part 2: tokens per CPU-second of the dense and the sparse export of one X-LoRA model, same requests."""
    import torch
    from peft import get_peft_model

    import peft_xlora
    from benchmarks.cases import TARGETS, Workload, build_base, make_experts
    from peft_xlora.serving.vllm import export_vllm, register

    work = Workload()
    work.dtype, work.device = "float32", "cpu"
    n_experts = 2 if args.smoke else n_experts
    if args.smoke:
        work.hidden_size, work.num_attention_heads, work.num_key_value_heads = 64, 2, 2
        work.num_hidden_layers, work.intermediate_size = 2, 128
    else:
        work.num_hidden_layers = 4
    base = os.path.join(root, "base")
    build_base(work).save_pretrained(base)
    experts = make_experts(work, n_experts, os.path.join(root, "experts"))
    k = 1 if args.smoke else args.k
    served = {}
    for mode in ("dense", "sparse"):
        torch.manual_seed(2)
        config = peft_xlora.XLoraConfig(
            task_type="CAUSAL_LM",
            adapters=experts,
            classifier_init="random",
            xlora_depth=work.xlora_depth,
            xlora_size=work.xlora_size,
            top_k_lora=k,
            topk_compute=mode,
            scaling_pass_layers=None,  # the whole model in the scaling pass, as recorded in the result file
        )
        model = get_peft_model(build_base(work), config).eval()
        checkpoint = os.path.join(root, f"xlora-{mode}")
        peft_xlora.save_pretrained(model, checkpoint)
        del model
        served[mode] = export_vllm(checkpoint, os.path.join(root, f"served-{mode}"), base_model=base)
    register()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, work.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(args.requests)]
    repeats = 1 if args.smoke else args.engine_repeats
    rows, outputs = {}, {}
    for mode, path in served.items():
        rows[mode], outputs[mode] = _time_engine(path, prompts, args.new_tokens, repeats)
        print(f"engine {mode}: {rows[mode]['tokens_per_cpu_s']:.1f} tokens per CPU-second", flush=True)
    same = sum(a == b for a, b in zip(outputs["dense"], outputs["sparse"]))
    return {
        "model": {**work.to_dict(), "experts": n_experts, "top_k_lora": k, "routing": "dual_pass"},
        "compilation": "traced once (vLLM's default on CPU), run as traced: VLLM_CPU_CI_ENV="
        + os.environ.get("VLLM_CPU_CI_ENV", ""),
        "requests": args.requests,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new_tokens,
        "targets": TARGETS,
        "rows": rows,
        "sparse_over_dense_tokens_per_cpu_s": rows["sparse"]["tokens_per_cpu_s"] / rows["dense"]["tokens_per_cpu_s"],
        "requests_with_identical_tokens": same,
    }


def _time_engine(path: str, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[dict, list]:
    import gc

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=path,
        dtype="float32",
        max_model_len=len(prompts[0]) + new_tokens + 8,
        max_num_seqs=len(prompts),
        seed=0,
        skip_tokenizer_init=True,
    )
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    try:
        llm.generate(requests, params, use_tqdm=False)  # untimed: warms the traced graph and the caches
        wall, cpu = [], []
        for _ in range(repeats):
            llm.reset_prefix_cache()
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            results = llm.generate(requests, params, use_tqdm=False)
            wall.append(time.perf_counter() - start_wall)
            cpu.append(time.process_time() - start_cpu)
        tokens = [list(r.outputs[0].token_ids) for r in results]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    generated = sum(len(t) for t in tokens)
    row = {
        "generated_tokens": generated,
        "wall_s": wall,
        "cpu_s": cpu,
        "wall_s_median": statistics.median(wall),
        "cpu_s_median": statistics.median(cpu),
        "tokens_per_cpu_s": generated / statistics.median(cpu),
    }
    return row, tokens


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the parts asked for and writes the result file."""
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Traced as vLLM does by default, but the graph run as traced instead of compiled by inductor (minutes per engine
    # on 2 shared cores): the same for both exports, recorded in the result.
    os.environ.setdefault("VLLM_CPU_CI_ENV", "1")
    import tempfile

    import torch

    from benchmarks.provenance import provenance, write_result

    torch.set_num_threads(1)
    if args.smoke:
        args.hidden, args.ranks, args.experts, args.tokens, args.repeats = [64], [4], [4], [1, 8], 1
        args.min_time = 0.001
    block = provenance()
    # Everything in the file comes from this run (its provenance): a part not run is None.
    payload: dict[str, Any] = {
        "threads": 1,
        "dtype": "float32",
        "kernels": None if args.skip_kernels else run_kernels(args),
        "engine": None,
    }
    if args.engine:  # one entry per number of experts
        payload["engine"] = {}
        for n in args.engine_experts:
            with tempfile.TemporaryDirectory() as root:
                payload["engine"][str(n)] = run_engine(args, root, n)
    write_result(args.out, payload, block)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
