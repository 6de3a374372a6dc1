"""Sparse top-k in the vLLM plugin: only each token's chosen experts computed, checked without an engine.

`ops.SparseLora` and its two kernels, `grouped_update` and `gathered_update` (no vLLM import: these run in the main
environment too), against a plain loop over each token's chosen experts, one at a time, written from the formula;
against the dense `StackedLora` with the same scalings; per tensor-parallel shard; for the embedding; in float16 and
bfloat16; with vLLM's padded token rows; and traced by torch.compile as one graph whose token count is symbolic
(what vLLM does with the forward). The engine-level check, peft-xlora's `top_k_lora` model against a traced engine
computing sparsely, is in test_vllm_exactness.py (case "llama-dual-sparse-top-k")."""

from __future__ import annotations

import json
import os

import pytest
import torch
from xlora_vllm_cases import build_case, join_column_shards, random_factors, shard_stack

from peft_xlora.core.classifier import gate
from peft_xlora.serving.vllm import SPEC_KEY, ServingSpec, XLoraServingError
from peft_xlora.serving.vllm.ops import (
    Block,
    Partition,
    SparseLora,
    StackedLora,
    XLoraRouter,
    gathered_update,
    grouped_update,
)

# A projection with two output partitions (e.g. gate and up of gate_up_proj, sizes 10 and 4), input width 8, and five
# experts of which each module holds a few, with different ranks. "fused" covers both partitions with one A (Phi-3's
# own gate_up_proj). (module, expert) -> (rank, partitions covered, scale).
_OUTS = (10, 4)
_N_IN, _N_EXPERTS, _K = 8, 5, 2
_BLOCKS = {
    ("gate", 0): (2, [0], 0.5),
    ("gate", 2): (3, [0], 1.5),
    ("gate", 4): (1, [0], 2.0),
    ("up", 1): (4, [1], 0.25),
    ("up", 2): (1, [1], 1.0),
    ("up", 3): (2, [1], 3.0),
    ("fused", 1): (2, [0, 1], 0.75),
    ("fused", 4): (3, [0, 1], 1.25),
}
_SLOT = {"gate": 0, "up": 1, "fused": 2}  # layerwise: each module reads its own scaling slot and its own top-k
_N_SLOTS = len(_SLOT)


def _factors(seed: int, row_parallel: bool = False) -> dict:
    return random_factors(_BLOCKS, _OUTS, _N_IN, seed, row_parallel, scale=lambda key, block: block[2])


def _stack(factors: dict, *, shards: int = 1, rank: int = 0, row_parallel: bool = False, dtype=torch.float32):
    """One tensor-parallel shard's loaded StackedLora (column-parallel by default), scales folded."""
    geometry = {"outs": _OUTS, "n_in": _N_IN, "n_experts": _N_EXPERTS, "slot": _SLOT}
    return shard_stack(_BLOCKS, factors, **geometry, shards=shards, rank=rank, row_parallel=row_parallel, dtype=dtype)


def _routing(n_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """peft-xlora's top-k gate on random logits: scalings (T, slots * n), kept indices and weights (T, slots, k)."""
    logits = torch.randn(n_tokens, _N_SLOTS, _N_EXPERTS, generator=torch.Generator().manual_seed(seed)) * 2
    scalings = gate(logits, top_k=_K, softmax_topk=True, global_weight=1.3)  # (T, slots, n)
    chosen = scalings.abs().topk(_K, dim=-1).indices  # (T, slots, k)
    return scalings.flatten(1), chosen, scalings.gather(-1, chosen)


def _loop_reference(x, factors, chosen, weights, row_parallel=False):
    """Per token, per chosen expert of each module's slot: w * scale * B A x into the module's output rows."""
    offsets = [0, _OUTS[0]]
    out = torch.zeros(x.shape[0], sum(_OUTS))
    for t in range(x.shape[0]):
        for (module, e), (a, b, scale) in factors.items():
            slot = _SLOT[module]
            for j in range(_K):
                if int(chosen[t, slot, j]) != e:
                    continue
                full = scale * float(weights[t, slot, j]) * (b @ (a @ x[t]))  # (rows of the covered partitions,)
                if row_parallel:
                    out[t] += full
                    continue
                row = 0
                for p in _BLOCKS[(module, e)][1]:
                    out[t, offsets[p] : offsets[p] + _OUTS[p]] += full[row : row + _OUTS[p]]
                    row += _OUTS[p]
    return out


def test_sparse_update_equals_the_loop_over_chosen_experts_and_the_dense_stack():
    factors = _factors(0)
    x = torch.randn(9, _N_IN)
    scalings, chosen, weights = _routing(9, seed=1)
    stack = _stack(factors)
    sparse = SparseLora(stack, _N_EXPERTS)
    base = torch.randn(9, sum(_OUTS))
    ours = sparse.add_update(base.clone(), x, chosen, weights)
    torch.testing.assert_close(ours, base + _loop_reference(x, factors, chosen, weights))
    dense = stack.add_update(base.clone(), x, scalings.index_select(1, stack.scaling_index), stack.own_B())
    torch.testing.assert_close(ours, dense)
    # Distinct experts and real routing: the update is far from 0, and tokens chose different experts.
    assert (ours - base).abs().max() > 1 and len({tuple(row) for row in chosen[:, 0].tolist()}) > 1


def test_padded_token_rows_do_not_change_the_real_ones():
    # vLLM pads a step's tokens to a compiled size: the padding rows carry whatever the buffers held (here: garbage
    # inputs, other experts), and the real rows' updates are the same as without them.
    factors = _factors(3)
    stack = _stack(factors)
    sparse = SparseLora(stack, _N_EXPERTS)
    x = torch.randn(4, _N_IN)
    _, chosen, weights = _routing(4, seed=2)
    _, pad_chosen, pad_weights = _routing(4, seed=9)
    alone = sparse.add_update(torch.zeros(4, sum(_OUTS)), x, chosen, weights)
    padded = sparse.add_update(
        torch.zeros(8, sum(_OUTS)),
        torch.cat([x, torch.randn(4, _N_IN) * 1e3]),
        torch.cat([chosen, pad_chosen]),
        torch.cat([weights, pad_weights]),
    )
    torch.testing.assert_close(padded[:4], alone)  # float tolerance: the grouped matmuls see other row counts


def test_column_parallel_shards_hold_their_rows_of_the_sparse_update():
    factors = _factors(4)
    x = torch.randn(6, _N_IN)
    _, chosen, weights = _routing(6, seed=5)
    full = _loop_reference(x, factors, chosen, weights)
    halves = [o // 2 for o in _OUTS]
    shard_outs = []
    for rank in range(2):
        sparse = SparseLora(_stack(factors, shards=2, rank=rank), _N_EXPERTS)
        shard_outs.append(sparse.add_update(torch.zeros(6, sum(halves)), x, chosen, weights))
    torch.testing.assert_close(join_column_shards(shard_outs, _OUTS), full)


def test_row_parallel_shards_sum_to_the_sparse_update():
    factors = _factors(6, row_parallel=True)
    x = torch.randn(5, _N_IN)
    _, chosen, weights = _routing(5, seed=7)
    total = torch.zeros(5, sum(_OUTS))
    half = _N_IN // 2
    for rank in range(2):
        sparse = SparseLora(_stack(factors, shards=2, rank=rank, row_parallel=True), _N_EXPERTS)
        total += sparse.add_update(torch.zeros(5, sum(_OUTS)), x[:, rank * half : (rank + 1) * half], chosen, weights)
    torch.testing.assert_close(total, _loop_reference(x, factors, chosen, weights, row_parallel=True))


def test_sparse_embedding_update_is_a_row_lookup_of_the_chosen_experts():
    vocab, dim, n = 11, 6, 4
    g = torch.Generator().manual_seed(8)
    ranks, scales = {0: 3, 2: 2, 3: 1}, {0: 0.5, 2: 1.5, 3: 2.0}  # expert 1 does not adapt the embedding
    factors = {e: (torch.randn(r, vocab, generator=g), torch.randn(dim, r, generator=g)) for e, r in ranks.items()}
    blocks = [Block(f"emb.{e}", "emb", e, r, scales[e], e, [0], [dim]) for e, r in ranks.items()]
    stack = StackedLora(vocab, (0, vocab), [Partition(0, dim, (0, dim))], blocks, torch.float32, embedding=True)
    for e, (a, b) in factors.items():
        stack.load(f"emb.{e}", a, b)
    stack.fold_scales()
    ids = torch.tensor([0, 4, 10, 4, 7])
    chosen = torch.tensor([[0, 1], [2, 3], [3, 0], [1, 2], [0, 2]]).unsqueeze(1)  # (T, 1 slot, k)
    weights = torch.rand(5, 1, 2, generator=g)
    expected = torch.zeros(5, dim)
    for t in range(5):
        for j in range(2):
            e = int(chosen[t, 0, j])
            if e in factors:
                a, b = factors[e]
                expected[t] += float(weights[t, 0, j]) * scales[e] * (b @ a[:, ids[t]])
    ours = SparseLora(stack, n).add_update(torch.zeros(5, dim), ids, chosen, weights)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("n_tokens", [4, 12], ids=["gathered", "grouped"])  # 8 and 24 (token, expert) pairs
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_sparse_update_matches_the_dense_one(dtype, tol, n_tokens):
    # vLLM serves in the model's dtype: the factors are float16/bfloat16, the gate's weights float32.
    factors = _factors(10)
    x = torch.randn(n_tokens, _N_IN)
    scalings, chosen, weights = _routing(n_tokens, seed=11)
    reference = _loop_reference(x, factors, chosen, weights)
    stack = _stack(factors, dtype=dtype)
    sparse = SparseLora(stack, _N_EXPERTS)
    zeros = torch.zeros(n_tokens, sum(_OUTS), dtype=dtype)
    ours = sparse.add_update(zeros.clone(), x.to(dtype), chosen, weights)
    rank_weights = scalings.index_select(1, stack.scaling_index)
    dense = stack.add_update(zeros.clone(), x.to(dtype), rank_weights, stack.own_B())
    assert ours.dtype == dtype
    scale = reference.abs().max()
    torch.testing.assert_close(ours.float() / scale, reference / scale, atol=tol, rtol=0)
    torch.testing.assert_close(ours.float() / scale, dense.float() / scale, atol=tol, rtol=0)


def test_sparse_update_traces_as_one_graph_with_a_symbolic_token_count():
    # What vLLM does with the forward: one torch.compile trace, the token dimension dynamic, no graph break (a
    # data-dependent branch or shape would break it, and fullgraph=True turns that into an error). The grouped kernel
    # inside is one opaque op whose output shape follows from its inputs', so the traced graph holds for a step of 5
    # tokens (10 pairs: the op gathers per token) and of 11 (22 pairs: it groups by expert).
    factors = _factors(12)
    stack = _stack(factors)
    sparse = SparseLora(stack, _N_EXPERTS)
    compiled = torch.compile(sparse.add_update, backend="eager", fullgraph=True, dynamic=True)
    for n_tokens, seed in ((5, 13), (11, 14)):
        x = torch.randn(n_tokens, _N_IN)
        _, chosen, weights = _routing(n_tokens, seed=seed)
        expected = sparse.add_update(torch.zeros(n_tokens, sum(_OUTS)), x, chosen, weights)
        torch.testing.assert_close(compiled(torch.zeros(n_tokens, sum(_OUTS)), x, chosen, weights), expected)


@pytest.mark.parametrize("update", [grouped_update, gathered_update], ids=["grouped", "gathered"])
def test_both_kernels_of_padded_ranks_are_the_per_expert_sum(update):
    # The padded layout on its own, for both ways (`topk_lora_update` runs the grouped one on CPU, the gathered one
    # elsewhere): two experts of ranks 2 and 3 padded to 3 with zero rows; a token may choose one expert twice.
    g = torch.Generator().manual_seed(15)
    a = [torch.randn(2, 6, generator=g), torch.randn(3, 6, generator=g)]
    b = [torch.randn(5, 2, generator=g), torch.randn(5, 3, generator=g)]
    A, B = torch.zeros(2, 3, 6), torch.zeros(2, 3, 5)
    for e in range(2):
        A[e, : a[e].shape[0]] = a[e]
        B[e, : b[e].shape[1]] = b[e].T
    x = torch.randn(3, 6, generator=g)
    indices = torch.tensor([[0, 1], [1, 0], [1, 1]])
    weights = torch.rand(3, 2, generator=g)
    expected = torch.stack(
        [sum(weights[t, j] * b[int(indices[t, j])] @ a[int(indices[t, j])] @ x[t] for j in range(2)) for t in range(3)]
    )
    torch.testing.assert_close(update(x, A, B, indices, weights), expected)


def test_both_kernels_agree_on_projections_and_embeddings():
    g = torch.Generator().manual_seed(16)
    n, rank, n_in, n_out, vocab = 6, 4, 10, 7, 13
    A, B = torch.randn(n, rank, n_in, generator=g), torch.randn(n, rank, n_out, generator=g)
    A_embedding = torch.randn(vocab * n, rank, generator=g)
    indices = torch.randint(0, n, (9, 3), generator=g)
    weights = torch.rand(9, 3, generator=g)
    x, ids = torch.randn(9, n_in, generator=g), torch.randint(0, vocab, (9,), generator=g)
    torch.testing.assert_close(grouped_update(x, A, B, indices, weights), gathered_update(x, A, B, indices, weights))
    torch.testing.assert_close(
        grouped_update(ids, A_embedding, B, indices, weights), gathered_update(ids, A_embedding, B, indices, weights)
    )


def test_router_hands_on_the_gates_chosen_experts(tmp_path):
    # The router's `chosen` and `chosen_weights` are the gate's own top-k: scattered back, exactly the scalings.
    case = build_case(str(tmp_path), layerwise_scalings=True, top_k_lora=2, xlora_depth=2, xlora_size=16)
    with open(os.path.join(case.served, "config.json"), encoding="utf-8") as f:
        spec = ServingSpec.from_dict(json.load(f)[SPEC_KEY])
    router = XLoraRouter(spec, max_tokens=16, sparse=True)
    for j in range(spec.classifier_depth):
        for name in ("weight", "bias"):
            buffer = getattr(router, f"{name}{j}")
            buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(j)))
    router.route(torch.randn(6, spec.hidden_size))
    scalings = router.scalings[:6].view(6, spec.n_slots, spec.n_experts)
    assert router.chosen.shape == (16, spec.n_slots, 2)
    scattered = torch.zeros_like(scalings).scatter(-1, router.chosen[:6], router.chosen_weights[:6])
    torch.testing.assert_close(scattered, scalings, rtol=0, atol=0)
    assert (scalings != 0).sum(-1).max() == 2
    assert not hasattr(XLoraRouter(spec, max_tokens=4), "chosen")  # dense serving: no index buffers


def test_export_writes_topk_compute_and_the_spec_checks_it(tmp_path):
    case = build_case(str(tmp_path), top_k_lora=2, topk_compute="sparse")
    with open(os.path.join(case.served, "config.json"), encoding="utf-8") as f:
        data = json.load(f)[SPEC_KEY]
    assert data["topk_compute"] == "sparse"
    assert ServingSpec.from_dict(data).topk_compute == "sparse"
    assert ServingSpec.from_dict({k: v for k, v in data.items() if k != "topk_compute"}).topk_compute == "auto"
    with pytest.raises(XLoraServingError, match="`topk_compute` must be one of"):
        ServingSpec.from_dict({**data, "topk_compute": "fast"})
