"""peft-xlora: X-LoRA (Mixture of LoRA Experts) as a PEFT plugin. Importing it registers the method with PEFT."""

from .classifier import XLoraClassifier
from .config import XLoraConfig
from .layer import XLoraLayer
from .model import XLoraModel
from .registration import PEFT_XLORA, register

__version__ = "0.1.0.dev0"

register(XLoraConfig, XLoraModel)

__all__ = ["PEFT_XLORA", "XLoraClassifier", "XLoraConfig", "XLoraLayer", "XLoraModel", "__version__"]
