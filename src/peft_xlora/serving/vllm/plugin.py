"""The `vllm.general_plugins` entry point: registers the X-LoRA model classes with vLLM's model registry.

vLLM calls every function of that entry-point group in each of its processes (the API server, the engine core and
every worker) before it resolves a model's architecture, which is how the classes reach a multi-process engine. The
classes are registered as objects, not as "module:Class" strings: vLLM inspects string registrations in a
subprocess, which costs tens of seconds per start.
"""

from __future__ import annotations


def register() -> None:
    """Registers the plugin's model classes (`XLoraLlamaForCausalLM`, ...; `spec.ARCHITECTURES`); safe to repeat."""
    from vllm import ModelRegistry

    from .model import MODEL_CLASSES

    supported = set(ModelRegistry.get_supported_archs())
    for name, cls in MODEL_CLASSES.items():
        if name not in supported:
            ModelRegistry.register_model(name, cls)
