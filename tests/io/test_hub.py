"""Hub round trip through the in-process server of helpers/hub_server.py: push, load here and in a fresh process."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_checkpoint import logits, trained_llama

from helpers.hub_server import HubServer
from helpers.models import tiny_llama
from peft_xlora import CheckpointError, XLoraConfig
from peft_xlora.io.hub import push_to_hub

REPO = "user/xlora-tiny"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants

    server = HubServer(int(os.environ["PEFT_XLORA_TEST_HUB_PORT"])).start()
    assert server.url == huggingface_hub.constants.ENDPOINT  # set by conftest before huggingface_hub was imported
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    yield server
    server.stop()


def test_push_uploads_folder_and_card(hub, expert_dirs):
    base = tiny_llama()
    base.config._name_or_path = "test-org/tiny-llama"  # as if loaded with from_pretrained("test-org/tiny-llama")
    model = get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", adapters=expert_dirs["llama"]))
    push_to_hub(model, REPO)
    files = hub.repos[REPO].files
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = files["README.md"].decode()
    header, body = card.split("---")[1], card.split("---", 2)[2]
    assert "library_name: peft" in header
    assert "- x-lora" in header and "- peft-xlora" in header
    assert "base_model: test-org/tiny-llama" in header
    usage = body.split("```python")[1]
    assert usage.lstrip().startswith("import peft_xlora")
    assert f'PeftModel.from_pretrained(base, "{REPO}")' in usage
    assert 'AutoModelForCausalLM.from_pretrained("test-org/tiny-llama")' in usage
    assert not hub.unknown


def test_pull_in_this_process(hub, expert_dirs):
    model = trained_llama(expert_dirs)
    ref = logits(model)
    push_to_hub(model, REPO)
    loaded = PeftModel.from_pretrained(tiny_llama(), REPO).eval()
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)
    assert not hub.unknown


def test_pull_in_fresh_process(hub, expert_dirs, tmp_path):
    model = trained_llama(expert_dirs)
    ref = logits(model)
    push_to_hub(model, REPO)
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
        from helpers.models import input_ids, tiny_llama  # sets no endpoint: the environment below already does
        import peft_xlora
        from peft import PeftModel, get_peft_model
        model = PeftModel.from_pretrained(tiny_llama(), {REPO!r}).eval()
        with torch.no_grad():
            torch.save(model(input_ids=input_ids()).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = dict(
        os.environ,
        HF_ENDPOINT=hub.url,
        HF_HUB_OFFLINE="0",
        HF_HUB_CACHE=str(tmp_path / "fresh-cache"),
        PEFT_XLORA_TEST_HUB_PORT=str(hub.port),
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ref, rtol=0, atol=0)
    assert os.listdir(tmp_path / "fresh-cache")  # it really downloaded


def test_hub_repo_without_safetensors_is_refused(hub, expert_dirs):
    push_to_hub(trained_llama(expert_dirs), REPO)
    del hub.repos[REPO].files["adapter_model.safetensors"]
    with pytest.raises(CheckpointError, match="only safetensors"):
        PeftModel.from_pretrained(tiny_llama(), REPO)


def test_peft_push_to_hub_round_trips_too(hub, expert_dirs):
    # PEFT's own push (through transformers' PushToHubMixin) uploads a loadable checkpoint; its card is PEFT's.
    model = trained_llama(expert_dirs)
    ref = logits(model)
    model.push_to_hub(REPO)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(hub.repos[REPO].files)
    loaded = PeftModel.from_pretrained(tiny_llama(), REPO).eval()
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)


def test_single_pass_round_trips_through_the_hub(hub, expert_dirs):
    torch.manual_seed(0)
    config = XLoraConfig(
        task_type="CAUSAL_LM", adapters=expert_dirs["llama"], routing="single_pass", scaling_pass_layers=1
    )
    model = get_peft_model(tiny_llama(), config).eval()
    with torch.no_grad():  # trained-looking weights: the static logits and the classifier away from zero
        for param in model.parameters():
            if param.requires_grad:
                param.normal_()
    ref = logits(model)
    push_to_hub(model, REPO)
    loaded = PeftModel.from_pretrained(tiny_llama(), REPO).eval()
    assert loaded.base_model.xlora_config.routing == "single_pass"
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)
    assert not hub.unknown


@pytest.mark.parametrize(
    ("field", "edit"),
    [("experts", lambda c: list(c["experts"])), ("expert_order", lambda c: c["expert_order"][0])],
    ids=["experts-a-list", "expert-order-a-string"],
)
def test_hub_config_of_the_wrong_structure_names_the_file_and_field(hub, expert_dirs, field, edit):
    # Before: the structure check ran on local folders only, and a Hub checkpoint gave a bare TypeError.
    import json

    push_to_hub(trained_llama(expert_dirs), REPO)
    files = hub.repos[REPO].files
    config = json.loads(files["adapter_config.json"])
    config[field] = edit(config)
    files["adapter_config.json"] = json.dumps(config).encode()
    with pytest.raises(CheckpointError, match=rf"{REPO}/adapter_config.json: `{field}` is .*the file was edited"):
        PeftModel.from_pretrained(tiny_llama(), REPO)
    with pytest.raises(CheckpointError, match=rf"`{field}` is"):
        XLoraConfig.from_pretrained(REPO)
