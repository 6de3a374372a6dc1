"""The original package's convenience helpers (`xlora.xlora_utils`): `load_model` and `load_scalings_log`."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..core.config import XLoraConfig
from ..core.scalings_log import load_scalings_log
from .original import add_xlora_to_model, from_pretrained

__all__ = ["load_model", "load_scalings_log"]


def load_model(
    model_name: str,
    device: str | torch.device,
    dtype: torch.dtype,
    adapters: dict[str, str] | list[str] | None = None,
    fine_tune_model_name: str | os.PathLike | None = None,
    load_xlora: bool | None = None,
    use_flash_attention_2: bool = False,
    verbose: bool = False,
    use_cache: bool = True,
    trust_remote_code: bool = False,
    from_safetensors: bool = True,
    **model_kwargs: Any,
) -> tuple[Any, Any]:
    """Loads a base causal LM and its tokenizer, and optionally turns it into an X-LoRA model.

    Args:
        model_name: Name or folder of the base model (and its tokenizer).
        device: Where to load the model (`device_map`), e.g. "cpu" or "cuda:0".
        dtype: The base model's dtype.
        adapters: With `fine_tune_model_name`, as in `from_pretrained` (list of names, or name -> source to read
            those experts from elsewhere). Without it, name -> LoRA checkpoint: a new X-LoRA model with an untrained
            classifier and default settings is built over these experts.
        fine_tune_model_name: Folder (or Hub id) of a trained X-LoRA checkpoint to load.
        load_xlora: Whether to return the X-LoRA model. None (default) loads it when `fine_tune_model_name` or
            `adapters` is given; False returns the base model alone.
        use_flash_attention_2: Load with `attn_implementation="flash_attention_2"` (needs the flash-attn package).
        verbose: Print what was loaded.
        use_cache: Sets the model's `config.use_cache`. X-LoRA's cached generation is exact, so it stays on by default.
        trust_remote_code: Passed to transformers; False unless you trust the model's code.
        from_safetensors: False also accepts a pickle-only (`adapter_model.bin`) X-LoRA checkpoint.
        **model_kwargs: Further arguments of `AutoModelForCausalLM.from_pretrained`.

    Returns:
        (model, tokenizer): the `PeftModel` (or the base model when not loading X-LoRA) and the tokenizer, whose
        `pad_token` is set to its `eos_token` when it had none.

    Raises:
        ValueError: X-LoRA was asked for but neither a checkpoint nor experts were given.
    """
    if load_xlora is None:
        load_xlora = fine_tune_model_name is not None or adapters is not None
    if load_xlora and fine_tune_model_name is None and not isinstance(adapters, dict):
        raise ValueError(
            "load_xlora=True needs `fine_tune_model_name` (a trained X-LoRA checkpoint) or `adapters` (a dict of "
            "expert name -> LoRA checkpoint to build a new X-LoRA model from)."
        )
    if use_flash_attention_2:
        model_kwargs.setdefault("attn_implementation", "flash_attention_2")
    model = AutoModelForCausalLM.from_pretrained(
        model_name, device_map=device, dtype=dtype, trust_remote_code=trust_remote_code, **model_kwargs
    )
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = use_cache
    tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad token; the original set the same one
    if not load_xlora:
        if verbose:
            print(f"Loaded the base model {model_name} without X-LoRA.")
        return model, tokenizer
    if fine_tune_model_name is not None:
        model = from_pretrained(
            fine_tune_model_name, model, adapters, device=device, verbose=verbose, from_safetensors=from_safetensors
        )
    else:
        # The original package's scaling pass runs the whole model.
        config = XLoraConfig(adapters=dict(adapters), task_type="CAUSAL_LM", scaling_pass_layers=None)  # type: ignore[arg-type]
        model = add_xlora_to_model(model, config, verbose=verbose)
    return model, tokenizer
