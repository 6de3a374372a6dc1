"""Cached generation: both passes cached, exact against uncached runs and full-sequence forwards; prompt mode."""

import pytest
import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from helpers.models import build_xlora, input_ids
from peft_xlora.core.generation import XLoraCache
from peft_xlora.core.routing import Routing

ARCHS = ["llama", "gpt2"]
MODES = ["token", "prompt"]
TOL = {"rtol": 1e-4, "atol": 1e-5}  # float32; cached and uncached attention sum in different orders
PAD = 0


def model_for(arch, expert_dirs, **overrides):
    """An eval-mode X-LoRA model (a fresh PeftModel is in training mode, so the classifier's dropout would be on)."""
    return build_xlora(arch, expert_dirs, **overrides).eval()


def greedy(model, ids, new=6, **kwargs):
    """Greedy generation of exactly `new` tokens (EOS suppressed), returning sequences and raw logits."""
    kwargs.setdefault("min_new_tokens", new)
    return model.generate(
        input_ids=ids, max_new_tokens=new, do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs
    )


def step_logits(out):
    return torch.stack(out.logits, dim=1)  # (batch, new, vocab)


def reference_logits(model, sequences, prompt_length, mode, monkeypatch, attention_mask=None):
    """Logits of ONE uncached forward over the final sequences, at the positions that produced each new token.

    Token mode is the plain forward. Prompt mode is the same forward with its routing replaced: per-token scalings on
    the prompt, the last prompt token's scalings on every later position.
    """
    xlora = model.base_model
    inputs = {"input_ids": sequences, "attention_mask": attention_mask, "use_cache": False}
    if attention_mask is not None:  # positions as generate numbers them under left padding (GPT-2's are absolute)
        inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(**inputs).logits
        if mode == "prompt":
            scalings = xlora.get_latest_scalings().clone()  # (batch, seq, n_layers, n_experts)
            scalings[:, prompt_length:] = scalings[:, prompt_length - 1 : prompt_length]
            with monkeypatch.context() as patch:
                patch.setattr(xlora.router, "route", lambda args, kwargs: Routing(scalings))
                logits = model(**inputs).logits
    return logits[:, prompt_length - 1 : -1]


def left_pad(prompts):
    """Left-pads 1-D id tensors into (batch, max_len) ids and the matching attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


class CountScalingPasses:
    """Wraps the model's scaling pass and counts its calls."""

    def __init__(self, xlora, monkeypatch):
        self.calls = 0
        original = xlora.router.scaling_pass

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(xlora.router, "scaling_pass", counted)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scaling_pass_value", [0.0, 0.5])
@pytest.mark.parametrize("mode", MODES)
def test_greedy_cached_equals_uncached_and_full_forward(arch, scaling_pass_value, mode, expert_dirs, monkeypatch):
    model = model_for(arch, expert_dirs, scaling_pass_value=scaling_pass_value, scalings_mode=mode)
    ids = input_ids(2, 6)
    cached = greedy(model, ids)
    assert isinstance(cached.cache, XLoraCache)
    uncached = greedy(model, ids, use_cache=False)
    assert uncached.cache is None
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(step_logits(cached), step_logits(uncached), **TOL)
    reference = reference_logits(model, cached.sequences, ids.shape[1], mode, monkeypatch)
    torch.testing.assert_close(step_logits(cached), reference, **TOL)


def test_token_and_prompt_modes_differ(expert_dirs):
    # Guards the tests above against a prompt mode that silently routes per token (or the reverse).
    model = model_for("llama", expert_dirs)
    ids = input_ids(2, 6)
    token = step_logits(greedy(model, ids, scalings_mode="token"))
    prompt = step_logits(greedy(model, ids, scalings_mode="prompt"))
    torch.testing.assert_close(token[:, 0], prompt[:, 0], **TOL)  # the prompt itself is routed per token in both
    assert not torch.allclose(token[:, 1:], prompt[:, 1:], atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_left_padded_batch_equals_each_prompt_alone(arch, mode, expert_dirs):
    model = model_for(arch, expert_dirs, scaling_pass_value=0.3)
    prompts = [input_ids(1, n, seed=n)[0] for n in (3, 7, 5)]
    ids, mask = left_pad(prompts)
    batch = greedy(model, ids, attention_mask=mask, scalings_mode=mode)
    new = batch.sequences[:, ids.shape[1] :]
    for i, prompt in enumerate(prompts):
        alone = greedy(model, prompt[None], scalings_mode=mode)
        assert torch.equal(new[i], alone.sequences[0, len(prompt) :])
        torch.testing.assert_close(step_logits(batch)[i], step_logits(alone)[0], **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_sampling_with_fixed_seed(mode, expert_dirs):
    model = model_for("llama", expert_dirs, scalings_mode=mode)
    ids = input_ids(3, 5)
    runs = []
    for use_cache in (True, False, True):
        torch.manual_seed(123)
        runs.append(
            model.generate(
                input_ids=ids,
                max_new_tokens=8,
                min_new_tokens=8,
                do_sample=True,
                top_k=30,
                temperature=1.3,
                use_cache=use_cache,
            )
        )
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[2])
    torch.manual_seed(7)
    other = model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=30)
    assert not torch.equal(runs[0], other)  # the seed matters, so the equality above is not vacuous


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_beam_search(arch, mode, expert_dirs, monkeypatch):
    model = model_for(arch, expert_dirs, scaling_pass_value=0.5, scalings_mode=mode)
    ids, mask = left_pad([input_ids(1, n, seed=n)[0] for n in (4, 6)])
    kwargs = {
        "input_ids": ids,
        "attention_mask": mask,
        "max_new_tokens": 5,
        "min_new_tokens": 5,
        "num_beams": 3,
        "num_return_sequences": 2,
        "do_sample": False,
        "return_dict_in_generate": True,
        "output_scores": True,
    }
    cached = model.generate(**kwargs)
    uncached = model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, **TOL)
    # The returned beams were reordered in the cache at every step: their scores must be those of one full forward.
    full_mask = torch.cat([mask.repeat_interleave(2, 0), torch.ones(4, 5, dtype=torch.long)], dim=1)
    logits = reference_logits(model, cached.sequences, ids.shape[1], mode, monkeypatch, full_mask)
    new = cached.sequences[:, ids.shape[1] :]
    logprob = torch.log_softmax(logits.float(), -1).gather(-1, new[..., None]).sum((1, 2))
    torch.testing.assert_close(logprob / new.shape[1], cached.sequences_scores, **TOL)  # length_penalty 1


class StopAfter(StoppingCriteria):
    """Stops every row once the sequence is `length` long (counts its calls, to show it ran per step)."""

    def __init__(self, length):
        self.length = length
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


@pytest.mark.parametrize("mode", MODES)
def test_stopping_criteria_and_eos(mode, expert_dirs):
    model = model_for("llama", expert_dirs, scalings_mode=mode)
    ids = input_ids(1, 5)
    outs = []
    for use_cache in (True, False):
        criterion = StopAfter(ids.shape[1] + 4)
        outs.append(
            model.generate(
                input_ids=ids,
                max_new_tokens=20,
                do_sample=False,
                use_cache=use_cache,
                stopping_criteria=StoppingCriteriaList([criterion]),
            )
        )
        assert criterion.calls == 4
    assert outs[0].shape[1] == ids.shape[1] + 4
    assert torch.equal(outs[0], outs[1])
    # An EOS that greedy decoding reaches at the third new token stops both paths there.
    eos = int(outs[0][0, ids.shape[1] + 2])
    first = int((outs[0][0, ids.shape[1] :] == eos).nonzero()[0])
    for use_cache in (True, False):
        out = model.generate(
            input_ids=ids, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=PAD, use_cache=use_cache
        )
        assert out.shape[1] == ids.shape[1] + first + 1
        assert torch.equal(out, outs[0][:, : out.shape[1]])


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).clone())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("mode", MODES)
def test_streamer_sees_the_generated_tokens(mode, expert_dirs):
    model = model_for("llama", expert_dirs, scalings_mode=mode)
    ids = input_ids(1, 5)
    streamer = Collect()
    out = model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, streamer=streamer)
    assert streamer.ended
    assert torch.equal(torch.cat(streamer.chunks), out[0])  # the prompt first, then one chunk per token
    assert torch.equal(out, model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, use_cache=False))


def test_repeated_generate_calls_and_continuing_a_returned_cache(expert_dirs):
    model = model_for("gpt2", expert_dirs, scaling_pass_value=0.2)
    ids = input_ids(2, 5)
    first = greedy(model, ids)
    again = greedy(model, ids)
    assert torch.equal(first.sequences, again.sequences)
    torch.testing.assert_close(step_logits(first), step_logits(again), rtol=0, atol=0)
    # Continue the returned cache with two more user tokens: equal to generating from scratch on the whole text.
    longer = torch.cat([first.sequences, input_ids(2, 2, seed=5)], dim=1)
    cache = first.cache
    assert cache.get_seq_length() == cache.scaling_cache.get_seq_length() == first.sequences.shape[1] - 1
    continued = greedy(model, longer, cache=cache)
    fresh = greedy(model, longer, use_cache=False)
    assert torch.equal(continued.sequences, fresh.sequences)
    torch.testing.assert_close(step_logits(continued), step_logits(fresh), **TOL)


def test_prompt_mode_runs_the_scaling_pass_once_and_per_call_override(expert_dirs, monkeypatch):
    model = model_for("llama", expert_dirs)  # config: token mode
    counter = CountScalingPasses(model.base_model, monkeypatch)
    ids = input_ids(2, 5)
    token = greedy(model, ids, new=6)
    assert counter.calls == 6  # the prefill and five decoding steps
    counter.calls = 0
    override = greedy(model, ids, new=6, scalings_mode="prompt")
    assert counter.calls == 1  # the prompt only
    assert override.cache.scalings_mode == "prompt" and override.cache.scaling_cache is None
    assert override.cache.held_scalings.shape == (2, 1, 1, 3)
    configured = greedy(model_for("llama", expert_dirs, scalings_mode="prompt"), ids, new=6)
    assert torch.equal(override.sequences, configured.sequences)
    torch.testing.assert_close(step_logits(override), step_logits(configured), rtol=0, atol=0)
    assert not torch.equal(step_logits(token), step_logits(override))
    with pytest.raises(ValueError, match="scalings_mode"):
        model.generate(input_ids=ids, max_new_tokens=2, scalings_mode="sentence")
    # A cache that holds prompt scalings cannot continue in token mode: its scaling pass never saw the new tokens.
    with pytest.raises(ValueError, match="prompt"):
        model.generate(input_ids=override.sequences, max_new_tokens=2, cache=override.cache, scalings_mode="token")


@pytest.mark.parametrize("mode", MODES)
def test_model_with_use_cache_off_generates_without_cache(mode, expert_dirs):
    reference = greedy(model_for("llama", expert_dirs, scalings_mode=mode), input_ids(2, 5))
    model = model_for("llama", expert_dirs, scalings_mode=mode)
    model.base_model.model.config.use_cache = False
    model.base_model.model.generation_config.use_cache = False
    out = greedy(model, input_ids(2, 5))
    assert out.cache is None
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(step_logits(out), step_logits(reference), **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_manual_decoding_loop_extends_the_returned_cache(arch, expert_dirs):
    model = model_for(arch, expert_dirs, scaling_pass_value=0.4)
    seq = input_ids(2, 9)
    with torch.no_grad():
        full = model(input_ids=seq, use_cache=False).logits
        full_scalings = model.get_latest_scalings()
        out = model(input_ids=seq[:, :5])  # use_cache defaults to the model config's (on)
        cache = out.cache
        assert isinstance(cache, XLoraCache)
        logits = [out.logits]
        for t in range(5, 9):
            out = model(input_ids=seq[:, t : t + 1], cache=cache)
            assert out.cache is cache
            logits.append(out.logits)
            assert model.get_latest_scalings().shape == (2, 1, *full_scalings.shape[2:])
            torch.testing.assert_close(model.get_latest_scalings()[:, 0], full_scalings[:, t], **TOL)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, **TOL)
    assert cache.get_seq_length() == cache.scaling_cache.get_seq_length() == 9


def test_callers_caches(expert_dirs):
    model = model_for("llama", expert_dirs)
    seq = input_ids(1, 6)
    with torch.no_grad():
        full = model(input_ids=seq, use_cache=False).logits
        mine = DynamicCache()
        model(input_ids=seq[:, :4], cache=mine)
        assert isinstance(mine, XLoraCache)  # upgraded in place: the caller's reference stays the cache
        out = model(input_ids=seq[:, 4:], cache=mine)
        torch.testing.assert_close(out.logits, full[:, 4:], **TOL)
        filled = DynamicCache()
        with model.disable_adapter():
            model(input_ids=seq[:, :4], cache=filled)
        with pytest.raises(ValueError, match="without X-LoRA's scaling pass"):
            model(input_ids=seq[:, 4:], cache=filled)
        with pytest.raises(ValueError, match="StaticCache"):
            model.generate(input_ids=seq, max_new_tokens=2, cache_implementation="static")
        # Tokens run with static scalings never reached the scaling cache: continuing without them is refused.
        cache = model(input_ids=seq[:, :3]).cache
        model.base_model.set_static_scalings({"math": 1.0})
        model(input_ids=seq[:, 3:4], cache=cache)
        model.base_model.set_static_scalings(None)
        with pytest.raises(RuntimeError, match="static scalings"):
            model(input_ids=seq[:, 4:5], cache=cache)


def test_training_mode_forward_keeps_no_scaling_cache(expert_dirs):
    model = build_xlora("llama", expert_dirs).train()
    out = model(input_ids=input_ids(2, 5), use_cache=True)
    assert type(out.cache) is DynamicCache


@pytest.mark.parametrize("mode", MODES)
def test_latest_scalings_during_cached_generation(mode, expert_dirs):
    model = model_for("llama", expert_dirs, scalings_mode=mode, layerwise_scalings=True)
    ids = input_ids(2, 5)
    out = greedy(model, ids, new=4)
    latest = model.get_latest_scalings()
    n_layers = len(model.base_model.mixture_layer_names)
    assert latest.shape == (2, 1, n_layers, 3)  # the last decoding step's one token
    with torch.no_grad():
        model(input_ids=out.sequences, use_cache=False)
    full = model.get_latest_scalings()  # (batch, seq, n_layers, n_experts), per token
    # The last step fed the next-to-last token; prompt mode held the last prompt token's scalings.
    expected = full[:, -2] if mode == "token" else full[:, ids.shape[1] - 1]
    torch.testing.assert_close(latest[:, 0], expected, **TOL)


def test_static_scalings_with_cache(expert_dirs):
    model = model_for("llama", expert_dirs)
    model.base_model.set_static_scalings({"math": 0.7, "poetry": 0.5})
    ids = input_ids(2, 5)
    cached, uncached = greedy(model, ids), greedy(model, ids, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(step_logits(cached), step_logits(uncached), **TOL)


def filled_cache(model, batch=3, mode="token"):
    ids = input_ids(batch, 4)
    with torch.no_grad():
        return model(input_ids=ids, cache=XLoraCache(scalings_mode=mode)).cache


def test_cache_rearrangements_move_both_caches_and_held_scalings(expert_dirs):
    model = model_for("llama", expert_dirs)
    cache = filled_cache(model, mode="prompt")
    main_k, scaling_k = cache.layers[0].keys.clone(), cache.scaling_cache.layers[0].keys.clone()
    held = cache.held_scalings.clone()
    assert held.shape == (3, 1, 1, 3) and not torch.allclose(held[0], held[1])
    order = torch.tensor([2, 0, 1])
    cache.reorder_cache(order)
    torch.testing.assert_close(cache.layers[0].keys, main_k[order], rtol=0, atol=0)
    torch.testing.assert_close(cache.scaling_cache.layers[0].keys, scaling_k[order], rtol=0, atol=0)
    torch.testing.assert_close(cache.held_scalings, held[order], rtol=0, atol=0)
    cache.batch_select_indices(torch.tensor([1, 2]))
    torch.testing.assert_close(cache.scaling_cache.layers[0].keys, scaling_k[[0, 1]], rtol=0, atol=0)
    torch.testing.assert_close(cache.held_scalings, held[[0, 1]], rtol=0, atol=0)
    cache.batch_repeat_interleave(2)
    assert cache.scaling_cache.layers[0].keys.shape[0] == cache.held_scalings.shape[0] == 4
    cache.crop(-1)
    assert cache.get_seq_length() == cache.scaling_cache.get_seq_length() == 3
    cache.reset()
    assert cache.get_seq_length() == cache.scaling_cache.get_seq_length() == 0 and cache.held_scalings is None


def test_scaling_cache_ahead_after_a_failed_forward_is_cropped(expert_dirs, monkeypatch):
    model = model_for("llama", expert_dirs)
    seq = input_ids(1, 6)
    with torch.no_grad():
        full = model(input_ids=seq, use_cache=False).logits
        cache = model(input_ids=seq[:, :4]).cache
        # Fails after the scaling pass extended its cache and before the main pass extends its own.
        classifier = model.base_model.xlora_classifier
        monkeypatch.setattr(classifier, "forward", lambda hidden: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            model(input_ids=seq[:, 4:5], cache=cache)
        monkeypatch.undo()
        assert cache.scaling_cache.get_seq_length() == cache.get_seq_length() + 1  # the scaling pass ran
        out = model(input_ids=seq[:, 4:], cache=cache)
    torch.testing.assert_close(out.logits, full[:, 4:], **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_prompt_lookup_and_chunked_prefill(mode, expert_dirs):
    # Both feed several tokens per forward after the first: candidate verification (then a crop of the rejected
    # ones from both caches) and a prompt split into chunks. Neither may change the tokens.
    model = model_for("llama", expert_dirs, scalings_mode=mode)
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])  # repeats, so prompt lookup finds candidates
    kwargs = {"input_ids": ids, "max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    reference = model.generate(**kwargs, use_cache=False)
    lengths = []
    hook = model.base_model.model.register_forward_pre_hook(
        lambda module, args, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        lookup = model.generate(**kwargs, prompt_lookup_num_tokens=3)
        assert lengths[0] >= ids.shape[1] and max(lengths[1:]) > 1  # candidates were verified several at a time
        lengths.clear()
        chunked = model.generate(**kwargs, prefill_chunk_size=4)
        assert lengths[:3] == [4, 4, 3]
    finally:
        hook.remove()
    assert torch.equal(lookup, reference)
    assert torch.equal(chunked, reference)
