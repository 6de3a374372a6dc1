"""Every architecture users bring, as a tiny random config (never downloaded): supported or refused up front.

One table drives the tests. For each supported architecture: two LoRA experts with different ranks and target modules
(Linear, fused projections, GPT-2's Conv1D, embeddings) are saved, X-LoRA wraps exactly the modules they adapt,
pinning the gate to one expert gives exactly that expert's PEFT LoRA model, one training step trains the gate and
nothing else, the trained model saves and loads back exactly, and generation with the KV cache gives the same tokens
as generation without it. Each refused architecture fails at `get_peft_model` with an error that says why.
docs/models.md lists the same table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model

from peft_xlora import XLoraConfig, XLoraLayer

VOCAB = 61
BATCH, SEQ = 2, 6
DECODER = {
    "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
BERT = {
    "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2, "max_position_embeddings": 64, "num_labels": 3,
}  # fmt: skip


@dataclass
class Arch:
    """One row of the architecture table.

    Attributes:
        name: Test id, and the row name in docs/models.md.
        config_cls: The transformers config class.
        model_cls: The model class built from it.
        config: Keyword arguments of the tiny config.
        targets: Target modules of the two experts (they differ on purpose).
        task: The X-LoRA config's `task_type`.
        refused: For an unsupported architecture, a regex of the error `get_peft_model` must raise.
        embed_scale: The embedding module whose `embed_scale` (Gemma) must be honoured, if any.
        heads: The experts are SEQ_CLS LoRAs that bring their own trained head (`modules_to_save`), mixed by the gate.
    """

    name: str
    config_cls: type
    model_cls: type
    config: dict
    targets: tuple[list[str], list[str]] = (["q_proj", "v_proj"], ["o_proj", "down_proj", "embed_tokens"])
    task: str | None = "CAUSAL_LM"
    refused: str | None = None
    embed_scale: str | None = None
    extra: dict = field(default_factory=dict)
    heads: bool = False

    def build(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return self.model_cls(self.config_cls(**self.config)).eval()

    def inputs(self, ids: torch.Tensor) -> dict:
        """A forward's inputs: encoder-decoder models also get a target (decoder) sequence, here the reversed ids."""
        if self.task == "SEQ_2_SEQ_LM":
            return {"input_ids": ids, "decoder_input_ids": ids.flip(-1)}
        return {"input_ids": ids}


ARCHS = [
    Arch("llama", tf.LlamaConfig, tf.LlamaForCausalLM, DECODER),
    Arch("mistral", tf.MistralConfig, tf.MistralForCausalLM, DECODER, (["q_proj", "k_proj"], ["v_proj", "up_proj"])),
    Arch("qwen2", tf.Qwen2Config, tf.Qwen2ForCausalLM, DECODER, (["q_proj", "v_proj"], ["gate_proj", "embed_tokens"])),
    Arch("gemma", tf.GemmaConfig, tf.GemmaForCausalLM, {**DECODER, "head_dim": 8},
         (["q_proj", "embed_tokens"], ["v_proj", "down_proj"]), embed_scale="model.embed_tokens"),
    Arch("gemma3", tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {**DECODER, "head_dim": 8, "sliding_window": 4},
         (["q_proj", "embed_tokens"], ["o_proj", "up_proj"]), embed_scale="model.embed_tokens"),
    Arch("qwen3", tf.Qwen3Config, tf.Qwen3ForCausalLM, {**DECODER, "head_dim": 8},
         (["q_proj", "k_proj"], ["gate_proj", "o_proj", "embed_tokens"])),
    # Gemma 2 multiplies the embeddings by sqrt(hidden) in the model's forward (no `embed_scale` module attribute),
    # soft-caps attention and final logits, and alternates sliding-window and full attention.
    Arch("gemma2", tf.Gemma2Config, tf.Gemma2ForCausalLM,
         {**DECODER, "head_dim": 8, "sliding_window": 4, "num_hidden_layers": 2},
         (["q_proj", "embed_tokens"], ["v_proj", "down_proj", "up_proj"])),
    Arch("phi3", tf.Phi3Config, tf.Phi3ForCausalLM, {**DECODER, "num_key_value_heads": 2},
         (["qkv_proj"], ["gate_up_proj", "o_proj", "embed_tokens"])),
    Arch("gpt2", tf.GPT2Config, tf.GPT2LMHeadModel,
         {"vocab_size": VOCAB, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64, "bos_token_id": 1,
          "eos_token_id": 2}, (["c_attn", "c_proj"], ["c_fc", "wte"])),
    Arch("opt", tf.OPTConfig, tf.OPTForCausalLM,
         {"vocab_size": VOCAB, "hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "max_position_embeddings": 64, "word_embed_proj_dim": 16, "pad_token_id": 0, "bos_token_id": 1,
          "eos_token_id": 2}, (["q_proj", "v_proj"], ["out_proj", "fc1", "embed_tokens"])),
    # OPT-350m style: the last hidden state is projected to `word_embed_proj_dim`, narrower than `hidden_size`.
    Arch("opt-projected", tf.OPTConfig, tf.OPTForCausalLM,
         {"vocab_size": VOCAB, "hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "max_position_embeddings": 64, "word_embed_proj_dim": 8, "pad_token_id": 0, "bos_token_id": 1,
          "eos_token_id": 2}, (["q_proj", "v_proj"], ["fc2", "project_in"])),
    Arch("gpt-neox", tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM,
         {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 2, "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2},
         (["query_key_value"], ["dense_h_to_4h", "dense", "embed_in"])),
    Arch("llama-seq-cls", tf.LlamaConfig, tf.LlamaForSequenceClassification, {**DECODER, "num_labels": 3},
         (["q_proj", "v_proj"], ["o_proj", "embed_tokens"]), task="SEQ_CLS"),
    Arch("bert-seq-cls", tf.BertConfig, tf.BertForSequenceClassification, BERT,
         (["query", "value"], ["intermediate.dense", "word_embeddings"]), task="SEQ_CLS"),
    Arch("llama-seq-cls-heads", tf.LlamaConfig, tf.LlamaForSequenceClassification, {**DECODER, "num_labels": 3},
         (["q_proj", "v_proj"], ["o_proj", "embed_tokens"]), task="SEQ_CLS", heads=True),
    Arch("bert-seq-cls-heads", tf.BertConfig, tf.BertForSequenceClassification, BERT,
         (["query", "value"], ["intermediate.dense", "word_embeddings"]), task="SEQ_CLS", heads=True),
    Arch("bert-token-cls", tf.BertConfig, tf.BertForTokenClassification, BERT,
         (["query", "value"], ["output.dense"]), task=None),
    Arch("bert-token-cls-task", tf.BertConfig, tf.BertForTokenClassification, BERT, (["query"], ["value"]),
         task="TOKEN_CLS", refused=r"task_type='TOKEN_CLS' is not supported.*task_type=None"),
    Arch("bart", tf.BartConfig, tf.BartForConditionalGeneration,
         {"vocab_size": VOCAB, "d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
          "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "max_position_embeddings": 64},
         (["q_proj", "v_proj"], ["fc1", "k_proj"]), task="SEQ_2_SEQ_LM"),
    Arch("t5", tf.T5Config, tf.T5ForConditionalGeneration,
         {"vocab_size": VOCAB, "d_model": 16, "d_ff": 32, "d_kv": 8, "num_layers": 1, "num_heads": 2,
          "decoder_start_token_id": 0}, (["q", "v"], ["wi", "k"]), task="SEQ_2_SEQ_LM"),
]  # fmt: skip
SUPPORTED = [a for a in ARCHS if a.refused is None]
REFUSED = [a for a in ARCHS if a.refused is not None]


def save_experts(arch: Arch, root) -> dict[str, str]:
    """Two distinct random LoRA experts of ranks 2 and 4 on different modules, saved as PEFT checkpoints.

    With `arch.heads` they are SEQ_CLS LoRAs, each with a distinct random head of its own (`modules_to_save`).
    """
    paths = {}
    for i, targets in enumerate(arch.targets):
        torch.manual_seed(100 + i)
        task = "SEQ_CLS" if arch.heads else None
        lora = get_peft_model(
            arch.build(),
            LoraConfig(task_type=task, r=2 + 2 * i, lora_alpha=4, target_modules=targets, init_lora_weights=False),
        )
        with torch.no_grad():  # PEFT zero-initialises B of embedding LoRAs even with init_lora_weights=False
            for name, param in lora.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    param.copy_(torch.randn_like(param) * 0.3)
        path = root / f"{arch.name}-expert{i}"
        lora.save_pretrained(path)
        paths[f"expert{i}"] = str(path)
    return paths


def labels_for(arch: Arch, ids: torch.Tensor) -> torch.Tensor:
    if arch.task == "SEQ_CLS":
        return torch.tensor([0, 2])
    if arch.model_cls is tf.BertForTokenClassification:
        return ids % 3
    return ids


def output_of(out) -> torch.Tensor:
    return out.logits


@pytest.mark.parametrize("arch", SUPPORTED, ids=lambda a: a.name)
def test_supported_architecture(arch, tmp_path):
    paths = save_experts(arch, tmp_path)
    model = get_peft_model(
        arch.build(),
        XLoraConfig(task_type=arch.task, adapters=paths, xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0),
    )
    tuner = model.base_model
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    # Wraps exactly the modules the experts adapt, whatever their type.
    adapted = {name for path in paths.values() for name in _adapted_modules(path)}
    assert set(tuner.mixture_layer_names) == adapted
    assert all(isinstance(m, XLoraLayer) for m in tuner.mixture_layers())

    # Pinned to one expert, X-LoRA is exactly that expert's PEFT LoRA model (embedding scale included).
    if arch.embed_scale:
        scale = model.get_base_model().get_submodule(arch.embed_scale).base_layer.embed_scale
        assert float(scale) != 1.0  # the check below would not notice an ignored scale otherwise
    for name, path in paths.items():
        model.set_static_scalings({name: 1.0})
        ours = output_of(model(**arch.inputs(ids)))
        reference = PeftModel.from_pretrained(arch.build(), path).eval()
        torch.testing.assert_close(ours, output_of(reference(**arch.inputs(ids))), rtol=1e-5, atol=1e-5)
    model.set_static_scalings(None)

    # Gated: per-token scalings, one row per adapted layer, rows sum to 1, output differs from the base model.
    out = output_of(model(**arch.inputs(ids)))
    scalings = model.get_latest_scalings()
    assert scalings.shape == (BATCH, SEQ, len(adapted), 2)
    torch.testing.assert_close(scalings.sum(-1), torch.ones(scalings.shape[:-1]))
    with model.disable_adapter():
        assert not torch.allclose(out, output_of(model(**arch.inputs(ids))), atol=1e-4)

    # One training step: only the gate gets gradients, and it moves.
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(input_ids=ids, labels=labels_for(arch, ids)).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("xlora_classifier" in n for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("xlora_classifier" in n for n in changed)
    model.eval()

    # The trained model saves and loads back exactly (the model's own head is not saved; the experts' heads are).
    model.save_pretrained(tmp_path / "xlora")
    loaded = PeftModel.from_pretrained(arch.build(), tmp_path / "xlora").eval()
    torch.testing.assert_close(
        output_of(loaded(**arch.inputs(ids))), output_of(model(**arch.inputs(ids))), rtol=0, atol=0
    )

    # Generation: with the KV cache of both passes, the same tokens as without a cache.
    if arch.task == "CAUSAL_LM":
        kwargs = {"input_ids": ids, "max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
        cached = model.generate(**kwargs)
        assert cached.shape == (BATCH, SEQ + 3)
        assert torch.equal(cached, model.generate(**kwargs, use_cache=False))
    elif arch.task == "SEQ_2_SEQ_LM":  # the decoder starts from its start token; random models stop early otherwise
        kwargs = {"input_ids": ids, "max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
        cached = model.generate(**kwargs)
        assert cached.shape == (BATCH, 4)
        assert torch.equal(cached, model.generate(**kwargs, use_cache=False))


@pytest.mark.parametrize("arch", SUPPORTED, ids=lambda a: a.name)
def test_gradient_checkpointing(arch, tmp_path):
    # The gate's gradient is the same with gradient checkpointing, in both modes, as without it.
    paths = save_experts(arch, tmp_path)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    grads = []
    for reentrant in (None, False, True):
        model = get_peft_model(
            arch.build(),
            XLoraConfig(task_type=arch.task, adapters=paths, xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0),
        )
        model.train()
        if reentrant is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
            assert model.get_base_model().is_activation_checkpointing
        model(input_ids=ids, labels=labels_for(arch, ids)).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.base_model.xlora_classifier.parameters()]))
    assert grads[0].abs().sum() > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])


def _adapted_modules(path: str) -> set[str]:
    from peft.utils.save_and_load import load_peft_weights

    names = set()
    for key in load_peft_weights(path):
        if "lora_" not in key:
            continue  # the base embedding PEFT saves beside embedding LoRAs
        module = key.removeprefix("base_model.model.")
        for part in (".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B"):
            module = module.split(part)[0]
        names.add(module)
    return names


@pytest.mark.parametrize("arch", REFUSED, ids=lambda a: a.name)
def test_refused_architecture(arch, tmp_path):
    paths = save_experts(arch, tmp_path)
    base = arch.build()
    state = {n: p.clone() for n, p in base.state_dict().items()}
    with pytest.raises(ValueError, match=arch.refused):
        get_peft_model(base, XLoraConfig(task_type=arch.task, adapters=paths))
    # Refused before anything was changed: the model is untouched.
    assert not any(isinstance(m, XLoraLayer) for m in base.modules())
    assert all(torch.equal(p, state[n]) for n, p in base.state_dict().items())


# ---------------------------------------------------------------------------------------------- quantized layers


def _bnb_quantized(bnb, kind: str) -> torch.nn.Module:
    """tiny_llama with every Linear that bitsandbytes' CPU kernels accept (sizes multiple of 32) quantized."""
    from helpers.models import tiny_llama

    model = tiny_llama()
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        if module.in_features % 32 or module.out_features % 32:
            continue
        if kind == "4bit":
            layer = bnb.nn.Linear4bit(
                module.in_features, module.out_features, bias=module.bias is not None, compute_dtype=torch.float32
            )
            layer.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, blocksize=32)
        else:
            layer = bnb.nn.Linear8bitLt(
                module.in_features, module.out_features, bias=module.bias is not None, has_fp16_weights=False
            )
            layer.weight = bnb.nn.Int8Params(module.weight.data.clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to("cpu"))  # .to() quantizes
    return model.eval()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_bitsandbytes_layers_are_wrapped(kind, expert_dirs):
    bnb = pytest.importorskip("bitsandbytes")
    from helpers.models import input_ids

    dirs = expert_dirs["llama"]
    model = get_peft_model(_bnb_quantized(bnb, kind), XLoraConfig(task_type="CAUSAL_LM", adapters=dirs, xlora_size=8))
    quantized = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}[kind]
    wrapped = [layer.base_layer for layer in model.base_model.mixture_layers()]
    assert sum(isinstance(b, quantized) for b in wrapped) >= 3  # q_proj, o_proj, down_proj, ... all mixed
    # bitsandbytes' CPU backend really quantized them (packed 4-bit in uint8, int8), not kept float weights
    stored = {"4bit": torch.uint8, "8bit": torch.int8}[kind]
    assert all(b.weight.dtype == stored for b in wrapped if isinstance(b, quantized))
    ids = input_ids()
    for name, path in dirs.items():
        model.set_static_scalings({name: 1.0})
        reference = PeftModel.from_pretrained(_bnb_quantized(bnb, kind), path).eval()
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    model.set_static_scalings(None)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.base_model.xlora_classifier.layers[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- LoRA options


def test_rank_and_alpha_patterns_layer_subsets_rslora(tmp_path):
    """Experts with per-module ranks/alphas, rsLoRA and a subset of layers mix exactly as PEFT applies them."""
    arch = Arch("llama-2-layers", tf.LlamaConfig, tf.LlamaForCausalLM, {**DECODER, "num_hidden_layers": 2})
    configs = {
        "patterns": LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 6},
            alpha_pattern={"down_proj": 1},
            init_lora_weights=False,
        ),
        "subset": LoraConfig(
            r=3,
            lora_alpha=5,
            target_modules=["q_proj", "up_proj"],
            layers_to_transform=[1],
            use_rslora=True,
            lora_dropout=0.1,
            init_lora_weights=False,
        ),
    }
    paths = {}
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(200 + i)
        lora = get_peft_model(arch.build(), config)
        lora.save_pretrained(tmp_path / name)
        paths[name] = str(tmp_path / name)
    model = get_peft_model(arch.build(), XLoraConfig(task_type="CAUSAL_LM", adapters=paths, xlora_size=8)).eval()
    layers = dict(zip(model.base_model.mixture_layer_names, model.base_model.mixture_layers()))
    assert layers["model.layers.0.self_attn.v_proj"].ranks == [6]
    assert "model.layers.0.mlp.up_proj" not in layers and layers["model.layers.1.mlp.up_proj"].ranks == [3]
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    for name, path in paths.items():
        model.set_static_scalings({name: 1.0})
        reference = PeftModel.from_pretrained(arch.build(), path).eval()
        ours = model(input_ids=ids).logits
        torch.testing.assert_close(ours, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours, arch.build()(input_ids=ids).logits, atol=1e-4)  # the expert does something


@pytest.mark.parametrize("arch", [a for a in SUPPORTED if a.embed_scale], ids=lambda a: a.name)
def test_embed_scale_applies_to_the_expert_update(arch, tmp_path):
    # Independent of how PEFT computes its forward: pinned to an embedding expert, X-LoRA equals the base model with
    # that LoRA merged into the embedding weight, which the model's own `embed_scale` then multiplies. Untied, so that
    # merging does not change the LM head as well.
    arch = Arch(
        arch.name,
        arch.config_cls,
        arch.model_cls,
        {**arch.config, "tie_word_embeddings": False},
        arch.targets,
        embed_scale=arch.embed_scale,
    )
    paths = save_experts(arch, tmp_path)
    name = next(n for n, targets in zip(paths, arch.targets) if "embed_tokens" in targets)
    model = get_peft_model(arch.build(), XLoraConfig(task_type=arch.task, adapters=paths, xlora_size=8)).eval()
    model.set_static_scalings({name: 1.0})
    merged = PeftModel.from_pretrained(arch.build(), paths[name]).merge_and_unload().eval()
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- single pass


def _single_pass_reference(arch: Arch, paths: dict[str, str], model, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Single-pass X-LoRA written out on a fresh base model with forward hooks, for any decoder architecture.

    Every adapted module adds sum_e w_e * scale_e * B_e A_e x (times the module's own `embed_scale`, which PEFT and
    peft-xlora apply to an embedding's update). The modules before decoder layer k+1 (layers 1..k and the input
    embedding) weigh the experts with softmax(static logits); a first pass gives the output of layer k, which the
    classifier (linear layers, ReLU between) and the gate turn into per-token weights for the later modules.
    """
    import re

    from helpers.reference import gate_reference, lora_factors_reference

    tuner = model.base_model
    config = tuner.xlora_config
    loras = [lora_factors_reference(path) for path in paths.values()]
    names = tuner.mixture_layer_names
    layer_of = {n: int(m.group(1)) if (m := re.search(r"\.(?:layers|h)\.(\d+)\.", n)) else -1 for n in names}
    early = [n for n in names if layer_of[n] < k]
    static = torch.softmax(tuner.xlora_classifier.single_pass_static.logits.detach().float(), -1)  # (n_early, E)
    weights: dict[str, torch.Tensor] = {n: static[early.index(n)] for n in early}
    base = arch.build()

    def hook(name: str):
        def add(module, args, output):
            w = weights[name]  # (n_experts,) or (batch, seq, n_experts)
            for e, lora in enumerate(loras):
                if name in lora:
                    a, b, scale, embedding = lora[name]
                    down = torch.nn.functional.embedding(args[0], a.T) if embedding else args[0] @ a.T
                    update = w[..., e : e + 1] * scale * (down @ b.T)
                    if embedding and getattr(module, "embed_scale", None) is not None:
                        update = update * module.embed_scale
                    output = output + update
            return output

        return add

    handles = [base.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            weights.update({n: torch.zeros(len(loras)) for n in names if n not in early})  # unused before layer k
            hidden = base.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[k]
            logits = hidden.float()
            linears = [m for m in tuner.xlora_classifier.layers if isinstance(m, torch.nn.Linear)]
            for i, linear in enumerate(linears):
                logits = logits @ linear.weight.T + linear.bias
                logits = torch.relu(logits) if i < len(linears) - 1 else logits
            logits = logits.unflatten(-1, (-1, len(loras)))  # (batch, seq, n_layers, n_experts)
            late = gate_reference(
                logits, config.softmax_temperature, config.enable_softmax, config.top_k_lora,
                config.enable_softmax_topk, config.global_scaling_weight,
            )  # fmt: skip
            weights.update({n: late[:, :, names.index(n)] for n in names if n not in early})
            return base(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


# The Llama-like decoders (those the vLLM plugin serves, and Gemma): layers under `model.layers`, one token per row.
DECODERS = [
    a for a in SUPPORTED if a.name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")
]


@pytest.mark.parametrize("arch", DECODERS, ids=lambda a: a.name)
def test_single_pass_architecture(arch, tmp_path):
    # Two decoder layers, the gate on the first one's output: static weights up to it, per-token scalings after. The
    # same logits as the single pass written out, and the same greedy tokens with the KV cache as without.
    arch = Arch(arch.name, arch.config_cls, arch.model_cls, {**arch.config, "num_hidden_layers": 2}, arch.targets)
    paths = save_experts(arch, tmp_path)
    config = XLoraConfig(
        task_type="CAUSAL_LM", adapters=paths, routing="single_pass", scaling_pass_layers=1, layerwise_scalings=True,
        top_k_lora=1, xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0, classifier_init="random",
    )  # fmt: skip
    torch.manual_seed(5)
    model = get_peft_model(arch.build(), config).eval()
    static = model.base_model.xlora_classifier.single_pass_static
    with torch.no_grad():
        static.logits.copy_(torch.randn(static.logits.shape))  # trained static weights are not uniform
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, _single_pass_reference(arch, paths, model, ids, k=1), rtol=1e-5, atol=1e-5)
    with model.disable_adapter(), torch.no_grad():
        assert not torch.allclose(ours, model(input_ids=ids).logits, atol=1e-4)
    kwargs = {"input_ids": ids, "max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, use_cache=False))


GENERATIVE = [a for a in SUPPORTED if a.task == "CAUSAL_LM"]


@pytest.mark.parametrize("arch", GENERATIVE, ids=lambda a: a.name)
def test_the_default_scaling_pass_reads_two_thirds_of_the_layers(arch, tmp_path):
    # `scaling_pass_layers="auto"` on 3 decoder layers: the classifier reads decoder layer 2's output, which with
    # `scaling_pass_value=0` is the base model's hidden_states[2]; the cached generation equals the uncached one.
    key = "n_layer" if "n_layer" in arch.config else "num_hidden_layers"
    deep = dataclasses.replace(arch, config={**arch.config, key: 3})
    paths = save_experts(deep, tmp_path)
    model = get_peft_model(deep.build(), XLoraConfig(task_type="CAUSAL_LM", adapters=paths, classifier_init="random"))
    assert model.peft_config["default"].scaling_pass_layers == 2
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
        with model.disable_adapter():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
        expected = torch.softmax(model.base_model.xlora_classifier(hidden).float(), -1)
    torch.testing.assert_close(model.get_latest_scalings()[:, :, :1], expected, rtol=1e-5, atol=1e-6)
    kwargs = {"input_ids": ids, "max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, use_cache=False))


def test_a_projected_last_hidden_state_keeps_the_classifier_width_it_was_built_for(tmp_path):
    # OPT-350m style: the LM head reads a projection (8 wide) of the residual stream (16 wide). A model built with the
    # whole scaling pass reads the projection; one built with a cut reads the residual stream. Moving between the two
    # with `update_config` would change the classifier's input width: refused, the model bit-identical.
    opt = next(a for a in GENERATIVE if a.name == "opt-projected")
    deep = dataclasses.replace(opt, config={**opt.config, "num_hidden_layers": 3})
    paths = save_experts(deep, tmp_path)
    for k, width, other, other_width in ((None, 8, 2, 16), (2, 16, None, 8)):
        config = XLoraConfig(task_type="CAUSAL_LM", adapters=paths, scaling_pass_layers=k)
        model = get_peft_model(deep.build(), config)
        assert model.peft_config["default"].hidden_size == width
        before = {n: t.clone() for n, t in model.state_dict().items()}
        with pytest.raises(ValueError, match=f"would feed the classifier a hidden state {other_width} wide"):
            model.base_model.update_config(scaling_pass_layers=other)
        assert model.peft_config["default"].scaling_pass_layers == k
        assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
