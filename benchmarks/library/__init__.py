"""The library benchmark (issue 26): X-LoRA top-2 over a library of 16 LoRA experts, against Arrow top-2."""
