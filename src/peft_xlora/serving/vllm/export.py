"""`export_vllm`: a saved X-LoRA checkpoint + its base model -> one folder that `vllm serve` loads offline.

The folder written is the base model's folder (weights, tokenizer, generation config) with

    config.json          the base config, `architectures` naming our vLLM class (e.g. XLoraLlamaForCausalLM), and
                         the X-LoRA serving spec under "xlora" (see `spec.py`)
    xlora.safetensors    xlora.classifier.<j>.{weight,bias}             the classifier's j-th linear layer
                         xlora.experts.<module>.<expert index>.lora_A    (r, in) an expert's factors on one module
                         xlora.experts.<module>.<expert index>.lora_B    (out, r)
                         xlora.single_pass_static.logits                 (n_early, n_experts) a learned single
                                                                         pass's static weights, before the softmax

A pinned export (`pin=...`) serves a fixed mixture: the spec's routing is "pinned", with the weights in the spec, and
the weights file holds the experts' factors only (no classifier, no static logits).

It reads the checkpoint from its files (``adapter_config.json`` and ``adapter_model.safetensors``, the stable saved
layout), not through peft-xlora's tuner, and works out what the tuner would: the mixture layers are the base model's
Linear and Embedding modules that some expert adapts, in `named_modules` order (the order layerwise scalings index),
and each expert's scale is alpha / r (alpha / sqrt(r) with rsLoRA) after its rank and alpha patterns. What it does
with every config field and named feature is its column of the table of what combines (`place.py`), checked before
anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ...core.checkpoint import check_checkpoint_dir
from ...core.combinations import check, register_place
from ...core.config import XLoraConfig
from ...io.files import write_folder
from .place import (
    VLLM_IRRELEVANT,
    VLLM_PLACE,
    VLLM_REFUSED,
    VLLM_REFUSED_WHEN,
    VLLM_WRITTEN,
    checkpoint_situation,
)
from .spec import (
    ARCHITECTURES,
    EMBEDDING,
    EMBEDDING_IS_LM_HEAD,
    SPEC_KEY,
    STATIC_LOGITS,
    WEIGHT_PREFIX,
    WEIGHTS_FILE,
    ExpertOnModule,
    ServingSpec,
    XLoraServingError,
)

# The vLLM exporter's column of the table of what combines (core cannot import this layer, so it is registered here).
register_place(VLLM_PLACE)

__all__ = [
    "VLLM_IRRELEVANT",
    "VLLM_PLACE",
    "VLLM_REFUSED",
    "VLLM_REFUSED_WHEN",
    "VLLM_WRITTEN",
    "Pin",
    "export_vllm",
]

_CHECKPOINT_CONFIG = "adapter_config.json"
_CHECKPOINT_WEIGHTS = "adapter_model.safetensors"
_STATIC_KEYS = (
    "base_model.xlora_classifier.single_pass_static.logits",
    "base_model.model.xlora_classifier.single_pass_static.logits",
)
_CLASSIFIER_PREFIXES = ("base_model.xlora_classifier.layers.", "base_model.model.xlora_classifier.layers.")
_EXPERT_KEY = "base_model.model.{module}.xlora_experts.{expert}.lora_{part}"
_INDEX_FILE = "model.safetensors.index.json"
# Weight formats vLLM would pick over (or beside) the safetensors files, and Mistral's consolidated duplicates.
_SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

#: What `pin` accepts: "uniform" (1 / n_experts each), expert name -> weight (missing experts get 0), or weights in
#: gate order, (n_experts,) shared or (n_layers, n_experts) one row per mixture layer (a tensor or nested lists).
Pin = str | dict[str, float] | torch.Tensor | list


def export_vllm(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base_model: str | os.PathLike | None = None,
    pin: Pin | None = None,
) -> str:
    """Writes a folder that `vllm serve OUT` and `vllm.LLM(model=OUT)` load, with the peft-xlora vLLM plugin.

    Args:
        checkpoint_dir: A saved X-LoRA checkpoint (`peft_xlora.save_pretrained` or `model.save_pretrained`).
        out_dir: The folder to write. Written beside its final place and renamed into it, so it is either the old
            folder or the complete new one; a file or a non-empty folder that is not an earlier export is refused.
        base_model: The base model's folder (transformers format, safetensors weights), or a Hub id resolved through
            huggingface_hub (offline: from its cache). Default: the checkpoint's `base_model_name_or_path` (at its
            `revision`).
        pin: Serve a fixed mixture instead of the learned gate: every mixture layer at these weights, in one pass
            with no classifier, exactly what the model computes after `set_static_scalings(pin)` (the weights are
            used as given: no softmax, no global weight), whatever its routing. "uniform" (1 / n_experts each),
            expert name -> weight (missing experts get 0), or weights in gate order: (n_experts,) shared or
            (n_layers, n_experts) one row per mixture layer. None serves the learned gate.

    Returns:
        The absolute path of the written folder.

    Raises:
        XLoraServingError: The checkpoint uses an option the vLLM plugin cannot serve (its column in
            docs/combinations.md), does not fit the base model, or `pin` is malformed.
        FileExistsError: `out_dir` is a file, or a non-empty folder that is not an earlier export.
        peft_xlora.CheckpointError: A checkpoint file is missing, truncated or unreadable.
        FileNotFoundError: The base model's files are missing.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    # The checks every load path runs: a missing, truncated or unreadable file is named before anything is read.
    check_checkpoint_dir(checkpoint_dir)
    config = _read_config(checkpoint_dir)
    revision = config.revision if base_model is None else None
    base_dir = _resolve_base(base_model or config.base_model_name_or_path, revision)
    base_config = _read_json(os.path.join(base_dir, "config.json"), "the base model's config")
    tensors = _read_checkpoint_tensors(checkpoint_dir)
    # The table of what combines, from what the files hold: every refusal named at once, before anything is written.
    check(VLLM_PLACE.name, checkpoint_situation(config, base_config, list(tensors), pin))
    arch = _architecture(base_config)
    modules = _mixable_modules(base_dir)
    spec, weights = _build_spec(config, base_config, modules, tensors, pin)
    if arch in EMBEDDING_IS_LM_HEAD and EMBEDDING in spec.modules:
        raise XLoraServingError(
            f"Experts adapt {EMBEDDING}, but vLLM's {arch} computes its logits with the input embedding module "
            "itself, which the plugin cannot wrap without changing the LM head. Use experts that do not target "
            "embed_tokens on this architecture."
        )

    target = os.path.abspath(os.fspath(out_dir))

    def write(tmp: str) -> None:
        _copy_base(base_dir, tmp)
        served_config = dict(base_config)
        served_config["architectures"] = [ARCHITECTURES[arch]]
        served_config[SPEC_KEY] = spec.to_dict()
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(served_config, f, indent=2)
        save_file(weights, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        _add_to_index(tmp, list(weights))

    write_folder(target, write)  # built beside the target, swapped in atomically; never displaces a foreign folder
    return target


# ---------------------------------------------------------------------------------------------------- checks


def _read_json(path: str, what: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} is missing: {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_config(checkpoint_dir: str) -> XLoraConfig:
    """The checkpoint's config, validated as `XLoraConfig` (every load path's checks), after refusing other kinds."""
    raw = _read_json(os.path.join(checkpoint_dir, _CHECKPOINT_CONFIG), "the X-LoRA checkpoint's config")
    if not isinstance(raw, dict) or raw.get("peft_type") != "PEFT_XLORA":
        peft_type = raw.get("peft_type") if isinstance(raw, dict) else None
        hint = (
            "It is PEFT's built-in X-LoRA: convert it first with `peft_xlora.migrate(base_model, checkpoint)` and "
            "save the result with `save_pretrained`."
            if peft_type == "XLORA"
            else "Export a checkpoint saved by peft-xlora."
        )
        raise XLoraServingError(f"Not a peft-xlora checkpoint (peft_type {peft_type!r}). {hint}")
    if not raw.get("experts") or not raw.get("expert_order"):
        raise XLoraServingError(
            "The checkpoint's adapter_config.json lacks `experts` or `expert_order` (it was not saved from a built "
            "model). Build the X-LoRA model, then save it with `peft_xlora.save_pretrained`."
        )
    return XLoraConfig.from_pretrained(checkpoint_dir)


def _resolve_base(base: str | os.PathLike | None, revision: str | None = None) -> str:
    if base is None:
        raise XLoraServingError(
            "The checkpoint does not name its base model: pass `base_model` (a local folder or a Hub id)."
        )
    base = os.fspath(base)
    if os.path.isdir(base):
        return base
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(base, revision=revision)
    except Exception as exc:
        raise FileNotFoundError(
            f"Base model {base!r} is neither a local folder nor a Hub id available here ({exc}). Pass the base "
            "model's folder as `base_model`."
        ) from exc


def _architecture(base_config: dict[str, Any]) -> str:
    archs = base_config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    raise XLoraServingError(
        f"The base model's architectures {archs} are not served by the X-LoRA vLLM plugin; supported: "
        f"{sorted(ARCHITECTURES)}."
    )


def _read_checkpoint_tensors(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    path = os.path.join(checkpoint_dir, _CHECKPOINT_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing. The vLLM export reads safetensors only: re-save the checkpoint with "
            "`peft_xlora.save_pretrained` (safetensors is its default)."
        )
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def _mixable_modules(base_dir: str) -> dict[str, tuple[int, int]]:
    """Name -> (in, out) of the base model's Linear and Embedding modules, in `named_modules` order.

    Built on the meta device from the config alone: no weights are read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out[name] = (module.in_features, module.out_features)
        elif isinstance(module, nn.Embedding):
            out[name] = (module.num_embeddings, module.embedding_dim)
    return out


def _pattern_value(pattern: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup (`peft.utils.other.get_pattern_key`): the first key matching a suffix."""
    from peft.utils.other import get_pattern_key

    pattern = pattern or {}
    return pattern.get(get_pattern_key(list(pattern), module), default)


def _expert_scale(expert: dict[str, Any], module: str, rank: int, name: str) -> float:
    r = _pattern_value(expert.get("rank_pattern"), module, expert["r"])
    alpha = _pattern_value(expert.get("alpha_pattern"), module, expert["lora_alpha"])
    if r != rank:
        raise XLoraServingError(
            f"Expert {name!r} has rank {rank} on {module!r} in its weights but {r} in its config: the checkpoint "
            "is inconsistent. Save it again."
        )
    return float(alpha / r**0.5 if expert.get("use_rslora") else alpha / r)


def _build_spec(
    config: XLoraConfig,
    base_config: dict[str, Any],
    modules: dict[str, tuple[int, int]],
    tensors: dict[str, torch.Tensor],
    pin: Pin | None = None,
) -> tuple[ServingSpec, dict[str, torch.Tensor]]:
    """The serving spec and the export's X-LoRA tensors, after checking every tensor against the base model.

    A pinned export checks the classifier and static weights as any other (the checkpoint must be whole) but writes
    only the experts' factors.
    """
    if config.hidden_size is not None and config.hidden_size != base_config.get("hidden_size"):
        raise XLoraServingError(
            f"The checkpoint was built for hidden size {config.hidden_size}, but the base model's is "
            f"{base_config.get('hidden_size')}: the checkpoint was trained on another base model."
        )
    names = list(config.expert_order)
    used: set[str] = set()
    weights: dict[str, torch.Tensor] = {}
    entries: dict[str, list[ExpertOnModule]] = {}
    for module, (n_in, n_out) in modules.items():
        for e, name in enumerate(names):
            key_a = _EXPERT_KEY.format(module=module, expert=name, part="A")
            key_b = _EXPERT_KEY.format(module=module, expert=name, part="B")
            if key_a not in tensors and key_b not in tensors:
                continue
            if key_a not in tensors or key_b not in tensors:
                raise XLoraServingError(f"Expert {name!r} has only one LoRA factor on {module!r} in the checkpoint.")
            a, b = tensors[key_a], tensors[key_b]  # (r, in), (out, r)
            rank = a.shape[0]
            if a.shape != (rank, n_in) or b.shape != (n_out, rank):
                raise XLoraServingError(
                    f"Expert {name!r} on {module!r} has factors A{tuple(a.shape)} and B{tuple(b.shape)}, but the "
                    f"base model's module maps {n_in} -> {n_out}: the checkpoint was trained on another base model."
                )
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise XLoraServingError(f"Expert {name!r} has NaN or infinite factors on {module!r}.")
            scale = _expert_scale(config.experts[name], module, rank, name)
            entries.setdefault(module, []).append(ExpertOnModule(e, rank, scale))
            weights[f"{WEIGHT_PREFIX}experts.{module}.{e}.lora_A"] = a.contiguous()
            weights[f"{WEIGHT_PREFIX}experts.{module}.{e}.lora_B"] = b.contiguous()
            used.update((key_a, key_b))

    static_logits = _static_logits(tensors, used)
    classifier = _classifier_tensors(tensors, used)
    depth = len(classifier)
    if depth != config.xlora_depth:
        raise XLoraServingError(
            f"The checkpoint's classifier has {depth} linear layers but its config says xlora_depth="
            f"{config.xlora_depth}."
        )
    for j, (weight, bias) in enumerate(classifier):
        weights[f"{WEIGHT_PREFIX}classifier.{j}.weight"] = weight.contiguous()
        weights[f"{WEIGHT_PREFIX}classifier.{j}.bias"] = bias.contiguous()
    leftover = sorted(set(tensors) - used)
    if leftover:
        raise XLoraServingError(
            f"The checkpoint holds tensors that fit no module of the base model: {leftover[:4]}. Was it trained on "
            "another base model?"
        )
    mixture_layers = list(entries)  # named_modules order, as the tuner numbers its mixture layers
    pinned = None if pin is None else _pin_rows(pin, names, mixture_layers)
    spec = ServingSpec(
        experts=names,
        mixture_layers=mixture_layers,
        modules=entries,
        classifier_depth=depth,
        classifier_width=int(config.xlora_size) if depth > 1 else 0,
        hidden_size=int(base_config["hidden_size"]),
        layerwise_scalings=bool(config.layerwise_scalings),
        enable_softmax=bool(config.enable_softmax),
        softmax_temperature=float(config.softmax_temperature),
        top_k_lora=config.top_k_lora,
        enable_softmax_topk=bool(config.enable_softmax_topk),
        topk_compute=str(config.topk_compute),
        scaling_pass_value=float(config.scaling_pass_value),
        global_scaling_weight=float(config.global_scaling_weight),
        scaling_pass_layers=config.scaling_pass_layers,
        routing=config.routing,
        single_pass_static=config.single_pass_static,
        shapes={module: list(modules[module]) for module in mixture_layers},
        peft_xlora_version=config.peft_xlora_version,
    )
    spec.check()  # refuses modules the plugin cannot mix, e.g. lm_head
    _check_static_logits(spec, static_logits, weights)
    first_in, last_out = classifier[0][0].shape[1], classifier[-1][0].shape[0]
    if first_in != spec.hidden_size or last_out != spec.n_slots * spec.n_experts:
        raise XLoraServingError(
            f"The classifier maps {first_in} -> {last_out}, but this base model and these experts need "
            f"{spec.hidden_size} -> {spec.n_slots * spec.n_experts} ({spec.n_slots} scaling sets x "
            f"{spec.n_experts} experts): the checkpoint does not belong to this base model."
        )
    if pinned is not None:
        # The fixed mixture replaces the gate: no classifier, no static weights (peft-xlora's pinned forward).
        spec.routing, spec.pinned_weights, spec.classifier_depth, spec.classifier_width = "pinned", pinned, 0, 0
        spec.check()
        weights = {key: value for key, value in weights.items() if key.startswith(f"{WEIGHT_PREFIX}experts.")}
    return spec, weights


def _pin_rows(pin: Pin, names: list[str], mixture_layers: list[str]) -> list[list[float]]:
    """The pin as rows of float32 weights in gate order: one shared row, or one per mixture layer.

    The same values as `set_static_scalings(pin)` holds (float32), so the served mixture is the pinned model's.

    Raises:
        XLoraServingError: An unknown expert name, another shape, or a weight that is not a finite number.
    """
    n, n_layers = len(names), len(mixture_layers)
    if isinstance(pin, str):
        if pin != "uniform":
            raise XLoraServingError(
                f"`pin` {pin!r} is not understood: pass 'uniform', expert name -> weight, or weights of shape ({n},) "
                f"or ({n_layers}, {n})."
            )
        weights = torch.full((1, n), 1.0 / n)
    elif isinstance(pin, dict):
        unknown = sorted(set(pin) - set(names))
        if unknown:
            raise XLoraServingError(f"`pin` names unknown experts {unknown}; this checkpoint has {names}.")
        try:
            weights = torch.tensor([[float(pin.get(name, 0.0)) for name in names]])
        except (TypeError, ValueError) as exc:
            raise XLoraServingError(f"`pin`'s weights must be numbers, got {pin!r}.") from exc
    else:
        try:
            weights = torch.as_tensor(pin, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise XLoraServingError(
                f"`pin` must be 'uniform', expert name -> weight, or weights of shape ({n},) or ({n_layers}, {n}); "
                f"got {type(pin).__name__} ({exc})."
            ) from exc
        if weights.shape == (n,):
            weights = weights[None]
        if weights.shape not in ((1, n), (n_layers, n)):
            raise XLoraServingError(
                f"`pin` must have shape ({n},) (shared) or ({n_layers}, {n}) (one row per mixture layer, in the "
                f"order of the spec's mixture_layers); got {tuple(weights.shape)}."
            )
    weights = weights.to(torch.float32)
    if not torch.isfinite(weights).all():
        raise XLoraServingError("`pin`'s weights must be finite numbers.")
    return [[float(w) for w in row] for row in weights.tolist()]


def _static_logits(tensors: dict[str, torch.Tensor], used: set[str]) -> torch.Tensor | None:
    """Single pass: the learned static weights' logits (a row per early mixture layer), if the checkpoint has them."""
    found = [key for key in _STATIC_KEYS if key in tensors]
    if not found:
        return None
    used.update(found)
    return tensors[found[0]]


def _check_static_logits(spec: ServingSpec, logits: torch.Tensor | None, weights: dict[str, torch.Tensor]) -> None:
    """Puts a learned single pass's static logits into the export's tensors, after checking them against the spec."""
    learned = spec.routing == "single_pass" and spec.single_pass_static == "learned"
    if not learned:
        if logits is not None:
            raise XLoraServingError(
                "The checkpoint holds single-pass static weights, but its config does not use them "
                f"(routing={spec.routing!r}, single_pass_static={spec.single_pass_static!r}): the config and weights "
                "disagree. Save the checkpoint again."
            )
        return
    shape = (len(spec.early_layers), spec.n_experts)
    if logits is None or tuple(logits.shape) != shape:
        found = None if logits is None else tuple(logits.shape)
        raise XLoraServingError(
            f"A learned single pass needs its static logits of shape {shape} (one row per mixture layer up to layer "
            f"k={spec.scaling_pass_layers}, one column per expert), but the checkpoint holds {found}. Save the "
            "checkpoint again."
        )
    if not torch.isfinite(logits).all():
        raise XLoraServingError("The checkpoint's single-pass static logits hold NaN or infinite values.")
    weights[f"{WEIGHT_PREFIX}{STATIC_LOGITS}"] = logits.float().contiguous()


def _classifier_tensors(tensors: dict[str, torch.Tensor], used: set[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The classifier's linear layers in order, from ``...xlora_classifier.layers.<i>.{weight,bias}``."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for prefix in _CLASSIFIER_PREFIXES:
            if key.startswith(prefix):
                index, part = key[len(prefix) :].split(".")
                layers.setdefault(int(index), {})[part] = tensor
                used.add(key)
    if not layers:
        raise XLoraServingError("The checkpoint holds no classifier weights (`base_model.xlora_classifier.*`).")
    out = []
    for index in sorted(layers):
        parts = layers[index]
        if set(parts) != {"weight", "bias"}:
            raise XLoraServingError(f"Classifier layer {index} lacks its weight or bias in the checkpoint.")
        out.append((parts["weight"], parts["bias"]))
    return out


# ---------------------------------------------------------------------------------------------------- writing


def _copy_base(base_dir: str, out: str) -> None:
    """Top-level files of the base folder (weights hard-linked where possible), except config and other formats."""
    for name in sorted(os.listdir(base_dir)):
        src = os.path.join(base_dir, name)
        lower = name.lower()
        if not os.path.isfile(src) or name == "config.json" or lower.endswith(_SKIPPED_SUFFIXES):
            continue
        if lower.startswith("consolidated"):
            continue  # Mistral's duplicate of the weights in its own format
        dst = os.path.join(out, name)
        try:
            os.link(os.path.realpath(src), dst)  # base weights can be many GB: no copy where the disk allows
        except OSError:
            shutil.copy2(src, dst)
    if not any(n.endswith(".safetensors") for n in os.listdir(out)):
        raise XLoraServingError(
            f"The base model at {base_dir} has no safetensors weights; vLLM would read ours only. Re-save it with "
            "`model.save_pretrained(folder)` (safetensors is transformers' default)."
        )


def _add_to_index(out: str, names: list[str]) -> None:
    # With a sharded base, vLLM reads only the files its index lists: ours must be listed too.
    path = os.path.join(out, _INDEX_FILE)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    index.setdefault("weight_map", {}).update(dict.fromkeys(names, WEIGHTS_FILE))
    os.remove(path)  # a hard link to the base's index: write a new file rather than through the link
    with open(path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
