"""The demo's CPU precision: bf16 autocast where the CPU multiplies bf16 natively, float32 where it does not.

On a CPU with AVX512-BF16 or AMX a bf16 matmul is faster than a float32 one (the demo runs about 1.5x faster); on an
AVX2-only CPU PyTorch emulates it, and a bf16 matmul is about 32x slower than float32 (docs/demo.md).
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16)."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:  # per-instruction-set flags
        flags = get_capabilities()
        return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))
    # Older PyTorch: only the dispatch level ("DEFAULT", "AVX2", "AVX512", ...), which names bf16 where it has it.
    capability = torch.backends.cpu.get_cpu_capability().upper()
    return "BF16" in capability or "AMX" in capability


def resolve_precision(choice: str, tiny: bool = False) -> str:
    """The precision to run: the user's "bf16" or "fp32", or for "auto" bf16 only where the CPU has it natively.

    "auto" gives float32 for `--tiny` (its hidden size of 48 gains nothing from bf16).

    Raises:
        ValueError: `choice` is not one of auto, bf16, fp32.
    """
    if choice not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {choice!r}.")
    if choice != "auto":
        return choice
    return "bf16" if not tiny and native_bf16() else "fp32"
