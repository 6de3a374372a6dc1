"""Concurrency and state: threads do not share per-call state, the scalings log stays well defined, building and
tearing down leaks nothing, and `unload()` gives back the base model exactly."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

from helpers.models import BUILDERS, build_xlora, input_ids
from peft_xlora.core.routing import current_routing

N_THREADS = 3


def run_together(fn, n: int = N_THREADS) -> list:
    """Runs fn(i) for i < n in n threads that start at the same moment; returns the results, re-raises errors."""
    barrier = threading.Barrier(n, timeout=60)
    results: list = [None] * n
    errors: list = []

    def work(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)  # a deadlock fails the test instead of hanging it
    assert not any(t.is_alive() for t in threads), "a thread did not finish within 120 s"
    if errors:
        raise errors[0]
    return results


def test_concurrent_generation_equals_generation_alone(expert_dirs):
    model = build_xlora("llama", expert_dirs).eval()
    prompts = [input_ids(1, 4 + i, seed=i) for i in range(N_THREADS)]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    alone = [model.generate(input_ids=p, **kwargs) for p in prompts]
    together = run_together(lambda i: model.generate(input_ids=prompts[i], **kwargs))
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_concurrent_training_forwards_get_their_own_scalings(expert_dirs):
    # Gradients of the classifier from each thread's loss equal those of the same loss computed alone.
    model = build_xlora("llama", expert_dirs, xlora_dropout_p=0.0)
    model.train()
    inputs = [input_ids(2, 5, seed=10 + i) for i in range(N_THREADS)]
    classifier = list(model.base_model.xlora_classifier.parameters())

    def grads(ids):
        loss = model(input_ids=ids, labels=ids).loss
        return torch.autograd.grad(loss, classifier)

    alone = [grads(ids) for ids in inputs]
    together = run_together(lambda i: grads(inputs[i]))
    for a, b in zip(alone, together):
        for ga, gb in zip(a, b):
            torch.testing.assert_close(ga, gb)


def test_scalings_log_under_concurrency(expert_dirs):
    # Each forward appends one complete entry (in the order the scaling passes finish); none is lost or mixed, and
    # get_latest_scalings() is the whole result of one of the forwards.
    model = build_xlora("llama", expert_dirs).eval()
    inputs = [input_ids(1, 3 + i, seed=20 + i) for i in range(N_THREADS)]
    expected = []
    for ids in inputs:
        model(input_ids=ids)
        expected.append(model.get_latest_scalings().clone())
    model.enable_scalings_logging()
    rounds = 3
    run_together(lambda i: [model(input_ids=inputs[i]) for _ in range(rounds)])
    log = model.get_scalings_log()
    assert len(log) == rounds * N_THREADS
    matches = [
        [i for i, e in enumerate(expected) if e.shape == entry.shape and torch.allclose(e, entry)] for entry in log
    ]
    assert all(len(m) == 1 for m in matches)
    assert sorted(m[0] for m in matches) == sorted(list(range(N_THREADS)) * rounds)
    latest = model.get_latest_scalings()
    assert any(e.shape == latest.shape and torch.allclose(e, latest) for e in expected)


def test_routing_state_is_clean_after_errors(expert_dirs):
    model = build_xlora("llama", expert_dirs).eval()
    with pytest.raises(ValueError, match="is on meta"):
        model(input_ids=input_ids().to("meta"))
    with pytest.raises(IndexError):
        model(input_ids=torch.full((1, 3), 10_000))  # out of vocabulary: fails inside the scaling pass
    assert current_routing() is None
    ids = input_ids()
    out = model(input_ids=ids).logits
    torch.testing.assert_close(out, build_xlora("llama", expert_dirs).eval()(input_ids=ids).logits)


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_build_and_teardown_leak_nothing(expert_dirs):
    ids = input_ids()

    def cycle():
        model = build_xlora("llama", expert_dirs)
        model(input_ids=ids, labels=ids).loss.backward()
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
        refs = [weakref.ref(model), weakref.ref(model.base_model), weakref.ref(model.base_model.xlora_classifier)]
        base = model.base_model.unload()
        del model
        return refs, weakref.ref(base)

    cycle()  # warm-up: caches that fill once (carrier classes, PEFT registries)
    before = _live_tensors()
    for _ in range(3):
        refs, base = cycle()
        gc.collect()
        assert all(r() is None for r in refs) and base() is None
    assert _live_tensors() <= before


def test_unload_gives_back_the_base_model_exactly(expert_dirs):
    base = BUILDERS["llama"]()
    original_types = {name: type(m) for name, m in base.named_modules()}
    original_state = {k: v.clone() for k, v in base.state_dict().items()}
    ids = input_ids()
    expected = base(input_ids=ids).logits
    from peft import get_peft_model

    from peft_xlora import XLoraConfig

    for _ in range(2):  # and again on the same base: nothing accumulates
        model = get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", adapters=expert_dirs["llama"], xlora_size=8))
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        returned = model.base_model.unload()
        assert returned is base
        assert {name: type(m) for name, m in base.named_modules()} == original_types
        assert base.state_dict().keys() == original_state.keys()
        assert all(torch.equal(v, original_state[k]) for k, v in base.state_dict().items())
        assert not base._forward_hooks and not base._forward_pre_hooks
        torch.testing.assert_close(base.eval()(input_ids=ids).logits, expected, rtol=0, atol=0)
