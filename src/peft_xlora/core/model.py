"""`XLoraModel`: the PEFT tuner. Glue between PEFT and the parts in `building`, `routers` and `gating`."""

from __future__ import annotations

import copy
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .building import (
    CLASSIFIER_NAME,
    add_classifier,
    check_experts_fit,
    infer_hidden_size,
    load_experts,
    resolve_scaling_pass,
    swap_in_mixture_layers,
)
from .classifier import XLoraClassifier
from .combinations import Situation, check
from .config import XLoraConfig
from .elastic import ElasticMixin
from .experts import compact_targets
from .gating import GatingMixin
from .generation import generation_scope, input_length, requested_scalings_mode
from .heads import (
    check_heads,
    head_entries,
    head_mixtures,
    join_heads,
    set_heads_requires_grad,
    split_heads,
    swap_in_head,
    unswap_heads,
)
from .layer import XLoraLayer, module_kind
from .places import situation_of
from .registration import PREFIX
from .routers import ROUTERS, Router, routing_mode
from .scalings_log import ScalingsLogMixin
from .sparse import configure_topk
from .state_dict import classifier_entries, join_experts, restore_saved_dtypes, split_experts


class XLoraModel(GatingMixin, ElasticMixin, ScalingsLogMixin, BaseTuner):
    """X-LoRA: a learned per-token gate over frozen LoRA experts (Buehler & Buehler 2024, arXiv 2402.07148).

    Built by `peft.get_peft_model(model, XLoraConfig(...))` once `peft_xlora` is imported. Every forward first runs a
    scaling pass of the model (experts at `scaling_pass_value`; by default up to two thirds of its decoder layers,
    `scaling_pass_layers`) to get a hidden state per token, feeds it to the classifier, and then runs the model with
    each mixture layer adding `sum_e s_e * B_e A_e x * scale_e`.

    Args:
        model: The transformers (or any torch) model to adapt.
        config: The X-LoRA config, or `{adapter_name: config}`.
        adapter_name: Name of the X-LoRA adapter inside PEFT (not an expert name).
        low_cpu_mem_usage: Accepted for PEFT's signature; the experts are always built with their weights.
        state_dict: Accepted for PEFT's signature; unused.
    """

    prefix: str = PREFIX
    tuner_layer_cls = XLoraLayer
    target_module_mapping: dict[str, list[str]] = {}  # noqa: RUF012 - PEFT's class attribute

    def __init__(
        self,
        model: nn.Module,
        config: XLoraConfig | dict[str, XLoraConfig],
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ------------------------------------------------------------------ building

    @property
    def xlora_config(self) -> XLoraConfig:
        """The config of the (single) X-LoRA adapter."""
        return self.peft_config[self.active_adapter]

    @property
    def xlora_classifier(self) -> XLoraClassifier:
        """The gating classifier; it lives on the transformers model as `model.xlora_classifier`."""
        return self.model.get_submodule(CLASSIFIER_NAME)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Loads the experts, swaps mixture layers into `model` and builds the classifier."""
        # The model keeps its own copy: building fills in `hidden_size` and `experts`, which must not leak into a
        # config object the caller may reuse for another model.
        config = copy.copy(self.peft_config[adapter_name])
        config.adapters = dict(config.adapters)
        self.peft_config[adapter_name] = config
        if len(self.peft_config) > 1 or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError(
                "X-LoRA must be the only PEFT adapter on the model: unload other adapters first "
                "(`merge_and_unload()` or `unload()`), and give all experts to one XLoraConfig."
            )
        self._enabled = True
        self._static_scalings: torch.Tensor | None = None
        self._active_experts: torch.Tensor | None = None  # `set_active_experts`: (n_experts,) bool, None = all
        mode = routing_mode(model, config)
        # "auto": an int or None from here on
        config.scaling_pass_layers = resolve_scaling_pass(model, config.scaling_pass_layers, mode)
        infer_hidden_size(model, config)

        shapes = {name: kind for name, module in model.named_modules() if (kind := module_kind(module))}
        experts = load_experts(config, shapes)
        check_experts_fit(model, experts, shapes)
        names = [name for name in shapes if any(name in e.modules for e in experts)]
        router = ROUTERS[mode](self)  # `self.model` is `model` (PEFT sets it first), which the router reads
        router.check_config(config)
        features = frozenset({"encoder_decoder"} if mode == "encoder_decoder" else ())
        late = router.late_layer_count(names)  # single pass: the layers that would read the gate
        situation = Situation(
            config, routing=mode, features=features, model_name=type(model).__name__, late_layers=late
        )
        check("build", situation)  # before any module of the model changes
        head_name = check_heads(model, experts, config.task_type, config.trainable_head)
        self.expert_names = list(config.adapters)
        # Built from a saved config: the checkpoint's weights fill the experts in `load_adapter`.
        self._experts_pending = any(m.A is None for e in experts for m in e.modules.values())

        trainable = config.use_trainable_adapters and not config.inference_mode
        self.mixture_layer_names = swap_in_mixture_layers(model, experts, shapes, adapter_name, trainable)
        self.targeted_module_names.extend(self.mixture_layer_names)
        swap_in_head(model, head_name, experts, len(self.mixture_layer_names), config.trainable_head, trainable)
        # A plain list: the model, not the tuner, owns the layers.
        self._layers: list[XLoraLayer] = [model.get_submodule(n) for n in self.mixture_layer_names]
        configure_topk(self._layers, config)  # top_k_lora / topk_compute: the sparse path (sparse.py)
        for expert in experts:
            compact_targets(expert, list(shapes))
        config.experts = {e.name: e.config_dict() for e in experts}
        add_classifier(model, config, n_layers=len(self.mixture_layer_names), n_experts=len(experts))
        self.router: Router = router
        router.install()  # its hooks, its carriers, and its own parameters (the single pass's static weights)
        self._mark_only_adapters_as_trainable(model)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freezes the base model; the classifier trains, and the experts when `use_trainable_adapters`."""
        config = self.xlora_config
        for param in model.parameters():
            param.requires_grad_(False)
        self.set_requires_grad(self.active_adapter, requires_grad=not config.inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Sets `requires_grad` on the declared trainable parameters: classifier, and experts if trainable."""
        self.xlora_classifier.requires_grad_(requires_grad)
        experts_train = requires_grad and self.xlora_config.use_trainable_adapters
        for layer in self.mixture_layers():
            for name in layer.adapter_layer_names:
                getattr(layer, name).requires_grad_(experts_train)
        set_heads_requires_grad(self.model, experts=experts_train, shared=requires_grad)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # Like PEFT's LoRA: trainable weights in half precision are upcast to float32 for stable training.
        if not autocast_adapter_dtype:
            return
        heads = [head for _, head in head_mixtures(self.model)]
        for module in (self.xlora_classifier, *self.mixture_layers(), *heads):
            for param in module.parameters(recurse=not isinstance(module, XLoraLayer)):
                if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("XLoraModel builds its layers in `inject_adapter`.")

    @staticmethod
    def _check_target_module_exists(config: XLoraConfig, key: str) -> bool:
        return False

    def mixture_layers(self) -> list[XLoraLayer]:
        """The mixture layers, in layer-index order."""
        return [m for m in self.model.modules() if isinstance(m, XLoraLayer)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the X-LoRA forward (the hooks on the model add the scaling pass)."""
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, scalings_mode: str | None = None, **kwargs: Any) -> Any:
        """Generates with the X-LoRA gate, caching both passes when the model caches (see docs/generation.md).

        Args:
            *args: Passed to the transformers model's `generate`.
            scalings_mode: ``"token"`` or ``"prompt"`` for this call; None keeps the mode of a cache passed in, or
                uses the config's `scalings_mode`.
            **kwargs: Passed to the transformers model's `generate`; `use_cache=False` generates without a cache.
        """
        with generation_scope(scalings_mode, input_length(args, kwargs)):
            mode = requested_scalings_mode() or self.xlora_config.scalings_mode
            check("generate", situation_of(self, features={"generate_modes"}, facts={"scalings_mode": mode}))
            return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ enabling / unloading

    def enable_adapter_layers(self) -> None:
        """Turns the experts back on (PEFT's `disable_adapter()` context calls this on exit)."""
        self._enabled = True

    def disable_adapter_layers(self) -> None:
        """Runs the plain base model. Does not touch `requires_grad` or train/eval mode."""
        self._enabled = False

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """X-LoRA holds one adapter; only its own name is accepted."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != [self.active_adapter]:
            raise ValueError(f"This X-LoRA model has one adapter, {self.active_adapter!r}; got {adapter_name!r}.")

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Not possible: the gate changes per token, so there is no single weight to merge."""
        raise ValueError(
            "X-LoRA cannot be merged into the base weights: its expert mix changes with every token. Use `unload()` "
            "to get the base model back, or pin the gate with `set_static_scalings` and export a plain LoRA."
        )

    def unload(self) -> nn.Module:
        """Removes the mixture layers, the router's hooks and carriers, and the classifier; returns the base model."""
        for name in self.mixture_layer_names:
            parent_name, _, child_name = name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            setattr(parent, child_name, getattr(parent, child_name).base_layer)
        self._layers = []
        unswap_heads(self.model)
        self.router.remove()
        if CLASSIFIER_NAME in self.model._modules:
            del self.model._modules[CLASSIFIER_NAME]
        return self.model

    def delete_adapter(self, adapter_name: str) -> None:
        """Not supported: unload the model instead."""
        raise ValueError("X-LoRA has a single adapter; use `unload()` to remove it.")

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        """Prints the trainable and total parameter counts."""
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # our keys never hold the adapter name

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: XLoraConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """The checkpoint entries: classifier, and each expert's factors per module (see `state_dict.py`)."""
        structural = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # PEFT finds the mixture layers' entries; the classifier is a plain submodule of the transformers model.
        structural.update(classifier_entries(model, state_dict))
        structural.update(head_entries(model, state_dict))
        order = _expert_order(model, config)
        return split_heads(model, order, split_experts(model, order, structural))

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: XLoraConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Joins the per-expert checkpoint entries into the model's stacked layout; raises if anything is missing."""
        order, replaced = _expert_order(model, config), getattr(config, "_replaced_experts", None)
        heads, state_dict = join_heads(model, order, state_dict, replaced=replaced)
        state_dict = {**join_experts(model, order, state_dict, replaced=replaced), **heads}
        # The replacements' factors are in `state_dict` now; later loads (e.g. resuming) read them from checkpoints.
        config.__dict__.pop("_replaced_experts", None)
        restore_saved_dtypes(model, state_dict)
        # `join_experts` raised if any tensor was missing or misshapen; PEFT copies exactly these tensors next.
        for tuner in find_tuners(model):
            tuner._experts_pending = False
        return state_dict


def find_tuners(model: nn.Module) -> list[XLoraModel]:
    """The X-LoRA tuners that drive `model`'s forward.

    `model` may be a `PeftModel`, a DDP/accelerate wrapper, the `XLoraModel` itself, or a bare transformers model
    after transformers' `model.load_adapter`: that keeps only the transformers model, whose tuner is then the owner of
    the forward hooks it registered on it.
    """
    found = [m for m in model.modules() if isinstance(m, XLoraModel)]
    if not found:
        for hook in model._forward_pre_hooks.values():
            owner = getattr(hook, "__self__", None)
            owner = owner.tuner if isinstance(owner, Router) else owner
            if isinstance(owner, XLoraModel) and owner not in found:
                found.append(owner)
    return found


def find_tuner(model: nn.Module) -> XLoraModel:
    """The one X-LoRA tuner of `model` (see `find_tuners` for what `model` may be).

    Raises:
        ValueError: `model` holds no X-LoRA model.
    """
    found = find_tuners(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} holds no X-LoRA model; build one with get_peft_model(base, XLoraConfig(...))."
        )
    return found[0]


def _expert_order(model: nn.Module, config: XLoraConfig) -> list[str]:
    # The tuner's list is the order the mixture layers index into; the config's is the same unless it was edited.
    found = find_tuners(model)
    return list(found[0].expert_names) if found else list(config.adapters)
