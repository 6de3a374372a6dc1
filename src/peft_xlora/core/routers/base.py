"""`Router`: how the forwards of one X-LoRA model get their scalings, for one routing mode.

A router is chosen when the model is built (`routers.build_router`) and owns everything routing adds to the model:
the forward hooks on the transformers model, the hooks its mode needs (an exit at layer k, the encoder's hooks, ...),
the routing carriers of the checkpointed layers, its own parameters (the single pass's static weights) and the
latest scalings it reports. Its lifecycle:

- `install()`: builds its parameters (once) and registers its hooks;
- `route(args, kwargs)`: the `Routing` of one forward of the model (None runs the base model alone);
- `rebuild(change)`: after experts or mixture layers changed (`add_expert`, `remove_expert`) or a structural config
  field did (`update_config`): its parameters follow the change and its hooks are registered again;
- `remove()`: takes every hook away (`unload`).

What every mode shares lives here, once: the checks before routing, the pinned gate (`set_static_scalings`, shared or
per row), the gate (`classifier.gate_and_choose`: softmax, temperature, top-k, the mask, the global weight, and the
experts each token chose), the router losses (regularisers and distillation), and the latest scalings. Per-forward
state never lives on the router: it travels in the `Routing` of the context variable (`core/routing.py`), so
concurrent forwards stay independent; the latest scalings are written from each forward's own tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..classifier import gate_and_choose
from ..distillation import distillation_term
from ..forward import _add_router_loss, _check_input_device
from ..regularisers import for_accumulated_batch, router_losses
from ..routing import Chosen, Routing, current_routing, install_carriers, pop_routing, push_routing, remove_carriers

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from ..changes import ExpertChange

_PENDING = (
    "The experts' weights were never loaded: this model was built from a saved X-LoRA config. Load it with "
    "`PeftModel.from_pretrained(base_model, checkpoint)` or transformers' `model.load_adapter(checkpoint)`."
)


class Router:
    """The routing of one X-LoRA model in one mode; subclasses implement `route_gated` and their hooks.

    Args:
        tuner: The `XLoraModel` it routes for; the router reads only the attributes `core.attributes.TunerAttributes`
            declares.
    """

    #: The routing mode this class implements (the key in `routers.ROUTERS`).
    mode: ClassVar[str] = ""

    def __init__(self, tuner: Any) -> None:
        self.tuner = tuner
        self._hooks: list[RemovableHandle] = []
        self._latest: torch.Tensor | None = None
        self._latest_router_losses: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ lifecycle

    def install(self) -> None:
        """Builds the router's parameters (the first time) and registers its hooks and carriers."""
        model = self.tuner.model
        self.build_parameters()
        install_carriers(model, set(self.tuner.mixture_layer_names))
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, always_call=True),
            *self.mode_hooks(model),
        ]

    def remove(self) -> None:
        """Removes every hook and carrier the router registered; its parameters stay where they are."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        remove_carriers(self.tuner.model)

    def rebuild(self, change: ExpertChange | None = None) -> None:
        """Follows a change of the experts or mixture layers (`change`), or of a structural config field (None)."""
        self.remove()
        if change is not None:
            self.follow(change)
        self._latest = None
        self.install()

    def build_parameters(self) -> None:
        """Creates the router's own parameters where it has any (single pass); called by every `install`."""

    def mode_hooks(self, model: nn.Module) -> list[RemovableHandle]:
        """Registers the hooks this mode needs beside the model's forward hooks; returns their handles."""
        return []

    def follow(self, change: ExpertChange) -> None:
        """Makes the router's own parameters follow a change of the experts or mixture layers."""

    def late_layer_count(self, names: list[str] | None = None) -> int | None:
        """Single pass: how many of the mixture layers `names` (default the model's) read the gate; else None."""
        return None

    # ------------------------------------------------------------------ the forward hooks

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Pushes exactly once, even when routing fails: the always-called `_after_forward` pops.
        outer = current_routing()
        if outer is not None and outer.scaling_pass:
            push_routing(outer)  # the scaling pass called the top model itself (it is its own base model)
            return
        try:
            routing = self.route(args, kwargs)
        except BaseException:
            push_routing(outer)
            raise
        push_routing(routing)

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        routing = current_routing()
        pop_routing()
        if routing is None or routing.scaling_pass:
            return None
        router_loss = self.forward_router_loss(routing)
        if router_loss is None:
            return None
        return _add_router_loss(output, router_loss)

    def forward_router_loss(self, routing: Routing) -> torch.Tensor | None:
        """The router loss of the forward that ran with `routing` (known once it has run)."""
        return routing.router_loss

    # ------------------------------------------------------------------ routing one forward

    def route(self, args: tuple, kwargs: dict) -> Routing | None:
        """The routing of one forward of the model: None when the experts are off, the pins, or the gate's.

        Raises:
            RuntimeError: The experts' weights were never loaded.
            ValueError: The inputs are on another device than the model's embeddings, or a per-row pin does not fit.
        """
        if not self.routes():
            return None
        _check_input_device(self.tuner.model, args, kwargs)
        if self.tuner._static_scalings is not None:
            return self.pinned_routing(self.pinned(args, kwargs))
        return self.route_gated(args, kwargs)

    def routes(self) -> bool:
        """Whether forwards are routed now: False when the experts are off; raises if they were never loaded."""
        tuner = self.tuner
        if not tuner._enabled or all(layer.disable_adapters for layer in tuner._layers):
            return False  # PEFT's `disable_adapter()` context, or transformers' `model.disable_adapters()`
        if tuner._experts_pending:
            raise RuntimeError(_PENDING)
        return True

    def route_gated(self, args: tuple, kwargs: dict) -> Routing:
        """The routing of one forward from the classifier (the mode's own work)."""
        raise NotImplementedError

    def pinned(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The pinned scalings of a forward: (1, 1, n_layers|1, n_experts), or (batch, 1, ...) per row.

        Raises:
            ValueError: Per-row pins, and the batch has another number of rows.
        """
        static = self.tuner._static_scalings
        if static.dim() == 2:  # (n_layers|1, n_experts)
            return static[None, None]
        rows = self.batch_rows(args, kwargs)
        if rows is not None and rows != static.shape[0]:
            raise ValueError(
                f"The gate is pinned to {static.shape[0]} per-row weight vectors (set_static_scalings(..., "
                f"per_row=True)) but this batch has {rows} rows: pass exactly one row per weight vector, or pin "
                "shared weights."
            )
        return static[:, None]  # (batch, 1, n_layers|1, n_experts)

    def pinned_routing(self, scalings: torch.Tensor) -> Routing:
        """The routing of a pinned forward: every mixture layer uses `scalings`."""
        return Routing(scalings)

    @staticmethod
    def batch_rows(args: tuple, kwargs: dict) -> int | None:
        """The number of rows of a forward's inputs, or None when it cannot be read."""
        for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                return value.shape[0]
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
            return args[0].shape[0]
        return None

    # ------------------------------------------------------------------ the gate

    def gate(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Chosen | None]:
        """Classifier logits, gated scalings and the chosen experts of hidden states (batch, seq, hidden).

        The classifier and the gate run in their own dtype (float32 for a trained classifier) even under
        torch.autocast: low-precision logits would quantise the routing decisions. Experts masked with
        `set_active_experts` get 0, and a softmax renormalises over the rest.

        Returns:
            Logits and scalings, (batch, seq, n_layers|1, n_experts) each, and the top-k choice (see
            `routing.Chosen`) or None.

        Raises:
            FloatingPointError: The scalings are not finite (naming the layer, expert, token and cause).
        """
        tuner = self.tuner
        config = tuner.xlora_config
        with torch.autocast(hidden.device.type, enabled=False):
            logits = tuner.xlora_classifier(hidden)
            scalings, chosen = gate_and_choose(
                logits,
                temperature=config.softmax_temperature,
                enable_softmax=config.enable_softmax,
                top_k=config.top_k_lora,
                softmax_topk=config.enable_softmax_topk,
                global_weight=config.global_scaling_weight,
                active=tuner._active_experts,
            )
        self.check_finite(scalings, hidden)
        return logits, scalings, chosen

    def scaling_pass_scalings(self) -> torch.Tensor | None:
        """The scaling pass's scalings (1, 1, 1, n_experts): active experts at `scaling_pass_value` * global weight.

        Masked experts (`set_active_experts`) sit it out, at 0, as if the model were built without them. None when
        the value is 0: the scaling pass is then the plain base model. Built where the classifier is (the scalings'
        device).
        """
        tuner = self.tuner
        value = tuner.xlora_config.scaling_pass_value * tuner.xlora_config.global_scaling_weight
        if value == 0:
            return None
        device = tuner.xlora_classifier.layers[0].weight.device
        constant = torch.full((1, 1, 1, len(tuner.expert_names)), float(value), device=device)
        if tuner._active_experts is not None:
            constant = constant * tuner._active_experts.to(device)
        return constant

    def scaling_pass_routing(self) -> Routing:
        """The routing of a scaling pass: every expert at the scaling-pass value (see `scaling_pass_scalings`)."""
        return Routing(self.scaling_pass_scalings(), scaling_pass=True)

    def check_finite(self, scalings: torch.Tensor, hidden: torch.Tensor) -> None:
        """Raises `FloatingPointError` naming the layer, expert and token where the scalings are NaN or infinite."""
        finite = torch.isfinite(scalings)  # (batch, seq, n_layers|1, n_experts)
        if bool(finite.all()):
            return
        tuner = self.tuner
        row, token, slot, expert = (~finite).nonzero()[0].tolist()
        value = scalings[row, token, slot, expert].item()
        names = tuner.mixture_layer_names
        if scalings.shape[2] > 1:
            where = f"mixture layer {slot} ({names[slot]!r})"
        else:
            where = f"all {len(names)} mixture layers (they share one set of scalings)"
        if not bool(torch.isfinite(hidden).all()):
            cause = (
                "the scaling pass's hidden state (the classifier's input) already holds NaN/Inf: the base model "
                "overflowed on these "
                "inputs (in float16 try bfloat16 or float32; with scaling_pass_value > 0, check the experts' weights)"
            )
        elif not all(bool(torch.isfinite(p).all()) for p in tuner.xlora_classifier.parameters()):
            cause = "the gating classifier's weights hold NaN/Inf (a diverged training step: lower the learning rate)"
        else:
            cause = "the classifier's logits overflowed (try a larger softmax_temperature or float32)"
        raise FloatingPointError(
            f"X-LoRA scalings are not finite ({value}) in {where}, expert {tuner.expert_names[expert]!r}, batch row "
            f"{row}, token {token}: {cause}."
        )

    # ------------------------------------------------------------------ the router losses

    def router_loss(
        self,
        stacks: list[tuple[torch.Tensor | None, Any]],
        kwargs: Mapping[str, Any],
        distill: tuple[tuple, dict] | None = None,
    ) -> torch.Tensor | None:
        """The weighted router regularisers (and distillation) of one forward, or None when they are off.

        Args:
            stacks: (logits (batch, seq, n_layers|1, n_experts) or None, attention mask or None) per stack of
                tokens the gate routed (one for decoder-only models; the source and the target for
                encoder-decoder ones). The regularisers are summed over the stacks, each over its own tokens.
            kwargs: The forward's keyword arguments: under gradient accumulation their labels and
                `num_items_in_batch` weigh this micro-batch's share (`regularisers.for_accumulated_batch`).
            distill: The forward's (args, kwargs), for the distillation term on the first stack's logits when
                `router_distillation_coef` is on and the forward has labels; None where the mode cannot score the
                experts (the table of what combines refuses the coefficient there).
        """
        config = self.tuner.xlora_config
        coefs = {"load_balancing": config.router_load_balancing_coef, "entropy": config.router_entropy_coef}
        labels = distill[1].get("labels") if distill is not None else None
        if config.router_distillation_coef and isinstance(labels, torch.Tensor):  # needs the next tokens
            coefs["distillation"] = config.router_distillation_coef
        if not any(coefs.values()):
            return None
        totals: dict[str, torch.Tensor] = {}
        for logits, mask in stacks:
            if logits is None:  # encoder outputs passed in (e.g. by `generate`): the encoder's loss is not here
                continue
            if not (isinstance(mask, torch.Tensor) and mask.shape == logits.shape[:2]):
                mask = None  # 4D or absent masks: every token counts
            with torch.autocast(logits.device.type, enabled=False):
                terms = router_losses(logits, config.softmax_temperature, config.top_k_lora, mask)
            for name, value in terms.items():
                totals[name] = totals[name] + value if name in totals else value
        if "distillation" in coefs:
            args, kwargs = distill
            totals["distillation"] = distillation_term(self.tuner, stacks[0][0], args, kwargs, labels)
        self._latest_router_losses = {name: value.detach() for name, value in totals.items()}
        return for_accumulated_batch(sum(coefs[name] * totals[name] for name in coefs), kwargs, self.tuner.model)

    def latest_router_losses(self) -> dict[str, torch.Tensor] | None:
        """The unweighted router losses of the last forward that computed them (detached), or None."""
        return self._latest_router_losses

    # ------------------------------------------------------------------ reporting

    def report(self, scalings: torch.Tensor) -> None:
        """Records one forward's predicted scalings (batch, seq, n_layers|1, n_experts) as the latest, and logs them.

        Logged from the forward's own tensor: another thread's forward may replace the latest in between.
        """
        latest = scalings.detach()
        self._latest = latest
        self.tuner._log_scalings(latest)

    def latest_scalings(self) -> torch.Tensor | None:
        """Scalings of the last forward, (batch, seq, n_layers, n_experts), detached; None before any forward."""
        s = self._latest
        return None if s is None else s.expand(-1, -1, len(self.tuner.mixture_layer_names), -1)

    def latest_encoder_scalings(self) -> torch.Tensor | None:
        """Encoder-decoder models: the source tokens' scalings of the last forward; None for other modes."""
        return None

    def check_config(self, config: Any) -> None:
        """Raises if this router cannot run with `config` (a structural change `update_config` is about to make)."""
