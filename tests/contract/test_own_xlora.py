"""The README's path for a newcomer, run end to end: `examples/own_xlora.py` on real PEFT LoRA folders.

A tiny random Llama is saved with a tokenizer (the user's base model), two LoRA experts are saved by PEFT's own
`save_pretrained` (the user's LoRAs), and the example builds X-LoRA over them, trains the gate with `Trainer` on a
text file, saves, reloads, pushes to the Hub look-alike of helpers/hub_server.py and writes the vLLM folder, in a
fresh process, as a user would run it. The test then loads what was pushed and compares it with what was saved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from helpers.hub_server import HubServer
from helpers.models import EXPERT_SPECS, VOCAB, make_expert, tiny_llama
from helpers.tiny_tokenizer import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
REPO = "you/my-xlora"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants

    server = HubServer(int(os.environ["PEFT_XLORA_TEST_HUB_PORT"])).start()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    yield server
    server.stop()


def test_readme_path_from_lora_folders_to_a_served_model(tmp_path, hub):
    base = tmp_path / "base-model"
    tiny_llama().save_pretrained(base)
    tokenizer = tiny_tokenizer(VOCAB)
    tokenizer.pad_token = "<pad>"
    tokenizer.save_pretrained(base)
    experts = {
        name: make_expert("llama", EXPERT_SPECS["llama"][name], seed, str(tmp_path / f"lora-{name}"))
        for seed, name in enumerate(["math", "code"])
    }
    generator = torch.Generator().manual_seed(0)
    words = [f"w{int(i)}" for i in torch.randint(3, VOCAB, (600,), generator=generator)]
    (tmp_path / "corpus.txt").write_text(" ".join(words), encoding="utf-8")

    out, served = tmp_path / "my-xlora", tmp_path / "my-xlora-vllm"
    command = [sys.executable, str(ROOT / "examples" / "own_xlora.py"), "--base", str(base)]
    command += [arg for name, path in experts.items() for arg in ("--expert", f"{name}={path}")]
    command += ["--data", str(tmp_path / "corpus.txt"), "--out", str(out), "--steps", "3", "--batch-size", "2"]
    command += ["--seq-len", "16", "--push", REPO, "--vllm-out", str(served)]
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_CACHE": str(tmp_path / "user-cache"),
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "reloaded logits identical: True" in result.stdout

    # The saved checkpoint holds everything: it loads with the expert folders gone.
    for path in experts.values():
        for file in Path(path).iterdir():
            file.unlink()
    ids = torch.randint(3, VOCAB, (2, 12), generator=generator)
    with torch.no_grad():
        local = PeftModel.from_pretrained(tiny_llama(), out).eval()(input_ids=ids).logits
        pushed = PeftModel.from_pretrained(tiny_llama(), REPO).eval()(input_ids=ids).logits
    torch.testing.assert_close(pushed, local, rtol=0, atol=0)
    card = hub.repos[REPO].files["README.md"].decode()
    assert "import peft_xlora" in card and not hub.unknown

    config = json.loads((served / "config.json").read_text())
    assert config["architectures"] == ["XLoraLlamaForCausalLM"]
    assert (served / "xlora.safetensors").is_file() and (served / "tokenizer.json").is_file()
