"""Sequence-classification experts that bring their own trained head (PEFT's `modules_to_save` for SEQ_CLS).

For a Llama-style classifier (`score` on every token, the last non-padding token kept) and a BERT-style one
(`classifier` on the state pooled from the first token): pinned to one expert, X-LoRA is exactly that expert's PEFT
model with its head; gated, the head is the plain loop `sum_e s_e * head_e(h)` with the gate of the token the head
reads; training moves only the gate (and the shared head with `trainable_head`); save and load are exact.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model

from helpers.reference import head_mixture_reference
from helpers.seq_cls import (
    ARCHS,
    BATCH,
    HEAD,
    VOCAB,
    build,
    expert_heads,
    head_of,
    inputs,
    save_expert,
    save_experts,
    xlora,
)
from peft_xlora import ExpertError, XLoraConfig, optimizer_param_groups
from peft_xlora.core.heads import XLoraHead


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return save_experts(tmp_path_factory.mktemp("cls-experts"))


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_pinned_gate_is_the_expert_with_its_head(arch, layerwise, experts):
    model = xlora(arch, experts[arch], layerwise_scalings=layerwise)
    head = head_of(model)
    assert isinstance(head, XLoraHead)
    seen = {}
    head.register_forward_hook(lambda module, args, out: seen.update(hidden=args[0], out=out))
    n_layers = len(model.base_model.mixture_layer_names)
    batch = inputs(arch)
    outputs = []
    for e, path in enumerate(experts[arch].values()):
        pinned = torch.zeros(n_layers if layerwise else 1, 2)
        pinned[:, e] = 1.0
        model.set_static_scalings(pinned)
        ours = model(**batch).logits
        reference = PeftModel.from_pretrained(build(arch), path).eval()
        # The mixture layers and PEFT's LoRA layers round differently (float32 tight); the head is bit-exact.
        torch.testing.assert_close(ours, reference(**batch).logits, rtol=1e-5, atol=1e-6)
        expert_head = reference.get_base_model().get_submodule(HEAD[arch])
        torch.testing.assert_close(seen["out"], expert_head(seen["hidden"]), rtol=0, atol=0)
        outputs.append(ours)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)  # the experts' heads differ


@pytest.mark.parametrize("routing", ["dual_pass", "single_pass"])
@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_gated_heads_match_the_plain_loop(arch, layerwise, routing, experts):
    # Single pass: the head comes after decoder layer k, so the per-token gate of layer k's output mixes it (the last
    # mixture layer's slot, which is late), not the static weights of layers 1..k.
    single = {"routing": "single_pass", "scaling_pass_layers": 1} if routing == "single_pass" else {}
    model = xlora(arch, experts[arch], layerwise_scalings=layerwise, **single)
    head = head_of(model)
    seen = {}
    head.register_forward_hook(lambda module, args, out: seen.update(hidden=args[0], out=out))
    batch = inputs(arch)
    logits = model(**batch).logits
    scalings = model.get_latest_scalings()  # (batch, seq, n_layers, n_experts)
    assert scalings.shape[2] == len(model.base_model.mixture_layer_names) > 1
    gate = scalings[:, :, -1]  # layerwise: the last mixture layer's slot; otherwise every slot is the same
    assert not torch.allclose(gate[0, 0], gate[1, 0])  # a real per-token gate, not a constant one
    if arch == "llama":
        # Every token's logits with that token's gate; the model keeps the last non-padding token's.
        expected = head_mixture_reference(seen["hidden"], expert_heads(head), gate)
        torch.testing.assert_close(seen["out"], expected, rtol=1e-6, atol=1e-6)
        last = batch["attention_mask"].sum(-1) - 1
        token_gate = gate[torch.arange(BATCH), last]  # (batch, n_experts)
        hidden_last = seen["hidden"][torch.arange(BATCH), last]
        torch.testing.assert_close(
            logits, head_mixture_reference(hidden_last, expert_heads(head), token_gate), rtol=1e-6, atol=1e-6
        )
    else:
        # The pooled state comes from the first token: its gate mixes the heads.
        expected = head_mixture_reference(seen["hidden"], expert_heads(head), gate[:, 0])
        torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_experts_off_give_the_models_own_head(arch, experts):
    model = xlora(arch, experts[arch])
    batch = inputs(arch)
    with model.disable_adapter():
        off = model(**batch).logits
    torch.testing.assert_close(off, build(arch)(**batch).logits, rtol=0, atol=0)
    base = model.unload()
    assert type(base.get_submodule(HEAD[arch])) is torch.nn.Linear
    torch.testing.assert_close(base(**batch).logits, off, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- training


def _train_step(model, arch: str) -> tuple[dict, set]:
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**inputs(arch), labels=torch.tensor([0, 2, 1])).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    optimizer.step()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    return grads, changed


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_train_step_moves_only_the_gate(arch, experts):
    model = xlora(arch, experts[arch])
    grads, changed = _train_step(model, arch)
    assert grads and changed and all("xlora_classifier" in n for n in (*grads, *changed))
    assert not head_of(model).xlora_head_weight.requires_grad


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_gradient_reaches_the_gate_through_the_heads(arch, experts):
    # With every LoRA update zeroed, the heads are the only path from the gate to the loss.
    model = xlora(arch, experts[arch])
    with torch.no_grad():
        for layer in model.base_model.mixture_layers():
            layer.xlora_B.zero_()
    grads, _ = _train_step(model, arch)
    assert any("xlora_classifier" in n for n in grads)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_shared_head_trains_beside_the_experts_heads(arch, experts):
    plain = xlora(arch, experts[arch])
    model = xlora(arch, experts[arch], trainable_head=True)
    shared = head_of(model).xlora_shared_head
    assert shared.weight.requires_grad and not shared.weight.any()  # starts at zero: changes nothing
    torch.testing.assert_close(model(**inputs(arch)).logits, plain(**inputs(arch)).logits, rtol=0, atol=0)
    _, changed = _train_step(model, arch)
    assert any("xlora_shared_head" in n for n in changed)
    assert all("xlora_classifier" in n or "xlora_shared_head" in n for n in changed)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_shared_head_without_expert_heads_is_a_trained_copy(arch, tmp_path):
    # Experts trained without a head (task_type=None): the shared head starts as the model's head, as PEFT's
    # modules_to_save does, and trains with the gate.
    targets = ARCHS[arch][3]
    paths = {f"e{i}": save_expert(arch, tmp_path / f"e{i}", i, t, task_type=None) for i, t in enumerate(targets)}
    plain = xlora(arch, paths)
    model = xlora(arch, paths, trainable_head=True)
    head = head_of(model)
    assert head.xlora_head_weight is None and torch.equal(head.xlora_shared_head.weight, head.base_layer.weight)
    torch.testing.assert_close(model(**inputs(arch)).logits, plain(**inputs(arch)).logits, rtol=0, atol=0)
    _, changed = _train_step(model, arch)
    assert any("xlora_shared_head" in n for n in changed)
    model.save_pretrained(tmp_path / "xlora")
    loaded = PeftModel.from_pretrained(build(arch), tmp_path / "xlora").eval()
    torch.testing.assert_close(loaded(**inputs(arch)).logits, model(**inputs(arch)).logits, rtol=0, atol=0)


def test_trainable_experts_train_their_heads(experts):
    model = xlora("llama", experts["llama"], use_trainable_adapters=True, trainable_head=True)
    head = head_of(model)
    assert head.xlora_head_weight.requires_grad
    groups = {g["name"]: {id(p) for p in g["params"]} for g in optimizer_param_groups(model, 1e-3, 1e-4)}
    assert (
        id(head.xlora_head_weight) in groups["experts"] and id(head.xlora_shared_head.weight) in groups["classifier"]
    )
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == groups["experts"] | groups["classifier"]
    model.base_model.set_use_trainable_adapters(False)
    assert not head_of(model).xlora_head_weight.requires_grad


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("trainable_head", [False, True])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_save_and_load_exact(arch, trainable_head, experts, tmp_path):
    # Names that look like the keys' own infixes and parts stay plain names.
    names = ["xlora_shared_head", "a.weight"]
    paths = dict(zip(names, experts[arch].values()))
    model = xlora(arch, paths, trainable_head=trainable_head)
    _train_step(model, arch)
    model.save_pretrained(tmp_path / "xlora")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "xlora" / "adapter_model.safetensors")
    head = f"base_model.model.{HEAD[arch]}"
    parts = ["weight"] + (["bias"] if arch == "bert" else [])
    for name in names:
        for part in parts:
            key = f"{head}.xlora_expert_heads.{name}.{part}"
            assert saved[key].shape == getattr(head_of(model).base_layer, part).shape
    assert (f"{head}.xlora_shared_head.weight" in saved) == trainable_head
    assert not any("xlora_head_weight" in k or "base_layer" in k for k in saved)
    loaded = PeftModel.from_pretrained(build(arch), tmp_path / "xlora").eval()
    torch.testing.assert_close(loaded(**inputs(arch)).logits, model(**inputs(arch)).logits, rtol=0, atol=0)
    for name in names:  # the heads are the experts', whatever their names
        loaded.set_static_scalings({name: 1.0})
        model.set_static_scalings({name: 1.0})
        torch.testing.assert_close(loaded(**inputs(arch)).logits, model(**inputs(arch)).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_transformers_load_adapter_and_expert_sources(arch, experts, tmp_path, monkeypatch):
    import transformers.integrations.peft as integration

    # transformers 5.24 gates its adapter methods other than load_adapter on PEFT >= 0.22 (0.21 is installed).
    monkeypatch.setattr(integration, "check_peft_version", lambda **kwargs: None)
    model = xlora(arch, experts[arch], trainable_head=True)
    _train_step(model, arch)
    model.save_pretrained(tmp_path / "xlora")
    # transformers' own adapter API builds the same model into a bare classifier, and saves it back.
    bare = build(arch)
    bare.load_adapter(str(tmp_path / "xlora"))
    torch.testing.assert_close(bare(**inputs(arch)).logits, model(**inputs(arch)).logits, rtol=0, atol=0)
    bare.save_pretrained(tmp_path / "bare")
    again = PeftModel.from_pretrained(build(arch), tmp_path / "bare").eval()
    torch.testing.assert_close(again(**inputs(arch)).logits, model(**inputs(arch)).logits, rtol=0, atol=0)
    # An expert swapped at load time brings its own head: pinned to it, the model is that expert.
    other = save_expert(arch, tmp_path / "other", 5, ARCHS[arch][3][0])
    swapped = PeftModel.from_pretrained(build(arch), tmp_path / "xlora", expert_sources={"e1": other}).eval()
    head = head_of(swapped)
    reference = PeftModel.from_pretrained(build(arch), other).get_base_model().get_submodule(HEAD[arch])
    torch.testing.assert_close(head.xlora_head_weight[1], reference.weight, rtol=0, atol=0)
    torch.testing.assert_close(head.xlora_head_weight[0], head_of(model).xlora_head_weight[0], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_gradient_checkpointing(arch, experts):
    # The gate's and the shared head's gradients are the same with gradient checkpointing, in both modes.
    grads = []
    for reentrant in (None, False, True):
        model = xlora(arch, experts[arch], trainable_head=True).train()
        if reentrant is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model(**inputs(arch), labels=torch.tensor([0, 2, 1])).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().sum() > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])


def test_checkpoint_missing_a_head_is_refused(experts, tmp_path):
    from safetensors.torch import load_file, save_file

    from peft_xlora import CheckpointError

    model = xlora("bert", experts["bert"])
    model.save_pretrained(tmp_path / "xlora")
    path = tmp_path / "xlora" / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.classifier.xlora_expert_heads.e1.bias"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"classification heads do not match.*missing .*e1\.bias"):
        PeftModel.from_pretrained(build("bert"), tmp_path / "xlora")


# ---------------------------------------------------------------------------------------------- refused


def _assert_refused(arch: str, paths: dict, error, match: str, **overrides) -> None:
    base = build(arch)
    state = {n: p.clone() for n, p in base.state_dict().items()}
    config = {"task_type": "SEQ_CLS", "adapters": paths, "xlora_size": 8, **overrides}
    with pytest.raises(error, match=match):
        get_peft_model(base, XLoraConfig(**config))
    assert type(base.get_submodule(HEAD[arch])) is torch.nn.Linear  # refused before anything was replaced
    assert all(torch.equal(p, state[n]) for n, p in base.state_dict().items())


def test_only_some_experts_with_a_head(experts, tmp_path):
    bare = save_expert("llama", tmp_path / "bare", 3, ["q_proj"], task_type=None)
    match = r"Experts \['e0'\] carry their classification head .* but \['bare'\] do not.*every expert brings"
    _assert_refused("llama", {"e0": experts["llama"]["e0"], "bare": bare}, ExpertError, match)


def test_heads_of_different_shapes(experts, tmp_path):
    five = save_expert("bert", tmp_path / "five", 2, ["query"], num_labels=5)
    match = r"heads 'classifier' have different shapes \(labels, hidden\): \{'e0': \(3, 16\), 'five': \(5, 16\)\}"
    _assert_refused("bert", {"e0": experts["bert"]["e0"], "five": five}, ExpertError, match)


def test_heads_for_other_labels_than_the_model(tmp_path):
    five = save_expert("bert", tmp_path / "five", 2, ["query"], num_labels=5)
    match = r"Expert 'five'.s head 'classifier' is \(5, 16\).*the model's is \(3, 16\).*num_labels=5"
    _assert_refused("bert", {"five": five}, ExpertError, match)


@pytest.mark.parametrize("task_type", [None, "FEATURE_EXTRACTION"])
def test_heads_on_a_model_that_is_not_seq_cls(experts, task_type):
    match = rf"Expert 'e0' carries a classification head 'score' .* task_type={task_type!r}.*task_type='SEQ_CLS'"
    _assert_refused("llama", experts["llama"], ExpertError, match, task_type=task_type)


def test_other_fully_trained_modules(tmp_path):
    pooled = save_expert("bert", tmp_path / "pooler", 1, ["query"], modules_to_save=["pooler"])
    match = r"Expert 'p' fully trains several modules \(modules_to_save\): \['bert.pooler', 'classifier'\]"
    _assert_refused("bert", {"p": pooled}, ExpertError, match)


def test_heads_that_are_not_one_linear(tmp_path):
    config = tf.RobertaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    expert = get_peft_model(tf.RobertaForSequenceClassification(config), LoraConfig(task_type="SEQ_CLS", r=2))
    expert.save_pretrained(tmp_path / "roberta")
    base = tf.RobertaForSequenceClassification(config)
    with pytest.raises(ExpertError, match=r"head 'classifier' is a .*RobertaClassificationHead; X-LoRA mixes heads"):
        get_peft_model(base, XLoraConfig(task_type="SEQ_CLS", adapters={"r": str(tmp_path / "roberta")}))
    assert not any(isinstance(m, XLoraHead) for m in base.modules())


def test_trainable_head_needs_a_sequence_classifier(tmp_path):
    bare = {"bare": save_expert("llama", tmp_path / "bare", 0, ["q_proj"], task_type=None)}
    match = r"`trainable_head=True` trains a sequence-classification head, but task_type=None"
    _assert_refused("llama", bare, ValueError, match, task_type=None, trainable_head=True)
    with pytest.raises(ValueError, match=r"`trainable_head` must be True or False, got 'yes'"):
        XLoraConfig(adapters=bare, trainable_head="yes")


# ---------------------------------------------------------------------------------------------- experts changed

NEW_TARGETS = {"llama": ["k_proj"], "bert": ["key"]}


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_added_expert_brings_its_head(arch, experts, tmp_path):
    from helpers.compose import same_as_built

    model = xlora(arch, experts[arch])
    batch = inputs(arch)
    before = model(**batch).logits
    new = save_expert(arch, tmp_path / "new", 2, NEW_TARGETS[arch])
    model.add_expert("new", new)
    torch.testing.assert_close(model(**batch).logits, before, rtol=1e-5, atol=1e-5)  # it starts changing nothing
    reference = xlora(arch, {**experts[arch], "new": new})
    same_as_built(model, reference, batch, tmp_path / "added", lambda: build(arch))
    model.set_static_scalings({"new": 1.0})
    alone = PeftModel.from_pretrained(build(arch), new).eval()
    torch.testing.assert_close(model(**batch).logits, alone(**batch).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_removed_expert_takes_its_head(arch, experts, tmp_path):
    # One expert left: the gate gives it weight 1, so the model is that expert's PEFT model with its head.
    from helpers.compose import same_as_built

    model = xlora(arch, experts[arch])
    batch = inputs(arch)
    model.remove_expert("e0")
    alone = PeftModel.from_pretrained(build(arch), experts[arch]["e1"]).eval()
    torch.testing.assert_close(model(**batch).logits, alone(**batch).logits, rtol=1e-5, atol=1e-6)
    same_as_built(model, xlora(arch, {"e1": experts[arch]["e1"]}), batch, tmp_path / "removed", lambda: build(arch))


def test_added_expert_without_a_head_is_refused(experts, tmp_path):
    from helpers.compose import assert_unchanged, snapshot

    model = xlora("llama", experts["llama"])
    batch = inputs("llama")
    before = snapshot(model, batch)
    bare = save_expert("llama", tmp_path / "bare", 3, ["k_proj"], task_type=None)
    with pytest.raises(ExpertError, match=r"carry their classification head .* but \['bare'\] do not"):
        model.add_expert("bare", bare)
    assert_unchanged(model, before, batch)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_mask_is_the_model_built_without(arch, experts):
    # One expert left active: the gate gives it weight 1, its head alone is mixed: that expert's PEFT model.
    model = xlora(arch, experts[arch])
    model.set_active_experts(["e1"])
    alone = PeftModel.from_pretrained(build(arch), experts[arch]["e1"]).eval()
    torch.testing.assert_close(model(**inputs(arch)).logits, alone(**inputs(arch)).logits, rtol=1e-5, atol=1e-6)
