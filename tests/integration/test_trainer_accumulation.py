"""Router regularisers under gradient accumulation: their strength does not depend on how a batch is split.

One SGD step over the same four sequences (no padding, so the language-model loss is split-invariant too), once as
one batch of four and once as four accumulated micro-batches of one, must move the gate the same way. transformers'
Trainer passes `num_items_in_batch` to a model that accepts it and then leaves the accumulation to the model's loss;
the regulariser, a mean over each micro-batch's tokens, was added at full weight to every micro-batch, so it counted
four times with four accumulation steps (measured: the regulariser's part of the update 4.0x as large).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from test_encoder_decoder import experts, inputs, xlora  # noqa: F401 - `experts` is a fixture
from transformers import Trainer, TrainingArguments

from helpers.models import VOCAB, tiny_llama
from peft_xlora import XLoraConfig

SEQUENCES = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(5))  # (examples, seq)
SPLITS = {"one-batch-of-4": (4, 1), "4-micro-batches-of-1": (1, 4)}  # (batch size, accumulation steps)


class Sequences(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return len(SEQUENCES)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": SEQUENCES[i], "labels": SEQUENCES[i]}


def build(expert_dirs, **coefs):
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        adapters=expert_dirs["llama"],
        xlora_depth=2,
        xlora_size=16,
        xlora_dropout_p=0.0,
        classifier_init="random",  # at the uniform gate the entropy's gradient is 0: the test would be vacuous
        **coefs,
    )
    torch.manual_seed(0)
    return get_peft_model(tiny_llama(), config)


def arguments(tmp_path, batch: int, accumulation: int) -> dict:
    """Training arguments of one plain SGD step (for `TrainingArguments` and TRL's `SFTConfig`)."""
    return {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accumulation,
        "max_steps": 1,
        "optim": "sgd",
        "learning_rate": 1.0,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,  # no clipping: it would shrink the larger update and hide the difference
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def gate_update(model, train) -> dict[str, torch.Tensor]:
    """How one optimizer step run by `train()` moves every trainable parameter (the classifier's)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}


def trainer_update(expert_dirs, tmp_path, split: str, **coefs) -> dict[str, torch.Tensor]:
    model = build(expert_dirs, **coefs)
    trainer = Trainer(
        model=model, args=TrainingArguments(**arguments(tmp_path, *SPLITS[split])), train_dataset=Sequences()
    )
    return gate_update(model, trainer.train)


def assert_updates_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def regulariser_part(updates: dict, split: str) -> dict[str, torch.Tensor]:
    """The update with the regulariser minus the update without it: what the regulariser moved."""
    return {n: updates[(1.0, split)][n] - updates[(0.0, split)][n] for n in updates[(1.0, split)]}


def test_trainer_regulariser_strength_does_not_depend_on_the_split(expert_dirs, tmp_path):
    updates = {
        (coef, split): trainer_update(expert_dirs, tmp_path, split, router_entropy_coef=coef)
        for coef in (0.0, 1.0)
        for split in SPLITS
    }
    whole, split = SPLITS
    assert_updates_close(updates[(0.0, whole)], updates[(0.0, split)])  # the LM loss alone: split-invariant
    parts = {s: regulariser_part(updates, s) for s in SPLITS}
    assert any(bool(p.abs().max() > 1e-4) for p in parts[whole].values())  # the regulariser does move the gate
    assert_updates_close(parts[split], parts[whole])  # before: 4.0x as large with four micro-batches
    assert_updates_close(updates[(1.0, whole)], updates[(1.0, split)])


@pytest.mark.parametrize("routing", ["dual_pass", "single_pass"])
def test_the_model_loss_weighs_each_micro_batch_by_its_share(expert_dirs, routing):
    # The forward alone, as Trainer calls it: the regulariser of a micro-batch is weighted by its share of the label
    # tokens Trainer counted for the whole step (num_items_in_batch); without that count it is the plain mean.
    single = {"routing": "single_pass", "scaling_pass_layers": 1} if routing == "single_pass" else {}
    model = build(expert_dirs, router_entropy_coef=1.0, **single).eval()
    ids = SEQUENCES[:1]
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids).router_loss
        share = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(4 * 11)).router_loss
        entropy = model.base_model.get_latest_router_losses()["entropy"]
    torch.testing.assert_close(plain, entropy)
    torch.testing.assert_close(share, entropy * 11 / 44)  # 11 of the step's 44 next-token labels (the shift drops 1)


@pytest.mark.parametrize("split", SPLITS)
def test_router_loss_mixin_on_a_trainer_that_reads_the_loss_counts_the_regulariser_once(expert_dirs, tmp_path, split):
    # `RouterLossMixin` on a trainer that takes `output.loss` (plain Trainer; TRL's sequence-parallel path) must move
    # the gate as plain Trainer does. Before: the regulariser was in `output.loss` and added again by the mixin.
    from peft_xlora import RouterLossMixin

    class MixinTrainer(RouterLossMixin, Trainer):
        pass

    plain = trainer_update(expert_dirs, tmp_path, split, router_entropy_coef=1.0)
    without = trainer_update(expert_dirs, tmp_path, split)
    assert any(bool((plain[n] - without[n]).abs().max() > 1e-4) for n in plain)  # the regulariser moves the gate
    model = build(expert_dirs, router_entropy_coef=1.0)
    args = TrainingArguments(**arguments(tmp_path, *SPLITS[split]))
    mixed = gate_update(model, MixinTrainer(model=model, args=args, train_dataset=Sequences()).train)
    assert_updates_close(mixed, plain)


def test_sft_trainer_regulariser_strength_does_not_depend_on_the_split(expert_dirs, tmp_path):
    # XLoraSFTTrainer adds the regulariser to TRL's loss itself (`RouterLossMixin`), per micro-batch divided by the
    # accumulation steps, as TRL does with its MoE auxiliary loss.
    trl = pytest.importorskip("trl", reason="TRL is an optional test dependency: pip install -e '.[trl]'")
    datasets = pytest.importorskip("datasets", reason="TRL's datasets dependency is missing")
    import peft_xlora
    from helpers.tiny_tokenizer import tiny_tokenizer

    data = datasets.Dataset.from_list([{"input_ids": row.tolist()} for row in SEQUENCES])
    updates = {}
    for coef in (0.0, 1.0):
        for s in SPLITS:
            options = {"max_length": 32, "gradient_checkpointing": False, "bf16": False, "data_seed": 0}
            sft = trl.SFTConfig(**arguments(tmp_path, *SPLITS[s]), **options)
            model = build(expert_dirs, router_entropy_coef=coef)
            trainer = peft_xlora.XLoraSFTTrainer(
                model=model, args=sft, train_dataset=data, processing_class=tiny_tokenizer()
            )
            updates[(coef, s)] = gate_update(model, trainer.train)
    whole, other = SPLITS
    parts = {s: regulariser_part(updates, s) for s in SPLITS}
    assert any(bool(p.abs().max() > 1e-4) for p in parts[whole].values())
    assert_updates_close(parts[other], parts[whole])


def test_encoder_decoder_micro_batches_are_weighed_by_their_unshifted_labels(experts):  # noqa: F811 - the fixture
    # Encoder-decoder losses do not shift the labels, and Trainer counts all of them: so does the share.
    arch, paths = experts
    model = xlora(arch, paths, router_entropy_coef=1.0).eval()
    batch = {k: v for k, v in inputs().items() if k != "decoder_input_ids"}
    labels = torch.randint(3, 61, (2, 5), generator=torch.Generator().manual_seed(1))
    labels[1, -2:] = -100  # 8 label tokens in this micro-batch
    with torch.no_grad():
        plain = model(**batch, labels=labels).router_loss
        share = model(**batch, labels=labels, num_items_in_batch=32).router_loss
    torch.testing.assert_close(share, plain * 8 / 32)
