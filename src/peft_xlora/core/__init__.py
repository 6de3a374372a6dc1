"""The tuner core: what an X-LoRA model is (config, experts, mixture layers, classifier) and how it computes.

Nothing here imports `peft_xlora.io`, `peft_xlora.cli` or the other layers above it.
"""
