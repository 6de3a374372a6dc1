"""The plugin in vLLM's own processes: `vllm serve` over real HTTP with tensor parallelism over 2 workers, and the
offline engine's tensor parallelism.

Both reach the model classes only through the `vllm.general_plugins` entry point (each vLLM process loads it before
resolving the architecture), so they need peft-xlora installed with its entry points, as scripts/vllm_env.sh does.
Every wait is bounded: a server that does not come up, or a request that does not return, fails the test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import entry_points

import pytest

pytest.importorskip(
    "vllm",
    reason="vLLM is not installed in this environment; scripts/test.sh runs tests/serving with the vLLM env that "
    "scripts/vllm_env.sh creates",
)

from xlora_vllm_cases import (
    SPARSE_EXPERT_SPECS,
    assert_same_generation,
    build_case,
    make_experts,
    prompts_of_lengths,
    reference_generate,
    vllm_engine,
    vllm_generate,
)

_PLUGIN = "peft_xlora.serving.vllm.plugin:register"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not any(ep.value == _PLUGIN for ep in entry_points(group="vllm.general_plugins")),
        reason="peft-xlora is installed without its vllm.general_plugins entry point (pyproject.toml's "
        "[project.entry-points] table); reinstall it, e.g. with scripts/vllm_env.sh",
    ),
]

SERVER_START_TIMEOUT_S = 300  # the multi-process server needs about a minute on 2 cores
REQUEST_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(process: subprocess.Popen, port: int, log_path: str) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                tail = f.read()[-4000:]
            pytest.fail(f"vllm serve exited with {process.returncode} before it was ready:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    pytest.fail(f"vllm serve did not answer /health within {SERVER_START_TIMEOUT_S} s")


def _stop(process: subprocess.Popen) -> None:
    """Ends the server's process group (the API server, its engine core and workers), then waits for it."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def test_vllm_serve_with_tensor_parallel_2_answers_over_http(tmp_path):
    # `vllm serve` in its own processes (the API server, the engine core, two tensor-parallel workers) answers a text
    # prompt and token-id prompts as peft-xlora generates them. With 2 KV heads each rank holds one (sharded k/v
    # columns); the classifier and the scaling pass's hidden state are replicated. qkv_proj (3 experts, 2 kept)
    # computes sparsely: each rank from its own rows of the factors.
    import openai
    from transformers import AutoTokenizer

    base = {"num_key_value_heads": 2}
    options = {"layerwise_scalings": True, "top_k_lora": 2, "topk_compute": "sparse", "xlora_depth": 2}
    case = build_case(str(tmp_path), base_overrides=base, xlora_size=16, **options)
    case.model.base_model.update_config(topk_compute="dense")  # the reference computes every expert
    tokenizer = AutoTokenizer.from_pretrained(case.served)
    prompt = "w5 w17 w33 w8 w60 w41 w12"
    ids = tokenizer(prompt)["input_ids"]
    reference = reference_generate(case.model, ids, 10)
    token_prompts = prompts_of_lengths([1, 9, 33], seed=6)
    token_references = [reference_generate(case.model, p, 10) for p in token_prompts]

    port = _free_port()
    vllm_cli = os.path.join(os.path.dirname(sys.executable), "vllm")
    command = [
        vllm_cli, "serve", case.served,
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", "xlora",
        "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "4", "--enforce-eager",
        "--tensor-parallel-size", "2", "--distributed-executor-backend", "mp",
    ]  # fmt: skip
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's default: engine core in its own process
    env.update({"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"})
    log_path = str(tmp_path / "server.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_healthy(process, port, log_path)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0
        )
        options = {
            "model": "xlora",
            "max_tokens": 10,
            "temperature": 0.0,
            "logprobs": 1,
            "extra_body": {"ignore_eos": True, "return_tokens_as_token_ids": True},
        }
        response = client.completions.create(prompt=prompt, **options)
        batch = client.completions.create(prompt=token_prompts, **options)  # one request, three prompts
    finally:
        _stop(process)
    choice = response.choices[0]
    assert_same_generation(_tokens_and_logprobs(choice), reference)
    # The text continues the prompt's words (vLLM detokenizes incrementally, with the separating space, and leaves
    # out special tokens such as a generated "<s>").
    words = [t for t in tokenizer.convert_ids_to_tokens(reference[0]) if t not in tokenizer.all_special_tokens]
    assert choice.text.split() == words
    choices = sorted(batch.choices, key=lambda c: c.index)
    assert len(choices) == len(token_prompts)
    for choice, reference in zip(choices, token_references):
        assert_same_generation(_tokens_and_logprobs(choice), reference)


def _tokens_and_logprobs(choice) -> tuple[list[int], list[float]]:
    return [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens], choice.logprobs.token_logprobs


def test_tensor_parallel_2_with_replicated_kv_heads_equals_peft_xlora(tmp_path):
    # TP=2 on CPU in vLLM's offline engine: two worker processes. With 1 KV head both ranks hold the same k/v
    # columns (vLLM replicates it); the sharded case is served above. Sparse top-k in every projection (2 of 4
    # experts), so the row-parallel o_proj and down_proj add their shards' partial sparse updates before the
    # all-reduce, and the column-parallel ones compute their own rows.
    base = {"num_key_value_heads": 1}
    case = build_case(
        str(tmp_path),
        experts=make_experts("llama", str(tmp_path), specs=SPARSE_EXPERT_SPECS, **base),
        base_overrides=base,
        layerwise_scalings=True,
        top_k_lora=2,
        topk_compute="sparse",
        xlora_depth=2,
        xlora_size=16,
    )
    case.model.base_model.update_config(topk_compute="dense")  # the reference computes every expert
    prompts = prompts_of_lengths([1, 9, 33], seed=6)
    references = [reference_generate(case.model, p, 10) for p in prompts]
    options = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
    with vllm_engine(case.served, **options) as llm:
        ours = vllm_generate(llm, prompts, 10)
        sparse = llm.apply_model(_sparse_projections)  # the workers are forks of this process: they know it
    assert sparse == [13, 13], sparse  # on each rank: the embedding and 4 projections in each of 3 layers
    for mine, reference in zip(ours, references):
        assert_same_generation(mine, reference)


def _sparse_projections(model) -> int:
    from peft_xlora.serving.vllm.projections import SparseProjection

    return sum(isinstance(m, SparseProjection) for m in model.modules())
