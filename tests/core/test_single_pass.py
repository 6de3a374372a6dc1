"""`routing="single_pass"`: static weights up to decoder layer k, the gate on its output, per-token scalings after."""

import functools

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import DynamicCache

from helpers.models import build_xlora, input_ids, tiny_llama
from helpers.reference import gate_reference, single_pass_reference
from peft_xlora import XLoraConfig
from peft_xlora.core import generation
from peft_xlora.core.single_pass import STATIC_NAME


def single(expert_dirs, k=1, **overrides):
    """A tiny Llama (2 decoder layers) in single-pass mode with random classifier and random static logits."""
    torch.manual_seed(0)
    model = build_xlora("llama", expert_dirs, routing="single_pass", scaling_pass_layers=k, **overrides).eval()
    static = static_module(model)
    if static.learned:
        with torch.no_grad():
            static.logits.normal_()  # distinct static weights per layer, not the uniform start
    return model


def static_module(model):
    return model.base_model.xlora_classifier.get_submodule(STATIC_NAME)


def static_logits(model):
    """Early mixture layer name -> its (n_experts,) static logits (zeros in uniform mode)."""
    tuner = model.base_model
    static = static_module(model)
    out = {}
    for i, name in enumerate(tuner.mixture_layer_names):
        if i not in tuner.router.late_layers:
            row = static.row_of_layer[i]
            out[name] = static.logits[row] if static.learned else torch.zeros(len(tuner.expert_names))
    return out


def reference(model, expert_dirs, ids, k=1, gate_fn=None):
    return single_pass_reference(model, expert_dirs["llama"], ids, k, static_logits(model), gate_fn=gate_fn)


def test_the_layers_after_k_are_late(expert_dirs):
    tuner = single(expert_dirs, k=1).base_model
    late = {tuner.mixture_layer_names[i] for i in tuner.router.late_layers}
    assert late == {n for n in tuner.mixture_layer_names if n.startswith("model.layers.1.")}
    assert "model.embed_tokens" in tuner.mixture_layer_names  # the embedding is early: it runs before layer 1


@pytest.mark.parametrize("k", [1])  # k = 2 is every layer of the tiny Llama: refused (tests/core/test_combinations.py)
def test_forward_matches_the_plain_reference(k, expert_dirs):
    model = single(expert_dirs, k=k)
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(model, expert_dirs, ids, k))


@pytest.mark.parametrize(
    "options",
    [
        {"softmax_temperature": 0.5, "global_scaling_weight": 0.7},
        {"top_k_lora": 2},
        {"top_k_lora": 2, "enable_softmax_topk": True},
        {"layerwise_scalings": True, "top_k_lora": 1},
    ],
    ids=["temperature-global", "topk", "softmax-topk", "layerwise-top1"],
)
def test_gating_options_match_the_reference(options, expert_dirs):
    model = single(expert_dirs, **options)
    gate_fn = functools.partial(
        gate_reference,
        temperature=options.get("softmax_temperature", 1.0),
        enable_softmax=True,
        top_k=options.get("top_k_lora"),
        softmax_topk=options.get("enable_softmax_topk", False),
        global_weight=options.get("global_scaling_weight", 1.0),
    )
    ids = input_ids()
    with torch.no_grad():
        expected = reference(model, expert_dirs, ids, gate_fn=gate_fn)
        torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_gradients_match_the_reference(expert_dirs):
    model = single(expert_dirs, xlora_dropout_p=0.0).train()
    ids = input_ids()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith(f"{STATIC_NAME}.logits") for n in trainable)
    model(input_ids=ids).logits.square().mean().backward()
    got = {n: p.grad.clone() for n, p in trainable.items()}
    model.zero_grad()
    reference(model, expert_dirs, ids).square().mean().backward()
    for name, param in trainable.items():
        assert got[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], param.grad, msg=name)


def test_uniform_static_weights_and_an_untrained_gate_are_the_uniform_mixture(expert_dirs):
    # Layers 1..k mix 1/3 of each expert (uniform, or learned logits at their zero start), and the untrained gate
    # (classifier_init="uniform") gives the later layers 1/3 too: the model pinned to 1/3 everywhere.
    ids = input_ids()
    options = {"routing": "single_pass", "scaling_pass_layers": 1, "classifier_init": "uniform"}
    with torch.no_grad():
        uniform = build_xlora("llama", expert_dirs, single_pass_static="uniform", **options).eval()(input_ids=ids)
        at_start = build_xlora("llama", expert_dirs, **options).eval()(input_ids=ids).logits
        pinned = build_xlora("llama", expert_dirs).eval()
        pinned.set_static_scalings(torch.full((3,), 1 / 3))
        expected = pinned(input_ids=ids).logits
    torch.testing.assert_close(uniform.logits, expected)
    torch.testing.assert_close(at_start, expected)
    assert not any(
        p.requires_grad for p in static_module(single(expert_dirs, single_pass_static="uniform")).parameters()
    )


def _no_scaling_cache(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the single pass must not prepare the dual-pass cache")

    monkeypatch.setattr(generation, "prepare_cache", refuse)
    monkeypatch.setattr("peft_xlora.core.routers.dual_pass.prepare_cache", refuse)


def test_cached_generation_equals_uncached_and_the_full_forward(expert_dirs, monkeypatch):
    _no_scaling_cache(monkeypatch)
    model = single(expert_dirs)
    ids = input_ids(batch=1, seq=5)
    out = model.generate(
        input_ids=ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    uncached = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, uncached)
    with torch.no_grad():
        full = model(input_ids=out.sequences).logits  # (1, 11, vocab)
    steps = torch.stack(out.logits, dim=1)  # (1, 6, vocab): each cached step's next-token logits
    torch.testing.assert_close(steps, full[:, 4:-1], rtol=1e-4, atol=1e-5)


def test_the_cache_is_the_models_own(expert_dirs):
    model = single(expert_dirs)
    with torch.no_grad():
        out = model(input_ids=input_ids(batch=1), use_cache=True)
    assert type(out.past_key_values) is DynamicCache


def test_left_padded_batch_rows_equal_each_row_alone(expert_dirs):
    model = single(expert_dirs)
    short, long = input_ids(batch=1, seq=4, seed=1), input_ids(batch=1, seq=7, seed=2)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 3), torch.ones(1, 4)], dim=1), torch.ones(1, 7)]).long()
    together = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for row, alone_ids in enumerate((short, long)):
        alone = model.generate(input_ids=alone_ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(together[row, -5:], alone[0, -5:]), row


def test_beam_search_cached_equals_uncached(expert_dirs):
    model = single(expert_dirs)
    ids = input_ids(batch=2, seq=5)
    kwargs = {"max_new_tokens": 5, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(
        model.generate(input_ids=ids, **kwargs), model.generate(input_ids=ids, use_cache=False, **kwargs)
    )


def _grads(model, forwards):
    for ids in forwards:
        model(input_ids=ids, labels=ids).loss.backward()  # accumulates: several forwards, one backward each
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _two_forwards_one_backward(model, batches):
    losses = [model(input_ids=ids, labels=ids).loss for ids in batches]
    sum(losses).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("trainable", [False, True], ids=["classifier", "experts-too"])
def test_gradient_checkpointing_gives_the_same_gradients(mode, trainable, expert_dirs):
    batches = [input_ids(seed=3), input_ids(seed=4)]

    def build(checkpointing):
        model = single(expert_dirs, xlora_dropout_p=0.0, use_trainable_adapters=trainable, layerwise_scalings=True)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
        return model.train()

    plain = _two_forwards_one_backward(build(False), batches)
    checkpointed = _two_forwards_one_backward(build(True), batches)
    sequential = _grads(build(True), batches)
    assert plain.keys() == checkpointed.keys() and any(STATIC_NAME in n for n in plain)
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
        torch.testing.assert_close(sequential[name], grad, msg=name)


def test_save_and_load_are_exact(expert_dirs, tmp_path):
    model = single(expert_dirs, layerwise_scalings=True)
    ids = input_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    key = f"base_model.xlora_classifier.{STATIC_NAME}.logits"
    torch.testing.assert_close(saved[key], static_module(model).logits.detach(), rtol=0, atol=0)
    config = XLoraConfig.from_pretrained(tmp_path)
    assert (config.routing, config.single_pass_static, config.scaling_pass_layers) == ("single_pass", "learned", 1)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_latest_scalings_report_static_weights_for_the_early_layers(expert_dirs):
    model = single(expert_dirs)
    tuner = model.base_model
    model.enable_scalings_logging()
    ids = input_ids()
    seen = []
    hook = tuner.model.model.layers[0].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    scalings = model.get_latest_scalings()
    assert scalings.shape == (2, 7, len(tuner.mixture_layer_names), 3)
    static = static_module(model)()[0, 0]  # (n_layers, n_experts)
    with torch.no_grad():
        logits = tuner.xlora_classifier(seen[0])  # from layer 1's output in the same forward
    for i in range(len(tuner.mixture_layer_names)):
        if i in tuner.router.late_layers:
            torch.testing.assert_close(scalings[:, :, i], torch.softmax(logits[:, :, 0], dim=-1))
        else:
            torch.testing.assert_close(scalings[:, :, i], static[i].expand(2, 7, 3))
    log = model.get_scalings_log()
    assert len(log) == 1 and log[0].shape == scalings.shape


def test_router_losses_are_added(expert_dirs):
    model = single(expert_dirs, router_entropy_coef=0.5)
    ids = input_ids()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.router_loss > 0
    assert set(model.get_latest_router_losses()) == {"load_balancing", "entropy"}


def test_config_errors(expert_dirs):
    adapters = expert_dirs["llama"]
    with pytest.raises(ValueError, match="needs `scaling_pass_layers=k`"):
        XLoraConfig(adapters=adapters, routing="single_pass")
    with pytest.raises(ValueError, match="`routing` must be"):
        XLoraConfig(adapters=adapters, routing="one_pass")
    with pytest.raises(ValueError, match="`single_pass_static` must be"):
        XLoraConfig(adapters=adapters, routing="single_pass", scaling_pass_layers=1, single_pass_static="random")
    with pytest.raises(ValueError, match="no scaling pass for `scalings_mode='prompt'`"):
        XLoraConfig(adapters=adapters, routing="single_pass", scaling_pass_layers=1, scalings_mode="prompt")
    assert XLoraConfig(adapters=adapters).routing == "dual_pass"


def test_routing_cannot_change_on_a_built_model(expert_dirs):
    model = single(expert_dirs)
    with pytest.raises(ValueError, match="cannot change on a built model"):
        model.update_config(routing="dual_pass")
    assert model.base_model.xlora_config.routing == "single_pass"
    model.update_config(top_k_lora=1)  # gating options still change
    with pytest.raises(ValueError, match="does not apply to routing='single_pass'"):
        model.generate(input_ids=input_ids(batch=1), max_new_tokens=2, scalings_mode="prompt")


def test_pinned_gate_overrides_the_single_pass(expert_dirs):
    model = single(expert_dirs)
    pinned = build_xlora("llama", expert_dirs).eval()
    weights = {"math": 0.2, "code": 0.5, "poetry": 0.3}
    model.set_static_scalings(weights)
    pinned.set_static_scalings(weights)
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, pinned(input_ids=ids).logits)


def test_export_plain_lora_at_a_pinned_gate_and_mistralrs_refuses(expert_dirs, tmp_path):
    from peft_xlora.io.export import export_lora, export_mistralrs

    model = single(expert_dirs)
    with pytest.raises(ValueError, match=r"mistral\.rs runs X-LoRA's dual pass only"):
        export_mistralrs(model, tmp_path / "mistralrs", base_model_id="tiny")
    assert not (tmp_path / "mistralrs").exists()
    weights = {"math": 0.6, "code": 0.1, "poetry": 0.3}
    model.set_static_scalings(weights)
    ids = input_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export_lora(model, tmp_path / "lora", weights)
    lora = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_plot_scalings_draws_the_single_pass(expert_dirs, tmp_path):
    pytest.importorskip("matplotlib")
    from peft_xlora import plot_scalings

    model = single(expert_dirs)
    with torch.no_grad():
        model(input_ids=input_ids())
    plot_scalings(model.base_model, tmp_path / "tokens.png")
    plot_scalings(model.base_model, tmp_path / "layers.png", view="layers")
    assert (tmp_path / "tokens.png").stat().st_size > 0 and (tmp_path / "layers.png").stat().st_size > 0


def test_a_late_layer_running_before_layer_k_is_a_clear_error():
    from peft_xlora.core.routing import Routing
    from peft_xlora.core.single_pass import SinglePassState

    static = torch.full((1, 1, 1, 3), 1 / 3)
    routing = Routing(static, single_pass=SinglePassState(frozenset({1}), {}))
    assert routing.scalings_for(0) is static  # early layers: the static weights
    with pytest.raises(RuntimeError, match="ran before layer k gave the per-token scalings"):
        routing.scalings_for(1)
    late = torch.rand(2, 7, 1, 3)
    routing.single_pass.late = late
    assert routing.scalings_for(1) is late and routing.snapshot().late_scalings is late


def test_masked_experts_get_no_weight_after_layer_k(expert_dirs):
    # `set_active_experts` masks the gate of the late layers too (the single pass has its own gate call).
    model = build_xlora("llama", expert_dirs, routing="single_pass", scaling_pass_layers=1).eval()
    ids = input_ids()
    tuner = model.base_model
    late = min(tuner.router.late_layers)
    with torch.no_grad():
        model(input_ids=ids)
        dense = model.get_latest_scalings()[:, :, late].clone()  # a late layer's scalings
        model.set_active_experts(["math", "poetry"])
        model(input_ids=ids)
    masked = model.get_latest_scalings()[:, :, late]
    code = tuner.expert_names.index("code")
    assert dense[..., code].abs().max() > 0
    torch.testing.assert_close(masked[..., code], torch.zeros_like(masked[..., code]), rtol=0, atol=0)
    torch.testing.assert_close(masked.sum(-1), torch.ones_like(masked.sum(-1)))
