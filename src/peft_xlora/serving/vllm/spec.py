"""The serving spec: what the vLLM model class needs to know about an exported X-LoRA model, as plain JSON.

`export_vllm` writes it into the exported folder's ``config.json`` under the key ``"xlora"``, so that every vLLM
process (the API server, the engine core, each tensor-parallel worker) reads it from the model config it already
has. It is deliberately flatter than `XLoraConfig`: the experts' LoRA configs are resolved at export into one
(expert, rank, scale) entry per adapted module, so the serving side needs neither PEFT nor peft-xlora's tuner.

No vLLM here: the export in the main environment and the model class in the vLLM environment both import it. Its
size checks are `core.config`'s, so importing it brings in PEFT and torch, which both environments have.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ...core.config import check_sizes

#: Key of the spec in the exported config.json.
SPEC_KEY = "xlora"
#: Version of the spec's layout; the model class refuses others (1: dual pass only, before routing was written).
SPEC_FORMAT = 2
#: File of the exported folder that holds the classifier and the experts' factors.
WEIGHTS_FILE = "xlora.safetensors"
#: Prefix of every X-LoRA tensor name in that file (and in vLLM's weight iterator).
WEIGHT_PREFIX = "xlora."
#: Name (after the prefix) of a learned single pass's static logits, (n_early, n_experts).
STATIC_LOGITS = "single_pass_static.logits"

#: transformers architecture -> name of our vLLM class for it (each is vLLM's own class for that architecture with
#: the X-LoRA projections added; see `model.py`).
ARCHITECTURES = {
    "LlamaForCausalLM": "XLoraLlamaForCausalLM",
    "MistralForCausalLM": "XLoraMistralForCausalLM",
    "Qwen2ForCausalLM": "XLoraQwen2ForCausalLM",
    "Qwen3ForCausalLM": "XLoraQwen3ForCausalLM",
    "Gemma2ForCausalLM": "XLoraGemma2ForCausalLM",
    "Gemma3ForCausalLM": "XLoraGemma3ForCausalLM",
    "Phi3ForCausalLM": "XLoraPhi3ForCausalLM",
}
#: Architectures whose vLLM class uses the input embedding module itself as its LM head (in `compute_logits`), so
#: the plugin cannot wrap it: experts on `embed_tokens` are refused there.
EMBEDDING_IS_LM_HEAD = ("Gemma2ForCausalLM",)

# Modules the plugin can mix, by their transformers names (relative to the CausalLM). vLLM fuses some of them (q, k, v
# into qkv_proj; gate and up into gate_up_proj); the model class finds where each lands from its own
# `packed_modules_mapping`. Phi-3's transformers model has the fused qkv_proj and gate_up_proj itself.
_LAYER_MODULE = re.compile(
    r"^model\.layers\.(\d+)\.(?:self_attn\.(?:q|k|v|o|qkv)_proj|mlp\.(?:gate|up|down|gate_up)_proj)$"
)
EMBEDDING = "model.embed_tokens"
SUPPORTED_MODULES = (
    "model.embed_tokens and every decoder layer's q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj "
    "(Phi-3: qkv_proj and gate_up_proj)"
)
#: "pinned": every mixture layer at fixed weights (`export_vllm(..., pin=...)`), in one pass, with no classifier.
ROUTINGS = ("dual_pass", "single_pass", "pinned")
#: How a top-k mixture is computed (`XLoraConfig.topk_compute`).
TOPK_COMPUTE = ("auto", "dense", "sparse")


class XLoraServingError(ValueError):
    """An X-LoRA model (or one of its options) cannot be served by the vLLM plugin."""


def scaling_pass_constant(scaling_pass_value: float, global_scaling_weight: float) -> float:
    """The weight every expert gets in the scaling pass.

    The scaling pass runs before any routing, with every expert at one constant weight. That constant is the
    configured `scaling_pass_value` times `global_scaling_weight`, as in the original `xlora` package, PEFT's built-in
    X-LoRA and mistral.rs: the global weight multiplies every expert weight the model applies, in both passes.

    Args:
        scaling_pass_value: `XLoraConfig.scaling_pass_value`.
        global_scaling_weight: `XLoraConfig.global_scaling_weight`.
    """
    return float(scaling_pass_value) * float(global_scaling_weight)


def decoder_layer(module: str) -> int | None:
    """The decoder layer a mixable module belongs to, or None for the input embedding and modules outside layers."""
    match = _LAYER_MODULE.match(module)
    return int(match.group(1)) if match else None


@dataclass
class ExpertOnModule:
    """One expert's LoRA on one module: its position in the gate order, its rank and its scale (alpha / r)."""

    expert: int
    rank: int
    scale: float


def pin_row(module: str, mixture_layers: list[str], n_rows: int) -> int:
    """The row of a pin that a mixture layer uses: its own with one row per mixture layer, else the shared row 0."""
    return mixture_layers.index(module) if n_rows > 1 else 0


@dataclass
class ServingSpec:
    """Everything the vLLM model class reads about an X-LoRA model (see the module docstring).

    Attributes:
        experts: Expert names in gate order (the classifier's output order).
        mixture_layers: Adapted modules in the order of the model's mixture layers: with layerwise scalings, the
            classifier gives one block of `len(experts)` logits per entry, in this order.
        modules: Adapted module -> the experts on it, in gate order (an expert absent from a module is not listed).
        classifier_depth: Number of linear layers of the classifier (ReLU between them); 0 when pinned (no
            classifier).
        classifier_width: Hidden width of the classifier (when depth > 1).
        hidden_size: Width of the classifier's input: the base model's hidden size.
        layerwise_scalings: One set of scalings per mixture layer instead of one shared set.
        enable_softmax: Softmax over the experts; otherwise the logits are the scalings.
        softmax_temperature: Divides the logits before a softmax.
        top_k_lora: Keep the k largest scalings per token; None keeps all.
        enable_softmax_topk: With top_k_lora, renormalise the kept experts by a softmax over their logits.
        topk_compute: With top_k_lora, how the routed projections compute the kept experts: "sparse" (only each
            token's k chosen experts), "dense" (every expert, the unchosen at weight 0) or "auto" (peft-xlora's rule,
            `core.sparse.use_sparse`). The same outputs within float tolerance.
        scaling_pass_value: Expert weight in the scaling pass, before the global weight.
        global_scaling_weight: Multiplies every scaling.
        scaling_pass_layers: k. Dual pass: decoder layers the scaling pass runs (None: all, classifier after the final
            norm). Single pass: the decoder layer whose output (the residual stream) feeds the classifier.
        routing: "dual_pass" (a scaling pass, then the main pass with the per-token scalings), "single_pass"
            (one pass: static weights in the mixture layers of decoder layers 1..k and the input embedding, the
            gate on layer k's output for the layers after it) or "pinned" (one pass, every mixture layer at the
            fixed `pinned_weights`; no classifier, as peft-xlora's `set_static_scalings`).
        single_pass_static: Single pass: "learned" (a softmax over the exported logits, one row per early mixture
            layer) or "uniform" (1 / n_experts).
        pinned_weights: Pinned: the weights, used as given (no softmax, no global weight), one row of
            `len(experts)` shared by every mixture layer, or one row per mixture layer (in `mixture_layers` order).
        shapes: Adapted module -> its (in, out) in the base model the export read (an embedding's (vocabulary,
            width)), so the plugin refuses an export made for another base model before it allocates anything.
            None in exports written before it was recorded.
        peft_xlora_version: Version that exported the model.
        format: Layout version of this spec.
    """

    experts: list[str]
    mixture_layers: list[str]
    modules: dict[str, list[ExpertOnModule]]
    classifier_depth: int
    classifier_width: int
    hidden_size: int
    layerwise_scalings: bool = False
    enable_softmax: bool = True
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    enable_softmax_topk: bool = False
    topk_compute: str = "auto"
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0
    scaling_pass_layers: int | None = None
    routing: str = "dual_pass"
    single_pass_static: str = "learned"
    pinned_weights: list[list[float]] | None = None
    shapes: dict[str, list[int]] | None = None
    peft_xlora_version: str | None = None
    format: int = field(default=SPEC_FORMAT)

    @property
    def n_experts(self) -> int:
        """Number of experts."""
        return len(self.experts)

    @property
    def n_slots(self) -> int:
        """Number of scaling sets the classifier gives per token: mixture layers if layerwise, else 1."""
        return len(self.mixture_layers) if self.layerwise_scalings else 1

    def slot(self, module: str) -> int:
        """The scaling set a module reads (its mixture-layer index when layerwise, else 0)."""
        return self.mixture_layers.index(module) if self.layerwise_scalings else 0

    def is_late(self, module: str) -> bool:
        """Single pass: whether a mixture layer runs after decoder layer k (it then applies the per-token scalings).

        As peft-xlora decides it (`core.single_pass.late_layer_indices`): the modules of decoder layers k+1..L are
        late; the input embedding, registered before the decoder stack, is early.
        """
        layer = decoder_layer(module)
        return self.routing == "single_pass" and layer is not None and layer >= self.scaling_pass_layers

    @property
    def early_layers(self) -> list[str]:
        """Single pass: the mixture layers with static weights, in mixture-layer order (the rows of the logits)."""
        return [m for m in self.mixture_layers if not self.is_late(m)]

    def pinned_weight(self, module: str, expert: int) -> float:
        """Pinned: the fixed weight of `expert` on mixture layer `module`."""
        rows = self.pinned_weights
        return float(rows[pin_row(module, self.mixture_layers, len(rows))][expert])

    def scaling_pass_weight(self) -> float:
        """The constant expert weight of the scaling pass (see `scaling_pass_constant`)."""
        return scaling_pass_constant(self.scaling_pass_value, self.global_scaling_weight)

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data (modules as lists of [expert, rank, scale])."""
        out = asdict(self)
        out["modules"] = {m: [[e.expert, e.rank, e.scale] for e in entries] for m, entries in self.modules.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingSpec:
        """Reads and checks a spec written by `to_dict`.

        Raises:
            XLoraServingError: The spec is of another format, inconsistent, or names modules the plugin cannot mix.
        """
        if not isinstance(data, dict):
            raise XLoraServingError(f"The '{SPEC_KEY}' entry of config.json must be an object, got {data!r}.")
        if data.get("format") != SPEC_FORMAT:
            raise XLoraServingError(
                f"This X-LoRA export has spec format {data.get('format')!r}; this peft-xlora reads format "
                f"{SPEC_FORMAT}. Export the checkpoint again with this version (`peft-xlora export --format vllm`)."
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise XLoraServingError(
                f"The X-LoRA spec in config.json has unknown entries {unknown}: it was written by a newer peft-xlora. "
                "Upgrade peft-xlora in the vLLM environment, or export again with this version."
            )
        fields = dict(data)
        fields["modules"] = {
            module: [ExpertOnModule(int(e), int(r), float(s)) for e, r, s in entries]
            for module, entries in data["modules"].items()
        }
        spec = cls(**fields)
        spec.check()
        return spec

    def check(self) -> None:
        """Checks the spec's consistency.

        Raises:
            XLoraServingError: On the first problem found, saying what is wrong.
        """
        n = self.n_experts
        if n == 0 or len(set(self.experts)) != n:
            raise XLoraServingError(f"The X-LoRA spec needs distinct expert names, got {self.experts!r}.")
        if sorted(self.modules) != sorted(self.mixture_layers):
            raise XLoraServingError("The X-LoRA spec's `modules` and `mixture_layers` name different modules.")
        for module, entries in self.modules.items():
            if module != EMBEDDING and decoder_layer(module) is None:
                raise XLoraServingError(
                    f"Module {module!r} is adapted by an expert, but the vLLM plugin can only mix {SUPPORTED_MODULES} "
                    "(lm_head is not supported: vLLM computes logits for selected tokens only). Use experts that "
                    "do not target it."
                )
            if not entries:
                raise XLoraServingError(f"Module {module!r} is listed without experts.")
            for entry in entries:
                if not 0 <= entry.expert < n or entry.rank < 1 or not math.isfinite(entry.scale):
                    raise XLoraServingError(f"Module {module!r} has an invalid expert entry {entry}.")
        for name in ("softmax_temperature", "scaling_pass_value", "global_scaling_weight"):
            if not math.isfinite(getattr(self, name)):
                raise XLoraServingError(f"`{name}` must be finite, got {getattr(self, name)!r}.")
        if self.softmax_temperature <= 0:
            raise XLoraServingError(f"`softmax_temperature` must be > 0, got {self.softmax_temperature!r}.")
        if self.top_k_lora is not None and not 1 <= self.top_k_lora <= n:
            raise XLoraServingError(f"`top_k_lora` must be between 1 and {n}, got {self.top_k_lora!r}.")
        if self.enable_softmax_topk and self.top_k_lora is None:
            raise XLoraServingError("`enable_softmax_topk` needs `top_k_lora`.")
        if self.topk_compute not in TOPK_COMPUTE:
            raise XLoraServingError(
                f"`topk_compute` must be one of {TOPK_COMPUTE}, got {self.topk_compute!r}. The export is damaged: "
                "export the checkpoint again."
            )
        if self.routing == "pinned":
            self._check_pin()
        elif self.classifier_depth < 1 or self.pinned_weights is not None:
            raise XLoraServingError(
                f"`classifier_depth` must be >= 1 and `pinned_weights` unset with routing={self.routing!r}, got "
                f"{self.classifier_depth!r} and {self.pinned_weights!r}."
            )
        self._check_shapes()
        if self.scaling_pass_layers is not None and self.scaling_pass_layers < 1:
            raise XLoraServingError(f"`scaling_pass_layers` must be None or >= 1, got {self.scaling_pass_layers!r}.")
        # The bounds every X-LoRA config has (core/config.py), before the plugin allocates the classifier and factors.
        ranks = {f"{module!r} expert {e.expert}": e.rank for module, entries in self.modules.items() for e in entries}
        check_sizes(self.classifier_depth, self.classifier_width, self.hidden_size, ranks, error=XLoraServingError)
        if self.routing not in ROUTINGS:
            raise XLoraServingError(f"`routing` must be one of {ROUTINGS}, got {self.routing!r}.")
        if self.routing == "single_pass" and self.scaling_pass_layers is None:
            raise XLoraServingError("`routing='single_pass'` needs `scaling_pass_layers` (the layer k of the gate).")
        if self.single_pass_static not in ("learned", "uniform"):
            raise XLoraServingError(
                f"`single_pass_static` must be 'learned' or 'uniform', got {self.single_pass_static!r}."
            )

    def _check_pin(self) -> None:
        rows, n = self.pinned_weights, self.n_experts
        if self.classifier_depth != 0:
            raise XLoraServingError(
                f"A pinned export has no classifier (`classifier_depth` 0), got {self.classifier_depth!r}."
            )
        if (
            not isinstance(rows, list)
            or len(rows) not in (1, len(self.mixture_layers))
            or not all(isinstance(row, list) and len(row) == n for row in rows)
        ):
            raise XLoraServingError(
                f"`pinned_weights` must be 1 or {len(self.mixture_layers)} (one per mixture layer) rows of {n} "
                "weights. The export is damaged: export the checkpoint again."
            )
        if not all(isinstance(w, (int, float)) and math.isfinite(w) for row in rows for w in row):
            raise XLoraServingError("`pinned_weights` must be finite numbers.")

    def _check_shapes(self) -> None:
        shapes = self.shapes
        if shapes is None:
            return
        if sorted(shapes) != sorted(self.mixture_layers) or not all(
            isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d >= 1 for d in shape)
            for shape in shapes.values()
        ):
            raise XLoraServingError(
                "The X-LoRA spec's `shapes` must give [in, out] (positive integers) for every mixture layer and no "
                "other module. The export is damaged: export the checkpoint again."
            )
