"""transformers' Trainer trains the gate on a causal-LM dataset: the loss falls and only the intended weights change.

The dataset is sampled from the model pinned to one expert, so a gate that learns to pick that expert lowers the
language-modelling loss on it. The tiny random model's head is scaled up so that its next-token distributions are
peaked (a random init gives nearly uniform ones, where every gate has almost the same loss).
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from helpers.models import tiny_llama
from peft_xlora import XLoraConfig, optimizer_param_groups

TEACHER = "code"


def _base():
    base = tiny_llama()
    with torch.no_grad():
        base.lm_head.weight.mul_(20.0)
    return base


def build(expert_dirs, **overrides):
    kwargs = {"task_type": "CAUSAL_LM", "adapters": expert_dirs["llama"], "xlora_depth": 2, "xlora_size": 16}
    kwargs.update(overrides)
    torch.manual_seed(0)
    return get_peft_model(_base(), XLoraConfig(**kwargs))


class SequenceDataset(torch.utils.data.Dataset):
    """Fixed-length token sequences as causal-LM examples (labels = inputs; the model shifts them)."""

    def __init__(self, sequences: torch.Tensor) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.sequences[i], "labels": self.sequences[i]}


@pytest.fixture(scope="module")
def teacher_data(expert_dirs) -> SequenceDataset:
    model = build(expert_dirs).eval()
    model.set_static_scalings({TEACHER: 1.0})
    torch.manual_seed(123)
    prompts = torch.randint(3, 97, (32, 1))
    with torch.no_grad():
        out = model.generate(input_ids=prompts, do_sample=True, top_k=0, max_new_tokens=15, min_new_tokens=15)
    return SequenceDataset(out)


def _trainer(model, data, tmp_path, steps, **overrides) -> Trainer:
    kwargs = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 32,
        "max_steps": steps,
        "learning_rate": 2e-2,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    kwargs.update(overrides)
    optimizers = kwargs.pop("optimizers", (None, None))
    return Trainer(
        model=model, args=TrainingArguments(**kwargs), train_dataset=data, eval_dataset=data, optimizers=optimizers
    )


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_trainer_lowers_the_loss_and_changes_only_the_classifier(teacher_data, expert_dirs, tmp_path):
    # The whole-model gate, on which the bound below was measured. The default's gate reads this 2-layer random
    # model's layer-1 residual stream and moves slower here (about 6.9 -> 6.5 in the 12 steps).
    model = build(expert_dirs, scaling_pass_layers=None)
    model.set_static_scalings({TEACHER: 1.0})
    with torch.no_grad():
        ids = teacher_data.sequences
        teacher_loss = model(input_ids=ids, labels=ids).loss.item()
    model.set_static_scalings(None)
    before = _snapshot(model)
    trainer = _trainer(model, teacher_data, tmp_path, steps=12)
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    # Measured: about 6.9 -> 5.7 with the teacher's own loss at 3.0; ask for a quarter of the gap.
    assert loss_after < loss_before - 0.25 * (loss_before - teacher_loss), (loss_before, loss_after, teacher_loss)

    classifier = {n for n, _ in model.base_model.xlora_classifier.named_parameters()}
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == {n for n in before if n.split("xlora_classifier.")[-1] in classifier and "classifier" in n}
    assert any(n.endswith("xlora_A") for n in before)  # the frozen experts were in the comparison, unchanged

    # The gate learnt to prefer the expert the data came from.
    model.eval()
    with torch.no_grad():
        model(input_ids=teacher_data.sequences[:8])
    mean = model.get_latest_scalings().mean(dim=(0, 1, 2))
    assert model.base_model.expert_names[int(mean.argmax())] == TEACHER, mean


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_trainer_gradient_checkpointing_trains_like_without(mode, teacher_data, expert_dirs, tmp_path):
    weights = []
    for checkpointing in (False, True):
        model = build(expert_dirs, xlora_dropout_p=0.0)
        kwargs = {"gradient_checkpointing": checkpointing}
        if checkpointing:
            kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": mode == "reentrant"}
        _trainer(model, teacher_data, tmp_path, steps=3, **kwargs).train()
        assert model.base_model.model.is_gradient_checkpointing == checkpointing
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    initial = build(expert_dirs, xlora_dropout_p=0.0)
    for name, want in weights[0].items():
        assert not torch.equal(want, initial.get_parameter(name)), name  # the classifier did train
        torch.testing.assert_close(weights[1][name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_with_trainable_experts_and_two_learning_rates(teacher_data, expert_dirs, tmp_path):
    model = build(expert_dirs, use_trainable_adapters=True)
    before = _snapshot(model)
    groups = optimizer_param_groups(model, classifier_lr=2e-2, experts_lr=1e-3)
    assert [g["name"] for g in groups] == ["classifier", "experts"]
    optimizer = torch.optim.AdamW(groups)
    trainer = _trainer(model, teacher_data, tmp_path, steps=4, optimizers=(optimizer, None))
    trainer.train()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [2e-2, 1e-3]

    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    experts = {n for n in before if n.endswith(("xlora_A", "xlora_B"))}
    assert experts <= changed  # every stacked factor trained
    assert all("xlora_classifier" in n or n in experts for n in changed)  # and nothing of the base model

    model.save_pretrained(tmp_path / "saved")
    reloaded = PeftModel.from_pretrained(_base(), tmp_path / "saved").eval()
    model.eval()
    ids = teacher_data.sequences[:4]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_trainer_bf16_on_cpu_follows_float32(teacher_data, expert_dirs, tmp_path):
    """`bf16=True` runs the step under CPU autocast; the classifier stays float32 and trains like in float32."""
    results = []
    for bf16 in (False, True):
        model = build(expert_dirs, xlora_dropout_p=0.0)
        trainer = _trainer(model, teacher_data, tmp_path, steps=4, bf16=bf16)
        trainer.train()
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        results.append(trainer.evaluate()["eval_loss"])
    assert abs(results[1] - results[0]) < 2e-2 * results[0], results
