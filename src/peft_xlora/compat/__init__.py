"""The original `xlora` package's API (`add_xlora_to_model`, `from_pretrained`, `xlora_utils`, `xLoRAConfig`)."""
