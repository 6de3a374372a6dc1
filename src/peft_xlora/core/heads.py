"""Classification experts with their own heads: every expert's head, stacked, mixed by the gate of the token it reads.

PEFT saves a `SEQ_CLS` LoRA with its fully trained classification head (`modules_to_save`: ``score`` in Llama-style
models, ``classifier`` in BERT-style ones). A head reads one token's state, so the experts' heads are mixed with that
token's scalings s (the same scalings the mixture layers use at that token, global weight and top-k applied):

    logits = sum_e s_e * head_e(h)                   (+ shared(h) with `trainable_head`)

- Llama-style: ``score`` maps every token, (batch, seq, hidden) -> (batch, seq, labels), and the model then keeps the
  last non-padding token's logits. Mixing every token with its own scalings and keeping that token's is mixing with the
  gate of the token the head reads.
- BERT-style: ``classifier`` maps the pooled state, (batch, hidden), which the pooler computes from the first token:
  the first token's scalings are used.
- With layerwise scalings the head uses the slot of the last mixture layer, the one nearest the head; in single-pass
  mode it uses that layer's scalings too: the per-token gate of layer k's output, not the static weights.

With `XLoraConfig.trainable_head` a head shared by all experts trains with the gate, as PEFT's `modules_to_save` trains
a `SEQ_CLS` head: a copy of the model's head when the experts bring none, a zero-initialised head added to the mixture
when they do (so the untrained shared head changes nothing).

Checkpoint keys (beside the experts' factors, see `state_dict.py`; expert names are never parsed out of keys):

    base_model.model.<head>.xlora_expert_heads.<expert>.{weight,bias}    (labels, hidden), (labels,)
    base_model.model.<head>.xlora_shared_head.{weight,bias}              the shared head

Factor keys end in ``.lora_A``/``.lora_B`` and head keys in ``.weight``/``.bias``, so no expert name can make the two
collide; the shared head's infix differs from the experts' heads' before any name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .changes import ExpertChange
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from .devices import execution_device
from .experts import Expert, ExpertError
from .routing import current_routing

#: The sequence-classification heads PEFT trains for `SEQ_CLS` (`PeftModelForSequenceClassification`).
HEAD_NAMES = ("score", "classifier")
HEAD_INFIX = "xlora_expert_heads"
SHARED_NAME = "xlora_shared_head"
_PEFT_PREFIX = "base_model.model."


class XLoraHead(nn.Module):
    """Wraps the model's classification head (an `nn.Linear`) and mixes every expert's head with the gate.

    Args:
        base_layer: The model's head; kept as `self.base_layer` and used when the experts are off.
        heads: Per expert in gate order, its head's parameters ({"weight": (labels, hidden), "bias": (labels,)});
            values may be None (filled from a checkpoint). Empty when the experts bring no heads.
        n_layers: Number of mixture layers; with layerwise scalings the head uses the last one's slot.
        shared: Whether a shared head trains beside the experts' heads (`XLoraConfig.trainable_head`).
        requires_grad: Whether the experts' stacked heads train (`use_trainable_adapters`).
    """

    adapter_layer_names = ("xlora_head_weight", "xlora_head_bias")

    def __init__(
        self,
        base_layer: nn.Linear,
        heads: list[dict[str, torch.Tensor | None]],
        n_layers: int,
        shared: bool = False,
        requires_grad: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slot = max(n_layers - 1, 0)
        self.n_experts = len(heads)
        n_out, n_in = base_layer.weight.shape
        has_bias = base_layer.bias is not None
        factory = {"device": execution_device(base_layer), "dtype": base_layer.weight.dtype}
        self.xlora_head_weight = self.xlora_head_bias = None
        if heads:
            # (E, labels, hidden) and (E, labels): every expert's head, in gate order.
            self.xlora_head_weight = nn.Parameter(torch.zeros(len(heads), n_out, n_in, **factory), requires_grad)
            if has_bias:
                self.xlora_head_bias = nn.Parameter(torch.zeros(len(heads), n_out, **factory), requires_grad)
            self.set_heads(heads)
        self.xlora_shared_head = None
        if shared:
            # skip_init: set below, and building it draws nothing from the random generator (the gate's init does).
            self.xlora_shared_head = nn.utils.skip_init(nn.Linear, n_in, n_out, bias=has_bias, **factory)
            with torch.no_grad():
                if heads:  # a residual beside the experts' heads: starts at zero, changing nothing
                    self.xlora_shared_head.weight.zero_()
                    if has_bias:
                        self.xlora_shared_head.bias.zero_()
                else:  # PEFT's `modules_to_save`: a trainable copy of the model's head
                    self.xlora_shared_head.weight.copy_(base_layer.weight)
                    if has_bias:
                        self.xlora_shared_head.bias.copy_(base_layer.bias)

    @torch.no_grad()
    def set_heads(self, heads: list[dict[str, torch.Tensor | None]]) -> None:
        """Copies the experts' head parameters (where given) into the stacked ones."""
        for e, head in enumerate(heads):
            if head.get("weight") is not None:
                self.xlora_head_weight[e].copy_(head["weight"])
            if self.xlora_head_bias is not None and head.get("bias") is not None:
                self.xlora_head_bias[e].copy_(head["bias"])

    @torch.no_grad()
    def follow(self, change: ExpertChange, added: list[dict[str, torch.Tensor]]) -> None:
        """Follows added and removed experts: kept experts keep their heads, added ones bring `added` (in order)."""
        self.slot = max(len(change.layers) - 1, 0)  # the last mixture layer's, nearest the head
        if self.xlora_head_weight is None:
            return
        new = iter(added)
        weights, biases = [], []
        for old in change.experts:
            head = next(new) if old is None else None
            w = self.xlora_head_weight[old] if head is None else head["weight"].to(self.xlora_head_weight)
            weights.append(w)  # (labels, hidden)
            if self.xlora_head_bias is not None:
                biases.append(self.xlora_head_bias[old] if head is None else head["bias"].to(self.xlora_head_bias))
        self.xlora_head_weight = nn.Parameter(torch.stack(weights), self.xlora_head_weight.requires_grad)
        if self.xlora_head_bias is not None:
            self.xlora_head_bias = nn.Parameter(torch.stack(biases), self.xlora_head_bias.requires_grad)
        self.n_experts = len(change.experts)

    def expert_parameters(self) -> list[nn.Parameter]:
        """The experts' stacked heads: trainable only with `use_trainable_adapters`."""
        return [p for p in (self.xlora_head_weight, self.xlora_head_bias) if p is not None]

    def token_scalings(self, scalings: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The scalings of the token each head input comes from.

        Args:
            scalings: (batch|1, seq|1, n_layers|1, n_experts), as the mixture layers get them.
            hidden: The head's input: (batch, seq, hidden) per token, or (batch, hidden) pooled from the first token.

        Returns:
            (batch|1, seq|1, n_experts) for a per-token input, (batch|1, n_experts) for a pooled one.
        """
        slot = self.slot if scalings.shape[2] > 1 else 0
        s = scalings[:, :, slot, :].to(hidden.device)  # (batch|1, seq|1, n_experts)
        batch_fits = s.shape[0] in (1, hidden.shape[0])
        if hidden.dim() == 2 and batch_fits:
            return s[:, 0]  # BERT-style pooler: it reads the first token
        if hidden.dim() == 3 and batch_fits and s.shape[1] in (1, hidden.shape[1]):
            return s
        raise RuntimeError(
            f"The X-LoRA head mixture got input of shape {tuple(hidden.shape)} and scalings for "
            f"{tuple(s.shape[:2])} tokens: it mixes heads that read every token (batch, seq, hidden) or a state "
            "pooled from the first token (batch, hidden); this model's head reads something else."
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The experts' heads mixed by the current routing's scalings; the base head when the experts are off."""
        routing = current_routing()
        # The last mixture layer's scalings: in single-pass mode the head, after layer k, reads the per-token gate.
        scalings = routing.scalings_for(self.slot) if routing is not None else None
        if scalings is None:
            return self.base_layer(hidden)
        out = None
        if self.xlora_head_weight is not None:
            weight, bias = self.xlora_head_weight, self.xlora_head_bias
            x = hidden.to(weight.dtype)
            s = self.token_scalings(scalings, hidden).to(weight.dtype)  # (*lead|1, E)
            # One small matmul per expert, each the very call the expert's own head makes (a stacked matmul differs
            # from it in the last bit): a gate pinned to one expert gives exactly that expert's logits.
            for e in range(self.n_experts):
                y = F.linear(x, weight[e], None if bias is None else bias[e]) * s[..., e : e + 1]  # (*lead, labels)
                out = y if out is None else out + y
        if self.xlora_shared_head is not None:
            shared = self.xlora_shared_head(hidden.to(self.xlora_shared_head.weight.dtype))
            out = shared if out is None else out + shared
        return out

    def __repr__(self) -> str:
        return f"xlora.{super().__repr__()}"

    def extra_repr(self) -> str:
        """The number of expert heads, and whether a shared head trains, for `print(model)`."""
        return f"expert_heads={self.n_experts}, shared={self.xlora_shared_head is not None}"


# ---------------------------------------------------------------------------------------------- building


def _model_head(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def check_heads(model: nn.Module, experts: list[Expert], task_type: Any, trainable_head: bool) -> str | None:
    """Checks the experts' heads (`modules_to_save`) before anything is built; returns the head's module name.

    Experts built from a saved config get their head's parameter names here (their weights come with the checkpoint).

    Args:
        model: The transformers model.
        experts: The experts, in gate order.
        task_type: The X-LoRA config's `task_type`.
        trainable_head: The config's `trainable_head`.

    Returns:
        The name of the head to wrap, or None when there is nothing to mix or train.

    Raises:
        ExpertError: A head cannot be mixed (see docs/errors.md, "Classification heads").
        ValueError: `trainable_head` on a model that is not a sequence classifier.
    """
    task = getattr(task_type, "value", task_type)
    with_head = [e for e in experts if e.saved_modules]
    for expert in with_head:
        _check_head_module(expert, task)
    if with_head and len(with_head) < len(experts):
        without = [e.name for e in experts if not e.saved_modules]
        raise ExpertError(heads_all_or_none([e.name for e in with_head], without))
    if not with_head:
        if not trainable_head:
            return None
        if task != "SEQ_CLS":
            raise ValueError(
                f"`trainable_head=True` trains a sequence-classification head, but task_type={task!r}. Use "
                "task_type='SEQ_CLS' on a *ForSequenceClassification model, or leave trainable_head=False."
            )
        name = next((n for n in HEAD_NAMES if isinstance(_model_head(model, n), nn.Linear)), None)
        if name is None:
            raise ValueError(
                f"`trainable_head=True` but {type(model).__name__} has no classification head X-LoRA can train (an "
                f"nn.Linear named {' or '.join(repr(n) for n in HEAD_NAMES)})."
            )
        return name
    names = sorted({next(iter(e.saved_modules)) for e in with_head})
    if len(names) > 1:
        raise ExpertError(f"The experts' heads are different modules ({names}); they must all train the same head.")
    name = names[0]
    head = _model_head(model, name)
    if head is None:
        raise ExpertError(
            f"The experts carry a head {name!r}, which this {type(model).__name__} does not have: they were "
            "trained on another model."
        )
    if not isinstance(head, nn.Linear):
        kind = type(head)
        raise ExpertError(
            f"The experts' head {name!r} is a {kind.__module__}.{kind.__qualname__}; X-LoRA mixes heads that are one "
            "nn.Linear (Llama-style `score`, BERT-style `classifier`). Merge the heads into the base model, or "
            "train the experts without modules_to_save."
        )
    expected = {rel: tuple(p.shape) for rel, p in head.named_parameters()}
    shapes = {}
    for expert in with_head:
        shape = _check_head_params(expert, name, expected)
        if shape is not None:
            shapes[expert.name] = shape
    if len(set(shapes.values())) > 1:
        raise ExpertError(
            f"The experts' heads {name!r} have different shapes (labels, hidden): {shapes}. X-LoRA mixes heads with "
            "the same labels; use experts trained for the same classes."
        )
    for expert_name, shape in shapes.items():
        _check_head_shape(expert_name, name, shape, expected["weight"])
    return name


def heads_all_or_none(with_head: list[str], without: list[str]) -> str:
    """The message for experts of which some bring a classification head and some do not."""
    return (
        f"Experts {with_head} carry their classification head (modules_to_save) but {without} do not: X-LoRA mixes "
        "one head per expert, so either every expert brings its head or none does. Use experts trained the same way "
        "(all with task_type='SEQ_CLS', or all without a head)."
    )


def _check_head_module(expert: Expert, task: Any) -> None:
    """An expert with `modules_to_save` trains exactly one sequence-classification head, on a SEQ_CLS model."""
    modules = sorted(expert.saved_modules)
    if len(modules) > 1:
        raise ExpertError(
            f"Expert {expert.name!r} fully trains several modules (modules_to_save): {modules}. X-LoRA mixes one "
            f"classification head per expert ({' or '.join(HEAD_NAMES)}); merge the others (e.g. a pooler) into "
            "the base model, or train the expert without them."
        )
    if modules[0].rpartition(".")[2] not in HEAD_NAMES:
        raise ExpertError(
            f"Expert {expert.name!r} fully trains {modules[0]!r} (modules_to_save), which is not a "
            f"sequence-classification head: X-LoRA mixes only the head PEFT saves for task_type='SEQ_CLS' "
            f"({' or '.join(repr(n) for n in HEAD_NAMES)}). Merge that module into the base model, or train the "
            "expert without modules_to_save."
        )
    if task != "SEQ_CLS":
        raise ExpertError(
            f"Expert {expert.name!r} carries a classification head {modules[0]!r} (modules_to_save), but this "
            f"X-LoRA model has task_type={task!r}: the experts' heads are mixed only for sequence classification. "
            "Build it with XLoraConfig(task_type='SEQ_CLS', ...) on a *ForSequenceClassification model."
        )


def _check_head_params(expert: Expert, name: str, expected: dict[str, tuple]) -> tuple | None:
    """Checks one expert's head parameters against the model's head; returns its weight's shape (None: to come)."""
    params = expert.saved_modules[name]
    if not params or all(v is None for v in params.values()):  # built from a saved config: weights to come
        expert.saved_modules[name] = dict.fromkeys(expected)
        return None
    if set(params) != set(expected):
        raise ExpertError(
            f"Expert {expert.name!r}'s head {name!r} has parameters {sorted(params)}, but the model's head has "
            f"{sorted(expected)}; it was trained on another model."
        )
    return tuple(params["weight"].shape)


def _check_head_shape(expert: str, name: str, shape: tuple, expected: tuple) -> None:
    if shape != expected:
        raise ExpertError(
            f"Expert {expert!r}'s head {name!r} is {shape} (labels, hidden), but the model's is {expected}. Load the "
            f"base model with the experts' number of labels (e.g. `from_pretrained(..., num_labels={shape[0]})`)."
        )


def added_expert_head(model: nn.Module, expert: Expert, task_type: Any) -> dict[str, torch.Tensor] | None:
    """Checks the head an expert added to a built model brings against the heads the model mixes; returns it.

    Whether it brings one exactly when the model's experts do is the table's refusal (`add_expert`'s `heads` cell);
    here the head itself is checked: one sequence-classification head, the same module and shape as the others'.

    Returns:
        The head's parameters ({"weight": (labels, hidden), "bias": (labels,)}), or None when it brings none.

    Raises:
        ExpertError: The head cannot join the mixed heads.
    """
    if not expert.saved_modules:
        return None
    _check_head_module(expert, getattr(task_type, "value", task_type))
    name, head = next(((n, h) for n, h in head_mixtures(model) if h.xlora_head_weight is not None), (None, None))
    if head is None:  # the table refuses a head on a model whose experts bring none
        return None
    module = next(iter(expert.saved_modules))
    if module != name:
        raise ExpertError(
            f"Expert {expert.name!r} carries a head {module!r}, but the other experts' heads are {name!r}; they "
            "must all train the same head."
        )
    expected = {rel: tuple(p.shape) for rel, p in head.base_layer.named_parameters()}
    shape = _check_head_params(expert, name, expected)
    if shape is not None:
        _check_head_shape(expert.name, name, shape, expected["weight"])
    return expert.saved_modules[name]


def swap_in_head(
    model: nn.Module,
    name: str | None,
    experts: list[Expert],
    n_layers: int,
    shared: bool,
    experts_trainable: bool,
) -> XLoraHead | None:
    """Replaces the model's head `name` (from `check_heads`) by an `XLoraHead` around it; None does nothing."""
    if name is None:
        return None
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    heads = [e.saved_modules[name] for e in experts if e.saved_modules]
    head = XLoraHead(getattr(parent, child_name), heads, n_layers, shared=shared, requires_grad=experts_trainable)
    setattr(parent, child_name, head)
    return head


def head_mixtures(model: nn.Module) -> Iterator[tuple[str, XLoraHead]]:
    """(name, module) of the head mixtures in `model` (at most one)."""
    for name, module in model.named_modules():
        if isinstance(module, XLoraHead):
            yield name, module


def unswap_heads(model: nn.Module) -> None:
    """Puts the model's own heads back."""
    for name, head in list(head_mixtures(model)):
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, head.base_layer)


def set_heads_requires_grad(model: nn.Module, experts: bool, shared: bool) -> None:
    """The experts' heads train with the experts (`use_trainable_adapters`), the shared head with the gate."""
    for _, head in head_mixtures(model):
        for param in head.expert_parameters():
            param.requires_grad_(experts)
        if head.xlora_shared_head is not None:
            head.xlora_shared_head.requires_grad_(shared)


# ---------------------------------------------------------------------------------------------- checkpoint keys


def head_key(module_key: str, expert: str, part: str) -> str:
    """The checkpoint key of one expert's head parameter (`part` is ``"weight"`` or ``"bias"``)."""
    return f"{module_key}.{HEAD_INFIX}.{expert}.{part}"


def head_entries(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head mixtures' entries of `model`'s state dict (the model's own head, `base_layer`, is not one)."""
    out = {}
    for name, head in head_mixtures(model):
        for rel, _ in head.named_parameters():
            key = f"{name}.{rel}"
            if not rel.startswith("base_layer.") and key in state_dict:
                out[key] = state_dict[key]
    return out


def split_heads(
    model: nn.Module, expert_names: list[str], state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Model state dict (stacked heads) -> checkpoint state dict (one head per expert); other entries unchanged."""
    out = dict(state_dict)
    for name, _ in head_mixtures(model):
        for part in ("weight", "bias"):
            stacked = out.pop(f"{name}.xlora_head_{part}", None)  # (E, labels, hidden) or (E, labels)
            if stacked is not None:
                for e, expert in enumerate(expert_names):
                    out[head_key(name, expert, part)] = stacked[e].clone()  # clone: safetensors refuses shared views
    return out


def join_heads(
    model: nn.Module,
    expert_names: list[str],
    state_dict: dict[str, torch.Tensor],
    replaced: dict[str, Expert] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Checkpoint state dict -> the head mixtures' model entries, and the checkpoint's other entries.

    Args:
        model: The `PeftModel` (or bare transformers model) the weights are loaded into.
        expert_names: The experts in gate order.
        state_dict: The checkpoint's tensors.
        replaced: Expert name -> `Expert` for experts whose source was swapped at load time: their head comes from
            there, and the checkpoint's copy is dropped.

    Returns:
        (model key -> tensor for the heads, the checkpoint entries that are not the heads').

    Raises:
        CheckpointError: A head tensor is missing or has the wrong shape.
    """
    replaced = replaced or {}
    remaining = dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    prefixed = any(k.startswith(_PEFT_PREFIX) for k in state_dict)
    for name, head in head_mixtures(model):
        # Keys are saved relative to the PeftModel; a model without that wrapper sees them without the prefix.
        ckpt = name if name.startswith("base_model.") or not prefixed else _PEFT_PREFIX + name
        module_name = name.removeprefix(_PEFT_PREFIX)
        for part, stacked in (("weight", head.xlora_head_weight), ("bias", head.xlora_head_bias)):
            if stacked is None:
                continue
            parts = []
            for expert in expert_names:
                key = head_key(ckpt, expert, part)
                tensor = remaining.pop(key, None)
                if expert in replaced:
                    tensor = replaced[expert].saved_modules[module_name].get(part)
                if tensor is None:
                    problems.append(f"missing {key}")
                elif tuple(tensor.shape) != tuple(stacked.shape[1:]):
                    problems.append(f"{key}: {tuple(tensor.shape)} in the checkpoint, {tuple(stacked.shape[1:])} here")
                else:
                    parts.append(tensor)
            if len(parts) == len(expert_names):
                out[f"{name}.xlora_head_{part}"] = torch.stack([p.to(parts[0].dtype) for p in parts])
        if head.xlora_shared_head is not None:
            for rel, param in head.xlora_shared_head.named_parameters():
                key = f"{ckpt}.{SHARED_NAME}.{rel}"
                tensor = remaining.pop(key, None)
                if tensor is None:
                    problems.append(f"missing {key}")
                elif tensor.shape != param.shape:
                    problems.append(f"{key}: {tuple(tensor.shape)} in the checkpoint, {tuple(param.shape)} here")
                else:
                    out[f"{name}.{SHARED_NAME}.{rel}"] = tensor
    if problems:
        raise CheckpointError(
            f"The X-LoRA classification heads do not match the model that {CONFIG_NAME} describes: "
            f"{len(problems)} tensor(s) missing or misshapen (e.g. {problems[:3]}). Was {WEIGHTS_NAME} or "
            f"{CONFIG_NAME} replaced, or "
            "written for another base model?"
        )
    return out, remaining
