"""Serving X-LoRA with vLLM: export a checkpoint to a folder vLLM loads, and the model plugin that runs it.

`export_vllm` needs only the main environment; `register` (the `vllm.general_plugins` entry point) and the model
classes in `peft_xlora.serving.vllm.model` need vLLM and are imported only when vLLM loads them.
"""

from .export import export_vllm
from .plugin import register
from .spec import SPEC_KEY, ServingSpec, XLoraServingError, scaling_pass_constant

__all__ = ["SPEC_KEY", "ServingSpec", "XLoraServingError", "export_vllm", "register", "scaling_pass_constant"]
