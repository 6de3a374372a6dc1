"""Migration in: checkpoints of PEFT's built-in X-LoRA and of the original `xlora` package become peft-xlora models.

Both functions return a `PeftModel` with peft-xlora's X-LoRA that computes what the source model computed; save it
with `peft_xlora.save_pretrained` to get a self-contained checkpoint. Nothing is initialised at random:
a tensor the source checkpoint lacks is an error that names it.

PEFT's built-in X-LoRA (`peft_type: "XLORA"`) saves the experts into numbered subfolders, but its key filter drops
every tensor whose key contains ``.<another expert's number>.``: each subfolder misses the LoRA factors of the
layers with other numbers, and the top-level file misses the classifier layers whose index is an expert's number
(layer ``i`` ends up in subfolder ``i`` as ``internal_xlora_classifier.layers.weight``, where it is recovered).
Experts are taken from their subfolder when it is complete, otherwise from the original path in
`adapter_config.json` when it still exists and the experts were frozen, otherwise it is an error listing the missing
modules (pass the expert's LoRA with `expert_sources`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.checkpoint import CheckpointError, check_safetensors_file
from ..core.config import XLoraConfig
from ..core.layer import module_kind

_GATING_FIELDS = (
    "hidden_size",
    "enable_softmax",
    "enable_softmax_topk",
    "softmax_temperature",
    "layerwise_scalings",
    "top_k_lora",
    "xlora_depth",
    "xlora_size",
    "xlora_dropout_p",
    "use_trainable_adapters",
    "scaling_pass_value",
    "global_scaling_weight",
)
_LORA_KEY = re.compile(
    r"^(?:base_model\.(?:lora_model\.)?model\.)?(?P<module>.+)\."
    r"(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$"
)


class MigrationWarning(UserWarning):
    """A migration went through, but took something from a place the user should know about."""


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}).") from exc


def _checkpoint_root(path: str) -> str:
    """The folder that every file a migration reads must resolve into: the checkpoint, symlinks resolved.

    A Hub download (`snapshot_download`) is a folder of symlinks into the repository's ``blobs/`` beside
    ``snapshots/``; for such a folder the repository folder is the root, so its own blobs stay readable.
    """
    real = os.path.realpath(path)
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots" and os.path.isdir(os.path.join(os.path.dirname(parent), "blobs")):
        return os.path.dirname(parent)
    return real


def _inside(root: str, path: str, what: str) -> str:
    """`path`, refused unless it resolves (symlinks followed) to `root` or below: a checkpoint is untrusted input."""
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise CheckpointError(
            f"{what}: {path} resolves to {real}, outside the checkpoint; a checkpoint may only refer to its own "
            "files. Copy the files into the checkpoint folder instead of linking them."
        )
    return path


def _expert_folder(path: str, root: str, name: Any, config_file: str) -> str:
    """The subfolder of expert `name` (read from the untrusted `config_file`), checked to stay in the checkpoint.

    Raises:
        CheckpointError: `name` is not a plain folder name (absolute, ``..``, a path separator), or the folder or
            one of its files is a symlink to somewhere outside the checkpoint.
    """
    plain = isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
    if not plain or os.path.isabs(name):
        raise CheckpointError(
            f"{path}/{config_file} names an expert {name!r}, which is not a plain folder name (no path separators, "
            "no '..', not absolute); a checkpoint's experts live in its own subfolders. Rename the expert there."
        )
    folder = _inside(root, os.path.join(path, name), f"Expert {name!r}")
    if os.path.isdir(folder):
        for entry in os.listdir(folder):
            _inside(root, os.path.join(folder, entry), f"Expert {name!r}")
    return folder


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    check_safetensors_file(path)
    return load_file(path)


def _expected_modules(base_model: nn.Module, lora_config: PeftConfig) -> set[str]:
    """Names of the modules of `base_model` that a LoRA with this config adapts."""
    return {
        name
        for name, module in base_model.named_modules()
        if name and module_kind(module) is not None and check_target_module_exists(lora_config, name)
    }


def _clean_lora_folder(source: str, out: str, base_model: nn.Module) -> list[str]:
    """Copies the LoRA factors of an expert subfolder into a standard PEFT LoRA folder.

    Returns:
        The modules whose factors the subfolder lacks (empty when complete).
    """
    config = PeftConfig.from_pretrained(source)
    tensors = _read_safetensors(os.path.join(source, "adapter_model.safetensors"))
    clean: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        m = _LORA_KEY.match(key)
        if m and "internal_xlora_classifier" not in key:
            clean[f"base_model.model.{m['module']}.{m['part']}"] = tensor
    present = {k.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for k in clean}
    missing = sorted(_expected_modules(base_model, config) - present)
    os.makedirs(out, exist_ok=True)
    config.save_pretrained(out)
    save_file(clean, os.path.join(out, "adapter_model.safetensors"))
    return missing


def _linear_positions(classifier: nn.Module) -> list[int]:
    return [i for i, m in enumerate(classifier.layers) if isinstance(m, nn.Linear)]


def _finish(model: PeftModel, is_trainable: bool) -> PeftModel:
    if not is_trainable:
        for param in model.parameters():
            param.requires_grad_(False)
        model.eval()
    return model


# ---------------------------------------------------------------------------------------------------- PEFT built-in


def from_peft_builtin(
    base_model: nn.Module,
    path: str | os.PathLike,
    *,
    expert_names: list[str] | None = None,
    expert_sources: dict[str, str] | None = None,
    is_trainable: bool = False,
) -> PeftModel:
    """Loads a checkpoint saved by PEFT's built-in X-LoRA (`peft_type: "XLORA"`) as a peft-xlora model.

    Args:
        base_model: The base model the checkpoint was trained on.
        path: The checkpoint folder.
        expert_names: New names for the experts "0".."n-1", in that order; kept as they are when None.
        expert_sources: Expert (old name) -> LoRA folder, for experts whose saved copy is incomplete.
        is_trainable: Leave the classifier (and trainable experts) trainable instead of returning an eval model.

    Returns:
        The `PeftModel`; it gives the same outputs as the built-in model did.

    Raises:
        CheckpointError: Files are missing or damaged, or tensors are lost (the message names them).
        ValueError: `top_k_lora` with a `scaling_pass_value` other than 0, whose scaling pass the built-in computes
            differently (see `_check_topk_in_scaling_pass`).
    """
    path = os.fspath(path)
    root = _checkpoint_root(path)
    saved = _read_json(_inside(root, os.path.join(path, "adapter_config.json"), "The config"))
    if saved.get("peft_type") != "XLORA":
        kind = saved.get("peft_type")
        raise CheckpointError(f"{path} is not a PEFT built-in X-LoRA checkpoint (peft_type {kind!r}).")
    old_names = list(saved["adapters"])
    folders = {old: _expert_folder(path, root, old, "adapter_config.json") for old in old_names}
    names = list(expert_names) if expert_names is not None else old_names
    if len(names) != len(old_names) or len(set(names)) != len(names):
        raise ValueError(f"`expert_names` must give {len(old_names)} distinct names, one per expert {old_names}.")
    expert_sources = dict(expert_sources or {})
    trainable_experts = bool(saved.get("use_trainable_adapters"))

    top = _read_safetensors(_inside(root, os.path.join(path, "adapter_model.safetensors"), "The weights"))
    prefix = "base_model.internal_xlora_classifier."
    classifier = {k.removeprefix(prefix): v for k, v in top.items() if k.startswith(prefix)}

    with tempfile.TemporaryDirectory() as tmp:
        sources, problems = {}, []
        for old, new in zip(old_names, names):
            folder = folders[old]
            if os.path.isdir(folder):
                # classifier layer `old` was saved here, under a key with ".<old>" removed
                sub = _read_safetensors(os.path.join(folder, "adapter_model.safetensors"))
                for part in ("weight", "bias"):
                    key = f"layers.{old}.{part}"
                    if key not in classifier and f"{prefix}layers.{part}" in sub:
                        classifier[key] = sub[f"{prefix}layers.{part}"]
            if old in expert_sources:
                sources[new] = os.fspath(expert_sources[old])
                continue
            missing = ["the whole subfolder"] if not os.path.isdir(folder) else []
            if not missing:
                missing = _clean_lora_folder(folder, os.path.join(tmp, old), base_model)
            if not missing:
                sources[new] = os.path.join(tmp, old)
                continue
            original = saved["adapters"].get(old)
            if original and os.path.isdir(original) and not trainable_experts:
                warnings.warn(
                    f"Expert {old!r}: the checkpoint's copy lacks {len(missing)} modules (PEFT's built-in X-LoRA "
                    f"drops them on save); using the original adapter at {original} instead.",
                    MigrationWarning,
                    stacklevel=2,
                )
                sources[new] = original
                continue
            problems.append(f"expert {old!r} lacks the LoRA factors of {missing}")
        if problems:
            raise CheckpointError(
                f"{path} lost expert weights (PEFT's built-in X-LoRA drops keys that contain another expert's "
                f"number): {'; '.join(problems)}. Pass the experts' LoRA adapters with "
                "`expert_sources={name: folder}`."
            )
        _check_topk_in_scaling_pass(saved, f"{path}/adapter_config.json")
        config = XLoraConfig(
            adapters=sources,
            task_type=saved.get("task_type"),
            base_model_name_or_path=saved.get("base_model_name_or_path"),
            scaling_pass_layers=None,  # the built-in runs the whole model in its scaling pass
            **{k: saved[k] for k in _GATING_FIELDS if k in saved},
        )
        model = get_peft_model(base_model, config)
    _load_classifier(model, classifier, f"{path}/adapter_model.safetensors", builtin=True)
    return _finish(model, is_trainable)


def _check_topk_in_scaling_pass(saved: dict[str, Any], where: str) -> None:
    """Refuses a PEFT built-in config whose scaling pass peft-xlora would compute differently.

    PEFT's built-in applies `top_k_lora` to the scaling pass's equal weights too, keeping k experts there by
    tie-breaking; peft-xlora (like mistral.rs) keeps every expert there. With `scaling_pass_value` 0 both are the
    plain base model.
    """
    if saved.get("top_k_lora") is None or not saved.get("scaling_pass_value"):
        return
    raise ValueError(
        f"{where} sets top_k_lora={saved['top_k_lora']} and scaling_pass_value={saved['scaling_pass_value']}: PEFT's "
        "built-in X-LoRA then keeps only k of the experts in the scaling pass (chosen by tie-breaking among equal "
        "weights), which peft-xlora does not reproduce; the migrated model would compute other outputs. To migrate it "
        'anyway, knowing its outputs change, set "scaling_pass_value": 0 (or "top_k_lora": null) in that file.'
    )


def _load_classifier(model: PeftModel, state: dict[str, torch.Tensor], where: str, builtin: bool) -> None:
    ours = model.base_model.xlora_classifier
    expected = dict(ours.state_dict())
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        hint = (
            " PEFT's built-in X-LoRA drops classifier layers whose index is an expert's number when saving; if the "
            "trained model is still in memory, save its classifier with "
            "`model.base_model.internal_xlora_classifier.state_dict()`."
            if builtin
            else ""
        )
        raise CheckpointError(
            f"{where} does not hold the classifier the config describes: missing {missing}, unexpected {unexpected}."
            + hint
        )
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(f"{where}: classifier tensors of the wrong shape: {wrong}.")
    with torch.no_grad():
        for name, param in ours.named_parameters():
            param.data = state[name].to(param.device).clone()


# ---------------------------------------------------------------------------------------------------- original xlora


def from_xlora_package(
    base_model: nn.Module,
    path: str | os.PathLike,
    *,
    adapters: dict[str, str] | None = None,
    is_trainable: bool = False,
) -> PeftModel:
    """Loads a checkpoint of the original `xlora` package (also mistral.rs's layout) as a peft-xlora model.

    The folder holds `xlora_config.json`, `xlora_classifier.safetensors` (``inner.<i>`` and ``last`` linear layers)
    and one PEFT LoRA subfolder per expert.

    Args:
        base_model: The base model the checkpoint was trained on.
        path: The checkpoint folder.
        adapters: Expert name -> LoRA folder, for experts not saved in the folder (the original saved frozen experts
            only by reference).
        is_trainable: Leave the classifier trainable instead of returning an eval model.

    Returns:
        The `PeftModel`.

    Raises:
        CheckpointError: Files or tensors are missing or damaged.
        ValueError: The checkpoint uses an option peft-xlora does not reproduce (named in the message).
    """
    path = os.fspath(path)
    root = _checkpoint_root(path)
    saved = _read_json(_inside(root, os.path.join(path, "xlora_config.json"), "The config"))
    names = list(saved["adapters"])  # a list of names, or a dict name -> original path
    folders = {name: _expert_folder(path, root, name, "xlora_config.json") for name in names}
    given = dict(adapters or {})
    unsupported = {
        "stop_token_id": saved.get("stop_token_id") is not None,
        "use_mean_pool": bool(saved.get("use_mean_pool")),
        "enable_softmax_topk": bool(saved.get("enable_softmax_topk")),
    }
    for option, used in unsupported.items():
        if used:
            raise ValueError(
                f"{path}/xlora_config.json sets `{option}`, which peft-xlora does not reproduce (the original pools "
                "or renormalises across the whole batch); the migrated model would compute something else."
            )
    recorded = saved["adapters"] if isinstance(saved["adapters"], dict) else {}
    sources, missing = {}, []
    for name in names:
        folder = folders[name]
        if name in given:
            sources[name] = os.fspath(given[name])
        elif os.path.isfile(os.path.join(folder, "adapter_config.json")):
            sources[name] = folder
        elif recorded.get(name) and os.path.isdir(recorded[name]) and not saved.get("use_trainable_adapters"):
            warnings.warn(
                f"Expert {name!r} is not saved in {path}; using the path recorded in xlora_config.json, "
                f"{recorded[name]}.",
                MigrationWarning,
                stacklevel=2,
            )
            sources[name] = recorded[name]
        else:
            missing.append(name)
    if missing:
        raise CheckpointError(
            f"{path} has no subfolder for experts {missing}; pass their LoRA folders with `adapters={{name: folder}}`."
        )
    classifier_file = _inside(root, os.path.join(path, "xlora_classifier.safetensors"), "The classifier")
    weights = _read_safetensors(classifier_file)
    linears = _original_linears(weights, f"{path}/xlora_classifier.safetensors", bool(saved.get("use_bias", True)))
    depth = int(saved.get("xlora_depth", 1))
    if len(linears) != depth:
        raise CheckpointError(
            f"{path}/xlora_classifier.safetensors holds {len(linears)} linear layers but xlora_config.json says "
            f"xlora_depth={depth}."
        )
    if depth > 1 and not saved.get("enable_relu_and_dropout", False):
        # Without activations the layers compose to one linear map: W = W_k ... W_1, b accumulated.
        weight, bias = linears[0]
        for w, b in linears[1:]:
            weight, bias = w.double() @ weight.double(), w.double() @ bias.double() + b.double()
        linears = [(weight.to(linears[-1][0].dtype), bias.to(linears[-1][1].dtype))]
    gating = {k: saved[k] for k in _GATING_FIELDS if k in saved and k not in ("xlora_depth", "enable_softmax_topk")}
    if saved.get("top_k_lora") is not None and saved.get("scaling_pass_value"):
        # the folder may be the original package's (top-k on the scaling pass too) or mistral.rs's (not): unknowable
        warnings.warn(
            f"{path}/xlora_config.json sets top_k_lora and a scaling_pass_value other than 0. The original xlora "
            "package applies top-k to the scaling pass's equal weights too (keeping k experts there by "
            "tie-breaking); peft-xlora and mistral.rs keep every expert there. If the original package trained this "
            "checkpoint, the migrated model computes other outputs.",
            MigrationWarning,
            stacklevel=2,
        )
    config = XLoraConfig(
        adapters=sources,
        task_type="CAUSAL_LM",
        base_model_name_or_path=saved.get("base_model_id"),
        xlora_depth=len(linears),
        scaling_pass_layers=None,  # the original package runs the whole model in its scaling pass
        **gating,
    )
    model = get_peft_model(base_model, config)
    positions = _linear_positions(model.base_model.xlora_classifier)
    state = {}
    for position, (w, b) in zip(positions, linears):
        state[f"layers.{position}.weight"], state[f"layers.{position}.bias"] = w, b
    _load_classifier(model, state, f"{path}/xlora_classifier.safetensors", builtin=False)
    return _finish(model, is_trainable)


def _original_linears(
    weights: dict[str, torch.Tensor], where: str, use_bias: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The classifier's linear layers in order: ``inner.<i>`` by numeric index, then ``last``.

    The original numbers `inner` by module position (ReLU and dropout take numbers too), mistral.rs consecutively;
    sorting the numbers reads both. A missing bias is zero when `use_bias` is false.
    """
    inner = sorted({int(k.split(".")[1]) for k in weights if k.startswith("inner.")})
    prefixes = [f"inner.{i}" for i in inner] + ["last"]
    out, missing = [], []
    for prefix in prefixes:
        weight = weights.get(f"{prefix}.weight")
        bias = weights.get(f"{prefix}.bias")
        if weight is None:
            missing.append(f"{prefix}.weight")
            continue
        if bias is None:
            if use_bias:
                missing.append(f"{prefix}.bias")
                continue
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
        out.append((weight, bias))
    if missing:
        raise CheckpointError(f"{where} lacks {missing}.")
    return out


def migrate(base_model: nn.Module, path: str | os.PathLike, **kwargs: Any) -> PeftModel:
    """Detects the layout of `path` (PEFT built-in X-LoRA or original `xlora`) and migrates it.

    Args:
        base_model: The base model.
        path: The checkpoint folder.
        **kwargs: Passed to `from_peft_builtin` or `from_xlora_package`.
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "xlora_config.json")):
        return from_xlora_package(base_model, path, **kwargs)
    config = os.path.join(path, "adapter_config.json")
    if os.path.isfile(config) and _read_json(config).get("peft_type") == "XLORA":
        return from_peft_builtin(base_model, path, **kwargs)
    raise CheckpointError(
        f"{path} is neither a PEFT built-in X-LoRA checkpoint (adapter_config.json with peft_type XLORA) nor an "
        "original xlora checkpoint (xlora_config.json). A peft-xlora checkpoint loads with PeftModel.from_pretrained."
    )
