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

import torch
from torch import nn

from .attributes import TunerAttributes
from .building import check_experts_fit, check_shapes
from .changes import ExpertChange, take
from .combinations import check
from .experts import ModuleLora, compact_targets, load_expert
from .heads import added_expert_head, head_mixtures
from .layer import XLoraLayer, module_kind
from .places import situation_of
from .sparse import configure_topk

#: Default distance (in logits, before the temperature) of a new expert's logit below the mean of the others.
LOGIT_OFFSET = 16.0


class ExpertChangeWarning(UserWarning):
    """Adding or removing an expert changes what the model computes beyond that expert's own share."""


class ElasticMixin(TunerAttributes):
    """`add_expert`, `remove_expert` and `set_active_experts` of `XLoraModel`."""

    # ------------------------------------------------------------------ masking

    def set_active_experts(self, names: list[str] | None) -> None:
        """Lets the gate choose only among `names`; the others get scaling 0, and a softmax renormalises over the rest.

        The masked experts also sit out the scaling pass (`scaling_pass_value`) and, in single-pass mode, the static
        weights of layers 1..k renormalise over the rest: the model is then the one built without the masked experts.
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
        check("set_active_experts", situation_of(self, features={"masks"}))
        mask = torch.tensor([name in names for name in self.expert_names])
        self._active_experts = None if bool(mask.all()) else mask.to(self._classifier_device())

    def get_active_experts(self) -> list[str]:
        """The experts the gate may choose (all unless `set_active_experts` masked some)."""
        mask = self._active_experts
        return [n for i, n in enumerate(self.expert_names) if mask is None or bool(mask[i])]

    # ------------------------------------------------------------------ adding

    def add_expert(self, name: str, source: str | os.PathLike, logit_offset: float = LOGIT_OFFSET) -> None:
        """Appends a LoRA expert whose gate output starts where it changes nothing (see the module docstring).

        Build a new optimizer afterwards: the classifier's last layer and the stacked factors are new parameters.

        Args:
            name: The new expert's name (not one the model has).
            source: Folder or Hub id of a PEFT LoRA adapter trained on this base model (for a classification model,
                a `SEQ_CLS` adapter with its head when the other experts bring theirs).
            logit_offset: How far (in logits) below the mean of the other experts' logits the new one starts, under a
                softmax or top-k (and in single-pass mode among the static logits): its initial share is below
                exp(-logit_offset), and its gradient is proportional to that share. Unused without softmax and
                top-k, where the new scaling starts at exactly 0.

        Raises:
            ValueError: The name is taken or empty, `logit_offset` is not a number >= 0, or the table of what
                combines refuses the change (docs/combinations.md); nothing changed.
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
        head = added_expert_head(self.model, expert, self.xlora_config.task_type)
        has_heads = any(h.xlora_head_weight is not None for _, h in head_mixtures(self.model))
        names_after = [m for m in shapes if m in expert.modules or m in self.mixture_layer_names]
        facts = {
            "head_mismatch": bool(expert.saved_modules) != has_heads,
            "with_head": list(self.expert_names) if has_heads else [name],
            "without_head": [name] if has_heads else list(self.expert_names),
        }
        late = self.router.late_layer_count(names_after)
        check("add_expert", situation_of(self, late_layers=late, facts=facts, features={"elastic_changes"}))
        self._warn_if_scaling_pass_changes("adding")
        if self.router.mode == "single_pass" and self.xlora_config.single_pass_static == "uniform":
            warnings.warn(
                "single_pass_static='uniform': decoder layers 1..k mix every expert at 1 / n_experts, so adding an "
                "expert changes them (and every later token). Build with single_pass_static='learned' to add experts "
                "that start changing nothing.",
                ExpertChangeWarning,
                stacklevel=2,
            )

        index = len(self.expert_names)
        layers_before = list(self.mixture_layer_names)
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
        layers = tuple(layers_before.index(n) if n in layers_before else None for n in self.mixture_layer_names)
        change = ExpertChange((*range(index), None), layers, float(logit_offset))
        self._follow(change, [head] if head is not None else [])

    # ------------------------------------------------------------------ removing

    def remove_expert(self, name: str) -> None:
        """Drops an expert: its factors, its gate outputs, and the mixture layers that only it adapted.

        Under a softmax the gate renormalises over the other experts' logits (the same scalings as
        `set_active_experts` without it). Build a new optimizer afterwards.

        Raises:
            ValueError: The name is unknown, it is the only expert, `top_k_lora` would exceed the experts left, it is
                the only active expert, or (single pass) no layer after k would be left to read the gate.
        """
        if name not in self.expert_names:
            raise ValueError(f"Unknown expert {name!r}; this model has {self.expert_names}.")
        config = self.xlora_config
        index = self.expert_names.index(name)
        left = len(self.expert_names) - 1
        mask = self._active_experts
        names_after = [
            n
            for n, layer in zip(self.mixture_layer_names, self._layers)
            if any(i != index for i in layer.expert_indices)
        ]
        facts = {
            "expert": name,
            "experts_left": left,
            "last_expert": left == 0,
            "top_k_exceeds": config.top_k_lora is not None and config.top_k_lora > left,
            "only_active": mask is not None and not bool(torch.cat([mask[:index], mask[index + 1 :]]).any()),
        }
        late = self.router.late_layer_count(names_after)
        check("remove_expert", situation_of(self, late_layers=late, facts=facts, features={"elastic_changes"}))
        self._warn_if_scaling_pass_changes("removing")
        layers_before = list(self.mixture_layer_names)
        for module in layers_before:
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
        experts = tuple(i for i in range(left + 1) if i != index)
        self._follow(ExpertChange(experts, tuple(layers_before.index(n) for n in self.mixture_layer_names)), [])

    # ------------------------------------------------------------------ helpers

    def _follow(self, change: ExpertChange, added_heads: list[dict[str, torch.Tensor]]) -> None:
        """Every part that holds something per expert or mixture layer follows `change` (see `core.changes`)."""
        config = self.xlora_config
        uses_softmax = config.enable_softmax or config.enable_softmax_topk or config.top_k_lora is not None
        scale = config.softmax_temperature if (config.enable_softmax or config.enable_softmax_topk) else 1.0
        self.xlora_classifier.remap_outputs(change, change.logit_offset * scale if uses_softmax else None)
        for _, head in head_mixtures(self.model):
            head.follow(change, added_heads)
        pins = self._static_scalings
        if pins is not None:  # (n_layers|1, E) or (batch, n_layers|1, E): a new expert (or layer) pinned at 0
            if pins.shape[-2] > 1:
                pins = take(pins, change.layers, -2, 0.0)
            self._static_scalings = take(pins, change.experts, -1, 0.0)
        if self._active_experts is not None:  # a new expert is active
            mask = take(self._active_experts, change.experts, 0, True)
            self._active_experts = None if bool(mask.all()) else mask
        self.router.rebuild(change)

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
