"""Serving engines for X-LoRA models beyond transformers' `generate`: `serving.vllm`, a vLLM model plugin."""
