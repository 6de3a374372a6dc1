"""The checkpoint's tensor layout: the model's stacked experts <-> one A/B pair per expert and module.

Tensor keys in `adapter_model.safetensors` (relative to the `PeftModel`):

    base_model.xlora_classifier.layers.<i>.{weight,bias}                    classifier, as PEFT's built-in X-LoRA
    base_model.model.<module>.xlora_experts.<expert>.lora_A   (r, in)       an expert's factors on one module
    base_model.model.<module>.xlora_experts.<expert>.lora_B   (out, r)

The model itself holds each module's experts stacked (`XLoraLayer.xlora_A`, (R, in)); saving splits the stacks per
expert and loading joins them again. Per-expert keys let an expert be replaced at load time by one of another rank or
other target modules, and let the experts be exported as plain LoRA adapters. Keys are built from the module and expert
names, never parsed, so expert names may contain any character.

The classifier is a submodule of the transformers model (``base_model.model.xlora_classifier`` in the `PeftModel`),
so that transformers' `model.load_adapter`, which keeps only the transformers model, has it too. Its checkpoint keys
stay ``base_model.xlora_classifier.*`` (the layout of every checkpoint written so far): saving and loading map between
the two. Loading also accepts ``base_model.model.xlora_classifier.*``, which transformers' `save_pretrained` of a bare
model writes (it prefixes every key of the model with ``base_model.model.``).

These functions are what the tuner's PEFT hooks (`XLoraModel._get_adapter_state_dict` and
`_remap_adapter_state_dict_for_load`) run; they take the expert order as an argument and never look up the tuner.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from .classifier import XLoraClassifier
from .experts import factor_problem
from .layer import XLoraLayer

CLASSIFIER_PREFIX = "base_model.xlora_classifier."
EXPERT_INFIX = "xlora_experts"
PEFT_PREFIX = "base_model.model."


def expert_key(module_key: str, expert: str, part: str) -> str:
    """The checkpoint key of one expert's factor on one module.

    Args:
        module_key: The module's key prefix, e.g. ``base_model.model.model.layers.0.self_attn.q_proj``.
        expert: The expert's name.
        part: ``"A"`` or ``"B"``.
    """
    return f"{module_key}.{EXPERT_INFIX}.{expert}.lora_{part}"


def rank_bounds(layer: XLoraLayer, position: int) -> tuple[int, int]:
    """Rows (of `xlora_A`) / columns (of `xlora_B`) that hold the `position`-th expert of `layer`."""
    start = sum(layer.ranks[:position])
    return start, start + layer.ranks[position]


def _mixture_layers(model: nn.Module) -> Iterator[tuple[str, XLoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, XLoraLayer):
            yield name, module


def split_experts(
    model: nn.Module, expert_names: list[str], state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Model state dict (stacked experts) -> checkpoint state dict (one A/B pair per expert and module).

    Args:
        model: The `PeftModel` (or any module holding the mixture layers under the names used in `state_dict`).
        expert_names: The experts in the order the mixture layers index them (`XLoraModel.expert_names`).
        state_dict: The X-LoRA entries of the model's state dict (classifier and stacked factors).

    Returns:
        The checkpoint entries: classifier entries unchanged, stacked factors split per expert.
    """
    names = expert_names
    out = dict(state_dict)
    for model_key, saved_key, _ in _classifier_keys(model):
        if model_key in out:
            out[saved_key] = out.pop(model_key)
    for module_key, layer in _mixture_layers(model):
        stacked_a = out.pop(f"{module_key}.xlora_A", None)
        stacked_b = out.pop(f"{module_key}.xlora_B", None)
        if stacked_a is None or stacked_b is None:
            continue  # not part of this state dict (e.g. a partial one)
        for position, index in enumerate(layer.expert_indices):
            start, stop = rank_bounds(layer, position)
            # clone: safetensors refuses views that share storage with other saved tensors
            out[expert_key(module_key, names[index], "A")] = stacked_a[start:stop].clone()  # (r, in)
            out[expert_key(module_key, names[index], "B")] = stacked_b[:, start:stop].clone()  # (out, r)
    return out


def classifier_entries(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The classifier's entries of `model`'s state dict, under the model's keys."""
    return {key: state_dict[key] for key, _, _ in _classifier_keys(model) if key in state_dict}


def join_experts(
    model: nn.Module,
    expert_names: list[str],
    state_dict: dict[str, torch.Tensor],
    replaced: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Checkpoint state dict -> model state dict, checking that it holds exactly what the model needs.

    Args:
        model: The `PeftModel` the weights are loaded into, or the bare transformers model after transformers'
            `model.load_adapter` built X-LoRA into it.
        expert_names: The experts in the order the mixture layers index them (`XLoraModel.expert_names`).
        state_dict: The checkpoint's tensors.
        replaced: Expert name -> `Expert` (from `experts.load_expert`) for experts whose source was swapped at load
            time: their factors come from there, and the checkpoint's tensors for them are ignored.

    Returns:
        The model's keys -> tensors: the classifier entries and one stacked (A, B) pair per mixture layer.

    Raises:
        CheckpointError: Tensors are missing, unexpected, or have the wrong shape; an expert factor is not floating
            point or holds NaN/Inf (naming the expert and module); a classifier tensor is not floating point or not
            of the other classifier tensors' dtype.
    """
    replaced = replaced or {}
    names = expert_names
    remaining = dict(state_dict)
    for name in replaced:  # the checkpoint's copy of a replaced expert is not used
        infix = f".{EXPERT_INFIX}.{name}.lora_"
        for key in [k for k in remaining if infix in k]:
            del remaining[key]
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    wrong_shape: list[str] = []
    bad_values: list[str] = []  # tensors of the right shape that cannot be used (not float, NaN/Inf)
    prefixed = any(k.startswith(PEFT_PREFIX) for k in state_dict)
    for module_key, layer in _mixture_layers(model):
        # Keys are saved relative to the PeftModel; a model without that wrapper sees them without the prefix.
        ckpt_module = module_key if module_key.startswith("base_model.") or not prefixed else PEFT_PREFIX + module_key
        module_name = module_key.removeprefix(PEFT_PREFIX)
        parts_a, parts_b = [], []
        problems_before = len(missing) + len(wrong_shape)
        for position, index in enumerate(layer.expert_indices):
            name = names[index]
            start, stop = rank_bounds(layer, position)
            if name in replaced:
                lora = replaced[name].modules[module_name]
                a, b = lora.A, lora.B
            else:
                key_a, key_b = expert_key(ckpt_module, name, "A"), expert_key(ckpt_module, name, "B")
                a, b = remaining.pop(key_a, None), remaining.pop(key_b, None)
                for key, tensor, shape in (
                    (key_a, a, (stop - start, layer.in_features)),
                    (key_b, b, (layer.out_features, stop - start)),
                ):
                    if tensor is None:
                        missing.append(key)
                    elif tuple(tensor.shape) != shape:
                        wrong_shape.append(f"{key}: {tuple(tensor.shape)} in the checkpoint, {shape} in the model")
                    elif problem := factor_problem(tensor):
                        bad_values.append(f"expert {name!r} on module {module_name!r} ({key}) {problem}")
                if a is None or b is None:
                    continue
            parts_a.append(a)
            parts_b.append(b)
        if len(missing) + len(wrong_shape) == problems_before:  # every factor of this layer is present and fits
            # (bad values raise below, after every tensor was looked at)
            dtype = parts_a[0].dtype if parts_a else layer.xlora_A.dtype
            out[f"{module_key}.xlora_A"] = torch.cat([p.to(dtype) for p in parts_a], dim=0)  # (R, in)
            out[f"{module_key}.xlora_B"] = torch.cat([p.to(dtype) for p in parts_b], dim=1)  # (out, R)

    classifier_dtypes: dict[str, torch.dtype] = {}
    for model_key, _, loadable in _classifier_keys(model):
        found = [k for k in loadable if k in remaining]  # a second layout of the same tensor stays "unexpected"
        tensor = remaining.pop(found[0]) if found else None
        if tensor is None:
            missing.append(loadable[0])
        else:
            expected = tuple(model.get_parameter(model_key).shape)
            if tuple(tensor.shape) != expected:
                wrong_shape.append(f"{found[0]}: {tuple(tensor.shape)} in the checkpoint, {expected} in the model")
            classifier_dtypes[found[0]] = tensor.dtype
            out[model_key] = tensor
    _check_classifier_dtypes(classifier_dtypes)
    if bad_values:
        raise CheckpointError(
            f"{WEIGHTS_NAME} holds expert factors that cannot be used: {'; '.join(bad_values[:3])}"
            + (f" (and {len(bad_values) - 3} more)" if len(bad_values) > 3 else "")
            + ". The file is damaged or edited, or the experts' training diverged: use an earlier checkpoint, or "
            "take those experts from their LoRA adapters with `expert_sources={name: folder}`."
        )
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {missing[:3]})")
    if remaining:
        problems.append(f"{len(remaining)} unexpected tensors (e.g. {sorted(remaining)[:3]})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with the wrong shape ({'; '.join(wrong_shape[:3])})")
    if problems:
        raise CheckpointError(
            f"The X-LoRA weights do not match the model that {CONFIG_NAME} describes: " + ", ".join(problems) + ". "
            f"Was {WEIGHTS_NAME} or {CONFIG_NAME} replaced, truncated, or written for another base model?"
        )
    return out


def _check_classifier_dtypes(dtypes: dict[str, torch.dtype]) -> None:
    """Refuses classifier tensors that are not floating point or not all of one dtype.

    The classifier runs in its weights' dtype (loading restores the checkpoint's), so its tensors must share one:
    otherwise its first matmul fails at the first forward, or integers are cast silently.
    """
    if not dtypes:
        return
    counts: dict[torch.dtype, int] = {}
    for dtype in dtypes.values():
        counts[dtype] = counts.get(dtype, 0) + 1
    common = max(counts, key=lambda d: (d.is_floating_point, counts[d]))
    for key, dtype in dtypes.items():
        if not dtype.is_floating_point or dtype != common:
            want = f"the {common} of the other classifier tensors" if common.is_floating_point else "floating point"
            raise CheckpointError(
                f"{WEIGHTS_NAME}: classifier tensor {key} holds {dtype}, not {want}. The file was edited or written "
                "by something else; save the checkpoint again from the model, or use an earlier one."
            )


def _classifier_keys(model: nn.Module) -> list[tuple[str, str, list[str]]]:
    """For each classifier parameter: its key in `model`, the key it is saved under, the keys it may be loaded from.

    In a `PeftModel` the classifier is ``base_model.model.xlora_classifier``, saved as ``base_model.xlora_classifier``.
    In a bare transformers model (transformers' PEFT integration) it is ``xlora_classifier`` and is saved under that
    key, relative to the model like every other key there. Either loads from ``base_model.xlora_classifier.*`` (what
    this package writes), ``base_model.model.xlora_classifier.*`` (what transformers' `save_pretrained` writes) and,
    into a bare model, the unprefixed key.
    """
    for name, module in model.named_modules():
        if isinstance(module, XLoraClassifier):
            wrapped = name.startswith(PEFT_PREFIX)
            out = []
            for rel, _ in module.named_parameters():
                model_key = f"{name}.{rel}"
                canonical = CLASSIFIER_PREFIX + rel
                loadable = [canonical, PEFT_PREFIX + model_key.removeprefix(PEFT_PREFIX)]
                if not wrapped:
                    loadable.append(model_key)
                out.append((model_key, canonical if wrapped else model_key, loadable))
            return out
    return []


def restore_saved_dtypes(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Gives each X-LoRA parameter the dtype it was saved in, so that a reload is bit-exact.

    A model trained on a bf16 base keeps its trainable weights in float32 (PEFT's `autocast_adapter_dtype`); loading
    that checkpoint for inference would otherwise round them to bf16.
    """
    for key, tensor in state_dict.items():
        try:
            param = model.get_parameter(key)
        except AttributeError:
            continue
        if param.dtype != tensor.dtype and tensor.is_floating_point():
            param.data = param.data.to(tensor.dtype)
