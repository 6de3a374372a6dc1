"""`XLoraModel`: the PEFT tuner that swaps mixture layers into a model and runs the dual-pass forward."""

from __future__ import annotations

import copy
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .classifier import XLoraClassifier, gate
from .config import XLoraConfig
from .devices import execution_device, last_module_with_weights
from .experts import Expert, ExpertError, compact_targets, expert_from_config, load_expert
from .generation import (
    CACHE_KWARGS,
    XLoraCache,
    generation_scope,
    hold_uncached,
    input_length,
    prepare_cache,
)
from .layer import XLoraLayer, module_kind
from .registration import PREFIX
from .regularisers import router_losses
from .routing import Routing, current_routing, install_carriers, pop_routing, push_routing, remove_carriers
from .scalings_log import ScalingsLogMixin

#: Attribute of the transformers model that holds the gating classifier.
CLASSIFIER_NAME = "xlora_classifier"

# Keyword arguments of a model's forward that concern only the head, the cache or the output format: the scaling
# pass, which runs the inner model once for its last hidden state, leaves them out.
_NOT_FOR_SCALING_PASS = frozenset(
    {
        "labels",
        "cache",
        "past_key_values",
        "use_cache",
        "cache_position",
        "logits_to_keep",
        "num_logits_to_keep",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)

_SUPPORTED_LAYERS = (
    "nn.Linear (and its subclasses, e.g. bitsandbytes' Linear4bit and Linear8bitLt), transformers' Conv1D (GPT-2) "
    "and nn.Embedding"
)


def _check_model_supported(model: nn.Module, config: XLoraConfig) -> None:
    """Refuses, before anything is built, the models whose scaling pass cannot give one hidden state per token."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(
            f"X-LoRA does not support encoder-decoder models ({type(model).__name__}): its gate gives one set of "
            "scalings per token of one sequence, and an encoder-decoder model runs two sequences (source and "
            "target) through different layers. Supported: decoder-only and encoder-only models; see docs/models.md."
        )
    if config.task_type == "TOKEN_CLS":
        raise ValueError(
            "task_type='TOKEN_CLS' is not supported: PEFT's token-classification wrapper needs `modules_to_save` for "
            "the head, which X-LoRA does not train. Build the model with task_type=None instead: the head is then "
            "used as the base model has it (frozen), as with task_type='SEQ_CLS'; see docs/models.md."
        )


def _check_experts_fit(model: nn.Module, experts: list[Expert], shapes: dict[str, tuple[str, int, int]]) -> None:
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


def _check_input_device(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Inputs must be on the device of the input embeddings (accelerate moves them itself under `device_map`)."""
    if getattr(model, "hf_device_map", None):
        return
    inputs = kwargs.get("input_ids", args[0] if args else None)
    name = "input_ids"
    if inputs is None:
        inputs, name = kwargs.get("inputs_embeds"), "inputs_embeds"
    weight = getattr(_embeddings(model, "get_input_embeddings"), "weight", None)
    if not isinstance(inputs, torch.Tensor) or not isinstance(weight, torch.Tensor) or inputs.device == weight.device:
        return
    raise ValueError(
        f"`{name}` is on {inputs.device} but the model's input embeddings are on {weight.device}: move the inputs "
        f"first, e.g. `{name}.to(model.device)`."
    )


def _embeddings(model: nn.Module, getter: str) -> nn.Module | None:
    """`model.get_input_embeddings()` / `get_output_embeddings()`, or None where the model has no such layer."""
    try:
        return getattr(model, getter)()
    except (AttributeError, NotImplementedError):
        return None


def _add_router_loss(output: Any, router_loss: torch.Tensor) -> Any:
    """Adds the router regularisers to a transformers output's loss and records them as its `router_loss`."""
    if not isinstance(output, dict):  # return_dict=False: a tuple whose layout depends on the model
        return None
    if output.get("loss") is not None:
        output["loss"] = output["loss"] + router_loss.to(output["loss"].device)
    output["router_loss"] = router_loss
    return output


def _check_hidden(hidden: torch.Tensor, hidden_size: int, inner: nn.Module) -> None:
    """The scaling pass must give a last hidden state (batch, seq, hidden_size) for the classifier."""
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[-1] == hidden_size:
        return
    shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
    raise RuntimeError(
        f"The X-LoRA scaling pass ran {type(inner).__name__} and got {shape}, not a last hidden state of shape "
        f"(batch, seq, {hidden_size}). X-LoRA reads `last_hidden_state` (or the first output) of the model's "
        "`base_model`; this model does not provide one. See docs/models.md for the supported models."
    )


class _ScalingPassExit(Exception):  # control flow, not an error
    """Carries the hidden state out of a scaling pass cut short by `scaling_pass_layers`."""

    def __init__(self, hidden: Any) -> None:
        super().__init__()
        self.hidden = hidden


def _scaling_pass_exit_layer(model: nn.Module, k: int) -> nn.Module:
    """The k-th decoder layer (1-based) of the model's stack, after which a shortened scaling pass stops."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(
            "`scaling_pass_layers` needs a transformers model whose decoder layers are GradientCheckpointingLayer "
            f"modules; {type(model).__name__} has none. Leave scaling_pass_layers=None."
        )
    if k > len(layers):
        raise ValueError(f"`scaling_pass_layers={k}` but the model has {len(layers)} decoder layers.")
    return layers[k - 1]


class XLoraModel(ScalingsLogMixin, BaseTuner):
    """X-LoRA: a learned per-token gate over frozen LoRA experts (Buehler & Buehler 2024, arXiv 2402.07148).

    Built by `peft.get_peft_model(model, XLoraConfig(...))` once `peft_xlora` is imported. Every forward first runs a
    scaling pass of the model (experts at `scaling_pass_value`) to get the last hidden state, feeds it to the
    classifier, and then runs the model with each mixture layer adding `sum_e s_e * B_e A_e x * scale_e`.

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
        self._latest_scalings: torch.Tensor | None = None
        _check_model_supported(model, config)
        self._infer_hidden_size(model, config)

        shapes = {name: kind for name, module in model.named_modules() if (kind := module_kind(module))}
        experts = self._load_experts(config, shapes)
        _check_experts_fit(model, experts, shapes)
        self.expert_names = list(config.adapters)
        # Built from a saved config: the checkpoint's weights fill the experts in `load_adapter`.
        self._experts_pending = any(m.A is None for e in experts for m in e.modules.values())

        trainable = config.use_trainable_adapters and not config.inference_mode
        self.mixture_layer_names: list[str] = []
        self._layers: list[XLoraLayer] = []  # a plain list: the model, not the tuner, owns them
        for name in shapes:  # named_modules order: a stable layer index
            users = [(i, e.modules[name]) for i, e in enumerate(experts) if name in e.modules]
            if not users:
                continue
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child_name)
            self._check_shapes(name, shapes[name], users, experts, base)
            layer = XLoraLayer(
                base,
                len(self.mixture_layer_names),
                [i for i, _ in users],
                [lora for _, lora in users],
                requires_grad=trainable,
            )
            layer._active_adapter = adapter_name  # what transformers' `model.active_adapters()` reads
            setattr(parent, child_name, layer)
            self._layers.append(layer)
            self.mixture_layer_names.append(name)
            self.targeted_module_names.append(name)

        all_names = list(shapes)
        for expert in experts:
            compact_targets(expert, all_names)
        config.experts = {e.name: e.config_dict() for e in experts}

        install_carriers(model, set(self.mixture_layer_names))
        self._early_exit_hook = None
        if config.scaling_pass_layers is not None:
            self._early_exit_hook = _scaling_pass_exit_layer(model, config.scaling_pass_layers).register_forward_hook(
                self._exit_scaling_pass
            )
        params = list(model.parameters())
        dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
        # The classifier is a submodule of the transformers model, not of this tuner: transformers' PEFT integration
        # (`model.load_adapter`) keeps only the bare model, whose parameters, `.to()` and state dict must include it.
        model.add_module(
            CLASSIFIER_NAME,
            XLoraClassifier(
                config,
                config.hidden_size,
                n_layers=len(self.mixture_layer_names),
                n_experts=len(experts),
                device=execution_device(last_module_with_weights(model)),  # beside the last layers, its input
                dtype=dtype,
            ),
        )
        self._mark_only_adapters_as_trainable(model)
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, always_call=True),
        ]

    @staticmethod
    def _infer_hidden_size(model: nn.Module, config: XLoraConfig) -> None:
        model_config = getattr(model, "config", None)
        if model_config is not None and hasattr(model_config, "get_text_config"):
            model_config = model_config.get_text_config()
        actual = getattr(model_config, "hidden_size", None) if model_config is not None else None
        # The classifier reads what the LM head reads: in some models (OPT with a `word_embed_proj_dim`) that last
        # hidden state is narrower than `config.hidden_size`.
        head = _embeddings(model, "get_output_embeddings")
        if isinstance(head, nn.Linear):
            actual = head.in_features
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

    def _load_experts(self, config: XLoraConfig, shapes: dict[str, tuple[str, int, int]]) -> list[Expert]:
        from_checkpoint = config.experts is not None
        experts = []
        for name, source in config.adapters.items():
            if from_checkpoint:
                experts.append(expert_from_config(name, config.experts[name], shapes))
            else:
                experts.append(load_expert(name, source))
        return experts

    @staticmethod
    def _check_shapes(
        name: str, kind: tuple[str, int, int], users: list, experts: list[Expert], base: nn.Module
    ) -> None:
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
                raise ExpertError(
                    f"Expert {experts[i].name!r}: module {name!r} is not the layer type it was trained on."
                )

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

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # Like PEFT's LoRA: trainable weights in half precision are upcast to float32 for stable training.
        if not autocast_adapter_dtype:
            return
        for module in (self.xlora_classifier, *self.mixture_layers()):
            for param in module.parameters(recurse=module is self.xlora_classifier):
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

    # ------------------------------------------------------------------ forward

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Pushes exactly once, even when routing fails: the always-called `_after_forward` pops.
        outer = current_routing()
        if outer is not None and outer.scaling_pass:
            push_routing(outer)  # the scaling pass called the top model itself (it is its own base model)
            return
        try:
            routing = self._route(args, kwargs)
        except BaseException:
            push_routing(outer)
            raise
        push_routing(routing)

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        routing = current_routing()
        pop_routing()
        if routing is None or routing.router_loss is None or routing.scaling_pass:
            return None
        return _add_router_loss(output, routing.router_loss)

    def _route(self, args: tuple, kwargs: dict) -> Routing | None:
        """Runs the scaling pass and the classifier; returns the routing for the main pass."""
        if not self._enabled or all(layer.disable_adapters for layer in self._layers):
            return None  # PEFT's `disable_adapter()` context, or transformers' `model.disable_adapters()`
        if self._experts_pending:
            raise RuntimeError(
                "The experts' weights were never loaded: this model was built from a saved X-LoRA config. "
                "Load it with `PeftModel.from_pretrained(base_model, checkpoint)` or transformers' "
                "`model.load_adapter(checkpoint)`."
            )
        config = self.xlora_config
        _check_input_device(self.model, args, kwargs)
        if self._static_scalings is not None:
            return Routing(self._static_scalings[None, None])
        # With a KV cache, the scaling pass extends its own cache beside the main one (see generation.py); in prompt
        # mode, decoding steps skip it and reuse the prompt's scalings held in the cache.
        cache, cache_name = prepare_cache(self.model, kwargs, config.scalings_mode)
        if cache is not None and not cache.needs_scaling_pass(input_length(args, kwargs) or 0):
            self._latest_scalings = cache.held_scalings  # (batch, 1, n_layers|1, n_experts)
            self._log_scalings(self._latest_scalings)
            return Routing(cache.held_scalings)
        hidden = self._scaling_pass(args, kwargs, cache, cache_name)  # (batch, seq, hidden)
        # The classifier and the gate run in their own dtype (float32 for a trained classifier) even under
        # torch.autocast: low-precision logits would quantise the routing decisions.
        with torch.autocast(hidden.device.type, enabled=False):
            logits = self.xlora_classifier(hidden)  # (batch, seq, n_layers|1, n_experts)
            scalings = gate(
                logits,
                temperature=config.softmax_temperature,
                enable_softmax=config.enable_softmax,
                top_k=config.top_k_lora,
                softmax_topk=config.enable_softmax_topk,
                global_weight=config.global_scaling_weight,
            )
        self._check_finite(scalings, hidden)
        scalings = cache.record(scalings) if cache is not None else hold_uncached(scalings, config.scalings_mode)
        self._latest_scalings = scalings.detach()
        self._log_scalings(self._latest_scalings)
        return Routing(scalings, router_loss=self._router_loss(logits, kwargs))

    def _router_loss(self, logits: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
        """The weighted router regularisers of this forward, or None when they are off (the default)."""
        config = self.xlora_config
        coefs = {"load_balancing": config.router_load_balancing_coef, "entropy": config.router_entropy_coef}
        if not any(coefs.values()):
            return None
        mask = kwargs.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.shape == logits.shape[:2]):
            mask = None  # 4D or absent masks: every token counts
        with torch.autocast(logits.device.type, enabled=False):
            terms = router_losses(logits, config.softmax_temperature, config.top_k_lora, mask)
        self._latest_router_losses = {name: value.detach() for name, value in terms.items()}
        return sum(coefs[name] * terms[name] for name in coefs)

    def get_latest_router_losses(self) -> dict[str, torch.Tensor] | None:
        """The router regularisers of the last forward (unweighted, detached), for logging; None when they are off.

        The weighted sum is added to the model output's `loss` (when labels are given) and returned as its
        `router_loss` entry.
        """
        return getattr(self, "_latest_router_losses", None)

    @torch.no_grad()
    def _scaling_pass(
        self, args: tuple, kwargs: dict, cache: XLoraCache | None = None, cache_name: str | None = None
    ) -> torch.Tensor:
        """The last hidden state of the model with every expert at `scaling_pass_value`.

        Args:
            args: Positional arguments of the model's forward.
            kwargs: Keyword arguments of the model's forward.
            cache: The main pass's cache, whose `scaling_cache` this pass extends; None runs without a cache.
            cache_name: The keyword the model takes its cache under.
        """
        value = self.xlora_config.scaling_pass_value
        n = len(self.expert_names)
        device = self.xlora_classifier.layers[0].weight.device  # built where the scalings are, not on the CPU
        routing = None if value == 0 else Routing(torch.full((1, 1, 1, n), float(value), device=device))
        inner = getattr(self.model, "base_model", self.model)
        scaling_kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_FOR_SCALING_PASS}
        if cache is not None:
            scaling_kwargs[cache_name] = cache.scaling_cache  # advances by the same tokens as the main cache
            scaling_kwargs["use_cache"] = True
        elif "use_cache" in kwargs or any(name in kwargs for name in CACHE_KWARGS):
            scaling_kwargs["use_cache"] = False
        with_flag = Routing(routing.scalings if routing else None, scaling_pass=True)
        push_routing(with_flag)
        try:
            out = inner(*args, **scaling_kwargs)
        except _ScalingPassExit as exit_:  # `scaling_pass_layers`: stopped after the k-th decoder layer
            out = exit_.hidden
        finally:
            pop_routing()
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out if isinstance(out, torch.Tensor) else out[0]
        _check_hidden(hidden, self.xlora_config.hidden_size, inner)
        return hidden

    def _exit_scaling_pass(self, module: nn.Module, args: tuple, output: Any) -> None:
        # Forward hook on the k-th decoder layer: in this model's scaling pass, the rest of the stack is not needed.
        routing = current_routing()
        if routing is not None and routing.scaling_pass:
            raise _ScalingPassExit(output)

    def _check_finite(self, scalings: torch.Tensor, hidden: torch.Tensor) -> None:
        """Raises `FloatingPointError` naming the layer, expert and token where the scalings are NaN or infinite."""
        finite = torch.isfinite(scalings)  # (batch, seq, n_layers|1, n_experts)
        if bool(finite.all()):
            return
        row, token, slot, expert = (~finite).nonzero()[0].tolist()
        value = scalings[row, token, slot, expert].item()
        if scalings.shape[2] > 1:
            where = f"mixture layer {slot} ({self.mixture_layer_names[slot]!r})"
        else:
            where = f"all {len(self.mixture_layer_names)} mixture layers (they share one set of scalings)"
        if not bool(torch.isfinite(hidden).all()):
            cause = (
                "the scaling pass's last hidden state already holds NaN/Inf: the base model overflowed on these "
                "inputs (in float16 try bfloat16 or float32; with scaling_pass_value > 0, check the experts' weights)"
            )
        elif not all(bool(torch.isfinite(p).all()) for p in self.xlora_classifier.parameters()):
            cause = "the gating classifier's weights hold NaN/Inf (a diverged training step: lower the learning rate)"
        else:
            cause = "the classifier's logits overflowed (try a larger softmax_temperature or float32)"
        raise FloatingPointError(
            f"X-LoRA scalings are not finite ({value}) in {where}, expert {self.expert_names[expert]!r}, batch row "
            f"{row}, token {token}: {cause}."
        )

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
        """Removes the mixture layers, carriers and hooks; returns the base model as it was."""
        for name in self.mixture_layer_names:
            parent_name, _, child_name = name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            setattr(parent, child_name, getattr(parent, child_name).base_layer)
        self._layers = []
        remove_carriers(self.model)
        if self._early_exit_hook is not None:
            self._early_exit_hook.remove()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if CLASSIFIER_NAME in self.model._modules:
            del self.model._modules[CLASSIFIER_NAME]
        return self.model

    def delete_adapter(self, adapter_name: str) -> None:
        """Not supported: unload the model instead."""
        raise ValueError("X-LoRA has a single adapter; use `unload()` to remove it.")

    # ------------------------------------------------------------------ gating API

    def get_latest_scalings(self) -> torch.Tensor | None:
        """Scalings of the last forward, (batch, seq, n_layers, n_experts), detached; None before any forward."""
        s = self._latest_scalings
        if s is None:
            return None
        return s.expand(-1, -1, len(self.mixture_layer_names), -1)

    def set_scaling_pass_value(self, value: float | None) -> None:
        """Sets the experts' weight in the scaling pass; None means 1 / n_experts. Saved with the config."""
        self.xlora_config.scaling_pass_value = 1.0 / len(self.expert_names) if value is None else float(value)
        self.xlora_config._check_numbers()

    def set_topk_lora(self, value: int | None) -> None:
        """Keeps only the k largest scalings per token (None: dense). Saved with the config."""
        old = self.xlora_config.top_k_lora
        self.xlora_config.top_k_lora = value
        try:
            self.xlora_config._check_numbers()
        except ValueError:
            self.xlora_config.top_k_lora = old
            raise

    def get_topk_lora(self) -> int | None:
        """The current top-k (None: dense)."""
        return self.xlora_config.top_k_lora

    def set_use_trainable_adapters(self, use_trainable_adapters: bool) -> None:
        """Makes the experts' stacked LoRA factors trainable or frozen. Saved with the config.

        Only the declared factors (`XLoraLayer.adapter_layer_names`) change; the classifier and base model keep their
        `requires_grad`.
        """
        self.xlora_config.use_trainable_adapters = bool(use_trainable_adapters)
        for layer in self.mixture_layers():
            for name in layer.adapter_layer_names:
                getattr(layer, name).requires_grad_(bool(use_trainable_adapters))

    def get_use_trainable_adapters(self) -> bool:
        """Whether the experts' LoRA factors are trained (the config's `use_trainable_adapters`)."""
        return self.xlora_config.use_trainable_adapters

    def set_global_scaling_weight(self, weight: float) -> None:
        """Multiplies every scaling by `weight`. Saved with the config."""
        self.xlora_config.global_scaling_weight = float(weight)
        self.xlora_config._check_numbers()

    def get_global_scaling_weight(self) -> float:
        """The global scaling weight."""
        return self.xlora_config.global_scaling_weight

    def set_static_scalings(self, weights: dict[str, float] | torch.Tensor | None) -> None:
        """Pins the gate to fixed weights, skipping the scaling pass; None gives the gate back to the classifier.

        Args:
            weights: Expert name -> weight (missing experts get 0), or a tensor of shape (n_experts,) or
                (n_layers, n_experts). Used as given: no softmax, no global weight.
        """
        if weights is None:
            self._static_scalings = None
            return
        n, n_layers = len(self.expert_names), len(self.mixture_layer_names)
        if isinstance(weights, dict):
            unknown = set(weights) - set(self.expert_names)
            if unknown:
                raise ValueError(f"Unknown experts {sorted(unknown)}; this model has {self.expert_names}.")
            weights = torch.tensor([float(weights.get(name, 0.0)) for name in self.expert_names])
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape == (n,):
            weights = weights[None]
        if weights.shape not in ((1, n), (n_layers, n)):
            raise ValueError(
                f"Static scalings must have shape ({n},) or ({n_layers}, {n}); got {tuple(weights.shape)}."
            )
        if not torch.isfinite(weights).all():
            raise ValueError("Static scalings must be finite numbers.")
        self._static_scalings = weights.to(self.xlora_classifier.layers[0].weight.device)  # (n_layers|1, n_experts)

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
        """The checkpoint entries: classifier, and each expert's factors per module (see `checkpoint.py`)."""
        from .checkpoint import classifier_entries, split_experts

        structural = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # PEFT finds the mixture layers' entries; the classifier is a plain submodule of the transformers model.
        structural.update(classifier_entries(model, state_dict))
        return split_experts(model, config, structural)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: XLoraConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Joins the per-expert checkpoint entries into the model's stacked layout; raises if anything is missing."""
        from .checkpoint import join_experts, restore_saved_dtypes

        state_dict = join_experts(model, config, state_dict, replaced=getattr(config, "_replaced_experts", None))
        # The replacements' factors are in `state_dict` now; later loads (e.g. resuming) read them from checkpoints.
        config.__dict__.pop("_replaced_experts", None)
        restore_saved_dtypes(model, state_dict)
        # `join_experts` raised if any tensor was missing or misshapen; PEFT copies exactly these tensors next.
        for tuner in attached_tuners(model):
            tuner._experts_pending = False
        return state_dict


def attached_tuners(model: nn.Module) -> list[XLoraModel]:
    """The X-LoRA tuners that drive `model`'s forward.

    Inside a `PeftModel` the tuner is a submodule. transformers' `model.load_adapter` keeps only the bare transformers
    model; its tuner is then the owner of the forward hooks it registered on that model.
    """
    found = [m for m in model.modules() if isinstance(m, XLoraModel)]
    if not found:
        for hook in model._forward_pre_hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, XLoraModel) and owner not in found:
                found.append(owner)
    return found
