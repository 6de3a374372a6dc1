"""Serving engines for X-LoRA models beyond transformers' `generate`."""
