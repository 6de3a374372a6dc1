"""The demo's precision: bf16 autocast only where the CPU multiplies bf16 natively, unless the user says otherwise."""

from __future__ import annotations

import pytest
import torch

from peft_xlora.cli.demo import Demo, preset
from peft_xlora.cli.demo import precision as demo_precision
from peft_xlora.cli.demo.precision import native_bf16, resolve_precision

AVX2_FLAGS = {"avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        (AVX2_FLAGS, False),
        ({**AVX2_FLAGS, "avx512_f": True}, False),  # AVX512 without its bf16 extension (e.g. Skylake)
        ({**AVX2_FLAGS, "avx512_f": True, "avx512_bf16": True}, True),
        ({**AVX2_FLAGS, "amx_bf16": True}, True),
    ],
)
def test_native_bf16_from_the_cpu_flags(monkeypatch, flags, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags, raising=False)
    assert native_bf16() is native
    assert resolve_precision("auto") == ("bf16" if native else "fp32")
    assert resolve_precision("auto", tiny=True) == "fp32"
    assert resolve_precision("bf16") == "bf16" and resolve_precision("fp32") == "fp32"  # the user's choice wins


@pytest.mark.parametrize(
    ("capability", "native"),
    [("DEFAULT", False), ("AVX2", False), ("AVX512", False), ("AVX512_BF16", True), ("AMX", True)],
)
def test_native_bf16_from_the_dispatch_level_on_older_pytorch(monkeypatch, capability, native):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert native_bf16() is native


def test_unknown_precision_refused():
    with pytest.raises(ValueError, match="--precision must be one of auto, bf16, fp32, got 'fp16'"):
        resolve_precision("fp16")


def test_the_demo_resolves_auto_before_keying_its_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(demo_precision, "native_bf16", lambda: False)
    assert Demo(preset(False), tmp_path, tmp_path).s.precision == "fp32"  # AVX2-only: float32
    monkeypatch.setattr(demo_precision, "native_bf16", lambda: True)
    assert Demo(preset(False), tmp_path, tmp_path).s.precision == "bf16"
    assert Demo(preset(False, precision="fp32"), tmp_path, tmp_path).s.precision == "fp32"
