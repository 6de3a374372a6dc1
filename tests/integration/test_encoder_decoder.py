"""Encoder-decoder models (tiny random BART and T5): each stack gated by its own tokens' scalings.

Two distinct random LoRA experts (ranks 2 and 4, `init_lora_weights=False`, task SEQ_2_SEQ_LM) adapt the encoder, the
decoder's self-attention and its cross-attention (queries, keys and values), and both stacks' token embeddings.
Pinned to one expert, X-LoRA is that expert's PEFT model exactly; gated, it equals a plain reference of the two-stack
gating written here with hooks on the unwrapped model; cached generation (greedy and beams) equals uncached; a
training step moves only the gate (with and without gradient checkpointing, the same gradient); a saved model
reloads exactly.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.save_and_load import load_peft_weights

from helpers.reference import gate_reference, mixture_reference, router_losses_reference
from peft_xlora import XLoraConfig

VOCAB = 61
SRC, TGT = 7, 5

ARCHS = {
    "bart": (
        lambda: tf.BartForConditionalGeneration(
            tf.BartConfig(
                vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
            )
        ),
        (["q_proj", "k_proj", "v_proj"], ["fc1", "out_proj", "v_proj", "embed_tokens"]),
    ),
    "t5": (
        lambda: tf.T5ForConditionalGeneration(
            tf.T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                        decoder_start_token_id=0)
        ),
        (["q", "k", "v"], ["wi", "o", "v", "embed_tokens"]),
    ),
}  # fmt: skip


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ARCHS[arch][0]().eval()


@pytest.fixture(scope="module", params=sorted(ARCHS))
def experts(request, tmp_path_factory):
    """(arch, {name: path}): two distinct random LoRA experts saved with PEFT."""
    arch = request.param
    paths = {}
    for i, targets in enumerate(ARCHS[arch][1]):
        torch.manual_seed(100 + i)
        lora = get_peft_model(
            build(arch),
            LoraConfig(
                task_type="SEQ_2_SEQ_LM",
                r=2 + 2 * i,
                lora_alpha=4 + i,
                target_modules=targets,
                init_lora_weights=False,
            ),
        )
        with torch.no_grad():  # PEFT zero-initialises B of embedding LoRAs even with init_lora_weights=False
            for name, param in lora.named_parameters():
                if "lora_embedding_B" in name:
                    param.copy_(torch.randn_like(param) * 0.3)
        path = tmp_path_factory.mktemp(f"{arch}-expert{i}")
        lora.save_pretrained(path)
        paths[f"expert{i}"] = str(path)
    return arch, paths


def xlora(arch: str, paths: dict, **overrides):
    config = XLoraConfig(
        task_type="SEQ_2_SEQ_LM", adapters=paths, xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0, **overrides
    )
    model = get_peft_model(build(arch), config)
    with torch.no_grad():  # a gate that routes (the uniform init would give every expert 1/2)
        for param in model.base_model.xlora_classifier.parameters():
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    return model


def inputs(batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, SRC, dtype=torch.long)
    mask[0, -2:] = 0  # a padded source row
    return {
        "input_ids": torch.randint(3, VOCAB, (batch, SRC), generator=generator),
        "attention_mask": mask,
        "decoder_input_ids": torch.randint(3, VOCAB, (batch, TGT), generator=generator),
    }


def test_pinned_one_hot_is_the_peft_expert(experts):
    arch, paths = experts
    model = xlora(arch, paths)
    batch = inputs()
    for name, path in paths.items():
        model.set_static_scalings({name: 1.0})
        reference = PeftModel.from_pretrained(build(arch), path).eval()
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- plain two-stack reference


def _expert_factors(paths: dict) -> dict[str, list[tuple[int, torch.Tensor, torch.Tensor, float]]]:
    """Module name -> [(expert index, A, B, alpha / r)] read from the PEFT checkpoints."""
    factors: dict[str, list] = {}
    for e, path in enumerate(paths.values()):
        config = LoraConfig.from_pretrained(path)
        weights = load_peft_weights(path)
        for key, A in weights.items():
            # Embedding factors are saved as (r, vocab) and (dim, r): the same layout as the Linear ones.
            for a, b in ((".lora_A.", ".lora_B."), (".lora_embedding_A", ".lora_embedding_B")):
                if a in key:
                    module = key.removeprefix("base_model.model.").split(a)[0]
                    B = weights[key.replace(a, b)]
                    factors.setdefault(module, []).append((e, A, B, config.lora_alpha / config.r))
    return factors


def _reference_logits(arch: str, paths: dict, tuner, batch: dict, layerwise: bool) -> tuple[torch.Tensor, ...]:
    """The two-stack gating written out: scaling passes, gate per stack, main pass with each layer's own scalings."""
    config = tuner.xlora_config
    model = build(arch)
    factors = _expert_factors(paths)
    names = [n for n, _ in model.named_modules() if n in factors]  # the layer slots, in module order
    n_experts = len(paths)
    encoder_prefix = "model.encoder." if arch == "bart" else "encoder."
    current: dict = {}

    def hook(name):
        def add(module, args, out):
            if not current:
                return out
            on_source = name.startswith(encoder_prefix) or (
                name.split(".")[-1] in ("k_proj", "v_proj", "k", "v") and ("encoder_attn" in name or "EncDec" in name)
            )
            s = current["source" if on_source else "target"]
            s = s[:, :, names.index(name) if layerwise else 0] if s.dim() == 4 else s  # (batch|1, seq|1, E)
            own = [(A, B, scale) for _, A, B, scale in factors[name]]
            columns = [e for e, _, _, _ in factors[name]]
            embedding = isinstance(module, torch.nn.Embedding)
            return mixture_reference(args[0], out, own, s[..., columns].expand(*out.shape[:2], -1), embedding)

        return add

    for name in names:
        model.get_submodule(name).register_forward_hook(hook(name))

    def gated(hidden):
        logits = tuner.xlora_classifier(hidden)  # (batch, seq, L|1, E): the MLP itself is tested elsewhere
        return logits, gate_reference(logits, config.softmax_temperature, True, None, False, g)

    g = config.global_scaling_weight  # multiplies every expert update in both passes (docs/concepts.md)
    with torch.no_grad():
        value = torch.full((1, 1, n_experts), float(config.scaling_pass_value) * g)
        current.update(source=value, target=value)
        source_hidden = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        target_hidden = model.get_decoder()(
            input_ids=batch["decoder_input_ids"],
            encoder_hidden_states=source_hidden,
            encoder_attention_mask=batch["attention_mask"],
        )[0]
        source_logits, source = gated(source_hidden)
        target_logits, target = gated(target_hidden)
        current.update(source=source, target=target)
        logits = model(**batch).logits
    return logits, source, target, source_logits, target_logits


@pytest.mark.parametrize("weight", [1.0, 0.5], ids=["weight-1", "weight-0.5"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["shared", "layerwise"])
def test_gating_matches_the_two_stack_reference(experts, layerwise, weight):
    arch, paths = experts
    model = xlora(arch, paths, layerwise_scalings=layerwise, scaling_pass_value=0.5, global_scaling_weight=weight)
    batch = inputs()
    logits = model(**batch).logits
    expected, source, target, _, _ = _reference_logits(arch, paths, model.base_model, batch, layerwise)
    n_layers = len(model.base_model.mixture_layer_names)
    torch.testing.assert_close(model.get_latest_encoder_scalings(), source.expand(-1, -1, n_layers, -1))
    torch.testing.assert_close(model.get_latest_scalings(), target.expand(-1, -1, n_layers, -1))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        assert not torch.allclose(logits, model(**batch).logits, atol=1e-4)


def test_router_losses_sum_both_stacks(experts):
    arch, paths = experts
    model = xlora(arch, paths, router_entropy_coef=0.3, router_load_balancing_coef=0.2)
    batch = inputs()
    out = model(**batch)
    _, _, _, source_logits, target_logits = _reference_logits(arch, paths, model.base_model, batch, False)
    source = router_losses_reference(source_logits, mask=batch["attention_mask"])
    target = router_losses_reference(target_logits)
    expected = 0.2 * (source["load_balancing"] + target["load_balancing"]) + 0.3 * (
        source["entropy"] + target["entropy"]
    )
    torch.testing.assert_close(out.router_loss.item(), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beams"])
def test_cached_generation_equals_uncached(experts, beams):
    arch, paths = experts
    model = xlora(arch, paths)
    batch = inputs()
    kwargs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "max_new_tokens": 6,
        "min_new_tokens": 6,  # random tiny models emit EOS early; the cache must see every step
        "do_sample": False,
        "num_beams": beams,
    }
    cached = model.generate(**kwargs)
    assert cached.shape[1] == 7
    torch.testing.assert_close(cached, model.generate(**kwargs, use_cache=False), rtol=0, atol=0)


def test_cached_forward_steps_equal_the_uncached_forward(experts):
    # A hand-written decoding loop: the target fed one token at a time against the returned cache.
    arch, paths = experts
    model = xlora(arch, paths)
    batch = inputs()
    full = model(**batch).logits
    encoded = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    cache, steps = None, []
    for t in range(TGT):
        out = model(
            encoder_outputs=encoded,
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"][:, t : t + 1],
            cache=cache,
            use_cache=True,
        )
        cache = out.cache
        steps.append(out.logits)
    assert type(cache).__name__ == "XLoraEncoderDecoderCache"
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- training, saving


def test_train_step_moves_only_the_gate(experts):
    arch, paths = experts
    model = xlora(arch, paths)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = inputs()
    loss = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["decoder_input_ids"]
    ).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("xlora_classifier" in n for n in grads)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("weight"))
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("xlora_classifier" in n for n in changed)


def _gate_grad(arch: str, paths: dict, reentrant: bool | None) -> torch.Tensor:
    model = xlora(arch, paths, layerwise_scalings=True)
    model.train()
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    batch = inputs()
    model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["decoder_input_ids"]
    ).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.base_model.xlora_classifier.parameters()])


def test_gradient_checkpointing_gives_the_same_gate_gradient(experts):
    # The checkpointed decoder layers carry both stacks' scalings (cross-attention keys and values read the source's).
    arch, paths = experts
    plain = _gate_grad(arch, paths, None)
    assert plain.abs().sum() > 0
    for reentrant in (False, True):
        torch.testing.assert_close(_gate_grad(arch, paths, reentrant), plain)


def test_save_and_reload_exactly(experts, tmp_path):
    arch, paths = experts
    model = xlora(arch, paths)
    batch = inputs()
    model.save_pretrained(tmp_path / "xlora")
    loaded = PeftModel.from_pretrained(build(arch), tmp_path / "xlora").eval()
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    kwargs = {"input_ids": batch["input_ids"], "max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    torch.testing.assert_close(loaded.generate(**kwargs), model.generate(**kwargs), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- bad input


def test_refused_options_and_inputs(experts):
    arch, paths = experts
    for option, match in [
        ({"scalings_mode": "prompt"}, "scalings_mode='prompt' is not supported for encoder-decoder"),
        ({"scaling_pass_layers": 1}, "`scaling_pass_layers` is not supported for encoder-decoder"),
        ({"router_distillation_coef": 0.5}, "`router_distillation_coef` is not supported for encoder-decoder"),
    ]:
        with pytest.raises(ValueError, match=match):
            xlora(arch, paths, **option)
    model = xlora(arch, paths)
    batch = inputs()
    with pytest.raises(ValueError, match="needs the decoder's input"):
        model(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="takes its inputs by keyword"):
        model.get_base_model()(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    with model.disable_adapter():
        plain = model.get_encoder()(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="were not computed by the X-LoRA encoder"):
        model(encoder_outputs=plain, decoder_input_ids=batch["decoder_input_ids"])
    with pytest.raises(ValueError, match="scalings_mode='prompt' is not supported"):
        model.generate(input_ids=batch["input_ids"], max_new_tokens=2, scalings_mode="prompt")
    with pytest.raises(ValueError, match="scalings_mode='prompt' is not supported"):
        model.base_model.update_config(scalings_mode="prompt")  # refused before it changes anything
    filled = tf.EncoderDecoderCache(tf.DynamicCache(), tf.DynamicCache())
    with model.disable_adapter():  # filled without the scaling pass, whose own cache is then missing
        model(**batch, cache=filled, use_cache=True)
    with pytest.raises(ValueError, match="X-LoRA cannot cache an encoder-decoder model"):
        model(**batch, cache=filled, use_cache=True)


def test_seq2seq_trainer_trains_the_gate_and_its_checkpoint_reloads(experts, tmp_path):
    # transformers' Seq2SeqTrainer: source/label pairs, only the gate moves, the saved checkpoint reloads exactly.
    arch, paths = experts
    model = xlora(arch, paths)
    generator = torch.Generator().manual_seed(5)
    sources = torch.randint(3, VOCAB, (8, SRC), generator=generator)
    data = [{"input_ids": s, "labels": (s[:TGT] * 7) % (VOCAB - 3) + 3} for s in sources]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = tf.Seq2SeqTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, learning_rate=5e-2,
        report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    tf.Seq2SeqTrainer(model=model, args=args, train_dataset=data).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("xlora_classifier" in n for n in changed)
    model.eval()
    loaded = PeftModel.from_pretrained(build(arch), tmp_path / "out" / "checkpoint-2").eval()
    batch = inputs()
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ combined with others

NEW_TARGETS = {"bart": ["k_proj", "fc2"], "t5": ["k", "wo"]}


@pytest.fixture(scope="module")
def new_expert(experts, tmp_path_factory):
    """A third expert on the cross-attention keys and a feed-forward layer no other expert adapts."""
    arch, _ = experts
    torch.manual_seed(300)
    lora = get_peft_model(
        build(arch),
        LoraConfig(
            task_type="SEQ_2_SEQ_LM", r=3, lora_alpha=5, target_modules=NEW_TARGETS[arch], init_lora_weights=False
        ),
    )
    path = tmp_path_factory.mktemp(f"{arch}-expert2")
    lora.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("layerwise", [False, True], ids=["shared", "layerwise"])
def test_added_expert_equals_a_model_built_with_it(experts, new_expert, tmp_path, layerwise):
    from helpers.compose import same_as_built

    arch, paths = experts
    model = xlora(arch, paths, layerwise_scalings=layerwise)
    batch = inputs()
    before = model(**batch).logits
    model.add_expert("expert2", new_expert)
    torch.testing.assert_close(model(**batch).logits, before, rtol=1e-5, atol=1e-5)  # it starts changing nothing
    reference = xlora(arch, {**paths, "expert2": new_expert}, layerwise_scalings=layerwise)
    same_as_built(model, reference, batch, tmp_path / "added", lambda: build(arch))
    model.set_static_scalings({"expert2": 1.0})
    reference = PeftModel.from_pretrained(build(arch), new_expert).eval()
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)


def test_removed_expert_equals_a_model_built_without_it(experts, tmp_path):
    # One expert left: the gate gives it weight 1 in both stacks, so the model is that expert's PEFT model.
    from helpers.compose import same_as_built

    arch, paths = experts
    model = xlora(arch, paths)
    batch = inputs()
    model.remove_expert("expert0")
    reference = PeftModel.from_pretrained(build(arch), paths["expert1"]).eval()
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)
    same_as_built(model, xlora(arch, {"expert1": paths["expert1"]}), batch, tmp_path / "removed", lambda: build(arch))


def test_per_row_pins_score_each_expert_in_one_batch(experts):
    arch, paths = experts
    model = xlora(arch, paths)
    batch = inputs()
    rows = batch["input_ids"].shape[0]
    doubled = {key: value.repeat(2, 1) for key, value in batch.items()}
    model.set_static_scalings(torch.eye(2).repeat_interleave(rows, dim=0), per_row=True)
    out = model(**doubled).logits
    for e, path in enumerate(paths.values()):
        reference = PeftModel.from_pretrained(build(arch), path).eval()
        torch.testing.assert_close(out[e * rows : (e + 1) * rows], reference(**batch).logits, rtol=1e-5, atol=1e-5)


def test_distillation_cannot_be_turned_on_later(experts):
    from helpers.compose import assert_unchanged, snapshot

    arch, paths = experts
    model = xlora(arch, paths)
    batch = inputs()
    before = snapshot(model, batch)
    with pytest.raises(ValueError, match="`router_distillation_coef` is not supported for encoder-decoder"):
        model.base_model.update_config(router_distillation_coef=0.5)
    with pytest.raises(ValueError, match="scalings_mode='prompt' is not supported for encoder-decoder"):
        model.base_model.update_config(scalings_mode="prompt")
    with pytest.raises(ValueError, match="`scaling_pass_layers` is not supported for encoder-decoder"):
        model.base_model.update_config(scaling_pass_layers=1)
    assert_unchanged(model, before, batch)


def test_mask_equals_a_model_built_without(experts):
    # One expert left active: the gate gives it weight 1 in both stacks (and the scaling passes leave the other out).
    arch, paths = experts
    model = xlora(arch, paths, scaling_pass_value=0.5)
    model.set_active_experts(["expert1"])
    batch = inputs()
    reference = PeftModel.from_pretrained(build(arch), paths["expert1"]).eval()
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)


def test_plain_lora_export_equals_the_pinned_model(experts, tmp_path):
    from peft_xlora import export_lora

    arch, paths = experts
    model = xlora(arch, paths)
    weights = {"expert0": 0.3, "expert1": 0.7}
    model.set_static_scalings(weights)
    export_lora(model, tmp_path / "lora")
    lora = PeftModel.from_pretrained(build(arch), tmp_path / "lora").eval()
    batch = inputs()
    torch.testing.assert_close(lora(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
