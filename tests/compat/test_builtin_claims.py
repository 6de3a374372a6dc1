"""What README and docs say PEFT's built-in X-LoRA gets wrong, each shown beside peft-xlora doing it right.

Every test runs one check on both implementations. The built-in's run is a strict expected failure with the
exception (or failed assertion) the docs quote, measured with peft 0.21.2 (pyproject pins peft < 0.22): if a PEFT
release fixes one, its test passes, the strict mark turns that into a failure, and the claim must be updated.
Tiny random models; nothing is downloaded.
"""

from __future__ import annotations

import shutil

import peft
import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model
from peft import XLoraConfig as BuiltinXLoraConfig
from torch.utils.checkpoint import CheckpointError

from helpers.models import EXPERT_SPECS, input_ids, make_expert, tiny_llama
from peft_xlora import XLoraConfig

PEFT_VERSION = peft.__version__


def _builtin(reason: str, raises: type[BaseException]):
    return pytest.param(
        "builtin",
        marks=pytest.mark.xfail(strict=True, raises=raises, reason=f"PEFT {PEFT_VERSION}'s built-in X-LoRA: {reason}"),
    )


def _xlora(impl: str, base: torch.nn.Module, adapters: dict[str, str], task_type: str = "CAUSAL_LM", **kw):
    """X-LoRA over `adapters` on `base`: ours, or PEFT's built-in (which refuses a KV cache in the config)."""
    if impl == "ours":
        config = XLoraConfig(task_type=task_type, adapters=adapters, xlora_depth=2, xlora_size=16, **kw)
    else:
        base.config.use_cache = False
        hidden = base.config.hidden_size if hasattr(base.config, "hidden_size") else base.config.d_model
        config = BuiltinXLoraConfig(
            task_type=task_type, hidden_size=hidden, adapters=adapters, xlora_depth=2, xlora_size=16, **kw
        )
    return get_peft_model(base, config)


def _classifier_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    inner = model.base_model
    classifier = inner.xlora_classifier if hasattr(inner, "xlora_classifier") else inner.internal_xlora_classifier
    return list(classifier.parameters())


@pytest.fixture(scope="module")
def named_experts(tmp_path_factory):
    """Two distinct LoRA experts of the tiny Llama, with names of one's own choosing."""
    root = tmp_path_factory.mktemp("named-experts")
    specs = EXPERT_SPECS["llama"]
    names = ["math", "code"]
    return {name: make_expert("llama", specs[name], seed, str(root / name)) for seed, name in enumerate(names)}


@pytest.fixture(scope="module")
def numbered_experts(named_experts):
    """The same experts under the only names the built-in accepts."""
    return {str(i): path for i, path in enumerate(named_experts.values())}


@pytest.mark.parametrize("impl", ["ours", _builtin("other names raise KeyError at the first forward", KeyError)])
def test_experts_may_have_any_names(impl, named_experts):
    model = _xlora(impl, tiny_llama(), named_experts).eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids()).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("impl", "reentrant"),
    [
        ("ours", True),
        ("ours", False),
        # Reentrant: no exception at all, the classifier's gradient is simply missing.
        pytest.param(
            "builtin",
            True,
            marks=pytest.mark.xfail(
                strict=True,
                raises=AssertionError,
                reason=f"PEFT {PEFT_VERSION}'s built-in X-LoRA: with reentrant checkpointing the classifier gets no "
                "gradient, silently",
            ),
        ),
        pytest.param(
            "builtin",
            False,
            marks=pytest.mark.xfail(
                strict=True,
                raises=CheckpointError,
                reason=f"PEFT {PEFT_VERSION}'s built-in X-LoRA: non-reentrant checkpointing fails in backward",
            ),
        ),
    ],
    ids=["ours-reentrant", "ours-non-reentrant", "builtin-reentrant", "builtin-non-reentrant"],
)
def test_gradient_checkpointing_gives_the_classifier_its_gradient(impl, reentrant, numbered_experts):
    torch.manual_seed(0)
    model = _xlora(impl, tiny_llama(), numbered_experts)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in _classifier_params(model)]
    assert all(g is not None for g in grads), "the classifier got no gradient"
    assert sum(g.abs().sum() for g in grads) > 0, "the classifier's gradient is zero"


def _tiny_bart() -> tf.BartForConditionalGeneration:
    torch.manual_seed(0)
    config = tf.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
    )  # fmt: skip
    return tf.BartForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def bart_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bart-experts")
    experts = {}
    for i in range(2):
        torch.manual_seed(100 + i)
        config = LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="SEQ_2_SEQ_LM"
        )
        get_peft_model(_tiny_bart(), config).save_pretrained(root / str(i))
        experts[str(i)] = str(root / str(i))
    return experts


@pytest.mark.parametrize(
    "impl", ["ours", _builtin("source and target of different lengths fail at the first forward", RuntimeError)]
)
def test_encoder_decoder_with_source_and_target_of_different_lengths(impl, bart_experts):
    model = _xlora(impl, _tiny_bart(), bart_experts, task_type="SEQ_2_SEQ_LM").eval()
    generator = torch.Generator().manual_seed(0)
    source = torch.randint(3, 64, (1, 7), generator=generator)
    target = torch.randint(3, 64, (1, 5), generator=generator)
    with torch.no_grad():
        logits = model(input_ids=source, decoder_input_ids=target).logits
    assert logits.shape == (1, 5, 64)


@pytest.mark.parametrize(
    "impl",
    [
        "ours",
        # Its save keeps the experts' original paths in adapter_config.json and reload reads them from there.
        _builtin("reload reads the experts from their original folders, which are gone", ValueError),
    ],
)
def test_a_saved_checkpoint_loads_without_the_expert_folders(impl, named_experts, tmp_path):
    experts = {}
    for i, (name, path) in enumerate(named_experts.items()):  # private copies, deleted after the save
        key = name if impl == "ours" else str(i)
        experts[key] = str(shutil.copytree(path, tmp_path / "experts" / key))
    model = _xlora(impl, tiny_llama(), experts).eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids()).logits
    model.save_pretrained(tmp_path / "checkpoint")
    shutil.rmtree(tmp_path / "experts")
    base = tiny_llama()
    base.config.use_cache = impl == "ours"  # the built-in refuses a cache
    loaded = PeftModel.from_pretrained(base, tmp_path / "checkpoint").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids()).logits, expected)


@pytest.mark.parametrize("impl", ["ours", _builtin("refuses a model whose config enables the KV cache", ValueError)])
def test_generation_with_a_kv_cache(impl, numbered_experts):
    base = tiny_llama()
    base.config.use_cache = True
    if impl == "ours":
        config = XLoraConfig(task_type="CAUSAL_LM", adapters=numbered_experts, xlora_depth=2, xlora_size=16)
    else:
        config = BuiltinXLoraConfig(
            task_type="CAUSAL_LM", hidden_size=32, adapters=numbered_experts, xlora_depth=2, xlora_size=16
        )
    model = get_peft_model(base, config).eval()
    ids = input_ids()[:1]
    cached = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
