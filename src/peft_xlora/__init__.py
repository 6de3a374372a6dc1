"""peft-xlora: X-LoRA (Mixture of LoRA Experts) as a PEFT plugin. Importing it registers the method with PEFT.

The package is layered, and imports only point down: `core` (the tuner) <- `io` (files, Hub, migration, export) <-
`compat` (the original package's API) and `serving` <- `cli`. This module wires them: it registers the tuner with PEFT,
installs the transformers integration and the atomic `PeftModel.save_pretrained` of X-LoRA models, and re-exports
the public names.
"""

import sys

from ._version import __version__
from .compat import xlora_utils
from .compat.original import XLoraCompatWarning, add_xlora_to_model, from_pretrained, xLoRAConfig
from .core.checkpoint import CheckpointError, check_checkpoint_dir
from .core.classifier import XLoraClassifier
from .core.config import XLoraConfig
from .core.elastic import ExpertChangeWarning
from .core.experts import ExpertError
from .core.heads import XLoraHead
from .core.layer import XLoraLayer
from .core.model import XLoraModel
from .core.registration import PEFT_XLORA, register
from .core.regularisers import RouterLossWarning
from .core.scalings_log import ScalingsLogMixin, load_scalings_log, save_scalings_log
from .core.training import RouterLossMixin, distillation_loss, optimizer_param_groups, sft_trainer_class
from .io import save as _atomic_save
from .io import transformers as _transformers_integration
from .io.export import export_lora, export_mistralrs
from .io.hub import push_to_hub
from .io.migration import MigrationWarning, migrate
from .io.plotting import plot_scalings
from .io.save import save_pretrained
from .io.transformers import unload_adapter

register(XLoraConfig, XLoraModel)
_transformers_integration.install()  # transformers' `model.load_adapter` loads X-LoRA checkpoints through PEFT
_atomic_save.install()  # `model.save_pretrained` of an X-LoRA PeftModel is atomic; other adapter types as before

# The original package is imported as `xlora` and its helpers as `xlora.xlora_utils`: `import peft_xlora as xlora`
# then `from peft_xlora.xlora_utils import load_model` keeps working.
sys.modules[f"{__name__}.xlora_utils"] = xlora_utils


def __getattr__(name: str) -> type:
    # `XLoraSFTTrainer` subclasses TRL's SFTTrainer, so it is built (and `trl` imported) only when asked for; it is
    # not in `__all__`, so that `from peft_xlora import *` works without TRL.
    if name == "XLoraSFTTrainer":
        return sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PEFT_XLORA",
    "CheckpointError",
    "ExpertChangeWarning",
    "ExpertError",
    "MigrationWarning",
    "RouterLossMixin",
    "RouterLossWarning",
    "ScalingsLogMixin",
    "XLoraClassifier",
    "XLoraCompatWarning",
    "XLoraConfig",
    "XLoraHead",
    "XLoraLayer",
    "XLoraModel",
    "__version__",
    "add_xlora_to_model",
    "check_checkpoint_dir",
    "distillation_loss",
    "export_lora",
    "export_mistralrs",
    "from_pretrained",
    "load_scalings_log",
    "migrate",
    "optimizer_param_groups",
    "plot_scalings",
    "push_to_hub",
    "save_pretrained",
    "save_scalings_log",
    "unload_adapter",
    "xLoRAConfig",
    "xlora_utils",
]
