"""peft-xlora: X-LoRA (Mixture of LoRA Experts) as a PEFT plugin. Importing it registers the method with PEFT."""

from . import xlora_utils
from .checkpoint import save_pretrained
from .classifier import XLoraClassifier
from .compat import XLoraCompatWarning, add_xlora_to_model, from_pretrained, xLoRAConfig
from .config import XLoraConfig
from .export import export_lora, export_mistralrs
from .hub import push_to_hub
from .layer import XLoraLayer
from .migration import migrate
from .model import XLoraModel
from .plotting import plot_scalings
from .registration import PEFT_XLORA, register
from .scalings_log import load_scalings_log, save_scalings_log
from .transformers_integration import unload_adapter

__version__ = "0.1.0.dev0"

register(XLoraConfig, XLoraModel)

__all__ = [
    "PEFT_XLORA",
    "XLoraClassifier",
    "XLoraCompatWarning",
    "XLoraConfig",
    "XLoraLayer",
    "XLoraModel",
    "__version__",
    "add_xlora_to_model",
    "export_lora",
    "export_mistralrs",
    "from_pretrained",
    "load_scalings_log",
    "migrate",
    "plot_scalings",
    "push_to_hub",
    "save_pretrained",
    "save_scalings_log",
    "unload_adapter",
    "xLoRAConfig",
    "xlora_utils",
]
