"""Building an X-LoRA model: the checks on the model and experts, and the mixture layers swapped into the model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .classifier import XLoraClassifier
from .config import AUTO_LAYERS, XLoraConfig, check_bounds
from .devices import execution_device, last_module_with_weights
from .experts import Expert, ExpertError, expert_from_config, load_expert
from .layer import XLoraLayer
from .single_pass import decoder_layers

#: Attribute of the transformers model that holds the gating classifier.
CLASSIFIER_NAME = "xlora_classifier"

_SUPPORTED_LAYERS = (
    "nn.Linear (and its subclasses, e.g. bitsandbytes' Linear4bit and Linear8bitLt), transformers' Conv1D (GPT-2) "
    "and nn.Embedding"
)


def check_model_supported(model: nn.Module, config: XLoraConfig) -> None:
    """Refuses, before anything is built, the task types X-LoRA cannot train (encoder-decoder models: seq2seq.py)."""
    if config.task_type == "TOKEN_CLS":
        raise ValueError(
            "task_type='TOKEN_CLS' is not supported: PEFT's token-classification wrapper needs `modules_to_save` for "
            "the head, which X-LoRA does not train. Build the model with task_type=None instead: the head is then "
            "used as the base model has it (frozen), as with task_type='SEQ_CLS'; see docs/models.md."
        )


def check_experts_fit(model: nn.Module, experts: list[Expert], shapes: dict[str, tuple[str, int, int]]) -> None:
    """Every module an expert adapts must be a layer X-LoRA mixes: none may be left out silently."""
    for expert in experts:
        for name in expert.modules:
            if name in shapes:
                continue
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ExpertError(
                    f"Expert {expert.name!r} adapts {name!r}, which this {type(model).__name__} does not have: the "
                    "adapter was trained on another base model. Use experts trained on this model."
                ) from None
            kind = type(module)
            raise ExpertError(
                f"Expert {expert.name!r} adapts {name!r}, a {kind.__module__}.{kind.__qualname__}, which X-LoRA "
                f"cannot mix; supported: {_SUPPORTED_LAYERS}. Load the base model unquantized (or quantized with "
                "bitsandbytes), or use an expert that does not target this module."
            )


def embeddings(model: nn.Module, getter: str) -> nn.Module | None:
    """`model.get_input_embeddings()` / `get_output_embeddings()`, or None where the model has no such layer."""
    try:
        return getattr(model, getter)()
    except (AttributeError, NotImplementedError):
        return None


def scaling_pass_exit_layer(model: nn.Module, k: int) -> nn.Module:
    """The k-th decoder layer (1-based) of the model's stack, after which a shortened scaling pass stops."""
    layers = [m for _, m in decoder_layers(model)]
    if not layers:
        raise ValueError(
            "`scaling_pass_layers` needs a transformers model whose decoder layers are GradientCheckpointingLayer "
            f"modules; {type(model).__name__} has none. Leave scaling_pass_layers=None."
        )
    if k > len(layers):
        raise ValueError(f"`scaling_pass_layers={k}` but the model has {len(layers)} decoder layers.")
    return layers[k - 1]


def _text_config(model: nn.Module) -> Any:
    """The model's config, or the text part of a multimodal one; None when the model has no config."""
    config = getattr(model, "config", None)
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config


def resolve_scaling_pass(model: nn.Module, k: int | str | None, mode: str) -> int | None:
    """The `scaling_pass_layers` a model gets: an int or None as given, ``"auto"`` resolved here.

    ``"auto"`` is ``round(2 * n / 3)`` of a generative decoder-only model's n decoder layers in the dual pass, where
    the gate routes better after domain switches than reading the last layer (docs/routing.md, measured on a causal
    language model). It is None (the whole model) where a shortened scaling pass is not possible or not measured:
    encoder-decoder models, models that do not generate (sequence classifiers, encoders such as BERT), models whose
    decoder layers are not `GradientCheckpointingLayer` modules, models with more such layers than their text config
    counts (a vision tower's layers would shift the count), and where two thirds round to the last layer, whose output
    the classifier would then read before the final norm, which routed worse in that benchmark.

    Args:
        model: The transformers model being built.
        k: The config's `scaling_pass_layers`.
        mode: The router it gets (`routing_mode`).
    """
    if k != AUTO_LAYERS:
        return k
    if mode != "dual_pass":  # the encoder-decoder router (single pass refuses "auto" in the config)
        return None
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        return None
    n = len(decoder_layers(model))
    if n == 0 or getattr(_text_config(model), "num_hidden_layers", None) != n:
        return None
    k = round(2 * n / 3)
    return k if k < n else None


def classifier_input_width(model: nn.Module, k: int | None) -> int | None:
    """The width of the hidden state the classifier reads: the last one (k None) or decoder layer k's output.

    The last hidden state is what the LM head reads, which in some models (OPT with a `word_embed_proj_dim`) is a
    projection narrower than the residual stream; layer k's output is the residual stream, `config.hidden_size` wide.
    None when the model's config has no hidden size and it has no linear LM head.
    """
    width = getattr(_text_config(model), "hidden_size", None)
    head = embeddings(model, "get_output_embeddings")
    if k is None and isinstance(head, nn.Linear):
        width = head.in_features
    return width


def infer_hidden_size(model: nn.Module, config: XLoraConfig) -> None:
    """Fills in `config.hidden_size` from the model (the width of what the classifier reads), or checks it.

    Then checks the config's sizes against it (`check_bounds`), before anything is built.
    """
    actual = classifier_input_width(model, config.scaling_pass_layers)
    if config.hidden_size is None:
        if actual is None:
            raise ValueError(
                "Cannot infer `hidden_size`: the model has no `config.hidden_size`. Pass "
                "XLoraConfig(hidden_size=<width of the model's last hidden state>)."
            )
        config.hidden_size = int(actual)
    elif actual is not None and config.hidden_size != actual:
        raise ValueError(
            f"XLoraConfig.hidden_size={config.hidden_size} does not match the model's hidden size {actual}. "
            "Leave hidden_size=None to infer it."
        )
    check_bounds(config)  # the classifier's size against the hidden size, now known, before anything is built


def load_experts(config: XLoraConfig, shapes: dict[str, tuple[str, int, int]]) -> list[Expert]:
    """The experts, in gate order: read from their sources, or described by a saved config (weights to come)."""
    from_checkpoint = config.experts is not None
    experts = []
    for name, source in config.adapters.items():
        if from_checkpoint:
            experts.append(expert_from_config(name, config.experts[name], shapes))
        else:
            experts.append(load_expert(name, source))
    return experts


def check_shapes(name: str, kind: tuple[str, int, int], users: list, experts: list[Expert], base: nn.Module) -> None:
    """Checks that every expert adapting module `name` fits its shape and layer type and leaves its base weights."""
    _, n_in, n_out = kind
    for i, lora in users:
        saved_base = experts[i].base_weights.get(name)
        if saved_base is not None and not (
            saved_base.shape == base.weight.shape
            and torch.allclose(saved_base.to(base.weight), base.weight, rtol=1e-3, atol=1e-5)
        ):
            raise ExpertError(
                f"Expert {experts[i].name!r} also changes the base weights of {name!r} (e.g. resized or trained "
                "embeddings); X-LoRA only mixes LoRA updates over one shared base. Use a base model that "
                "already has those weights."
            )
        if lora.A is None:
            continue
        if tuple(lora.A.shape) != (lora.rank, n_in) or tuple(lora.B.shape) != (n_out, lora.rank):
            raise ExpertError(
                f"Expert {experts[i].name!r} does not fit module {name!r}: its LoRA factors are "
                f"A{tuple(lora.A.shape)} and B{tuple(lora.B.shape)} but the module maps {n_in} -> {n_out}. "
                "Was the adapter trained on another base model?"
            )
        if lora.is_embedding != (kind[0] == "embedding"):
            raise ExpertError(f"Expert {experts[i].name!r}: module {name!r} is not the layer type it was trained on.")


def swap_in_mixture_layers(
    model: nn.Module,
    experts: list[Expert],
    shapes: dict[str, tuple[str, int, int]],
    adapter_name: str,
    trainable: bool,
) -> list[str]:
    """Replaces every module some expert adapts by an `XLoraLayer` around it.

    Args:
        model: The model to change in place.
        experts: The experts, in gate order.
        shapes: Module name -> `module_kind` of every module X-LoRA can mix, in `named_modules` order.
        adapter_name: The X-LoRA adapter's name inside PEFT.
        trainable: Whether the experts' stacked factors train.

    Returns:
        The names of the mixture layers, in layer-index order.
    """
    names: list[str] = []
    for name in shapes:  # named_modules order: a stable layer index
        users = [(i, e.modules[name]) for i, e in enumerate(experts) if name in e.modules]
        if not users:
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child_name)
        check_shapes(name, shapes[name], users, experts, base)
        layer = XLoraLayer(
            base, len(names), [i for i, _ in users], [lora for _, lora in users], requires_grad=trainable
        )
        layer._active_adapter = adapter_name  # what transformers' `model.active_adapters()` reads
        setattr(parent, child_name, layer)
        names.append(name)
    return names


def add_classifier(model: nn.Module, config: XLoraConfig, n_layers: int, n_experts: int) -> XLoraClassifier:
    """Builds the gating classifier as the submodule `model.xlora_classifier`, beside the model's last layers.

    The classifier is a submodule of the transformers model, not of the tuner: transformers' PEFT integration
    (`model.load_adapter`) keeps only the bare model, whose parameters, `.to()` and state dict must include it.
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    classifier = XLoraClassifier(
        config,
        config.hidden_size,
        n_layers=n_layers,
        n_experts=n_experts,
        device=execution_device(last_module_with_weights(model)),  # beside the last layers, its input
        dtype=dtype,
    )
    model.add_module(CLASSIFIER_NAME, classifier)
    return classifier
