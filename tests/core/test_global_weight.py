"""`global_scaling_weight` weighs every expert update in both passes, as the original X-LoRA does.

The original package, PEFT's built-in X-LoRA and mistral.rs run the scaling pass with every expert at
``scaling_pass_value * global_scaling_weight``; so does peft-xlora. Checked against the formula written out in
`helpers.reference.xlora_logits_reference`, with and without the KV cache and `scaling_pass_layers`.
"""

import pytest
import torch
from torch import nn

from helpers.models import BUILDERS, build_xlora, input_ids
from helpers.reference import lora_factors_reference, xlora_logits_reference

OPTIONS = {"scaling_pass_value": 0.4, "global_scaling_weight": 0.7}
TOL = {"rtol": 1e-4, "atol": 1e-5}  # float32; the reference sums expert by expert, the mixture layer stacked


def reference(model, arch, expert_dirs, ids):
    tuner = model.base_model
    config = tuner.xlora_config
    experts = [lora_factors_reference(expert_dirs[arch][name]) for name in tuner.expert_names]
    linears = [m for m in tuner.xlora_classifier.layers if isinstance(m, nn.Linear)]
    classifier = [(m.weight.detach(), m.bias.detach()) for m in linears]
    return xlora_logits_reference(
        BUILDERS[arch](),
        experts,
        classifier,
        ids,
        scaling_pass_value=config.scaling_pass_value,
        global_weight=config.global_scaling_weight,
        scaling_pass_layers=config.scaling_pass_layers,
    )


@pytest.mark.parametrize("layers", [None, 1], ids=["all-layers", "scaling-pass-layers-1"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_matches_the_original_formula(arch, layers, expert_dirs):
    model = build_xlora(arch, expert_dirs, scaling_pass_layers=layers, **OPTIONS).eval()
    ids = input_ids()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, reference(model, arch, expert_dirs, ids), **TOL)


@pytest.mark.parametrize("layers", [None, 1], ids=["all-layers", "scaling-pass-layers-1"])
def test_cached_generation_matches_the_original_formula(layers, expert_dirs):
    # generate caches the scaling pass beside the main pass; each step's logits must still be the formula's
    model = build_xlora("llama", expert_dirs, scaling_pass_layers=layers, **OPTIONS).eval()
    ids = input_ids(batch=2, seq=5)
    out = model.generate(
        input_ids=ids,
        max_new_tokens=4,
        min_new_tokens=4,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    expected = reference(model, "llama", expert_dirs, out.sequences)[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), expected, **TOL)


def test_setters_change_the_scaling_pass_too(expert_dirs):
    model = build_xlora("llama", expert_dirs).eval()
    model.set_scaling_pass_value(0.4)
    model.set_global_scaling_weight(0.7)
    ids = input_ids()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, reference(model, "llama", expert_dirs, ids), **TOL)
