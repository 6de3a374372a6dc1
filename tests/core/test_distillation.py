"""Router distillation from the experts' own losses: against separate per-expert forwards, in the loss, in Trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from helpers.models import build_xlora, input_ids, tiny_llama
from helpers.reference import distillation_reference
from peft_xlora import XLoraConfig, distillation_loss
from peft_xlora.core.distillation import expert_token_losses


def _batch():
    ids = input_ids(batch=3, seq=9, seed=5)
    labels = ids.clone()
    labels[1, 4] = -100  # a token without a label
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # left padding
    labels[2, :3] = -100
    return ids, labels, mask


def test_expert_token_losses_equal_one_forward_per_expert(expert_dirs):
    model = build_xlora("llama", expert_dirs)
    xlora = model.base_model
    ids, labels, mask = _batch()
    got = expert_token_losses(xlora, (), {"input_ids": ids, "attention_mask": mask}, labels)  # (3, 8, 3)
    for e, name in enumerate(xlora.expert_names):
        xlora.set_static_scalings({name: 1.0})
        logits = model(input_ids=ids, attention_mask=mask).logits
        want = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
        torch.testing.assert_close(got[..., e], want)
    assert xlora._static_scalings is not None  # the caller's pin is restored, not dropped
    xlora.set_static_scalings(None)
    expert_token_losses(xlora, (), {"input_ids": ids}, labels)
    assert xlora._static_scalings is None


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("temperature", [0.3, 2.0])
def test_distillation_term_in_the_loss_matches_reference(expert_dirs, layerwise, temperature):
    ids, labels, mask = _batch()
    model = build_xlora(
        "llama", expert_dirs, layerwise_scalings=layerwise, softmax_temperature=0.7, xlora_dropout_p=0.0
    )
    xlora = model.base_model
    lm = model(input_ids=ids, labels=labels, attention_mask=mask).loss
    xlora.update_config(router_distillation_coef=0.5, router_distillation_temperature=temperature)
    out = model(input_ids=ids, labels=labels, attention_mask=mask)
    want = distillation_reference(model, ids, labels, temperature, mask)
    term = xlora.get_latest_router_losses()
    torch.testing.assert_close(out.loss, lm + 0.5 * torch.tensor(want), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["router_loss"], 0.5 * torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert set(term) == {"load_balancing", "entropy", "distillation"}


def test_distillation_needs_labels_and_is_off_by_default(expert_dirs):
    ids = input_ids()
    model = build_xlora("llama", expert_dirs)
    assert "router_loss" not in model(input_ids=ids, labels=ids)
    model.base_model.update_config(router_distillation_coef=1.0)
    assert "router_loss" not in model(input_ids=ids)  # no labels: no next tokens to score the experts on
    assert "router_loss" in model(input_ids=ids, labels=ids)


def test_distillation_loss_alone_matches_reference_and_trains_only_the_gate(expert_dirs):
    ids, labels, mask = _batch()
    model = build_xlora("llama", expert_dirs, router_distillation_temperature=0.5, xlora_dropout_p=0.0)
    got = distillation_loss(model, input_ids=ids, labels=labels, attention_mask=mask)
    torch.testing.assert_close(got, torch.tensor(distillation_reference(model, ids, labels, 0.5, mask)))
    got.backward()
    with_grad = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    classifier = {id(p) for p in model.base_model.xlora_classifier.parameters()}
    assert with_grad and with_grad <= classifier
    # labels default to the inputs
    torch.testing.assert_close(
        distillation_loss(model, input_ids=ids), distillation_loss(model, input_ids=ids, labels=ids)
    )


def test_distillation_loss_refuses_a_pinned_gate_and_missing_labels(expert_dirs):
    model = build_xlora("llama", expert_dirs)
    with pytest.raises(ValueError, match="distillation_loss needs `labels`"):
        distillation_loss(model, inputs_embeds=torch.zeros(1, 3, 32))
    model.base_model.set_static_scalings({"math": 1.0})
    with pytest.raises(ValueError, match=r"The gate is pinned \(set_static_scalings\)"):
        distillation_loss(model, input_ids=input_ids())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("router_distillation_coef", -1.0),
        ("router_distillation_temperature", 0.0),
        ("router_distillation_temperature", "x"),
    ],
)
def test_config_refuses_bad_distillation_values(field, value):
    with pytest.raises(ValueError, match=field):
        XLoraConfig(adapters={"a": "x"}, **{field: value})


# ---------------------------------------------------------------- Trainer

TEACHER = "code"


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, sequences: torch.Tensor) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.sequences[i], "labels": self.sequences[i]}


class _DistillationOnly(Trainer):
    """The pretraining phase in a Trainer: the distillation term is the whole loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return distillation_loss(model, **inputs)


def _model(expert_dirs, **overrides):
    base = tiny_llama()
    with torch.no_grad():
        base.lm_head.weight.mul_(20.0)  # peaked next-token distributions: the experts' losses differ clearly
    torch.manual_seed(0)
    config = XLoraConfig(
        task_type="CAUSAL_LM", adapters=expert_dirs["llama"], xlora_depth=2, xlora_size=16, **overrides
    )
    return get_peft_model(base, config)


def _teacher_share(model, ids) -> float:
    with torch.no_grad():
        model(input_ids=ids)
    scalings = model.base_model.get_latest_scalings()  # (batch, seq, n_layers, n_experts)
    return scalings[..., model.base_model.expert_names.index(TEACHER)].mean().item()


@pytest.mark.parametrize("kind", ["coefficient", "distillation only"])
def test_trainer_learns_the_teacher_expert_from_distillation(expert_dirs, tmp_path, kind):
    # Text sampled from the model pinned to one expert: that expert has the lowest loss on most of its tokens.
    teacher = _model(expert_dirs).eval()
    teacher.base_model.set_static_scalings({TEACHER: 1.0})
    torch.manual_seed(123)
    with torch.no_grad():
        ids = teacher.generate(
            input_ids=torch.randint(3, 97, (16, 1)), do_sample=True, top_k=0, max_new_tokens=15, min_new_tokens=15
        )
    model = _model(expert_dirs, router_distillation_coef=1.0 if kind == "coefficient" else 0.0)
    before = _teacher_share(model, ids)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=10,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    trainer_class = Trainer if kind == "coefficient" else _DistillationOnly
    trainer_class(model=model, args=args, train_dataset=_Sequences(ids)).train()
    after = _teacher_share(model, ids)
    assert before == pytest.approx(1 / 3, abs=1e-6)  # the uniform start
    assert after > before + 0.1, (before, after)


def test_distillation_is_refused_where_it_cannot_run(expert_dirs):
    # Single pass: the experts' scoring would nest forwards inside the one pass; refused at config time.
    with pytest.raises(ValueError, match="router_distillation_coef` is not supported with `routing='single_pass'"):
        XLoraConfig(
            task_type="CAUSAL_LM",
            adapters=expert_dirs["llama"],
            routing="single_pass",
            scaling_pass_layers=1,
            router_distillation_coef=0.5,
        )
    model = build_xlora("llama", expert_dirs, routing="single_pass", scaling_pass_layers=1)
    with pytest.raises(ValueError, match="single-pass routing and encoder-decoder models are not supported"):
        distillation_loss(model, input_ids=input_ids())
