"""Experts added to or removed from a built (or trained) X-LoRA model, and experts masked at inference.

`add_expert` appends an expert: its LoRA factors join the stacked factors of every mixture layer it adapts (new mixture
layers are swapped in where no expert adapted a module before), and the classifier's last layer gets one more output
per layer slot. That output starts where it changes nothing:

* without softmax (and without top-k) its weights are zero, so the new expert's scaling is exactly 0;
* with a softmax (or top-k) its row is the mean of the other experts' rows of the same slot, minus `logit_offset`
  (times the temperature): per token, the new logit is at least `logit_offset` below the largest one, so its softmax
  share is below exp(-logit_offset) (1e-7 at the default 16) and every other scaling moves by less than that share.

Either way the new output still receives a gradient (through the softmax, proportional to its share), so training the
gate continues from where it was; under top-k an expert outside the k largest gets no gradient until chosen, as for
the experts already there.

`remove_expert` drops an expert everywhere (its factors, its classifier outputs, the mixture layers only it adapted);
under a softmax the remaining scalings renormalise over the other experts' logits. `set_active_experts` masks experts
without changing the model: the gate gives them 0 and the softmax renormalises over the rest. The first two change
the config (`adapters`, `experts`, `expert_order`) and the checkpoint's shapes; the mask is runtime state, not saved.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from .attributes import TunerAttributes
from .building import check_experts_fit, check_shapes
from .experts import ModuleLora, compact_targets, load_expert
from .layer import XLoraLayer, module_kind
from .routing import install_carriers
from .sparse import configure_topk

if TYPE_CHECKING:
    pass

#: Default distance (in logits, before the temperature) of a new expert's logit below the mean of the others.
LOGIT_OFFSET = 16.0


class ExpertChangeWarning(UserWarning):
    """Adding or removing an expert changes what the model computes beyond that expert's own share."""


class ElasticMixin(TunerAttributes):
    """`add_expert`, `remove_expert` and `set_active_experts` of `XLoraModel`."""

    # ------------------------------------------------------------------ masking

    def set_active_experts(self, names: list[str] | None) -> None:
        """Lets the gate choose only among `names`; the others get scaling 0, and a softmax renormalises over the rest.

        Not saved with the checkpoint (runtime state, like `set_static_scalings`, which it does not affect).

        Args:
            names: Expert names to keep; None makes every expert active again.

        Raises:
            ValueError: A name is unknown, or `names` is empty.
        """
        if names is None:
            self._active_experts = None
            return
        names = [names] if isinstance(names, str) else list(names)
        unknown = sorted(set(names) - set(self.expert_names))
        if unknown:
            raise ValueError(f"Unknown experts {unknown}; this model has {self.expert_names}.")
        if not names:
            raise ValueError("`set_active_experts` needs at least one expert; pass None to make all active again.")
        mask = torch.tensor([name in names for name in self.expert_names])
        self._active_experts = None if bool(mask.all()) else mask.to(self._classifier_device())

    def get_active_experts(self) -> list[str]:
        """The experts the gate may choose (all unless `set_active_experts` masked some)."""
        mask = getattr(self, "_active_experts", None)
        return [n for i, n in enumerate(self.expert_names) if mask is None or bool(mask[i])]

    # ------------------------------------------------------------------ adding

    def add_expert(self, name: str, source: str | os.PathLike, logit_offset: float = LOGIT_OFFSET) -> None:
        """Appends a LoRA expert whose gate output starts where it changes nothing (see the module docstring).

        Build a new optimizer afterwards: the classifier's last layer and the stacked factors are new parameters.

        Args:
            name: The new expert's name (not one the model has).
            source: Folder or Hub id of a PEFT LoRA adapter trained on this base model.
            logit_offset: How far (in logits) below the mean of the other experts' logits the new one starts, under a
                softmax or top-k: its initial share is below exp(-logit_offset), and its gradient is proportional to
                that share. Unused without softmax and top-k, where the new scaling starts at exactly 0.

        Raises:
            ValueError: The name is taken or empty, or `logit_offset` is not a number >= 0.
            peft_xlora.ExpertError: The adapter cannot be read, is not a plain LoRA, or does not fit this model.
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"Expert names must be non-empty strings, got {name!r}.")
        if name in self.expert_names:
            raise ValueError(f"This model already has an expert {name!r}; remove it first or choose another name.")
        if isinstance(logit_offset, bool) or not isinstance(logit_offset, (int, float)) or not logit_offset >= 0:
            raise ValueError(f"`logit_offset` must be a number >= 0, got {logit_offset!r}.")
        source = os.fspath(source)
        expert = load_expert(name, source)
        shapes = self._module_shapes()
        check_experts_fit(self.model, [expert], shapes)
        for module in expert.modules:
            check_shapes(module, shapes[module], [(0, expert.modules[module])], [expert], self._base_of(module))
        self._warn_if_scaling_pass_changes("adding")

        index = len(self.expert_names)
        slots_before = list(self.mixture_layer_names)
        for module, lora in expert.modules.items():
            current = self.model.get_submodule(module)
            if isinstance(current, XLoraLayer):
                self._replace_layer(module, current, [*self._layer_loras(current), (index, lora)])
            else:
                self._replace_layer(module, None, [(index, lora)])
        compact_targets(expert, list(shapes))

        config = self.xlora_config
        config.adapters = {**config.adapters, name: source}
        config.experts = {**(config.experts or {}), name: expert.config_dict()}
        config.expert_order = list(config.adapters)
        self.expert_names.append(name)
        self._refresh_layers()
        self._grow_classifier(slots_before, float(logit_offset))
        if self._static_scalings is not None:  # pinned weights: the new expert is pinned at 0
            self._static_scalings = _pad_static(self._static_scalings, slots_before, self.mixture_layer_names)
        if getattr(self, "_active_experts", None) is not None:
            self._active_experts = torch.cat([self._active_experts, self._active_experts.new_ones(1)])
        self._latest_scalings = None

    # ------------------------------------------------------------------ removing

    def remove_expert(self, name: str) -> None:
        """Drops an expert: its factors, its gate outputs, and the mixture layers that only it adapted.

        Under a softmax the gate renormalises over the other experts' logits (the same scalings as
        `set_active_experts` without it). Build a new optimizer afterwards.

        Raises:
            ValueError: The name is unknown, it is the only expert, or `top_k_lora` would exceed the experts left.
        """
        if name not in self.expert_names:
            raise ValueError(f"Unknown expert {name!r}; this model has {self.expert_names}.")
        if len(self.expert_names) == 1:
            raise ValueError(f"{name!r} is the only expert; X-LoRA needs at least one. Use `unload()` instead.")
        config = self.xlora_config
        if config.top_k_lora is not None and config.top_k_lora > len(self.expert_names) - 1:
            raise ValueError(
                f"`top_k_lora={config.top_k_lora}` would exceed the {len(self.expert_names) - 1} experts left; lower "
                "it first with `set_topk_lora`."
            )
        index = self.expert_names.index(name)
        mask = getattr(self, "_active_experts", None)
        if mask is not None and not bool(torch.cat([mask[:index], mask[index + 1 :]]).any()):
            raise ValueError(
                f"{name!r} is the only active expert (`set_active_experts`); call `set_active_experts(None)` first."
            )
        self._warn_if_scaling_pass_changes("removing")
        slots_before = list(self.mixture_layer_names)
        for module in slots_before:
            layer = self.model.get_submodule(module)
            if max(layer.expert_indices) < index:
                continue  # neither this expert nor one whose index shifts
            kept = [(i - (i > index), lora) for i, lora in self._layer_loras(layer) if i != index]
            self._replace_layer(module, layer, kept)
        del self.expert_names[index]
        config.adapters = {n: s for n, s in config.adapters.items() if n != name}
        config.experts = {n: c for n, c in (config.experts or {}).items() if n != name}
        config.expert_order = list(config.adapters)
        self._refresh_layers()
        self._shrink_classifier(index, slots_before)
        if self._static_scalings is not None:
            kept_slots = [slots_before.index(n) for n in self.mixture_layer_names]
            static = self._static_scalings
            static = static[kept_slots] if static.shape[0] > 1 else static
            self._static_scalings = torch.cat([static[:, :index], static[:, index + 1 :]], dim=1)
        if mask is not None:
            mask = torch.cat([mask[:index], mask[index + 1 :]])
            self._active_experts = None if bool(mask.all()) else mask
        self._latest_scalings = None

    # ------------------------------------------------------------------ helpers

    def _classifier_device(self) -> torch.device:
        return self.xlora_classifier.layers[-1].weight.device

    def _warn_if_scaling_pass_changes(self, verb: str) -> None:
        value = self.xlora_config.scaling_pass_value
        if value != 0:
            warnings.warn(
                f"scaling_pass_value={value}: the scaling pass runs every expert at that weight, so {verb} an expert "
                "changes the scaling pass and with it every token's routing. Set it to 0 with "
                "`set_scaling_pass_value(0)` before changing experts to keep the other experts' routing as it was.",
                ExpertChangeWarning,
                stacklevel=3,
            )

    def _module_shapes(self) -> dict[str, tuple[str, int, int]]:
        """Every module X-LoRA could mix, in `named_modules` order, as before the model was built."""
        classifier = set(self.xlora_classifier.modules())
        shapes: dict[str, tuple[str, int, int]] = {}
        inside: list[str] = []
        for name, module in self.model.named_modules():
            if module in classifier or any(name.startswith(prefix) for prefix in inside):
                continue
            if isinstance(module, XLoraLayer):
                shapes[name] = module_kind(module.base_layer)
                inside.append(f"{name}.")
            elif (kind := module_kind(module)) is not None:
                shapes[name] = kind
        return shapes

    def _base_of(self, module: str) -> nn.Module:
        current = self.model.get_submodule(module)
        return current.base_layer if isinstance(current, XLoraLayer) else current

    @staticmethod
    def _layer_loras(layer: XLoraLayer) -> list[tuple[int, ModuleLora]]:
        """(expert index, factors) of every expert of `layer`, the factors as copies of its stacked slices."""
        out = []
        start = 0
        for position, (index, rank) in enumerate(zip(layer.expert_indices, layer.ranks)):
            a, b = layer.expert_factors(position)
            scale, dropout = float(layer.rank_scale[start]), float(layer.rank_dropout[start])
            lora = ModuleLora(a.detach().clone(), b.detach().clone(), rank, scale, dropout, layer.is_embedding)
            out.append((index, lora))
            start += rank
        return out

    def _replace_layer(self, module: str, old: XLoraLayer | None, loras: list[tuple[int, ModuleLora]]) -> None:
        """Swaps in a mixture layer over `loras` (or the bare base layer when empty) at `module`."""
        parent_name, _, child_name = module.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        base = old.base_layer if old is not None else getattr(parent, child_name)
        if not loras:
            setattr(parent, child_name, base)
            return
        config = self.xlora_config
        trainable = config.use_trainable_adapters and not config.inference_mode
        layer = XLoraLayer(base, 0, [i for i, _ in loras], [lora for _, lora in loras], requires_grad=trainable)
        layer._active_adapter = self.active_adapter
        if old is not None:
            layer.train(old.training)
            layer._disable_adapters = old.disable_adapters
            for param_name in layer.adapter_layer_names:  # keep e.g. float32 factors trained on a bf16 base
                getattr(layer, param_name).data = getattr(layer, param_name).data.to(getattr(old, param_name).dtype)
        else:
            layer.train(base.training)
        setattr(parent, child_name, layer)

    def _refresh_layers(self) -> None:
        names = [n for n, m in self.model.named_modules() if isinstance(m, XLoraLayer)]
        for position, name in enumerate(names):
            self.model.get_submodule(name).layer_index = position
        self.mixture_layer_names = names
        self._layers = [self.model.get_submodule(n) for n in names]
        configure_topk(self._layers, self.xlora_config)
        self.targeted_module_names[:] = names
        install_carriers(self.model, set(names))

    def _grow_classifier(self, slots_before: list[str], logit_offset: float) -> None:
        """One more output per layer slot (the new expert's, last); new layers' slots copy slot 0's outputs."""
        config = self.xlora_config
        last = self.xlora_classifier.layers[-1]
        n_old = len(self.expert_names) - 1
        old_slots = len(slots_before) if config.layerwise_scalings else 1
        weight = last.weight.detach().unflatten(0, (old_slots, n_old))  # (old_slots, E, in)
        bias = last.bias.detach().unflatten(0, (old_slots, n_old))  # (old_slots, E)
        if config.layerwise_scalings:
            sources = [slots_before.index(n) if n in slots_before else 0 for n in self.mixture_layer_names]
            weight, bias = weight[sources], bias[sources]  # (new_slots, E, in), (new_slots, E)
        uses_softmax = config.enable_softmax or config.enable_softmax_topk or config.top_k_lora is not None
        if uses_softmax:
            scale = config.softmax_temperature if (config.enable_softmax or config.enable_softmax_topk) else 1.0
            new_w = weight.mean(dim=1, keepdim=True)  # (new_slots, 1, in)
            new_b = bias.mean(dim=1, keepdim=True) - logit_offset * scale  # (new_slots, 1)
        else:
            new_w, new_b = torch.zeros_like(weight[:, :1]), torch.zeros_like(bias[:, :1])
        weight = torch.cat([weight, new_w], dim=1).flatten(0, 1)  # (new_slots * (E + 1), in)
        bias = torch.cat([bias, new_b], dim=1).flatten(0, 1)
        self._set_last_layer(weight, bias, n_old + 1)

    def _shrink_classifier(self, index: int, slots_before: list[str]) -> None:
        config = self.xlora_config
        last = self.xlora_classifier.layers[-1]
        n_old = len(self.expert_names) + 1
        old_slots = len(slots_before) if config.layerwise_scalings else 1
        weight = last.weight.detach().unflatten(0, (old_slots, n_old))  # (old_slots, E, in)
        bias = last.bias.detach().unflatten(0, (old_slots, n_old))
        keep = [e for e in range(n_old) if e != index]
        weight, bias = weight[:, keep], bias[:, keep]
        if config.layerwise_scalings:
            kept_slots = [slots_before.index(n) for n in self.mixture_layer_names]
            weight, bias = weight[kept_slots], bias[kept_slots]
        self._set_last_layer(weight.flatten(0, 1), bias.flatten(0, 1), n_old - 1)

    def _set_last_layer(self, weight: torch.Tensor, bias: torch.Tensor, n_experts: int) -> None:
        """Replaces the classifier's last layer by one with these (n_slots * n_experts, in) weights."""
        classifier = self.xlora_classifier
        old = classifier.layers[-1]
        new = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
            new.bias.copy_(bias)
        new.requires_grad_(old.weight.requires_grad)
        new.train(old.training)
        classifier.layers[-1] = new
        classifier.n_experts = n_experts
        classifier.n_layers = len(self.mixture_layer_names)


def _pad_static(static: torch.Tensor, slots_before: list[str], slots_after: list[str]) -> torch.Tensor:
    """Pinned scalings (n_layers|1, E) -> (n_layers'|1, E + 1): the new expert at 0, new layers' rows at 0."""
    if static.shape[0] > 1:
        zeros = static.new_zeros(static.shape[1])
        static = torch.stack([static[slots_before.index(n)] if n in slots_before else zeros for n in slots_after])
    return torch.cat([static, static.new_zeros(static.shape[0], 1)], dim=1)
