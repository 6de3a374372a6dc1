"""transformers' Trainer: checkpoints of an X-LoRA model resume exactly where they stopped."""

import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from helpers.models import VOCAB, tiny_llama
from peft_xlora import XLoraConfig

STEPS, SAVE_AT = 6, 3


class TokenData(torch.utils.data.Dataset):
    """Fixed random sequences; the labels are the inputs (causal LM)."""

    def __init__(self, n=24, seq=12):
        g = torch.Generator().manual_seed(123)
        self.ids = torch.randint(3, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_model(expert_dirs, trainable, **overrides):
    torch.manual_seed(0)
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        adapters=expert_dirs["llama"],
        xlora_depth=2,
        xlora_size=16,
        use_trainable_adapters=trainable,
        **overrides,
    )
    return get_peft_model(tiny_llama(), config)


def make_trainer(model, output_dir):
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        save_steps=SAVE_AT,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=TokenData())


def losses(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def trained_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


SINGLE_PASS = {"routing": "single_pass", "scaling_pass_layers": 1}


@pytest.mark.parametrize(
    ("trainable", "overrides"),
    [(False, {}), (True, {}), (False, SINGLE_PASS)],
    ids=["classifier", "classifier+experts", "single-pass"],
)
def test_resume_continues_loss_curve_exactly(tmp_path, expert_dirs, trainable, overrides):
    straight = make_trainer(make_model(expert_dirs, trainable, **overrides), tmp_path / "straight")
    initial = trained_weights(straight.model)
    straight.train()
    full_curve = losses(straight)
    assert sorted(full_curve) == list(range(1, STEPS + 1))
    moved = trained_weights(straight.model)
    assert all(not torch.equal(moved[n], initial[n]) for n in initial)  # every trainable weight was trained

    checkpoint = tmp_path / "straight" / f"checkpoint-{SAVE_AT}"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(checkpoint))

    # The checkpoint alone reproduces the model at step SAVE_AT.
    resumed_model = make_model(expert_dirs, trainable, **overrides)
    with torch.no_grad():  # start from other weights, so that only the checkpoint can make them equal
        for param in resumed_model.parameters():
            if param.requires_grad:
                param.add_(1.0)
    resumed = make_trainer(resumed_model, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed_curve = losses(resumed)  # steps up to SAVE_AT come from the checkpoint's trainer_state.json
    assert sorted(resumed_curve) == list(range(1, STEPS + 1))
    for step in resumed_curve:
        assert resumed_curve[step] == pytest.approx(full_curve[step], rel=1e-6, abs=1e-7), step

    final, again = trained_weights(straight.model), trained_weights(resumed.model)
    assert final.keys() == again.keys()
    assert any(".xlora_classifier." in n for n in final)
    assert any(".xlora_A" in n for n in final) == trainable
    assert any(".single_pass_static." in n for n in final) == bool(overrides)
    for name in final:
        torch.testing.assert_close(again[name], final[name], rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_checkpoint_loads_for_inference(tmp_path, expert_dirs):
    trainer = make_trainer(make_model(expert_dirs, False), tmp_path)
    trainer.train()
    model = trainer.model.eval()
    ids = TokenData().ids[:2]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / f"checkpoint-{STEPS}").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=0, atol=0)
