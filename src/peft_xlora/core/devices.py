"""Where a module computes, for models dispatched by accelerate (`device_map=...`, CPU or disk offload)."""

from __future__ import annotations

import torch
from torch import nn


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` runs on.

    An offloaded module (accelerate's `AlignDevicesHook` with `offload=True`) keeps its weights on the meta device and
    loads them onto the hook's execution device for each forward: new weights that work beside it (stacked experts,
    the classifier) must live there, not on meta.

    Args:
        module: A module, possibly carrying an accelerate hook (`_hf_hook`).

    Returns:
        The hook's execution device if it has one, else the device of the module's first non-meta parameter or
        buffer, else meta (a model deliberately built on the meta device).
    """
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)] or list(module.parameters())
    for tensor in tensors:
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("meta")


def last_module_with_weights(model: nn.Module) -> nn.Module:
    """The last module (in registration order) that holds parameters of its own, else `model` itself."""
    last = model
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = module
    return last
