"""The X-LoRA model end to end: experts, trainable parameters, mixture wiring, pinned gating vs PEFT's own LoRA."""

import threading

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.save_and_load import load_peft_weights

from helpers.models import BUILDERS, EXPERT_SPECS, build_xlora, input_ids
from helpers.reference import mixture_reference
from peft_xlora import XLoraConfig, XLoraLayer, XLoraModel

ARCHS = ["llama", "gpt2"]


def single_lora(arch, path):
    """The plain PEFT LoRA model of one expert (eval mode)."""
    return PeftModel.from_pretrained(BUILDERS[arch](), path).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_are_distinct(arch, expert_dirs):
    ids = input_ids()
    outputs = [single_lora(arch, path)(input_ids=ids).logits for path in expert_dirs[arch].values()]
    base = BUILDERS[arch]()(input_ids=ids).logits
    for i, out in enumerate(outputs):
        assert not torch.allclose(out, base, atol=1e-3)
        for other in outputs[i + 1 :]:
            assert not torch.allclose(out, other, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_build_wraps_every_targeted_module_and_only_classifier_trains(arch, expert_dirs):
    model = build_xlora(arch, expert_dirs)
    tuner = model.base_model
    assert isinstance(tuner, XLoraModel)
    targeted = set()
    for path in expert_dirs[arch].values():
        for key in load_peft_weights(path):
            if "lora_" in key:
                targeted.add(key.removeprefix("base_model.model.").split(".lora_")[0])
    assert set(tuner.mixture_layer_names) == targeted
    layers = tuner.mixture_layers()
    assert [layer.layer_index for layer in layers] == list(range(len(layers)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".xlora_classifier." in n}
    counted, total = model.get_nb_trainable_parameters()
    assert counted == sum(p.numel() for p in tuner.xlora_classifier.parameters())
    assert total == sum(p.numel() for p in model.parameters())


def test_expert_names_are_kept_and_any_string_works(expert_dirs):
    dirs = expert_dirs["llama"]
    names = ["0", "math.v2", "layers.0"]  # names that broke key-based designs
    model = build_xlora("llama", {"llama": dict(zip(names, dirs.values()))})
    assert model.base_model.expert_names == names
    model(input_ids=input_ids())
    assert model.get_latest_scalings().shape[-1] == 3


def test_trainable_adapters_declares_expert_factors(expert_dirs):
    model = build_xlora("llama", expert_dirs, use_trainable_adapters=True)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert {"xlora_A", "xlora_B"} <= trainable
    base_trainable = [n for n, p in model.named_parameters() if p.requires_grad and "base_layer" in n]
    assert base_trainable == []


def test_hidden_size_is_inferred_and_checked(expert_dirs):
    model = build_xlora("llama", expert_dirs)
    assert model.peft_config["default"].hidden_size == 32
    with pytest.raises(ValueError, match="does not match the model's hidden size 32"):
        build_xlora("llama", expert_dirs, hidden_size=64)


def test_user_config_is_not_mutated(expert_dirs):
    config = XLoraConfig(task_type="CAUSAL_LM", adapters=expert_dirs["llama"], xlora_depth=2, xlora_size=8)
    get_peft_model(BUILDERS["llama"](), config)
    assert config.experts is None and config.hidden_size is None
    get_peft_model(BUILDERS["llama"](), config)(input_ids=input_ids())  # reusable for a second model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("j", [0, 1, 2])
def test_pinned_one_hot_equals_single_peft_lora(arch, j, expert_dirs):
    model = build_xlora(arch, expert_dirs).eval()
    names = list(expert_dirs[arch])
    model.set_static_scalings({names[j]: 1.0})
    ids = input_ids()
    ours = model(input_ids=ids).logits
    ref = single_lora(arch, expert_dirs[arch][names[j]])(input_ids=ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_pinned_weights_equal_peft_weighted_cat_adapter(arch, expert_dirs):
    weights = [0.5, 0.3, 0.2]
    names = list(expert_dirs[arch])
    model = build_xlora(arch, expert_dirs).eval()
    model.set_static_scalings(dict(zip(names, weights)))
    ids = input_ids()
    ours = model(input_ids=ids).logits

    ref = PeftModel.from_pretrained(BUILDERS[arch](), expert_dirs[arch][names[0]], adapter_name=names[0])
    for name in names[1:]:
        ref.load_adapter(expert_dirs[arch][name], adapter_name=name)
    ref.add_weighted_adapter(names, weights, adapter_name="mix", combination_type="cat")
    ref.set_adapter("mix")
    torch.testing.assert_close(ours, ref.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


class NaiveMixture(torch.nn.Module):
    """A layer computing the mixture with the per-expert loop, from the same factors and scalings."""

    def __init__(self, layer: XLoraLayer, scalings: torch.Tensor):
        super().__init__()
        self.layer, self.scalings = layer, scalings

    def forward(self, x):
        layer = self.layer
        factors = [
            (*layer.expert_factors(p), layer.rank_scale[sum(layer.ranks[:p])].item()) for p in range(len(layer.ranks))
        ]
        s = self.scalings[:, :, layer.layer_index][..., layer.expert_indices]
        out = mixture_reference(x, layer.base_layer(x), factors, s, is_embedding=layer.is_embedding)
        if layer.is_embedding and hasattr(layer.base_layer, "embed_scale"):
            raise AssertionError("not covered by this reference")
        return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layerwise", [False, True])
def test_model_mixture_equals_naive_reference(arch, layerwise, expert_dirs):
    model = build_xlora(arch, expert_dirs, layerwise_scalings=layerwise).eval()
    ids = input_ids()
    ours = model(input_ids=ids).logits
    scalings = model.get_latest_scalings()
    assert scalings.shape == (2, 7, len(model.base_model.mixture_layer_names), 3)
    torch.testing.assert_close(scalings.sum(-1), torch.ones(scalings.shape[:-1]))
    assert layerwise or torch.equal(scalings[:, :, 0], scalings[:, :, -1])

    # Reference: the base model with each mixture layer replaced by the naive loop over the same scalings.
    tuner = model.base_model
    reference = BUILDERS[arch]().eval()
    for name, layer in zip(tuner.mixture_layer_names, tuner.mixture_layers()):
        parent_name, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent_name), child, NaiveMixture(layer, scalings))
    torch.testing.assert_close(ours, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_classifier_reads_last_hidden_state_of_scaling_pass(expert_dirs):
    # The whole model in the scaling pass; the default's layer k: tests/core/test_scaling_pass_layers.py.
    model = build_xlora("llama", expert_dirs, scaling_pass_layers=None).eval()
    ids = input_ids()
    model(input_ids=ids)
    with model.disable_adapter():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    tuner = model.base_model
    config = tuner.xlora_config
    expected = torch.softmax(tuner.xlora_classifier(hidden).float() / config.softmax_temperature, -1)
    torch.testing.assert_close(model.get_latest_scalings()[:, :, :1], expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapter_gives_base_model_exactly(arch, expert_dirs):
    model = build_xlora(arch, expert_dirs).eval()
    ids = input_ids()
    with model.disable_adapter():
        disabled = model(input_ids=ids).logits
    assert torch.equal(disabled, BUILDERS[arch]()(input_ids=ids).logits)
    assert not torch.equal(model(input_ids=ids).logits, disabled)
    assert all(p.requires_grad for p in model.base_model.xlora_classifier.parameters())


@pytest.mark.parametrize("k", [None, "auto"])
def test_scaling_pass_value(expert_dirs, k):
    model = build_xlora("llama", expert_dirs, scaling_pass_layers=k).eval()
    read = model.peft_config["default"].scaling_pass_layers  # "auto" on 2 layers: 1
    ids = input_ids()
    model(input_ids=ids)
    at_zero = model.get_latest_scalings()
    model.set_scaling_pass_value(None)
    assert model.peft_config["default"].scaling_pass_value == pytest.approx(1 / 3)
    model(input_ids=ids)
    assert not torch.allclose(model.get_latest_scalings(), at_zero)
    # Reference: the scaling pass is the model pinned at 1/3 per expert.
    model.set_static_scalings(torch.full((3,), 1 / 3))
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1 if read is None else read]
    model.set_static_scalings(None)
    model(input_ids=ids)
    logits = model.base_model.xlora_classifier(hidden)
    torch.testing.assert_close(model.get_latest_scalings()[:, :, :1], torch.softmax(logits.float(), -1))


def test_topk_and_global_weight_setters(expert_dirs):
    model = build_xlora("llama", expert_dirs).eval()
    ids = input_ids()
    model.set_topk_lora(2)
    assert model.get_topk_lora() == 2
    model(input_ids=ids)
    assert ((model.get_latest_scalings() != 0).sum(-1) == 2).all()
    model.set_global_scaling_weight(0.0)
    assert model.get_global_scaling_weight() == 0.0
    out = model(input_ids=ids).logits
    with model.disable_adapter():
        torch.testing.assert_close(out, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="top_k_lora"):
        model.set_topk_lora(4)
    assert model.get_topk_lora() == 2


def test_static_scalings_validation(expert_dirs):
    model = build_xlora("llama", expert_dirs)
    with pytest.raises(ValueError, match="Unknown experts"):
        model.set_static_scalings({"nope": 1.0})
    with pytest.raises(ValueError, match="shape"):
        model.set_static_scalings(torch.ones(5))
    with pytest.raises(ValueError, match="finite"):
        model.set_static_scalings(torch.tensor([1.0, float("nan"), 0.0]))


def test_forward_changes_neither_mode_nor_requires_grad(expert_dirs):
    model = build_xlora("llama", expert_dirs)
    ids = input_ids()
    for mode in (True, False):
        model.train(mode)
        before = {n: p.requires_grad for n, p in model.named_parameters()}
        model(input_ids=ids, labels=ids)
        with model.disable_adapter():
            model(input_ids=ids)
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before
        assert all(m.training == mode for m in model.modules())


def test_concurrent_forwards_do_not_share_scalings(expert_dirs):
    # Two threads drive the same model with different inputs; each must get exactly its own single-thread result.
    model = build_xlora("llama", expert_dirs).eval()
    inputs = [input_ids(seed=s) for s in range(4)]
    expected = [model(input_ids=ids).logits for ids in inputs]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                results[i] = model(input_ids=inputs[i]).logits
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)  # a deadlock fails the test instead of hanging it
    assert not any(t.is_alive() for t in threads), "a thread did not finish within 120 s"
    assert not errors
    for i in range(4):
        torch.testing.assert_close(results[i], expected[i])


def test_unload_restores_base_model(expert_dirs):
    model = build_xlora("llama", expert_dirs)
    ids = input_ids()
    base = model.base_model.unload()
    assert not any(isinstance(m, XLoraLayer) for m in base.modules())
    assert type(base.model.layers[0]).__name__ == "LlamaDecoderLayer"
    torch.testing.assert_close(base(input_ids=ids).logits, BUILDERS["llama"]()(input_ids=ids).logits)
    with pytest.raises(ValueError, match="cannot be merged"):
        build_xlora("llama", expert_dirs).base_model.merge_and_unload()


def test_different_ranks_and_targets_mix_only_their_experts(expert_dirs):
    model = build_xlora("llama", expert_dirs)
    by_name = dict(zip(model.base_model.mixture_layer_names, model.base_model.mixture_layers()))
    specs = list(EXPERT_SPECS["llama"].values())
    q = by_name["model.layers.0.self_attn.q_proj"]
    assert q.expert_indices == [0, 1, 2] and q.ranks == [s["r"] for s in specs]
    o = by_name["model.layers.0.self_attn.o_proj"]
    assert o.expert_indices == [1] and o.ranks == [2]
    emb = by_name["model.embed_tokens"]
    assert emb.is_embedding and emb.expert_indices == [2]
    rslora_scale = specs[1]["lora_alpha"] / specs[1]["r"] ** 0.5
    assert o.rank_scale[0].item() == pytest.approx(rslora_scale)


def test_builds_on_the_models_dtype(expert_dirs):
    base = BUILDERS["llama"]().to(torch.bfloat16)
    model = get_peft_model(
        base, XLoraConfig(task_type="CAUSAL_LM", adapters=expert_dirs["llama"]), autocast_adapter_dtype=False
    )
    assert model.base_model.xlora_classifier.layers[0].weight.dtype == torch.bfloat16
    assert all(layer.xlora_A.dtype == torch.bfloat16 for layer in model.base_model.mixture_layers())
    out = model(input_ids=input_ids()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_single_lora_model_reference_for_lora_config_sanity(expert_dirs):
    # The fixture experts are real PEFT LoRA checkpoints.
    cfg = LoraConfig.from_pretrained(expert_dirs["llama"]["math"])
    assert cfg.r == EXPERT_SPECS["llama"]["math"]["r"]
