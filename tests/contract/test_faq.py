"""The FAQ quotes real errors: every message in docs/faq.md is raised, as written, by the situation it describes.

Each ```text block of docs/faq.md holds one error as Python prints its last line (`Type: message`), with `…` where
the message names something of the reader's (a path, a name, a size). `SCENARIOS` reproduces each situation on tiny
local models; the test checks that the FAQ and the scenarios match one to one, so a changed message, a new FAQ entry
without a scenario or a scenario whose error the FAQ lost all fail.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from transformers import DynamicCache

import peft_xlora
from helpers.models import build_xlora, input_ids, tiny_llama

FAQ = Path(__file__).resolve().parents[2] / "docs" / "faq.md"


def _xlora_checkpoint(expert_dirs, tmp_path) -> Path:
    path = tmp_path / "xlora"
    build_xlora("llama", expert_dirs).save_pretrained(path)
    return path


def forgot_import(expert_dirs, tmp_path, monkeypatch):
    path = _xlora_checkpoint(expert_dirs, tmp_path)
    monkeypatch.delitem(PEFT_TYPE_TO_CONFIG_MAPPING, "PEFT_XLORA")  # as in a process that never imported peft_xlora
    PeftModel.from_pretrained(tiny_llama(), path)


def base_reused(expert_dirs, tmp_path, monkeypatch):
    base = tiny_llama()
    config = peft_xlora.XLoraConfig(task_type="CAUSAL_LM", adapters=expert_dirs["llama"])
    get_peft_model(base, config)
    get_peft_model(base, config)  # `base` now holds the first model's layers


def no_adapters(expert_dirs, tmp_path, monkeypatch):
    peft_xlora.XLoraConfig(task_type="CAUSAL_LM")


def expert_for_another_model(expert_dirs, tmp_path, monkeypatch):
    adapters = {"gpt2-expert": expert_dirs["gpt2"]["math"]}
    get_peft_model(tiny_llama(), peft_xlora.XLoraConfig(task_type="CAUSAL_LM", adapters=adapters))


def expert_for_wider_model(expert_dirs, tmp_path, monkeypatch):
    wide = tiny_llama()
    wide.config.hidden_size = 64
    lora = get_peft_model(
        type(wide)(type(wide.config)(**{**wide.config.to_dict(), "hidden_size": 64})),
        LoraConfig(r=2, target_modules=["q_proj"]),
    )
    lora.save_pretrained(tmp_path / "wide")
    adapters = {"wide": str(tmp_path / "wide")}
    get_peft_model(tiny_llama(), peft_xlora.XLoraConfig(task_type="CAUSAL_LM", adapters=adapters))


def dora_expert(expert_dirs, tmp_path, monkeypatch):
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    lora.save_pretrained(tmp_path / "dora")
    adapters = {"dora": str(tmp_path / "dora")}
    get_peft_model(tiny_llama(), peft_xlora.XLoraConfig(task_type="CAUSAL_LM", adapters=adapters))


def merge(expert_dirs, tmp_path, monkeypatch):
    build_xlora("llama", expert_dirs).merge_and_unload()


def pickle_only(expert_dirs, tmp_path, monkeypatch):
    path = _xlora_checkpoint(expert_dirs, tmp_path)
    weights = path / "adapter_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), path / "adapter_model.bin")
    weights.unlink()
    PeftModel.from_pretrained(tiny_llama(), path)


def truncated(expert_dirs, tmp_path, monkeypatch):
    path = _xlora_checkpoint(expert_dirs, tmp_path)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # as an interrupted copy or download leaves it
    PeftModel.from_pretrained(tiny_llama(), path)


def static_cache(expert_dirs, tmp_path, monkeypatch):
    model = build_xlora("llama", expert_dirs).eval()
    model.generate(input_ids=input_ids(1, 5), max_new_tokens=2, cache_implementation="static")


def prompt_cache_in_token_mode(expert_dirs, tmp_path, monkeypatch):
    model = build_xlora("llama", expert_dirs).eval()
    out = model.generate(
        input_ids=input_ids(1, 5), max_new_tokens=2, scalings_mode="prompt", return_dict_in_generate=True
    )
    model.generate(
        input_ids=out.sequences, past_key_values=out.past_key_values, max_new_tokens=2, scalings_mode="token"
    )


def plain_cache(expert_dirs, tmp_path, monkeypatch):
    model = build_xlora("llama", expert_dirs).eval()
    ids = input_ids(1, 5)
    cache = DynamicCache()
    with model.disable_adapter():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    model(input_ids=input_ids(1, 1, seed=1), past_key_values=cache, use_cache=True)


def inputs_on_other_device(expert_dirs, tmp_path, monkeypatch):
    model = build_xlora("llama", expert_dirs)
    model(input_ids=input_ids().to("meta"))


def encoder_decoder(expert_dirs, tmp_path, monkeypatch):
    from peft import LoraConfig
    from transformers import T5Config, T5ForConditionalGeneration

    def t5():
        torch.manual_seed(0)
        return T5ForConditionalGeneration(
            T5Config(vocab_size=97, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
        )

    get_peft_model(t5(), LoraConfig(task_type="SEQ_2_SEQ_LM", target_modules=["q"])).save_pretrained(tmp_path / "e")
    model = get_peft_model(t5(), peft_xlora.XLoraConfig(task_type="SEQ_2_SEQ_LM", adapters={"e": str(tmp_path / "e")}))
    model(input_ids=input_ids())


def built_from_saved_config(expert_dirs, tmp_path, monkeypatch):
    path = _xlora_checkpoint(expert_dirs, tmp_path)
    model = get_peft_model(tiny_llama(), peft_xlora.XLoraConfig.from_pretrained(str(path)))
    model(input_ids=input_ids())


SCENARIOS: list[Callable] = [
    forgot_import,
    base_reused,
    no_adapters,
    expert_for_another_model,
    expert_for_wider_model,
    dora_expert,
    merge,
    pickle_only,
    truncated,
    static_cache,
    prompt_cache_in_token_mode,
    plain_cache,
    inputs_on_other_device,
    encoder_decoder,
    built_from_saved_config,
]


def faq_messages() -> list[str]:
    text = FAQ.read_text(encoding="utf-8")
    return [m.strip() for m in re.findall(r"^```text\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)]


def _pattern(message: str) -> re.Pattern:
    """`…` in the FAQ stands for any text; everything else must match exactly."""
    return re.compile(".+?".join(re.escape(part) for part in message.split("…")), flags=re.DOTALL)


def _raised(scenario: Callable, expert_dirs, tmp_path, monkeypatch) -> str:
    with pytest.raises(Exception) as info:
        scenario(expert_dirs, tmp_path, monkeypatch)
    kind = type(info.value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{name}: {info.value}"  # as Python prints an uncaught exception's last line


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_scenario_error_is_in_the_faq(scenario, expert_dirs, tmp_path, monkeypatch):
    actual = _raised(scenario, expert_dirs, tmp_path, monkeypatch)
    matches = [m for m in faq_messages() if _pattern(m).fullmatch(actual)]
    assert len(matches) == 1, f"docs/faq.md should quote this error once (… for its variable parts):\n{actual}"


def test_every_faq_error_has_a_scenario():
    # One FAQ message per scenario; together with the test above this makes the match one to one.
    assert len(faq_messages()) == len(SCENARIOS)


def test_pattern_wildcards():
    assert _pattern("ValueError: Expert … has rank ….").fullmatch("ValueError: Expert 'a' has rank 4.")
    assert not _pattern("ValueError: Expert … has rank 4.").fullmatch("ValueError: Expert 'a' has rank 5.")
