"""Reading LoRA experts: standard PEFT LoRA checkpoints, checked and split per adapted module."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, PeftConfig
from peft.tuners.tuners_utils import _find_minimal_target_modules, check_target_module_exists
from peft.utils.other import get_pattern_key
from peft.utils.save_and_load import load_peft_weights

# LoraConfig options that change what a LoRA layer computes beyond `B A x * scale`: refused, not silently ignored.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
    "target_parameters": "LoRA on nn.Parameter targets",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}
_KEY_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A_emb",
    ".lora_embedding_B": "B_emb",
}


class ExpertError(ValueError):
    """An expert adapter cannot be used as an X-LoRA expert."""


def factor_problem(tensor: torch.Tensor) -> str | None:
    """Why a LoRA factor cannot be mixed, or None: it must be floating point and finite.

    Run once per factor when experts are read, not per forward. On CPU a float64 sum decides it (finite exactly when
    every element is: no sum of float32 values overflows float64), 4x faster than `isfinite().all()`: 0.07-0.1 s
    per 40M parameters on one core (measured on this project's 2-core CPU).
    """
    if not tensor.is_floating_point():
        return f"holds {tensor.dtype} values; LoRA factors are floating point"
    if tensor.device.type == "cpu":
        finite = math.isfinite(float(tensor.sum(dtype=torch.float64)))
    else:  # float64 is slow or missing on accelerators; one reduction there anyway
        finite = bool(torch.isfinite(tensor).all())
    if not finite:
        bad = int((~torch.isfinite(tensor)).sum())
        return f"holds {bad} NaN/Inf value{'s' if bad > 1 else ''}, which would make every output NaN"
    return None


@dataclass
class ModuleLora:
    """One expert's LoRA factors on one module.

    Attributes:
        A: (r, in_features) for Linear/Conv1D; (r, num_embeddings) for Embedding. None before weights are loaded.
        B: (out_features, r) for Linear/Conv1D; (embedding_dim, r) for Embedding.
        rank: r.
        scale: alpha / r, or alpha / sqrt(r) with rsLoRA.
        dropout: The expert's `lora_dropout`.
        is_embedding: Whether the factors come from `lora_embedding_A/B`.
    """

    A: torch.Tensor | None
    B: torch.Tensor | None
    rank: int
    scale: float
    dropout: float
    is_embedding: bool = False


@dataclass
class Expert:
    """A LoRA expert: its name, its PEFT config, and its factors per module name of the base model."""

    name: str
    config: LoraConfig
    modules: dict[str, ModuleLora] = field(default_factory=dict)
    # Full base-layer weights PEFT saves beside embedding LoRAs (`save_embedding_layers`); they must equal the base.
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    # The fully trained modules PEFT saves with `modules_to_save` (a SEQ_CLS LoRA's classification head): module name
    # -> {parameter name relative to it: tensor}; the tensors are None until a checkpoint's weights fill them. The
    # build checks that this is one classification head (`heads.check_expert_heads`).
    saved_modules: dict[str, dict[str, torch.Tensor | None]] = field(default_factory=dict)

    def config_dict(self) -> dict[str, Any]:
        """The expert's LoRA config as saved in the X-LoRA config, with its targets made explicit."""
        return _jsonable_lora_config(self.config)


def _jsonable_lora_config(config: LoraConfig) -> dict[str, Any]:
    out = config.to_dict()
    for key in ("runtime_config", "base_model_name_or_path", "revision", "auto_mapping"):
        out.pop(key, None)
    if isinstance(out.get("target_modules"), set):
        out["target_modules"] = sorted(out["target_modules"])
    out["peft_type"] = "LORA"
    return out


def _check_lora_config(name: str, config: PeftConfig) -> LoraConfig:
    if not isinstance(config, LoraConfig):
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise ExpertError(f"Expert {name!r} is a {kind} adapter; X-LoRA experts must be LoRA adapters.")
    for option, label in _UNSUPPORTED_OPTIONS.items():
        value = getattr(config, option, None)
        if value:
            raise ExpertError(
                f"Expert {name!r} uses {label} (`{option}={value!r}`), which X-LoRA does not support. "
                "Use a plain LoRA adapter, or merge that part into the base model first."
            )
    if config.bias != "none":
        raise ExpertError(
            f"Expert {name!r} trains biases (`bias={config.bias!r}`); X-LoRA cannot gate bias changes. "
            "Use an adapter trained with bias='none'."
        )
    return config


def _rank_and_scale(config: LoraConfig, module_name: str) -> tuple[int, float]:
    r_key = get_pattern_key(list((config.rank_pattern or {}).keys()), module_name)
    a_key = get_pattern_key(list((config.alpha_pattern or {}).keys()), module_name)
    r = (config.rank_pattern or {}).get(r_key, config.r)
    alpha = (config.alpha_pattern or {}).get(a_key, config.lora_alpha)
    scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return r, scale


_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # what PEFT's load_peft_weights reads


def load_expert(name: str, source: str, **hub_kwargs: Any) -> Expert:
    """Reads a PEFT LoRA checkpoint (folder or Hub id) through PEFT's own loaders.

    Args:
        name: The expert's name, used in error messages.
        source: Folder or Hub id of the LoRA adapter.
        **hub_kwargs: Passed to PEFT's loaders (revision, token, subfolder, ...).

    Returns:
        The expert with its factors on CPU, keyed by module name relative to the base model.

    Raises:
        ExpertError: The adapter is missing (or its folder has no weights file), is not a LoRA adapter, uses an
            unsupported LoRA variant, or has a factor that is not floating point or holds NaN/Inf.
    """
    if source is None:
        raise ExpertError(f"Expert {name!r} has no source: give a LoRA checkpoint folder or Hub id in `adapters`.")
    try:
        config = PeftConfig.from_pretrained(source, **hub_kwargs)
    except Exception as exc:
        raise ExpertError(
            f"Expert {name!r}: cannot read a PEFT adapter config from {source!r} ({exc}). "
            "Give a folder written by `save_pretrained` of a LoRA model, or a Hub id of one."
        ) from exc
    config = _check_lora_config(name, config)
    subfolder = hub_kwargs.get("subfolder")
    folder = os.path.join(source, subfolder) if subfolder else source
    if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, f)) for f in _WEIGHT_FILES):
        # PEFT would take the folder for a Hub id and blame its name.
        raise ExpertError(
            f"Expert {name!r}: the folder {folder} has no adapter_model.safetensors (nor adapter_model.bin): it holds "
            "the adapter's config but not its weights. Give the folder `save_pretrained` of the LoRA model wrote, "
            "weights included."
        )
    try:
        weights = load_peft_weights(source, device="cpu", **hub_kwargs)
    except Exception as exc:
        raise ExpertError(f"Expert {name!r}: cannot read the adapter weights from {source!r} ({exc}).") from exc

    factors: dict[str, dict[str, torch.Tensor]] = {}
    base_weights = {}
    saved_modules: dict[str, dict[str, torch.Tensor | None]] = {}
    for key, tensor in weights.items():
        if key.endswith(".base_layer.weight"):
            base_weights[key[: -len(".base_layer.weight")].removeprefix("base_model.model.")] = tensor
            continue
        saved = _saved_module_of(key.removeprefix("base_model.model."), config.modules_to_save or [])
        if saved is not None:
            module, param = saved
            saved_modules.setdefault(module, {})[param] = tensor
            continue
        for suffix, kind in _KEY_SUFFIXES.items():
            if key.endswith(suffix):
                module = key[: -len(suffix)].removeprefix("base_model.model.")
                factors.setdefault(module, {})[kind] = tensor
                break
        else:
            raise ExpertError(
                f"Expert {name!r} has a weight X-LoRA cannot use: {key!r}. Only LoRA A/B factors are supported "
                "(no DoRA magnitudes, biases, or fully trained modules)."
            )
    if not factors:
        raise ExpertError(f"Expert {name!r} at {source!r} holds no LoRA weights.")

    expert = Expert(name=name, config=config, base_weights=base_weights, saved_modules=saved_modules)
    for module, parts in sorted(factors.items()):
        is_emb = "A_emb" in parts or "B_emb" in parts
        A = parts.get("A_emb" if is_emb else "A")
        B = parts.get("B_emb" if is_emb else "B")
        if A is None or B is None:
            raise ExpertError(f"Expert {name!r}: module {module!r} has only one of its two LoRA factors.")
        if A.shape[0] != B.shape[1]:
            raise ExpertError(
                f"Expert {name!r}: module {module!r} has factors of ranks {A.shape[0]} and {B.shape[1]}."
            )
        for part, tensor in (("A", A), ("B", B)):
            problem = factor_problem(tensor)
            if problem:
                raise ExpertError(
                    f"Expert {name!r}: module {module!r}, factor {part} at {source!r} {problem}. Use another "
                    "checkpoint of this adapter: this one is damaged or edited, or its training diverged."
                )
        r, scale = _rank_and_scale(config, module)
        if r != A.shape[0]:
            raise ExpertError(
                f"Expert {name!r}: module {module!r} has rank {A.shape[0]} in its weights but {r} in its config."
            )
        expert.modules[module] = ModuleLora(A, B, r, scale, float(config.lora_dropout), is_emb)
    # Record the modules actually adapted, so a rebuild from the saved config matches these weights exactly.
    config.target_modules = sorted(expert.modules)
    config.layers_to_transform = config.layers_pattern = config.exclude_modules = None
    # Likewise the modules it saved in full (PEFT lists `classifier` and `score` for every SEQ_CLS LoRA; one exists).
    config.modules_to_save = sorted(saved_modules) or None
    return expert


def _saved_module_of(key: str, modules_to_save: list[str]) -> tuple[str, str] | None:
    """(module, parameter) of a checkpoint key that belongs to a `modules_to_save` module, or None.

    PEFT wraps every module whose name is a `modules_to_save` entry or ends with ``.<entry>``, and saves its
    parameters under the module's name: the key's longest such prefix is the module.
    """
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if any(module == m or module.endswith(f".{m}") for m in modules_to_save):
            return module, ".".join(parts[cut:])
    return None


def expert_from_config(
    name: str, config_dict: dict[str, Any], module_shapes: dict[str, tuple[str, int, int]]
) -> Expert:
    """Rebuilds an expert's structure (no weights) from its saved LoRA config.

    Args:
        name: The expert's name.
        config_dict: The LoRA config saved in `XLoraConfig.experts`.
        module_shapes: Module name -> (kind, in, out) of every adaptable module of the base model, where kind is
            "linear" or "embedding".

    Returns:
        The expert, with `A`/`B` left as None: the checkpoint's weights fill them.
    """
    config = _check_lora_config(name, LoraConfig.from_peft_type(**config_dict))
    # Parameter names are filled in from the model's head when it is built (`heads.check_expert_heads`).
    expert = Expert(name=name, config=config, saved_modules={m: {} for m in config.modules_to_save or []})
    for module, (kind, _, _) in module_shapes.items():
        if check_target_module_exists(config, module):
            r, scale = _rank_and_scale(config, module)
            expert.modules[module] = ModuleLora(None, None, r, scale, float(config.lora_dropout), kind == "embedding")
    if not expert.modules:
        raise ExpertError(
            f"Expert {name!r}: none of its target modules {config.target_modules!r} exists in this base model; "
            "the checkpoint was made for another model."
        )
    return expert


def compact_targets(expert: Expert, all_module_names: list[str]) -> None:
    """Shortens the expert's `target_modules` to the fewest suffixes that still select exactly its modules."""
    targets = sorted(expert.modules)
    others = [n for n in all_module_names if n not in expert.modules]
    try:
        minimal = sorted(_find_minimal_target_modules(targets, others))
    except ValueError:
        minimal = targets
    expert.config.target_modules = minimal
