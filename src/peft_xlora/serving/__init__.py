"""Serving X-LoRA models in inference engines (vLLM) outside transformers' `generate`."""
