"""Big-model placement: a base model dispatched by accelerate (CPU and disk offload) gives the same X-LoRA results.

A disk-offloaded module keeps its weights on the meta device between forwards; the stacked experts and the
classifier must be built on the device the module computes on, and the routing carriers must work through the
forward wrapper accelerate installs on hooked decoder layers.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model
from peft import get_peft_model

from helpers.models import BUILDERS, input_ids
from peft_xlora import XLoraConfig, XLoraLayer
from peft_xlora.core.devices import execution_device

# Layer 1 and the head are offloaded to disk; the boundary gives decoder layer 1 an accelerate forward wrapper.
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}


def _config(expert_dirs: dict) -> XLoraConfig:
    return XLoraConfig(
        task_type="CAUSAL_LM",
        adapters=expert_dirs["llama"],
        xlora_depth=2,
        xlora_size=16,
        xlora_dropout_p=0.0,
        scaling_pass_value=0.5,
        classifier_init="random",
    )


def _pair(expert_dirs: dict, tmp_path):
    """(plain X-LoRA model, X-LoRA over the dispatched base) with the same classifier weights."""
    plain = get_peft_model(BUILDERS["llama"](), _config(expert_dirs))
    base = dispatch_model(BUILDERS["llama"](), device_map=DEVICE_MAP, offload_dir=str(tmp_path / "offload"))
    assert base.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    offloaded = get_peft_model(base, _config(expert_dirs))
    offloaded.base_model.xlora_classifier.load_state_dict(plain.base_model.xlora_classifier.state_dict())
    return plain, offloaded


def test_offloaded_layers_get_their_experts_on_the_execution_device(expert_dirs, tmp_path):
    _, model = _pair(expert_dirs, tmp_path)
    trainable = dict(model.named_parameters())
    assert all(p.device.type == "cpu" for n, p in trainable.items() if "xlora" in n), [
        n for n, p in trainable.items() if "xlora" in n and p.device.type != "cpu"
    ]
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    assert isinstance(layer, XLoraLayer) and layer.xlora_A.abs().sum() > 0  # the expert's factors, not zeros
    assert execution_device(layer.base_layer) == torch.device("cpu")


@pytest.mark.parametrize("mode", [None, "non_reentrant", "reentrant"])
def test_offloaded_model_equals_plain_model(mode, expert_dirs, tmp_path):
    plain, offloaded = _pair(expert_dirs, tmp_path)
    ids = input_ids(seed=4)
    grads = []
    for model in (plain, offloaded):
        if mode is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        model.eval()
        with torch.no_grad():
            grads[-1]["logits"] = model(input_ids=ids).logits
    assert grads[0].keys() == grads[1].keys()
    for name, want in grads[0].items():
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], want, rtol=1e-5, atol=1e-6, msg=name)


def test_unload_gives_the_dispatched_base_model_back(expert_dirs, tmp_path):
    base = dispatch_model(BUILDERS["llama"](), device_map=DEVICE_MAP, offload_dir=str(tmp_path / "offload"))
    ids = input_ids(seed=5)
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = get_peft_model(base, _config(expert_dirs))
    restored = model.base_model.unload()
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, want, rtol=0, atol=0)


def test_layer_output_follows_the_layers_device_not_the_scalings(expert_dirs):
    """Under a device_map the scalings live beside the classifier. Meta stands in for a second device on CPU."""
    from peft_xlora.core.routing import Routing, use_routing

    model = get_peft_model(BUILDERS["llama"](), _config(expert_dirs))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.to("meta")
    scalings = torch.full((1, 3, 1, 3), 0.3)  # on CPU
    with use_routing(Routing(scalings)):
        out = layer(torch.randn(1, 3, 32, device="meta"))
    assert out.device.type == "meta" and out.shape == (1, 3, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_offload_to_gpu_execution(expert_dirs):  # pragma: no cover - not run on CPU-only machines
    device_map = {
        **DEVICE_MAP,
        "model.layers.1": "cpu",
        "lm_head": "cpu",
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.norm": 0,
        "model.rotary_emb": 0,
    }
    plain = get_peft_model(BUILDERS["llama"](), _config(expert_dirs)).cuda()
    base = dispatch_model(BUILDERS["llama"](), device_map=device_map, main_device=0)
    model = get_peft_model(base, _config(expert_dirs))
    model.base_model.xlora_classifier.load_state_dict(plain.base_model.xlora_classifier.state_dict())
    assert all(p.device.type == "cuda" for n, p in model.named_parameters() if "xlora" in n)
    ids = input_ids().cuda()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits.cuda(), plain(input_ids=ids).logits)
