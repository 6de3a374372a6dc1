"""`XLoraConfig`: what an X-LoRA model is made of. Field names follow PEFT's built-in `XLoraConfig`."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig

from .._version import __version__
from .checkpoint import CheckpointError, check_checkpoint
from .combinations import Situation, check
from .experts import load_expert
from .places import CONFIG
from .registration import PEFT_XLORA
from .sparse import TopKCompute

ScalingsMode = Literal["token", "prompt"]
ClassifierInit = Literal["uniform", "random"]
RoutingMode = Literal["dual_pass", "single_pass"]
SinglePassStatic = Literal["learned", "uniform"]

#: `scaling_pass_layers="auto"`: resolved when the model is built (`peft_xlora.core.building.resolve_scaling_pass`).
AUTO_LAYERS = "auto"


@dataclass
class XLoraConfig(PeftConfig):
    """Configuration of an X-LoRA model: a learned gate over several frozen LoRA experts.

    Args:
        adapters: Expert name -> LoRA checkpoint (local folder or Hub id), each a standard PEFT LoRA adapter. Names
            are kept as given. When a saved X-LoRA checkpoint is loaded, the experts come from the checkpoint and
            these sources are not read.
        hidden_size: Hidden size of the base model, read by the classifier. Inferred from the base model's config when
            left as None; a value that disagrees with the model is an error.
        enable_softmax: Softmax over the experts' logits (dense gating).
        enable_softmax_topk: With `top_k_lora`, renormalise the kept experts by a softmax over their logits only.
        softmax_temperature: Divides the logits before any softmax; lower is sharper. Must be > 0.
        layerwise_scalings: One scaling per adapted layer and expert instead of one per expert, broadcast to all
            layers.
        top_k_lora: Keep only the k largest scalings per token (and layer); None keeps all experts.
        topk_compute: With `top_k_lora`, how the mixture layers compute the kept experts: ``"sparse"`` computes only
            each token's k chosen experts (cost flat in the number of experts), ``"dense"`` multiplies by every
            expert and weighs the unchosen ones by 0 (faster for few experts), ``"auto"`` picks sparse in layers with
            at least a measured number of experts per kept expert for their rank
            (`peft_xlora.core.sparse.SPARSE_FROM_RANK`; on CPUs at top-2, in prefill and training, from 32 / 12 / 6
            experts of rank 8 / 16 / 32, later when decoding). Both paths compute the same sum: switching moves
            outputs and gradients within float tolerance. No effect without `top_k_lora`. See docs/performance.md.
        xlora_depth: Number of linear layers in the classifier (1 = a single linear map).
        xlora_size: Hidden width of the classifier; unused when `xlora_depth` is 1.
        xlora_dropout_p: Dropout between the classifier's layers while training.
        classifier_init: ``"uniform"`` zero-initialises the classifier's last layer, so the untrained gate gives
            every expert the same logit: the uniform mixture under softmax (the plain base model without it), a
            good start that training moves away from only where routing pays (the way LoRA starts from a zero
            update). ``"random"`` keeps PyTorch's default initialisation, as PEFT's built-in X-LoRA and the original
            package do. Loaded checkpoints overwrite either.
        use_trainable_adapters: Train the experts' LoRA weights together with the classifier (and their
            classification heads, where they bring them).
        trainable_head: For sequence classification (`task_type="SEQ_CLS"`): train a head shared by all experts with
            the gate, as PEFT's `modules_to_save` trains a SEQ_CLS head. When the experts bring no heads it is a
            trainable copy of the model's head, used instead of it; when they do, it starts at zero and is added to
            their mixed heads. False (the default) trains only the gate: the experts' heads (or the model's head)
            stay as they are. See docs/models.md.
        scaling_pass_value: Weight of every expert during the scaling pass, which `global_scaling_weight` multiplies
            too (each expert's update there is ``scaling_pass_value * global_scaling_weight * scale_e * B_e A_e x``,
            as in the original package, PEFT's built-in X-LoRA and mistral.rs); 0 runs the plain base model there.
        global_scaling_weight: Multiplies every expert update in both passes: the gate's scalings in the main pass and
            `scaling_pass_value` in the scaling pass.
        scalings_mode: ``"token"`` computes scalings for every token; ``"prompt"`` holds the prompt's scalings for
            generated tokens (see the generation docs).
        router_load_balancing_coef: Weight of the load-balancing term added to the model's loss (>= 0; 0 = off).
            See `peft_xlora.core.regularisers`.
        scaling_pass_layers: Run only the first k decoder layers in the scaling pass and feed the classifier their
            output (the residual stream, before any final norm): a cheaper scaling pass. None runs the whole model,
            as published X-LoRA, PEFT's built-in and mistral.rs do. ``"auto"`` (the default) is resolved when the
            model is built, and the model's config (and checkpoint) holds the result: ``round(2 * n / 3)`` of a
            generative decoder-only model's n decoder layers in the dual pass (the gate routes better after domain
            switches there, and the scaling pass costs a third less: docs/routing.md), and None elsewhere
            (encoder-decoder models, sequence classifiers and encoders, models whose layers have no exit, or where
            that would be the last layer). A saved config without this field predates ``"auto"`` and loads as None.
            Single pass needs an int. The mistral.rs layout needs None. See docs/performance.md for the cost.
        router_entropy_coef: Weight of the mean per-token routing entropy added to the loss (>= 0; 0 = off).
        routing: ``"dual_pass"`` (X-LoRA as published) runs a scaling pass before every forward. ``"single_pass"``
            runs none: decoder layers 1..`scaling_pass_layers` mix the experts with static weights, the hidden state
            leaving layer k of the same forward feeds the classifier, and the later layers use its per-token
            scalings: the cost of one LoRA of the experts' total rank. Needs `scaling_pass_layers`. See
            docs/concepts.md.
        single_pass_static: In single-pass mode, the static weights of the first k layers: ``"learned"`` (a softmax
            over one logit per adapted layer and expert, starting uniform and trained with the classifier) or
            ``"uniform"`` (fixed at 1 / n_experts).
        router_distillation_coef: Weight of the distillation term added to the loss when labels are given (>= 0;
            0 = off): the cross-entropy between the gate and a soft target made from each expert's own loss on
            every token (each expert scored alone, no gradient; one more batched forward over n_experts copies of
            the batch). See `peft_xlora.core.distillation` and docs/training.md.
        router_distillation_temperature: Temperature T of the distillation target softmax(-loss / T), in nats
            (finite, > 0): small T targets the best expert of each token, large T spreads the target.
        experts: Filled in when the model is built (in the model's copy of the config) and saved with it: for each
            expert, the PEFT `LoraConfig` (as a dict) that describes its layers. A config that has it describes a
            checkpoint: the model built from it takes the experts' weights from that checkpoint, not from `adapters`.
    """

    adapters: dict[str, str] = field(
        default=None, metadata={"help": "Expert name -> LoRA checkpoint (local folder or Hub id)."}
    )
    hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden size of the base model; inferred from the model when None."}
    )
    enable_softmax: bool = field(default=True, metadata={"help": "Softmax over the experts (dense gating)."})
    enable_softmax_topk: bool = field(
        default=False, metadata={"help": "With top_k_lora: softmax over the kept experts' logits only."}
    )
    softmax_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature (> 0)."})
    layerwise_scalings: bool = field(default=False, metadata={"help": "One scaling per adapted layer and expert."})
    top_k_lora: int | None = field(default=None, metadata={"help": "Keep the k largest scalings per token."})
    topk_compute: TopKCompute = field(
        default="auto",
        metadata={"help": "With top_k_lora: 'sparse' computes only the chosen experts, 'dense' all, 'auto' picks."},
    )
    xlora_depth: int = field(default=1, metadata={"help": "Number of linear layers in the classifier."})
    xlora_size: int = field(default=2048, metadata={"help": "Hidden width of the classifier."})
    xlora_dropout_p: float = field(default=0.2, metadata={"help": "Dropout inside the classifier."})
    classifier_init: ClassifierInit = field(
        default="uniform",
        metadata={"help": "'uniform': zero last layer, the untrained gate is the uniform mixture; 'random': default."},
    )
    use_trainable_adapters: bool = field(default=False, metadata={"help": "Also train the experts."})
    trainable_head: bool = field(
        default=False, metadata={"help": "SEQ_CLS: train a classification head shared by all experts."}
    )
    scaling_pass_value: float = field(default=0.0, metadata={"help": "Expert weight during the scaling pass."})
    global_scaling_weight: float = field(default=1.0, metadata={"help": "Multiplies every scaling."})
    scalings_mode: ScalingsMode = field(
        default="token", metadata={"help": "'token': per-token scalings; 'prompt': hold the prompt's scalings."}
    )
    scaling_pass_layers: int | Literal["auto"] | None = field(
        default="auto",
        metadata={
            "help": "Route from the hidden state after the first k decoder layers (None: the whole model; 'auto': "
            "two thirds of a decoder-only model's layers, resolved at build).",
            "unset": (None, AUTO_LAYERS),
        },
    )
    router_load_balancing_coef: float = field(
        default=0.0, metadata={"help": "Weight of the router load-balancing loss added to the loss (0 = off)."}
    )
    router_entropy_coef: float = field(
        default=0.0, metadata={"help": "Weight of the per-token routing entropy added to the loss (0 = off)."}
    )
    routing: RoutingMode = field(
        default="dual_pass",
        metadata={"help": "'dual_pass': a scaling pass per forward; 'single_pass': route from layer k of one pass."},
    )
    single_pass_static: SinglePassStatic = field(
        default="learned", metadata={"help": "Single pass: 'learned' or 'uniform' static weights in layers 1..k."}
    )
    router_distillation_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the distillation loss from the experts' own per-token losses (0 = off)."},
    )
    router_distillation_temperature: float = field(
        default=1.0, metadata={"help": "Temperature (nats) of the distillation target softmax(-loss / T) (> 0)."}
    )
    experts: dict[str, dict[str, Any]] | None = field(
        default=None, metadata={"help": "Per-expert LoRA configs, filled in at build time and saved."}
    )
    expert_order: list[str] | None = field(
        default=None, metadata={"help": "Expert names in gate order; recorded automatically and saved."}
    )
    peft_xlora_version: str | None = field(
        default=None, metadata={"help": "Version of peft-xlora that saved this config; set on save."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_XLORA
        if self.adapters is None:
            if not self.experts:
                raise ValueError(
                    "XLoraConfig needs `adapters`: a dict of expert name -> LoRA checkpoint path or Hub id, "
                    "e.g. adapters={'math': './lora-math', 'code': './lora-code'}."
                )
            self.adapters = dict.fromkeys(self.experts)
        if not isinstance(self.adapters, dict):
            raise ValueError(
                f"`adapters` must be a dict of expert name -> LoRA checkpoint, got {type(self.adapters).__name__}."
            )
        self.adapters = {name: _source_str(name, src) for name, src in self.adapters.items()}
        if not self.adapters:
            raise ValueError("`adapters` is empty: X-LoRA needs at least one LoRA expert to gate.")
        for name in self.adapters:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"Expert names must be non-empty strings, got {name!r}.")
        if self.experts is not None and set(self.experts) != set(self.adapters):
            raise ValueError(
                f"`experts` names {sorted(self.experts)} do not match `adapters` names {sorted(self.adapters)}; "
                "the config was edited inconsistently. Rebuild it from the experts' sources."
            )
        if self.experts is not None and self.scaling_pass_layers == AUTO_LAYERS:
            # A checkpoint's config (it has `experts`) holds the value its model was built with; "auto" here means the
            # field was missing, as in checkpoints written before it existed, which ran the whole model. (Loaded
            # through `XLoraConfig.from_pretrained`, `check_kwargs` already did this; `PeftConfig.from_pretrained`
            # does not call it.)
            self.scaling_pass_layers = None
        self._apply_expert_order()
        self._check_numbers()

    def _apply_expert_order(self) -> None:
        # adapter_config.json is written with sorted keys, which loses the order of `adapters`: the order of the
        # classifier's outputs. `expert_order` keeps it as a list and puts the dicts back in that order on load.
        if self.expert_order is None:
            if self.experts is not None and len(self.adapters) > 1:
                # A config with `experts` describes a saved checkpoint, whose `adapters` came back sorted. Guessing
                # an order would gate the wrong experts without a sign; with one expert there is only one order.
                raise CheckpointError(
                    f"This X-LoRA checkpoint config has no `expert_order`, so the order of the gate's outputs is lost "
                    f"(adapter_config.json stores `adapters` with sorted keys: {sorted(self.adapters)}). Add "
                    '`"expert_order": [...]` to adapter_config.json: the expert names in the order `adapters` had '
                    "when the model was built (the order of the classifier's outputs)."
                )
            self.expert_order = list(self.adapters)
            return
        if sorted(self.expert_order) != sorted(self.adapters):
            raise ValueError(
                f"`expert_order` {self.expert_order} does not name the same experts as `adapters` "
                f"{sorted(self.adapters)}; the config was edited inconsistently."
            )
        self.adapters = {name: self.adapters[name] for name in self.expert_order}
        if self.experts is not None:
            self.experts = {name: self.experts[name] for name in self.expert_order}

    def to_dict(self) -> dict[str, Any]:
        """The config as saved; records the peft-xlora version that writes it."""
        out = super().to_dict()
        # A checkpoint carries its experts; local source paths would only leak this machine's layout. Hub ids stay.
        out["adapters"] = {name: _portable_source(src) for name, src in self.adapters.items()}
        out["expert_order"] = list(self.adapters)
        out["peft_xlora_version"] = __version__
        return out

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """PEFT's hook on a loaded config's fields: a saved config without `scaling_pass_layers` ran the whole model.

        Such a config was written before the field existed, when the scaling pass always ran every layer; the
        default ``"auto"`` would cut it short and change what the saved classifier reads.
        """
        kwargs = super().check_kwargs(**kwargs)
        kwargs.setdefault("scaling_pass_layers", None)
        return kwargs

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> XLoraConfig:
        """Loads the config of a saved X-LoRA checkpoint, after checking that its files are complete.

        The model built from it takes every expert from the checkpoint. To use another LoRA for some expert instead
        (another rank or other target modules are fine), pass `expert_sources`; `PeftModel.from_pretrained` forwards
        it here.

        Args:
            pretrained_model_name_or_path: Folder or Hub id of the checkpoint.
            subfolder: Subfolder inside it.
            **kwargs: `expert_sources` (expert name -> LoRA folder or Hub id), `allow_pickle` (accept a checkpoint
                that has only `adapter_model.bin`; default False), Hub download options, config overrides.

        Raises:
            peft_xlora.CheckpointError: A file is missing, truncated, or pickle-only without opt-in; or the config
                has several experts and no `expert_order` (the gate's order is lost: see docs/checkpoints.md).
        """
        expert_sources = kwargs.pop("expert_sources", None)
        allow_pickle = kwargs.pop("allow_pickle", False)
        check_checkpoint(pretrained_model_name_or_path, subfolder=subfolder, allow_pickle=allow_pickle, **kwargs)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if expert_sources:
            replace_experts(config, expert_sources)
        return config

    def _check_numbers(self) -> None:
        n = len(self.adapters)
        for name in ("enable_softmax", "enable_softmax_topk", "layerwise_scalings", "use_trainable_adapters"):
            value = getattr(self, name)
            if not isinstance(value, bool):  # "no" or 0 would be read by truthiness
                raise ValueError(f"`{name}` must be True or False, got {value!r}.")
        hidden = self.hidden_size
        if hidden is not None and (not _is_int(hidden) or hidden <= 0):
            raise ValueError(f"`hidden_size` must be a positive int or None (inferred), got {hidden!r}.")
        if not (_is_int(self.xlora_depth) and self.xlora_depth >= 1):
            raise ValueError(f"`xlora_depth` must be an int >= 1, got {self.xlora_depth!r}.")
        if not (_is_int(self.xlora_size) and self.xlora_size >= 1):
            raise ValueError(f"`xlora_size` must be an int >= 1, got {self.xlora_size!r}.")
        for name in ("xlora_dropout_p", "softmax_temperature", "scaling_pass_value", "global_scaling_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):  # None or a string compares badly
                raise ValueError(f"`{name}` must be a number, got {value!r}.")
        if not 0.0 <= self.xlora_dropout_p < 1.0:
            raise ValueError(f"`xlora_dropout_p` must be in [0, 1), got {self.xlora_dropout_p!r}.")
        if not (math.isfinite(self.softmax_temperature) and self.softmax_temperature > 0):
            raise ValueError(f"`softmax_temperature` must be a finite number > 0, got {self.softmax_temperature!r}.")
        if self.top_k_lora is not None and not (_is_int(self.top_k_lora) and 1 <= self.top_k_lora <= n):
            raise ValueError(
                f"`top_k_lora` must be None (dense) or an int between 1 and the number of experts ({n}), "
                f"got {self.top_k_lora!r}."
            )
        if self.topk_compute not in ("auto", "dense", "sparse"):
            raise ValueError(
                f"`topk_compute` must be 'auto', 'dense' or 'sparse', got {self.topk_compute!r}. It only chooses how "
                "a top_k_lora mixture is computed; both paths give the same outputs."
            )
        for name in ("scaling_pass_value", "global_scaling_weight"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        for name in ("router_load_balancing_coef", "router_entropy_coef", "router_distillation_coef"):
            value = getattr(self, name)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (is_number and math.isfinite(value) and value >= 0):
                raise ValueError(f"`{name}` must be a finite number >= 0 (0 turns the term off), got {value!r}.")
        t = self.router_distillation_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"`router_distillation_temperature` must be a finite number > 0 (nats), got {t!r}.")
        k = self.scaling_pass_layers
        if k is not None and k != AUTO_LAYERS and (not _is_int(k) or k < 1):
            raise ValueError(
                f"`scaling_pass_layers` must be None (all layers), {AUTO_LAYERS!r} (two thirds of the decoder layers, "
                f"resolved at build) or an int >= 1, got {k!r}."
            )
        if self.scalings_mode not in ("token", "prompt"):
            raise ValueError(f"`scalings_mode` must be 'token' or 'prompt', got {self.scalings_mode!r}.")
        if not isinstance(self.trainable_head, bool):
            raise ValueError(f"`trainable_head` must be True or False, got {self.trainable_head!r}.")
        if self.classifier_init not in ("uniform", "random"):
            raise ValueError(f"`classifier_init` must be 'uniform' or 'random', got {self.classifier_init!r}.")
        _check_routing(self)
        check_bounds(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a count


def _portable_source(source: str | None) -> str | None:
    if source is None or os.path.isabs(source) or os.path.exists(source) or source.startswith("."):
        return None
    return source


def _source_str(name: str, source: str | os.PathLike | None) -> str | None:
    if source is None or isinstance(source, str):
        return source
    if isinstance(source, os.PathLike):
        return os.fspath(source)
    raise ValueError(f"Expert {name!r}: the source must be a path or Hub id string, got {type(source).__name__}.")


def replace_experts(config: XLoraConfig, sources: dict[str, str]) -> None:
    """Makes a loaded checkpoint config take some experts from other LoRA adapters instead of the checkpoint.

    The replacement may have another rank or other target modules; its LoRA config replaces the saved one, and its
    weights are used when the checkpoint is loaded (`join_experts`).

    Args:
        config: The config just read from the checkpoint.
        sources: Expert name -> LoRA folder or Hub id.

    Raises:
        ValueError: A name is not an expert of the checkpoint.
    """
    unknown = sorted(set(sources) - set(config.adapters))
    if unknown:
        raise ValueError(
            f"`expert_sources` names {unknown}, which are not experts of this checkpoint; its experts are "
            f"{list(config.adapters)}."
        )
    replaced = dict(getattr(config, "_replaced_experts", {}))
    for name, source in sources.items():
        expert = load_expert(name, os.fspath(source))
        config.adapters[name] = os.fspath(source)
        config.experts[name] = expert.config_dict()
        replaced[name] = expert
    config._replaced_experts = replaced


def _check_routing(config: XLoraConfig) -> None:
    """Checks `routing` and the fields that combine within a config (the table of what combines, "config" place).

    `routing` and `single_pass_static` take one of their values, and the single pass needs its layer k.
    """
    if config.routing not in ("dual_pass", "single_pass"):
        raise ValueError(f"`routing` must be 'dual_pass' or 'single_pass', got {config.routing!r}.")
    if config.single_pass_static not in ("learned", "uniform"):
        raise ValueError(f"`single_pass_static` must be 'learned' or 'uniform', got {config.single_pass_static!r}.")
    if config.routing == "single_pass" and not _is_int(config.scaling_pass_layers):
        raise ValueError(
            "`routing='single_pass'` needs `scaling_pass_layers=k` (an int, not "
            f"{config.scaling_pass_layers!r}): the decoder layer whose output feeds the classifier (layers 1..k use "
            "static weights, the later ones the per-token scalings), e.g. half the model's layers."
        )
    check(CONFIG.name, Situation(config, routing=config.routing))


# ------------------------------------------------------------------------------------------------ bounds on sizes
# A config (or a checkpoint's adapter_config.json, or the spec of a vLLM export) decides how much the model built from
# it allocates. These bounds sit far above what published models and X-LoRA setups use, and are checked before
# anything is allocated, so that a mistyped or hostile value fails in milliseconds with a message instead of taking
# the machine's memory. docs/api.md lists them.

#: Widest hidden state accepted: released decoders go up to 16384 (4x headroom).
MAX_HIDDEN_SIZE = 65536
#: Deepest gating classifier: the paper and PEFT's examples use 1 to 8 linear layers.
MAX_CLASSIFIER_DEPTH = 32
#: The classifier's width, and an expert's LoRA rank, may be this many times the hidden size...
MAX_WIDTH_PER_HIDDEN = 16
#: ...or this much, whichever is larger (the default width, 2048, fits every model, small ones included).
WIDTH_ALWAYS_ALLOWED = 4096
#: Widest classifier or highest rank while the hidden size is not known yet (inferred when the model is built).
MAX_WIDTH = MAX_WIDTH_PER_HIDDEN * MAX_HIDDEN_SIZE
#: The classifier's weights may number this many times hidden_size**2 (a Llama decoder layer has about 12)...
MAX_CLASSIFIER_WEIGHTS_PER_HIDDEN_SQUARED = 64
#: ...or this many, whichever is larger (512 MiB in float32: depth 32 at the default width, 2048, on any model).
CLASSIFIER_WEIGHTS_ALWAYS_ALLOWED = 2**27
#: Lowest softmax or distillation temperature: below it the softmax is an argmax whose logits overflow.
MIN_TEMPERATURE = 1e-3


def check_bounds(config: XLoraConfig) -> None:
    """Checks the sizes and temperatures of a config against the bounds above (again once `hidden_size` is known).

    Raises:
        ValueError: A size or temperature is out of bounds; the message names the field, its bound and the fix.
    """
    hints = {
        "softmax_temperature": "for a gate that picks fewer experts, use top_k_lora",
        "router_distillation_temperature": f"{MIN_TEMPERATURE} nats already targets each token's best expert",
    }
    for name, hint in hints.items():
        if getattr(config, name) < MIN_TEMPERATURE:
            raise ValueError(
                f"`{name}` must be >= {MIN_TEMPERATURE}, got {getattr(config, name)!r}: below that the softmax is a "
                f"hard argmax whose inputs overflow; {hint}."
            )
    ranks = {}
    for expert, lora in (config.experts or {}).items():
        if not isinstance(lora, dict):
            continue  # not a LoRA config: refused when the expert is read
        pattern = lora.get("rank_pattern") if isinstance(lora.get("rank_pattern"), dict) else {}
        for where, rank in [("r", lora.get("r")), *((f"rank_pattern[{k!r}]", v) for k, v in pattern.items())]:
            ranks[f"expert {expert!r}, {where}"] = rank
    check_sizes(config.xlora_depth, config.xlora_size, config.hidden_size, ranks)


def check_sizes(
    depth: int,
    width: int,
    hidden: int | None,
    ranks: dict[str, Any] | None = None,
    error: type[Exception] = ValueError,
) -> None:
    """Checks the sizes an X-LoRA model allocates from: the classifier's depth and width, the hidden size, LoRA ranks.

    The one place that holds these bounds: `XLoraConfig` (every config, checkpoint and `update_config`), the build
    (once the hidden size is known), the CLI and the vLLM plugin's spec loader call it.

    Args:
        depth: Linear layers of the classifier.
        width: Width of its hidden layers (unused, but still bounded, when depth is 1).
        hidden: The base model's hidden size; None while unknown (absolute bounds only).
        ranks: Where -> LoRA rank (e.g. ``{"expert 'math', r": 8}``); non-int values are left to their own checks.
        error: The exception type to raise (the vLLM plugin raises its `XLoraServingError`).

    Raises:
        error: A size is out of bounds; the message names it, the bound and what to do.
    """
    if _is_int(hidden) and hidden > MAX_HIDDEN_SIZE:
        raise error(f"`hidden_size` is {hidden}; at most {MAX_HIDDEN_SIZE} is supported. Leave it None to infer it.")
    if _is_int(depth) and depth > MAX_CLASSIFIER_DEPTH:
        raise error(
            f"`xlora_depth` is {depth}: the classifier may have at most {MAX_CLASSIFIER_DEPTH} linear layers "
            "(1 or 2 are usual). Was the config or checkpoint edited by hand?"
        )
    limit, because = _width_bound(hidden if depth != 1 else None)  # depth 1: the width is unused, any hidden size
    if _is_int(width) and width > limit:
        raise error(
            f"`xlora_size` is {width}: the classifier may be at most {limit} wide ({because}). "
            "Was the config or checkpoint edited by hand?"
        )
    limit, because = _width_bound(hidden)
    for where, rank in (ranks or {}).items():
        if _is_int(rank) and rank > limit:
            raise error(
                f"The LoRA rank of {where} is {rank}; at most {limit} is supported ({because}). "
                "Was the config or checkpoint edited by hand?"
            )
    if _is_int(hidden) and _is_int(depth) and _is_int(width) and depth > 1:
        weights = hidden * width + (depth - 2) * width * width  # the hidden layers; the last one is n_experts wide
        most = max(MAX_CLASSIFIER_WEIGHTS_PER_HIDDEN_SQUARED * hidden * hidden, CLASSIFIER_WEIGHTS_ALWAYS_ALLOWED)
        if weights > most:
            raise error(
                f"A classifier of depth {depth} and width {width} over hidden size {hidden} has {weights:,} weights; "
                f"at most {most:,} are supported ({MAX_CLASSIFIER_WEIGHTS_PER_HIDDEN_SQUARED}x hidden_size**2, or "
                f"{CLASSIFIER_WEIGHTS_ALWAYS_ALLOWED:,}). Use a smaller xlora_depth or xlora_size."
            )


def _width_bound(hidden: int | None) -> tuple[int, str]:
    """The largest classifier width or LoRA rank for a hidden size (None: not known), and the reason in words."""
    if not _is_int(hidden):
        return MAX_WIDTH, f"{MAX_WIDTH_PER_HIDDEN}x the largest supported hidden size, {MAX_HIDDEN_SIZE}"
    limit = max(MAX_WIDTH_PER_HIDDEN * hidden, WIDTH_ALWAYS_ALLOWED)
    return limit, f"{MAX_WIDTH_PER_HIDDEN}x the hidden size {hidden}, or {WIDTH_ALWAYS_ALLOWED}"
