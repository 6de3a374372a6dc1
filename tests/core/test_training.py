"""Gradients reach the classifier in every checkpointing mode, and training the gate lowers the loss."""

import pytest
import torch

from helpers.models import build_xlora, input_ids

MODES = [None, "reentrant", "non_reentrant"]


def classifier_grads(model, batches, mode, trainable_adapters=False):
    """Classifier (and expert) gradients after one backward over the summed losses of `batches`."""
    if mode is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    model.train()
    model.zero_grad()
    loss = sum(model(input_ids=ids, labels=ids).loss for ids in batches)  # several forwards, one backward
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", MODES[1:])
def test_checkpointing_gives_the_same_classifier_gradients(arch, mode, expert_dirs):
    batches = [input_ids(seed=1), input_ids(seed=2)]
    overrides = {"xlora_dropout_p": 0.0}
    if arch == "gpt2":
        overrides["layerwise_scalings"] = True
    torch.manual_seed(0)
    plain = classifier_grads(build_xlora(arch, expert_dirs, **overrides), batches, None)
    torch.manual_seed(0)
    checkpointed_model = build_xlora(arch, expert_dirs, **overrides)
    checkpointed_model.config.resid_pdrop = checkpointed_model.config.embd_pdrop = 0.0
    checkpointed = classifier_grads(checkpointed_model, batches, mode)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_trainable_experts_get_gradients_under_checkpointing(mode, expert_dirs):
    batches = [input_ids(seed=3)]
    torch.manual_seed(0)
    ref = classifier_grads(
        build_xlora("llama", expert_dirs, use_trainable_adapters=True, xlora_dropout_p=0.0), batches, None
    )
    torch.manual_seed(0)
    model = build_xlora("llama", expert_dirs, use_trainable_adapters=True, xlora_dropout_p=0.0)
    grads = classifier_grads(model, batches, mode)
    assert any(n.endswith("xlora_A") for n in grads) and any(n.endswith("xlora_B") for n in grads)
    for name, grad in ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)


def test_training_the_gate_routes_to_the_right_expert(expert_dirs):
    """Targets come from the model pinned to one expert: training the gate must lower the loss towards it."""
    model = build_xlora("llama", expert_dirs, xlora_dropout_p=0.0).eval()
    names = list(expert_dirs["llama"])
    data = [input_ids(batch=4, seq=12, seed=s) for s in range(4)]
    model.set_static_scalings({names[1]: 1.0})
    with torch.no_grad():
        targets = [torch.softmax(model(input_ids=ids).logits, -1) for ids in data]
    model.set_static_scalings(None)

    def loss_of(ids, target):
        log_probs = torch.log_softmax(model(input_ids=ids).logits, -1)
        return torch.nn.functional.kl_div(log_probs, target, reduction="batchmean")

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    with torch.no_grad():
        before = sum(loss_of(i, t) for i, t in zip(data, targets)).item()
    model.train()
    for _ in range(15):
        for ids, target in zip(data, targets):
            opt.zero_grad()
            loss_of(ids, target).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        after = sum(loss_of(i, t) for i, t in zip(data, targets)).item()
        model(input_ids=data[0])
    assert after < 0.5 * before
    mean_scalings = model.get_latest_scalings().mean(dim=(0, 1, 2))
    assert mean_scalings.argmax().item() == 1, mean_scalings


def test_xlora_sft_trainer_without_trl_says_how_to_install(monkeypatch):
    import sys

    import peft_xlora
    from peft_xlora.core import training

    training.sft_trainer_class.cache_clear()
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError, as where TRL is not installed
    try:
        with pytest.raises(ImportError, match=r"XLoraSFTTrainer needs TRL: `pip install 'trl>=1.16,<2'`"):
            peft_xlora.XLoraSFTTrainer  # noqa: B018
    finally:
        training.sft_trainer_class.cache_clear()
    with pytest.raises(AttributeError, match="has no attribute 'XLoraSFTTrainers'"):
        peft_xlora.XLoraSFTTrainers  # noqa: B018
