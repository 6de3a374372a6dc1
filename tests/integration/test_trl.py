"""TRL's SFTTrainer trains X-LoRA: only the gate trains, checkpoints resume and reload exactly, packing stays exact.

SFTTrainer computes its loss from the per-token log-probabilities of a fused LM head (`fused_lm_head=True`), not from
`output.loss`; these tests check that path against the model's own loss, and the router regularisers under it.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is an optional test dependency: pip install -e '.[trl]'")
datasets = pytest.importorskip("datasets", reason="TRL's datasets dependency is missing")

from peft import PeftModel, get_peft_model  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

import peft_xlora  # noqa: E402
from helpers.models import VOCAB, tiny_llama  # noqa: E402
from helpers.reference import router_losses_reference  # noqa: E402
from helpers.tiny_tokenizer import tiny_tokenizer  # noqa: E402
from peft_xlora import XLoraConfig  # noqa: E402
from peft_xlora.core import regularisers  # noqa: E402
from peft_xlora.core.model import find_tuner  # noqa: E402

STEPS, SAVE_AT = 4, 2


def documents(n: int = 16, seed: int = 0) -> list[list[int]]:
    """Token sequences of different lengths (ids 3.. are words of the tiny tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (n,), generator=g)
    return [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in lengths]


def dataset():
    return datasets.Dataset.from_list([{"input_ids": ids} for ids in documents()])


def xlora_config(expert_dirs, **overrides) -> XLoraConfig:
    kwargs = {"task_type": "CAUSAL_LM", "adapters": expert_dirs["llama"], "xlora_depth": 2, "xlora_size": 16}
    kwargs["classifier_init"] = "random"  # a gate that routes tokens differently from the start
    kwargs.update(overrides)
    return XLoraConfig(**kwargs)


def sft_args(output_dir, **overrides) -> SFTConfig:
    kwargs = {
        "output_dir": str(output_dir),
        "max_steps": STEPS,
        "save_steps": SAVE_AT,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-2,
        "logging_steps": 1,
        "max_length": 32,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "gradient_checkpointing": False,  # TRL's default is True; its own test below
        "bf16": False,  # TRL's default is bf16 autocast, which stays on the trained model's forward afterwards
    }
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def make_trainer(expert_dirs, output_dir, way="peft_model", trainer_cls=SFTTrainer, xlora=None, **overrides):
    """An SFTTrainer given the X-LoRA PeftModel (`way="peft_model"`) or the base model and `peft_config`."""
    torch.manual_seed(0)
    config = xlora_config(expert_dirs, **(xlora or {}))
    if way == "peft_model":
        model, kwargs = get_peft_model(tiny_llama(), config), {}
    else:
        model, kwargs = tiny_llama(), {"peft_config": config}
    return trainer_cls(
        model=model,
        args=sft_args(output_dir, **overrides),
        train_dataset=dataset(),
        processing_class=tiny_tokenizer(),
        **kwargs,
    )


def losses(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def padded_batch(docs):
    return DataCollatorForLanguageModeling(pad_token_id=0)([{"input_ids": d} for d in docs])


@pytest.mark.parametrize("way", ["peft_model", "peft_config"])
def test_sft_trains_only_the_gate(tmp_path, expert_dirs, way):
    trainer = make_trainer(expert_dirs, tmp_path, way, save_strategy="no")
    model = trainer.model
    assert isinstance(model, PeftModel) and find_tuner(model) is not None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = dict(model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n].detach())}
    classifier = {n for n in before if ".xlora_classifier." in n}
    assert moved == classifier  # every classifier weight trained, nothing else (base model, experts) changed
    assert {n for n, p in after.items() if p.requires_grad} == classifier
    assert sorted(losses(trainer)) == list(range(1, STEPS + 1))


def test_sft_loss_is_the_models_own_loss(tmp_path, expert_dirs):
    # TRL's fused LM head (log-probabilities in chunks) gives the loss X-LoRA's plain forward computes from logits.
    trainer = make_trainer(expert_dirs, tmp_path, save_strategy="no", xlora={"xlora_dropout_p": 0.0})
    model = trainer.model.train()
    batch = padded_batch(documents()[:4])
    sft_loss = trainer.compute_loss(model, dict(batch))
    sft_grads = torch.autograd.grad(sft_loss, _params(model))
    own_loss = model(**batch).loss
    own_grads = torch.autograd.grad(own_loss, _params(model))
    torch.testing.assert_close(sft_loss, own_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(sft_grads, own_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def _params(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("way", ["peft_model", "peft_config"])
def test_sft_resume_and_reload_are_exact(tmp_path, expert_dirs, way):
    straight = make_trainer(expert_dirs, tmp_path / "straight", way)
    straight.train()
    checkpoint = tmp_path / "straight" / f"checkpoint-{SAVE_AT}"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(checkpoint))

    resumed = make_trainer(expert_dirs, tmp_path / "resumed", way)
    with torch.no_grad():  # other starting weights: only the checkpoint can make them equal
        for param in _params(resumed.model):
            param.add_(1.0)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    full, again = losses(straight), losses(resumed)
    assert sorted(again) == list(range(1, STEPS + 1))
    for step in range(SAVE_AT + 1, STEPS + 1):  # the steps after the checkpoint were run again
        assert again[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
    final, resumed_final = trainable(straight.model), trainable(resumed.model)
    for name in final:
        torch.testing.assert_close(resumed_final[name], final[name], rtol=1e-5, atol=1e-6, msg=name)

    ids = torch.tensor([documents()[0]])
    model = straight.model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "straight" / f"checkpoint-{STEPS}").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_sft_gradient_checkpointing_trains_the_same(tmp_path, expert_dirs, reentrant):
    plain = make_trainer(expert_dirs, tmp_path / "plain", save_strategy="no", xlora={"xlora_dropout_p": 0.0})
    plain.train()
    checkpointed = make_trainer(
        expert_dirs,
        tmp_path / "gc",
        save_strategy="no",
        xlora={"xlora_dropout_p": 0.0},
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    checkpointed.train()
    assert checkpointed.model.base_model.model.is_gradient_checkpointing
    for step, loss in losses(plain).items():
        assert losses(checkpointed)[step] == pytest.approx(loss, rel=1e-5), step
    weights, gc_weights = trainable(plain.model), trainable(checkpointed.model)
    assert weights.keys() == gc_weights.keys()
    for name in weights:
        torch.testing.assert_close(gc_weights[name], weights[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_documents_route_as_if_alone(expert_dirs):
    # Padding-free packing (TRL's default "bfd" strategy): one row, position_ids restart at every document, and
    # transformers builds a block-diagonal mask from them (without a cache: TRL passes use_cache=False). The scaling
    # pass gets the same position_ids, so each document's per-token scalings (and log-probabilities) are exactly those
    # it has alone: no routing leaks across documents.
    model = get_peft_model(
        tiny_llama(),
        xlora_config(
            expert_dirs,
        ),
    ).eval()
    docs = documents()[:3]
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": d} for d in docs])
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        packed_logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits[0]
        packed_scalings = model.get_latest_scalings()[0]  # (tokens, n_layers, n_experts)
        start = 0
        for doc in docs:
            alone_logits = model(input_ids=torch.tensor([doc])).logits[0]
            alone_scalings = model.get_latest_scalings()[0]
            stop = start + len(doc)
            torch.testing.assert_close(packed_scalings[start:stop], alone_scalings, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(packed_logits[start:stop], alone_logits, rtol=1e-5, atol=1e-5)
            start = stop
    assert not torch.allclose(packed_scalings[0], packed_scalings[-1])  # the gate routes tokens differently


def test_sft_packing_loss_equals_unpacked(tmp_path, expert_dirs):
    # The packed batch predicts the same tokens (the first token of a document is not predicted from the previous
    # document), so TRL's loss and its gradient equal those of the padded batch of the same documents.
    trainer = make_trainer(expert_dirs, tmp_path, save_strategy="no", xlora={"xlora_dropout_p": 0.0})
    model = trainer.model.train()
    docs = documents()[:4]
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": d} for d in docs])
    packed_loss = trainer.compute_loss(model, dict(packed))
    packed_grads = torch.autograd.grad(packed_loss, _params(model))
    padded_loss = trainer.compute_loss(model, dict(padded_batch(docs)))
    padded_grads = torch.autograd.grad(padded_loss, _params(model))
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    packing = make_trainer(expert_dirs, tmp_path / "packed", save_strategy="no", packing=True)
    packing.train()  # TRL's packing end to end
    assert sorted(losses(packing)) == list(range(1, STEPS + 1))


# ---- router regularisers (issue 15): TRL never reads output.loss ----

REGULARISED = {"router_entropy_coef": 0.5, "router_load_balancing_coef": 0.3, "xlora_dropout_p": 0.0}


def _router_reference(model, batch) -> torch.Tensor:
    """coef-weighted router losses of `batch`, from the classifier's logits and the plain reference."""
    tuner = find_tuner(model)
    captured = {}
    handle = tuner.xlora_classifier.register_forward_hook(lambda m, a, out: captured.setdefault("logits", out))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    terms = router_losses_reference(captured["logits"], mask=batch["attention_mask"])
    return torch.tensor(
        REGULARISED["router_load_balancing_coef"] * terms["load_balancing"]
        + REGULARISED["router_entropy_coef"] * terms["entropy"]
    )


def test_plain_sft_trainer_warns_that_it_ignores_router_regularisers(tmp_path, expert_dirs, monkeypatch):
    monkeypatch.setattr(regularisers, "_warned", False)
    trainer = make_trainer(expert_dirs, tmp_path, save_strategy="no", xlora=REGULARISED)
    model = trainer.model.train()
    batch = padded_batch(documents()[:4])
    with pytest.warns(peft_xlora.RouterLossWarning, match="not applied"):
        loss = trainer.compute_loss(model, dict(batch))
    # It is the plain negative log-likelihood: the model's own loss less the regularisers.
    with torch.no_grad():
        own = model(**batch)
    torch.testing.assert_close(loss.detach(), own.loss - own.router_loss, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", peft_xlora.RouterLossWarning)
        trainer.compute_loss(model, dict(batch))  # once only


def test_xlora_sft_trainer_adds_router_regularisers(tmp_path, expert_dirs, monkeypatch):
    monkeypatch.setattr(regularisers, "_warned", False)
    plain = make_trainer(expert_dirs, tmp_path / "p", save_strategy="no", xlora=REGULARISED)
    trainer = make_trainer(
        expert_dirs, tmp_path / "x", trainer_cls=peft_xlora.XLoraSFTTrainer, save_strategy="no", xlora=REGULARISED
    )
    assert isinstance(trainer, SFTTrainer) and isinstance(trainer, peft_xlora.RouterLossMixin)
    model = trainer.model.train()
    batch = padded_batch(documents()[:4])
    with warnings.catch_warnings():
        warnings.simplefilter("error", peft_xlora.RouterLossWarning)  # the mixin applies them: no warning
        loss = trainer.compute_loss(model, dict(batch))
    nll = plain.compute_loss(plain.model.train(), dict(batch)).detach()
    torch.testing.assert_close(loss.detach(), nll + _router_reference(model, batch), rtol=1e-5, atol=1e-6)
    # ... and equals the model's own loss, the one transformers' Trainer trains on.
    own = model(**batch).loss
    torch.testing.assert_close(loss, own, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, _params(model))
    own_grads = torch.autograd.grad(model(**batch).loss, _params(model))
    for a, b in zip(grads, own_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    trainer.train()  # and it trains
    assert sorted(losses(trainer)) == list(range(1, STEPS + 1))


def test_xlora_sft_trainer_without_regularisers_is_sft_trainer(tmp_path, expert_dirs):
    plain = make_trainer(expert_dirs, tmp_path / "p", save_strategy="no", xlora={"xlora_dropout_p": 0.0})
    mixed = make_trainer(
        expert_dirs,
        tmp_path / "x",
        trainer_cls=peft_xlora.XLoraSFTTrainer,
        save_strategy="no",
        xlora={"xlora_dropout_p": 0.0},
    )
    batch = padded_batch(documents()[:4])
    a = plain.compute_loss(plain.model.train(), dict(batch))
    b = mixed.compute_loss(mixed.model.train(), dict(batch))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_xlora_sft_trainer_router_loss_under_gradient_accumulation(tmp_path, expert_dirs):
    # Two micro-batches of one accumulated step: TRL normalises its NLL by the token count of both (num_items_in_batch)
    # and the router regularisers count once per step, as the mean over the micro-batches (like TRL's MoE aux loss).
    trainer = make_trainer(
        expert_dirs, tmp_path, trainer_cls=peft_xlora.XLoraSFTTrainer, save_strategy="no", xlora=REGULARISED
    )
    model = trainer.model.train()
    docs = documents()[:4]
    batches = [padded_batch(docs[:2]), padded_batch(docs[2:])]
    n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    trainer.current_gradient_accumulation_steps = 2
    for batch in batches:
        trainer.training_step(model, dict(batch), num_items_in_batch=torch.tensor(n_items))
    grads = [p.grad.clone() for p in _params(model)]
    model.zero_grad()

    total = 0.0
    for batch in batches:
        out = model(**batch)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total = total + (out.loss - out.router_loss) * n / n_items + out.router_loss / 2
    expected = torch.autograd.grad(total, _params(model))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
