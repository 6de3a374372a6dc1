"""Sparse top-k compute (core/sparse.py): each token computes only its k chosen experts, exactly as the dense path.

Layer level: every method (grouped, gather, loop) against a plain per-token reference loop over the chosen experts
and against the dense path, forward and gradients (gate, inputs, trainable factors), for Linear, Conv1D and
Embedding layers, equal and mixed ranks, layers some experts do not adapt, per-layer slots, dropout, skewed routing.
Model level: a tiny Llama with up to 16 experts, top-1 and top-2, against the dense path (logits and gradients) and
the original two-pass formula, under gradient checkpointing (both modes, two forwards then one backward), padding,
cached generation, single-pass routing and bf16; the config's `topk_compute` and its "auto" choice.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from torch import nn
from transformers.pytorch_utils import Conv1D

import peft_xlora.core.layer as layer_module
from helpers.models import BUILDERS, build_xlora, input_ids, make_expert
from helpers.reference import lora_factors_reference, topk_mixture_reference, xlora_logits_reference
from peft_xlora import XLoraConfig
from peft_xlora.core import sparse
from peft_xlora.core.classifier import gate
from peft_xlora.core.experts import ModuleLora
from peft_xlora.core.layer import XLoraLayer
from peft_xlora.core.routing import Routing, use_routing
from peft_xlora.core.sparse import TopKSetting, chosen_indices, sparse_mixture, use_sparse

METHODS = ["grouped", "gather", "loop"]
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 3e-2}}
MODEL_TOL = {"rtol": 1e-4, "atol": 1e-5}  # float32 logits through a few layers, summed in another order

# ------------------------------------------------------------------ one mixture layer

N_EXPERTS, N_SLOTS, SLOT = 16, 3, 1
# The layer is adapted by 12 of the 16 experts: a token may choose one that adds nothing here.
LAYER_EXPERTS = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15]


def make_layer(kind, ranks, dtype=torch.float32, dropouts=None, trainable=False, n_in=12, n_out=10, vocab=20):
    """An `XLoraLayer` at slot 1 of 3 over experts `LAYER_EXPERTS` with distinct ranks, scales and factors."""
    base = {"linear": lambda: nn.Linear(n_in, n_out), "conv1d": lambda: Conv1D(n_out, n_in)}.get(
        kind, lambda: nn.Embedding(vocab, n_out)
    )().to(dtype)
    width = vocab if kind == "embedding" else n_in
    loras = []
    for i, r in enumerate(ranks):
        A = (torch.randn(r, width) * 0.3).to(dtype)
        B = (torch.randn(n_out, r) * 0.3).to(dtype)
        dropout = dropouts[i % len(dropouts)] if dropouts else 0.0
        loras.append(ModuleLora(A, B, r, scale=0.5 + 0.25 * i, dropout=dropout, is_embedding=kind == "embedding"))
    return XLoraLayer(base, SLOT, LAYER_EXPERTS[: len(ranks)], loras, requires_grad=trainable)


def layer_input(kind, shape=(2, 9), dtype=torch.float32, n_in=12, vocab=20, grad=False):
    if kind == "embedding":
        return torch.randint(0, vocab, shape)
    return torch.randn(*shape, n_in).to(dtype).requires_grad_(grad)


def gate_logits(shape=(2, 9), grad=True):
    return torch.randn(*shape, N_SLOTS, N_EXPERTS).requires_grad_(grad)  # (batch, seq, n_slots, n_experts)


def gated(logits, k, softmax_topk=False, enable_softmax=True):
    return gate(logits, top_k=k, softmax_topk=softmax_topk, enable_softmax=enable_softmax)


def reference(layer, x, scalings, logits, k):
    """`topk_mixture_reference` of the layer's own factors (views of its parameters: gradients reach them)."""
    chosen = logits.detach()[:, :, SLOT].topk(k, dim=-1).indices  # the gate's choice, from its logits
    weights = scalings[:, :, SLOT].gather(-1, chosen)
    factors = [
        (*layer.expert_factors(i), float(layer.rank_scale[sum(layer.ranks[:i])])) for i in range(len(layer.ranks))
    ]
    if not layer.is_embedding:
        factors = [(A.float(), B.float(), s) for A, B, s in factors]
    tokens = x.shape[0] * x.shape[1]
    flat_x = x.reshape(tokens) if layer.is_embedding else x.reshape(tokens, -1).float()
    base_out = layer.base_layer(x).float().reshape(tokens, -1)
    out = topk_mixture_reference(
        flat_x, base_out, factors, layer.expert_indices, chosen.reshape(tokens, k), weights.reshape(tokens, k),
        is_embedding=layer.is_embedding,
    )  # fmt: skip
    return out.reshape(*x.shape[:2], -1)


def run_sparse(layer, x, scalings, method, k, into=True):
    """The sparse path as `XLoraLayer.forward` takes it (the update added into the base output in place), or the
    update alone added afterwards."""
    indices = chosen_indices(Routing(scalings), scalings, k)
    assert indices is not None
    if into:
        return sparse_mixture(layer, x, scalings, indices, method=method, into=layer.base_layer(x))
    return layer.base_layer(x) + sparse_mixture(layer, x, scalings, indices, method=method)


def run_dense(layer, x, scalings):
    layer.topk = None
    with use_routing(Routing(scalings)):
        return layer(x)


def grads(*tensors):
    out = [t.grad.clone() if t.grad is not None else None for t in tensors]
    for t in tensors:
        t.grad = None
    return out


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("ranks", ["equal", "mixed"])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
@pytest.mark.parametrize("method", METHODS)
def test_layer_equals_reference_and_dense(method, kind, ranks, k):
    rank_list = [4] * 12 if ranks == "equal" else [4, 1, 7, 2, 4, 3, 1, 5, 2, 6, 4, 3]
    layer = make_layer(kind, rank_list, trainable=True)
    x = layer_input(kind, grad=kind != "embedding")
    logits = gate_logits()
    g = torch.randn(2, 9, 10)  # a fixed direction for the backward

    ours = run_sparse(layer, x, gated(logits, k), method, k)
    (ours * g).sum().backward()
    leaves = [logits, layer.xlora_A, layer.xlora_B] + ([x] if kind != "embedding" else [])
    ours_grads = grads(*leaves)

    expected = reference(layer, x, gated(logits, k), logits, k)
    (expected * g).sum().backward()
    ref_grads = grads(*leaves)

    dense = run_dense(layer, x, gated(logits, k))
    (dense * g).sum().backward()
    dense_grads = grads(*leaves)

    torch.testing.assert_close(ours, expected, **TOL[torch.float32])
    torch.testing.assert_close(ours, dense, **TOL[torch.float32])
    for name, a, b, c in zip(["gate", "A", "B", "x"], ours_grads, ref_grads, dense_grads):
        assert a is not None and a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, **TOL[torch.float32], msg=name)
        torch.testing.assert_close(a, c, **TOL[torch.float32], msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_layer_within_bf16_tolerance(method):
    layer = make_layer("linear", [4] * 12, dtype=torch.bfloat16)
    x = layer_input("linear", dtype=torch.bfloat16)
    logits = gate_logits(grad=False)
    scalings = gated(logits, 2)
    ours = run_sparse(layer, x, scalings, method, 2)
    assert ours.dtype == torch.bfloat16
    # The reference runs in float32 on the same (rounded) inputs: it measures our error, not bf16's input rounding.
    torch.testing.assert_close(ours.float(), reference(layer, x, scalings, logits, 2), **TOL[torch.bfloat16])


@pytest.mark.parametrize("softmax_topk, enable_softmax", [(True, True), (False, False)])
@pytest.mark.parametrize("method", METHODS)
def test_gate_variants(method, softmax_topk, enable_softmax):
    # renormalised top-k, and raw logits (negative weights) without softmax
    layer = make_layer("linear", [3] * 12)
    x = layer_input("linear")
    logits = gate_logits(grad=False)
    scalings = gated(logits, 2, softmax_topk=softmax_topk, enable_softmax=enable_softmax)
    torch.testing.assert_close(run_sparse(layer, x, scalings, method, 2), run_dense(layer, x, scalings))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dropouts", [[0.3], [0.1, 0.4]], ids=["one-dropout", "two-dropouts"])
def test_training_dropout_draws_the_dense_masks(method, dropouts):
    # With the same random state both paths drop the same entries (one mask per dropout value, in the same order).
    layer = make_layer("linear", [4] * 12, dropouts=dropouts).train()
    x = layer_input("linear")
    scalings = gated(gate_logits(grad=False), 2)
    torch.manual_seed(7)
    ours = run_sparse(layer, x, scalings, method, 2)
    torch.manual_seed(7)
    dense = run_dense(layer, x, scalings)
    torch.testing.assert_close(ours, dense)
    layer.eval()
    assert not torch.allclose(run_sparse(layer, x, scalings, method, 2), ours)  # dropout was on


@pytest.mark.parametrize("method", METHODS)
def test_skewed_routing_uses_small_tiles_and_stays_exact(method):
    # 60 of 64 tokens choose expert 3: one tile per expert padded to 60 rows would be mostly padding.
    layer = make_layer("linear", [4] * 12)
    x = layer_input("linear", shape=(1, 64))
    logits = gate_logits(shape=(1, 64), grad=False)
    logits[0, :60, :, 3] += 100.0
    scalings = gated(logits, 1)
    counts = torch.bincount(logits[0, :, SLOT].topk(1).indices.flatten(), minlength=16)[LAYER_EXPERTS].tolist()
    assert max(counts) >= 60 and sparse._tile_size(counts, 4, 12, 10, views=True) not in (0, max(counts))
    torch.testing.assert_close(run_sparse(layer, x, scalings, method, 1), run_dense(layer, x, scalings))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    n_experts=st.integers(2, 12),
    k=st.integers(1, 4),
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=12),
    tokens=st.integers(1, 40),
    layerwise=st.booleans(),
    method=st.sampled_from(METHODS),
    seed=st.integers(0, 2**16),
)
def test_any_shape_equals_dense(n_experts, k, ranks, tokens, layerwise, method, seed):
    # random sizes: experts (some absent from the layer), k, ranks, token counts, per-layer slots
    g = torch.Generator().manual_seed(seed)
    k = min(k, n_experts)
    users = sorted(torch.randperm(n_experts, generator=g)[: len(ranks)].tolist())[: len(ranks)]
    ranks = ranks[: len(users)]
    loras = [
        ModuleLora(torch.randn(r, 5, generator=g), torch.randn(4, r, generator=g), r, 0.5 + i, 0.0)
        for i, r in enumerate(ranks)
    ]
    layer = XLoraLayer(nn.Linear(5, 4), 1, users, loras)
    slots = 3 if layerwise else 1
    logits = torch.randn(1, tokens, slots, n_experts, generator=g)
    scalings = gated(logits, k)
    x = torch.randn(1, tokens, 5, generator=g)
    torch.testing.assert_close(run_sparse(layer, x, scalings, method, k), run_dense(layer, x, scalings))


@pytest.mark.parametrize("layout", [0, 3, sparse.LOOP], ids=["tile-per-expert", "tiles-of-3", "loop"])
@pytest.mark.parametrize("ranks", ["equal", "mixed"])
@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_every_grouped_layout_is_exact(monkeypatch, layout, ranks, kind):
    rank_list = [4] * 12 if ranks == "equal" else [4, 1, 7, 2, 4, 3, 1, 5, 2, 6, 4, 3]
    layer = make_layer(kind, rank_list, trainable=True)
    x = layer_input(kind, grad=kind != "embedding")
    logits = gate_logits()
    if layout == 0 and ranks == "mixed":
        layout = 5  # one tile per expert needs equal ranks
    monkeypatch.setattr(sparse, "_tile_size", lambda *a: layout)
    g = torch.randn(2, 9, 10)
    ours = run_sparse(layer, x, gated(logits, 2), "grouped", 2)
    (ours * g).sum().backward()
    leaves = [logits, layer.xlora_A, layer.xlora_B] + ([x] if kind != "embedding" else [])
    ours_grads = grads(*leaves)
    dense = run_dense(layer, x, gated(logits, 2))
    (dense * g).sum().backward()
    torch.testing.assert_close(ours, dense)
    for a, b in zip(ours_grads, grads(*leaves)):
        torch.testing.assert_close(a, b)


def test_tiles_as_many_as_experts_but_not_one_each_use_each_tiles_own_expert(monkeypatch):
    # 4 of 12 experts take 9 tokens each: tiles of 3 make 12 tiles, as many as the layer's experts, yet tile i is not
    # expert i (the regression: the stacked factors were used as if it were, so most tokens got another expert).
    layer = make_layer("linear", [4] * 12)
    x = layer_input("linear", shape=(1, 36))
    logits = gate_logits(shape=(1, 36), grad=False)
    for t in range(36):
        logits[0, t, :, LAYER_EXPERTS[t // 9]] += 100.0
    scalings = gated(logits, 1)
    monkeypatch.setattr(sparse, "_tile_size", lambda *a: 3)
    torch.testing.assert_close(run_sparse(layer, x, scalings, "grouped", 1), run_dense(layer, x, scalings))


def test_tile_planner():
    rank, n_in, n_out = 16, 512, 1376
    balanced = [16] * 64
    skewed = [445, 257, 122, 75, 45, 30, 20] + [10] * 5  # 1024 pairs over 12 of 64 experts
    skewed += [0] * (64 - len(skewed))
    few = [100, 100] + [0] * 62  # two experts chosen
    assert sparse._tile_size(balanced, rank, n_in, n_out, views=True) == 0  # no padding: the stacked factors
    assert sparse._tile_size(skewed, rank, n_in, n_out, views=True) == sparse.LOOP
    assert sparse._tile_size(few, rank, n_in, n_out, views=True) == sparse.LOOP
    # mixed ranks have no views: balanced groups get tiles of their size (one factor copy each)
    assert sparse._tile_size(balanced, rank, n_in, n_out, views=False) == 16


def test_flattened_tokens_and_a_token_broadcast():
    layer = make_layer("linear", [4] * 12)
    x = layer_input("linear")
    scalings = gated(gate_logits(grad=False), 2)
    expected = run_sparse(layer, x, scalings, "grouped", 2)
    torch.testing.assert_close(run_sparse(layer, x, scalings, "grouped", 2, into=False), expected)
    torch.testing.assert_close(run_sparse(layer, x.reshape(18, 12), scalings, "grouped", 2), expected.reshape(18, 10))
    pinned = torch.zeros(1, 1, 1, N_EXPERTS)  # one weight vector for every token (a pinned gate), 2 experts
    pinned[..., [1, 6]] = torch.tensor([0.3, 0.7])
    for method in METHODS:
        torch.testing.assert_close(run_sparse(layer, x, pinned, method, 2), run_dense(layer, x, pinned))


def test_tokens_whose_experts_do_not_adapt_the_layer_get_the_base_output():
    layer = make_layer("linear", [4] * 12)
    x = layer_input("linear")
    only_absent = torch.zeros(2, 9, N_SLOTS, N_EXPERTS)
    only_absent[..., [4, 7]] = 0.5  # experts 4 and 7 do not adapt this layer
    for method in METHODS:
        torch.testing.assert_close(run_sparse(layer, x, only_absent, method, 2), layer.base_layer(x))


def test_chosen_indices_once_per_tensor_and_none_for_dense_rows(monkeypatch):
    dense_rows = torch.softmax(torch.randn(2, 5, 1, 8), -1)  # every expert non-zero: only the dense path is exact
    assert chosen_indices(Routing(dense_rows), dense_rows, 2) is None
    logits = torch.randn(2, 5, 1, 8)
    top2 = gated(logits, 2)
    first = chosen_indices(Routing(top2), top2, 2)
    assert torch.equal(first.sort(-1).values, logits.topk(2).indices.sort(-1).values)
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "topk", lambda *a, **kw: pytest.fail("derived twice"))
        assert chosen_indices(Routing(top2), top2, 2) is first  # once per scalings tensor
    # The gate's own choice for a layer (`Routing.chosen_for`) is used as it is: no derivation.
    given = torch.zeros(2, 5, 1, 2, dtype=torch.long)
    routed = Routing(top2.clone(), chosen=(given, torch.zeros(2, 5, 1, 2)))
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "topk", lambda *a, **kw: pytest.fail("derived"))
        assert chosen_indices(routed, routed.scalings, 2, layer_index=0) is given
    assert torch.equal(chosen_indices(routed, routed.scalings, 2), first)  # no layer: derived from the scalings


MANY, FEW = sparse.SPARSE_FROM["cpu"]
CUDA_MANY, CUDA_FEW = sparse.SPARSE_FROM["cuda"]


@pytest.mark.parametrize(
    "mode, n, k, device, tokens, expected",
    [
        ("dense", 64, 2, "cpu", 512, False),
        ("sparse", 3, 2, "cpu", 512, True),
        ("sparse", 2, 2, "cpu", 512, False),  # keeping every expert: nothing to skip
        ("auto", MANY * 2, 2, "cpu", 512, True),
        ("auto", MANY * 2 - 1, 2, "cpu", 512, False),
        ("auto", MANY * 2, 2, "cpu", None, True),  # unknown: many
        ("auto", MANY, 1, "cpu", 512, True),
        ("auto", FEW * 2, 2, "cpu", 1, True),  # decoding one token
        ("auto", FEW * 2 - 1, 2, "cpu", 1, False),
        ("auto", MANY * 2, 2, "cpu", 1, MANY >= FEW),  # enough for a prefill, not for one token
        ("auto", CUDA_MANY * 2, 2, "cuda", 512, True),
        ("auto", CUDA_MANY * 2 - 1, 2, "cuda", 512, False),
        ("auto", CUDA_FEW * 2 - 1, 2, "cuda", 1, False),
        ("auto", sparse.SPARSE_FROM_DEFAULT[0] * 2 - 1, 2, "mps", 512, False),
    ],
)
def test_use_sparse(mode, n, k, device, tokens, expected):
    assert use_sparse(mode, n, k, device, tokens) is expected


# ------------------------------------------------------------------ a tiny Llama with up to 16 experts


@pytest.fixture(scope="module")
def sixteen(tmp_path_factory):
    """16 distinct random LoRA experts of a tiny Llama: rank 4, distinct alphas, two dropout values; every expert
    adapts q/v/up, half of them down, a quarter the token embedding."""
    paths = {}
    for i in range(16):
        targets = ["q_proj", "v_proj", "up_proj"] + (["down_proj"] if i < 8 else [])
        targets += ["embed_tokens"] if i % 4 == 0 else []
        spec = {"r": 4, "lora_alpha": 4 + i, "lora_dropout": 0.1 if i % 2 else 0.2, "target_modules": targets}
        paths[f"e{i}"] = make_expert("llama", spec, 50 + i, str(tmp_path_factory.mktemp(f"sparse-e{i}")))
    return paths


def model_of(paths, n, mode, **overrides):
    chosen = dict(list(paths.items())[:n])
    torch.manual_seed(0)  # the same random classifier for both paths
    return build_xlora("llama", {"llama": chosen}, topk_compute=mode, **overrides)


@pytest.fixture
def sparse_calls(monkeypatch):
    """Counts the mixture layers that took the sparse path, by layer index."""
    calls = []
    original = layer_module.sparse_mixture

    def counted(layer, *args, **kwargs):
        calls.append(layer.layer_index)
        return original(layer, *args, **kwargs)

    monkeypatch.setattr(layer_module, "sparse_mixture", counted)
    return calls


def train_step(model, batches, seed=3):
    """Logits and gradients of one backward over the losses of `batches` (dropout on, a fixed seed)."""
    torch.manual_seed(seed)
    model.train()
    logits, loss = [], 0
    for ids in batches:
        out = model(input_ids=ids, labels=ids)
        logits.append(out.logits.detach())
        loss = loss + out.loss
    loss.backward()
    named = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits, named


def assert_same(a, b, tol=MODEL_TOL):
    a_logits, a_grads = a
    b_logits, b_grads = b
    for x, y in zip(a_logits, b_logits):
        torch.testing.assert_close(x, y, **tol)
    assert a_grads.keys() == b_grads.keys() and a_grads
    for name, grad in a_grads.items():
        torch.testing.assert_close(grad, b_grads[name], **tol, msg=name)


@pytest.mark.parametrize("softmax_topk", [False, True], ids=["topk", "softmax-topk"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("n", [4, 16])
def test_model_logits_and_gradients_equal_dense(sixteen, sparse_calls, n, k, softmax_topk):
    options = {"top_k_lora": k, "enable_softmax_topk": softmax_topk}
    batches = [input_ids(seed=1)]
    dense = train_step(model_of(sixteen, n, "dense", **options), batches)
    assert not sparse_calls
    ours = train_step(model_of(sixteen, n, "sparse", **options), batches)
    assert sparse_calls  # the sparse path ran
    assert_same(ours, dense)


@pytest.mark.parametrize("k", [1, 2])
def test_mixed_ranks_rslora_and_partial_targets(expert_dirs, sparse_calls, k):
    # the shared experts: ranks 4, 2 and 8 (rsLoRA in one), each adapting different modules
    options = {"top_k_lora": k, "use_trainable_adapters": True}
    batches = [input_ids(seed=9)]
    torch.manual_seed(0)
    dense = train_step(build_xlora("llama", expert_dirs, topk_compute="dense", **options), batches)
    torch.manual_seed(0)
    ours = train_step(build_xlora("llama", expert_dirs, topk_compute="sparse", **options), batches)
    assert sparse_calls
    assert_same(ours, dense)


@pytest.mark.parametrize("layerwise", [False, True], ids=["shared", "layerwise"])
def test_trainable_experts_get_gradients_only_where_chosen(sixteen, sparse_calls, layerwise):
    options = {"top_k_lora": 1, "use_trainable_adapters": True, "layerwise_scalings": layerwise}
    ids = input_ids(batch=1, seq=3, seed=5)  # 3 tokens choose at most 3 of 16 experts per layer
    dense = train_step(model_of(sixteen, 16, "dense", **options), [ids])
    model = model_of(sixteen, 16, "sparse", **options)
    ours = train_step(model, [ids])
    assert sparse_calls
    assert_same(ours, dense)
    layer = next(m for m in model.base_model.mixture_layers() if len(m.ranks) == 16)  # every expert adapts it
    assert layer.layer_index in sparse_calls
    grad = ours[1][next(n for n, p in model.named_parameters() if p is layer.xlora_A)]
    per_expert = grad.view(len(layer.ranks), layer.ranks[0], -1).abs().sum((1, 2))
    assert 0 < int((per_expert > 0).sum()) <= 3  # only the chosen experts' factors


def test_matches_the_original_two_pass_formula(sixteen, sparse_calls):
    model = model_of(sixteen, 16, "sparse", top_k_lora=2).eval()
    ids = input_ids()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    assert sparse_calls
    tuner = model.base_model
    experts = [lora_factors_reference(sixteen[name]) for name in tuner.expert_names]
    linears = [m for m in tuner.xlora_classifier.layers if isinstance(m, nn.Linear)]
    classifier = [(m.weight.detach(), m.bias.detach()) for m in linears]
    k = tuner.xlora_config.scaling_pass_layers  # the default's layer (test_default_scaling_pass.py checks which)
    expected = xlora_logits_reference(BUILDERS["llama"](), experts, classifier, ids, top_k=2, scaling_pass_layers=k)
    torch.testing.assert_close(ours, expected, **MODEL_TOL)


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_gradient_checkpointing_two_forwards_one_backward(sixteen, sparse_calls, mode):
    batches = [input_ids(seed=3), input_ids(seed=4)]
    options = {"top_k_lora": 2, "use_trainable_adapters": True, "layerwise_scalings": True}
    dense = train_step(model_of(sixteen, 16, "dense", **options), batches)
    model = model_of(sixteen, 16, "sparse", **options)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    ours = train_step(model, batches)
    assert sparse_calls
    assert_same(ours, dense)


def test_padding(sixteen, sparse_calls):
    ids = input_ids(batch=2, seq=7, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    ids[0, :3] = 0
    out = {}
    for mode in ("dense", "sparse"):
        model = model_of(sixteen, 16, mode, top_k_lora=2).eval()
        with torch.no_grad():
            out[mode] = model(input_ids=ids, attention_mask=mask).logits
    assert sparse_calls
    torch.testing.assert_close(out["sparse"], out["dense"], **MODEL_TOL)


@pytest.mark.parametrize("scalings_mode", ["token", "prompt"])
def test_cached_generation(sixteen, sparse_calls, scalings_mode):
    ids = input_ids(batch=2, seq=5, seed=6)
    out = {}
    for mode in ("dense", "sparse"):
        model = model_of(sixteen, 16, mode, top_k_lora=2).eval()
        out[mode] = model.generate(
            input_ids=ids,
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            scalings_mode=scalings_mode,
        )
    assert sparse_calls
    assert torch.equal(out["sparse"].sequences, out["dense"].sequences)
    for a, b in zip(out["sparse"].logits, out["dense"].logits):
        torch.testing.assert_close(a, b, **MODEL_TOL)


def test_single_pass_routes_sparsely_after_layer_k_only(sixteen, sparse_calls):
    options = {"top_k_lora": 2, "routing": "single_pass", "scaling_pass_layers": 1}
    batches = [input_ids(seed=8)]
    dense = train_step(model_of(sixteen, 16, "dense", **options), batches)
    model = model_of(sixteen, 16, "sparse", **options)
    ours = train_step(model, batches)
    assert_same(ours, dense)
    late = model.base_model.router.late_layers
    # the static weights of layers 1..k mix every expert by definition: those layers stay dense
    assert sparse_calls and set(sparse_calls) <= set(late)


def test_bf16_model_within_bf16_tolerance(sixteen, sparse_calls):
    ids = input_ids()
    out = {}
    for mode in ("dense", "sparse"):
        model = model_of(sixteen, 16, mode, top_k_lora=2).eval().to(torch.bfloat16)
        with torch.no_grad():
            out[mode] = model(input_ids=ids).logits.float()
    assert sparse_calls
    torch.testing.assert_close(out["sparse"], out["dense"], **TOL[torch.bfloat16])


@pytest.mark.parametrize("pinned", [2, 3], ids=["pin-to-k", "pin-to-more-than-k"])
def test_pinned_gate_is_the_dense_pinned_model(sixteen, sparse_calls, pinned):
    # A pin to at most top_k_lora experts runs sparse; a pin to more runs dense. Either way the logits equal the
    # dense model pinned to the same weights.
    weights = {f"e{i}": 0.2 + 0.1 * i for i in range(pinned)}
    outs = {}
    for mode in ("dense", "sparse"):
        model = model_of(sixteen, 8, mode, top_k_lora=2).eval()
        model.base_model.set_static_scalings(weights)
        with torch.no_grad():
            outs[mode] = model(input_ids=input_ids(seed=5)).logits
    assert bool(sparse_calls) == (pinned <= 2)
    torch.testing.assert_close(outs["sparse"], outs["dense"], **MODEL_TOL)


def test_without_top_k_nothing_changes(sixteen, monkeypatch):
    # No top_k_lora: every layer is dense and nothing looks for chosen experts (no extra work, no host sync).
    monkeypatch.setattr(layer_module, "chosen_indices", lambda *a: pytest.fail("looked for chosen experts"))
    model = model_of(sixteen, 16, "sparse").eval()
    assert all(layer.topk is None for layer in model.base_model.mixture_layers())
    with torch.no_grad():
        model(input_ids=input_ids())


@pytest.mark.parametrize(
    "table, sparse_from",
    [
        ({4: (4, 4), 8: (100, 100)}, 8),  # the experts' rank 4 has its entry: at top-2, sparse from 8 experts
        ({2: (4, 4), 8: (100, 100)}, 8),  # rank 4 takes the entry of rank 2, the next one below
        ({8: (2, 2), 16: (100, 100)}, 8),  # below the table: the smallest rank's entry x 8 / 4 = (4, 4)
        ({2: (100, 100), 8: (4, 4)}, None),  # rank 4 takes rank 2's: dense everywhere
    ],
)
def test_auto_picks_sparse_in_layers_with_enough_experts_for_their_rank(
    sixteen, sparse_calls, monkeypatch, table, sparse_from
):
    # The layers ask `use_sparse` with their experts' rank: the rank table decides, not `SPARSE_FROM`.
    monkeypatch.setitem(sparse.SPARSE_FROM, "cpu", (1, 1) if sparse_from is None else (100, 100))
    monkeypatch.setitem(sparse.SPARSE_FROM_RANK, "cpu", table)
    model = model_of(sixteen, 16, "auto", top_k_lora=2).eval()
    with torch.no_grad():
        model(input_ids=input_ids())
    layers = model.base_model.mixture_layers()
    expected = {layer.layer_index for layer in layers if sparse_from and len(layer.ranks) >= sparse_from}
    assert set(sparse_calls) == expected  # the embedding (4 experts) stays dense
    assert any(len(layer.ranks) < 8 for layer in layers) and any(len(layer.ranks) >= 8 for layer in layers)


def test_config_field_is_validated_switched_saved_and_kept_by_elastic_changes(sixteen, tmp_path):
    with pytest.raises(ValueError, match="`topk_compute` must be 'auto', 'dense' or 'sparse', got 'fast'"):
        XLoraConfig(adapters=sixteen, top_k_lora=2, topk_compute="fast")
    model = model_of(sixteen, 4, "auto", top_k_lora=2)
    tuner = model.base_model
    settings = {layer.topk for layer in tuner.mixture_layers()}
    assert settings == {TopKSetting(2, "auto")}
    tuner.update_config(topk_compute="sparse")
    assert {layer.topk for layer in tuner.mixture_layers()} == {TopKSetting(2, "sparse")}
    with pytest.raises(ValueError, match="`topk_compute` must be"):
        tuner.update_config(topk_compute="never", top_k_lora=1)
    assert tuner.xlora_config.topk_compute == "sparse" and tuner.xlora_config.top_k_lora == 2
    assert {layer.topk for layer in tuner.mixture_layers()} == {TopKSetting(2, "sparse")}
    tuner.set_topk_lora(None)
    assert {layer.topk for layer in tuner.mixture_layers()} == {None}
    tuner.set_topk_lora(3)
    tuner.add_expert("e4", sixteen["e4"])
    assert {layer.topk for layer in tuner.mixture_layers()} == {TopKSetting(3, "sparse")}
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["topk_compute"] == "sparse"
    loaded = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    assert {layer.topk for layer in loaded.base_model.mixture_layers()} == {TopKSetting(3, "sparse")}


@pytest.fixture(scope="module")
def bart_experts(tmp_path_factory):
    """Three distinct random LoRA experts of a tiny BART, on the encoder's and decoder's attention (cross-attention
    keys and values read the source tokens, so those layers apply the source's scalings)."""
    from peft import LoraConfig, get_peft_model

    paths = {}
    for i in range(3):
        torch.manual_seed(200 + i)
        lora = get_peft_model(
            tiny_bart(), LoraConfig(task_type="SEQ_2_SEQ_LM", r=2 + i, lora_alpha=4, init_lora_weights=False,
                                    target_modules=["q_proj", "k_proj", "v_proj"])
        )  # fmt: skip
        path = tmp_path_factory.mktemp(f"bart-{i}")
        lora.save_pretrained(path)
        paths[f"b{i}"] = str(path)
    return paths


def tiny_bart():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BartConfig(
        vocab_size=61, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
    )  # fmt: skip
    return tf.BartForConditionalGeneration(config).eval()


@pytest.mark.parametrize("k", [1, 2])
def test_encoder_decoder(bart_experts, sparse_calls, k):
    # source and target lengths differ: cross-attention layers must use the source tokens' choices
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(3, 61, (2, 7), generator=g),
        "decoder_input_ids": torch.randint(3, 61, (2, 5), generator=g),
    }
    out = {}
    for mode in ("dense", "sparse"):
        torch.manual_seed(0)
        config = XLoraConfig(
            task_type="SEQ_2_SEQ_LM", adapters=bart_experts, xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0,
            classifier_init="random", top_k_lora=k, topk_compute=mode,
        )  # fmt: skip
        from peft import get_peft_model

        model = get_peft_model(tiny_bart(), config).train()
        logits = model(**batch, labels=batch["decoder_input_ids"]).logits
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[mode] = (logits.detach(), grads)
    assert sparse_calls
    torch.testing.assert_close(out["sparse"][0], out["dense"][0], **MODEL_TOL)
    assert out["dense"][1].keys() == out["sparse"][1].keys() and out["dense"][1]
    for name, grad in out["dense"][1].items():
        torch.testing.assert_close(out["sparse"][1][name], grad, **MODEL_TOL, msg=name)


def test_per_row_pins_on_a_sparse_model_equal_each_expert_built_alone(sixteen):
    # per-row pins x sparse top-2: row i pinned to expert i alone must be that expert's plain PEFT LoRA model
    # (the library benchmark's scoring; a wrong tile-to-expert mapping once gave rows other experts' outputs).
    from helpers.models import tiny_llama
    from peft_xlora.cli.demo.evaluate import pinned_token_losses

    names = list(sixteen)[:8]
    model = model_of(sixteen, 8, "sparse", top_k_lora=2).eval()
    ids = input_ids(batch=2, seq=12, seed=4)
    with torch.no_grad():
        ours = pinned_token_losses(model, ids, torch.eye(8)[4:], batch_size=2)  # (4, 2, 11)
        for row, name in zip(ours, names[4:]):
            alone = PeftModel.from_pretrained(tiny_llama(), sixteen[name]).eval()
            logits = alone(input_ids=ids).logits[:, :-1]
            expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            torch.testing.assert_close(row, expected, **MODEL_TOL)
