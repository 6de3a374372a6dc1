"""X-LoRA as vLLM model classes: each architecture's own vLLM class, with the experts added to its projections.

Each vLLM forward gets the tokens of every scheduled request flattened, with their positions. The class is vLLM's own
CausalLM class for the architecture (its decoder layers, its final norm, its LM head and logits processing: Gemma 2's
final soft-capping included), with, after the weights are loaded:

- every projection an expert adapts (qkv_proj, o_proj, gate_up_proj, down_proj, the input embedding) wrapped by a
  module that adds the experts' stacked update (`projections.py`), so the layers' own forward runs;
- the X-LoRA router (`ops.XLoraRouter`): the classifier, peft-xlora's gate, and a `scalings` buffer that the router
  writes in place and the mixed projections read (with sparse top-k, also the indices and scalings of each token's
  k chosen experts, which the sparse projections read: `ops.SparseLora`, chosen per projection by `topk_compute`).
  vLLM traces the forward once with its guards dropped, so the projections cannot be told which pass they are in by
  a Python flag; a buffer is data the trace keeps.

**Single pass** (`routing="single_pass"`, one KV cache): the projections of decoder layers 1..k and the embedding
carry static weights folded into their factors; decoder layer k is wrapped so that its output (the residual stream)
goes through the classifier and gate into the buffer; the projections after it read the buffer.

**Dual pass**: before the model's own forward, its own decoder stack runs once more as the scaling pass, over a
shallow copy of the first k layers that shares every weight but owns its attention modules: `Attention` modules
built with all the original's constructor arguments under new layer indices, so vLLM gives the scaling pass its own
paged KV cache (allocated, prefix-cached and freed with the main pass's blocks). Its projections are the bare vLLM
ones (or fixed at `scaling_pass_value * global_scaling_weight` when that is not 0). The router reads its output; the
main pass's projections read the buffer.

**Pinned** (`routing="pinned"`, `export_vllm(..., pin=...)`): one pass, every projection at the fixed weights folded
into its factors, no classifier and no router: what peft-xlora computes after `set_static_scalings`.

Before anything X-LoRA is allocated, the spec is checked against the base model vLLM built: its hidden size, and the
(in, out) of every adapted module, so an export made for another model fails with a message instead of sizing the
classifier and the factors for the wrong one.

Every step is per token and causal, so continuous batching, chunked prefill and prefix caching stay exact.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import QKVParallelLinear
from vllm.model_executor.models.gemma2 import Gemma2ForCausalLM
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.phi3 import Phi3ForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from ...core.sparse import use_sparse
from .ops import Block, Partition, SparseLora, StackedLora, XLoraRouter
from .projections import (
    COLUMN_PARALLEL,
    EMBEDDING,
    ROW_PARALLEL,
    FixedProjection,
    MixedProjection,
    ResidualStream,
    RouteAfterLayer,
    SparseProjection,
    check_projection,
)
from .spec import (
    ARCHITECTURES,
    EMBEDDING_IS_LM_HEAD,
    SPEC_KEY,
    STATIC_LOGITS,
    WEIGHT_PREFIX,
    ServingSpec,
    XLoraServingError,
    decoder_layer,
)


def read_spec(vllm_config: VllmConfig) -> ServingSpec:
    """The X-LoRA spec of the model being loaded, after checking that vLLM runs it in a way the plugin supports.

    Raises:
        XLoraServingError: The config has no spec, or an engine option the plugin cannot honour is on.
    """
    hf_config = vllm_config.model_config.hf_config
    data = getattr(hf_config, SPEC_KEY, None)
    if data is None:
        raise XLoraServingError(
            f"config.json has no '{SPEC_KEY}' entry: this folder was not written by `export_vllm`. Export the X-LoRA "
            "checkpoint with `peft-xlora export --format vllm CHECKPOINT OUT` and serve OUT."
        )
    spec = ServingSpec.from_dict(data)
    if vllm_config.lora_config is not None:
        raise XLoraServingError(
            "vLLM's own LoRA (--enable-lora) cannot be combined with an X-LoRA model: its layers would replace the "
            "projections the mixture adds to. Serve the X-LoRA export without --enable-lora."
        )
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise XLoraServingError(
            "Pipeline parallelism is not supported by the X-LoRA plugin (the gate's hidden state must reach every "
            "later layer on the same stage). Use tensor parallelism (--tensor-parallel-size) instead."
        )
    if vllm_config.quant_config is not None:
        raise XLoraServingError(
            "Quantized base models are not supported by the X-LoRA plugin yet; serve the unquantized base model."
        )
    if spec.hidden_size != hf_config.hidden_size:
        raise XLoraServingError(
            f"The X-LoRA classifier reads hidden states of width {spec.hidden_size} but the base model's hidden size "
            f"is {hf_config.hidden_size}: the export mixes models. Export again against the right base model."
        )
    k = spec.scaling_pass_layers
    if k is not None and k > hf_config.num_hidden_layers:
        raise XLoraServingError(
            f"`scaling_pass_layers={k}` but the base model has {hf_config.num_hidden_layers} decoder layers."
        )
    return spec


# ---------------------------------------------------------------------------------------------------- module copies


@contextlib.contextmanager
def _recorded_attention_arguments() -> Iterator[dict[str, inspect.BoundArguments]]:
    """Records the arguments of every `Attention` built inside the block, by layer name.

    vLLM's `Attention` hands some of its arguments (the soft cap, sliding window, sinks, ...) to a backend-specific
    implementation object and keeps no public copy, so the only exact way to build a twin of one is to call the
    constructor with the same arguments. The recording wraps the constructor for the duration of the model's own
    `__init__` only.
    """
    records: dict[str, inspect.BoundArguments] = {}
    original = Attention.__init__
    signature = inspect.signature(original)

    def recording_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self) is Attention:
            records[self.layer_name] = signature.bind(self, *args, **kwargs)

    Attention.__init__ = recording_init
    try:
        yield records
    finally:
        Attention.__init__ = original


def _twin_attention(arguments: inspect.BoundArguments, prefix: str) -> Attention:
    """A new `Attention` with the recorded arguments, under another layer name (so with a KV cache of its own)."""
    args = dict(arguments.arguments)
    args.pop("self")
    extra = args.pop("extra_impl_args", {})
    args["prefix"] = prefix
    return Attention(**args, **extra)


def _shallow_copy(module: nn.Module, replace: dict[str, nn.Module]) -> nn.Module:
    """A copy of `module` that shares everything but the modules at the dotted paths of `replace`.

    The copy holds the replacements instead; the modules on the way to them are copied the same way, so the original
    is untouched.
    """
    clone = copy.copy(module)
    clone._modules = dict(module._modules)  # its own table of children; everything else is shared
    children: dict[str, dict[str, nn.Module]] = {}
    for path, new in replace.items():
        head, _, rest = path.partition(".")
        if rest:
            children.setdefault(head, {})[rest] = new
        else:
            clone._modules[head] = new
    for head, deeper in children.items():
        clone._modules[head] = _shallow_copy(module._modules[head], deeper)
    return clone


def _only_attention(layer: nn.Module, index: int) -> tuple[str, Attention]:
    found = [(name, m) for name, m in layer.named_modules() if isinstance(m, Attention)]
    if len(found) != 1 or type(found[0][1]) is not Attention:
        kinds = [type(m).__name__ for _, m in found]
        raise XLoraServingError(
            f"Decoder layer {index} has attention modules {kinds}; the dual pass needs exactly one vLLM `Attention` "
            "to give the scaling pass a KV cache of its own. Serve this model with routing='single_pass'."
        )
    return found[0]


# ---------------------------------------------------------------------------------------------------- layouts


@dataclass
class _Layout:
    """How one vLLM projection holds its weights in this tensor-parallel shard.

    Attributes:
        embedding: Whether it is the input embedding (its input is token ids).
        full_in: Its full input width (the vocabulary for the embedding), across shards.
        in_features: The input width this shard sees.
        a_cols: (start, stop) columns of each full A factor this shard holds.
        partitions: Its output partitions in this shard, in output order.
        full: The full rows of each partition, across shards.
    """

    embedding: bool
    full_in: int
    in_features: int
    a_cols: tuple[int, int]
    partitions: list[Partition]
    full: list[int]


def _check_shapes(spec: ServingSpec, blocks_by_path: dict[str, list], layouts: dict[str, _Layout]) -> None:
    """Refuses a spec whose adapted modules have other shapes in this base model than in the one it was exported for.

    Raises:
        XLoraServingError: Naming the first module whose (in, out) differs.
    """
    if spec.shapes is None:
        return  # an export written before the shapes were recorded: the factors' shapes are checked at load
    for path, blocks in blocks_by_path.items():
        layout = layouts[path]
        for module, _, _, _, _, parts in blocks:
            parts = range(len(layout.full)) if parts is None else parts
            here = [layout.full_in, sum(layout.full[p] for p in parts)]  # (in, out), as transformers names them
            if spec.shapes[module] != here:
                raise XLoraServingError(
                    f"The X-LoRA export adapts {module!r} as a {spec.shapes[module][0]} -> {spec.shapes[module][1]} "
                    f"module, but in this base model it maps {here[0]} -> {here[1]}: the export was made for another "
                    "base model. Export the checkpoint again against this one."
                )


# ---------------------------------------------------------------------------------------------------- the mixin


class XLoraCausalLM(nn.Module):
    """The X-LoRA part of the plugin's model classes; mixed in before vLLM's own CausalLM class (see the module doc).

    Args:
        vllm_config: vLLM's config of this model; its hf_config carries the X-LoRA spec.
        prefix: Name prefix of this model's modules.
    """

    packed_modules_mapping: dict[str, list[str]]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        spec = read_spec(vllm_config)
        with _recorded_attention_arguments() as attention_arguments:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        embedding_experts = any(decoder_layer(m) is None for m in spec.modules)
        if embedding_experts and type(self).__name__.removeprefix("XLora") in EMBEDDING_IS_LM_HEAD:
            raise XLoraServingError(
                "Experts adapt the input embedding, but this architecture's vLLM class uses the embedding module as "
                "its LM head; export experts that do not target embed_tokens."
            )
        self.xlora_spec = spec
        self.xlora_dtype = vllm_config.model_config.dtype
        self._xlora_sizes = (config.vocab_size, config.hidden_size, config.num_hidden_layers)
        n_layers = config.num_hidden_layers
        # Every check against the base model before anything X-LoRA is allocated (read_spec checked the hidden size):
        # a spec made for another model must not size the classifier or the factors.
        blocks_by_path = self._blocks_by_projection(spec)
        layouts = {path: self._layout(path) for path in blocks_by_path}
        _check_shapes(spec, blocks_by_path, layouts)
        self.xlora_stacks = nn.ModuleDict()
        self._xlora_paths: dict[str, str] = {}  # stack key -> vLLM module path
        for path, blocks in blocks_by_path.items():
            key = path.replace(".", "__")
            self.xlora_stacks[key] = self._build_stack(layouts[path], blocks)
            self._xlora_paths[key] = path
        self._xlora_sparse = self._sparse_stacks()
        # A pinned model has no gate: every projection carries fixed weights.
        self.xlora = (
            None
            if spec.routing == "pinned"
            else XLoraRouter(
                spec, vllm_config.scheduler_config.max_num_batched_tokens, sparse=bool(self._xlora_sparse)
            )
        )
        if spec.routing == "single_pass" and spec.single_pass_static == "learned":
            logits = torch.zeros(len(spec.early_layers), spec.n_experts, dtype=torch.float32)
            self.register_buffer("xlora_static_logits", logits, persistent=False)
        self._xlora_scaling_model: tuple[nn.Module, ...] = ()
        self._xlora_installed = False
        if spec.routing == "dual_pass":
            # The scaling pass's attention modules: twins of layers 1..k's, named with index n_layers + i (vLLM keys
            # KV caches by layer index). Built here, with the model: vLLM sizes the KV cache from the attention
            # modules that exist when the model is built.
            model_prefix = maybe_prefix(prefix, "model")
            twins = {}
            for i in range(spec.scaling_pass_layers or n_layers):
                _, attention = _only_attention(self.model.layers[i], i)
                index = str(n_layers + i)
                twins[index] = _twin_attention(
                    attention_arguments[attention.layer_name], f"{model_prefix}.xlora_scaling_attn.{index}"
                )
            self.xlora_scaling_attn = nn.ModuleDict(twins)

    # ------------------------------------------------------------------ building

    def _target(self, module: str) -> tuple[str, list[int] | None]:
        """Where a transformers module lands: (vLLM module path, its output partitions, or None for all)."""
        parent, _, leaf = module.rpartition(".")
        for fused, parts in getattr(self, "packed_modules_mapping", {}).items():
            if leaf in parts and parts != [fused]:
                return f"{parent}.{fused}", [parts.index(leaf)]
        return module, None

    def _blocks_by_projection(self, spec: ServingSpec) -> dict[str, list[tuple[str, int, int, float, list | None]]]:
        out: dict[str, list] = {}
        for module in spec.mixture_layers:
            path, parts = self._target(module)
            try:
                self.get_submodule(path)
            except AttributeError as exc:
                raise XLoraServingError(
                    f"Experts adapt {module!r}, which this vLLM model has no module for ({path!r}). Use experts that "
                    "do not target it."
                ) from exc
            for entry in spec.modules[module]:
                index = spec.slot(module) * spec.n_experts + entry.expert
                out.setdefault(path, []).append((module, entry.expert, entry.rank, entry.scale, index, parts))
        return out

    def _layout(self, path: str) -> _Layout:
        """How vLLM's projection at `path` holds its weights in this shard (nothing is allocated)."""
        base = self.get_submodule(path)
        check_projection(path, base)
        kind = type(base)
        if kind in EMBEDDING:
            # The embedding's output is replicated across tensor-parallel ranks, so its update is too: full factors.
            vocab, dim, _ = self._xlora_sizes
            return _Layout(True, vocab, vocab, (0, vocab), [Partition(0, dim, (0, dim))], [dim])
        if kind in ROW_PARALLEL:
            width = base.input_size_per_partition
            a_cols = (base.tp_rank * width, (base.tp_rank + 1) * width)
            partitions = [Partition(0, base.output_size, (0, base.output_size))]
            return _Layout(False, width * base.tp_size, width, a_cols, partitions, [base.output_size])
        assert kind in COLUMN_PARALLEL
        partitions, full, start = [], [], 0
        for p, local in enumerate(base.output_partition_sizes):
            replicas = base.num_kv_head_replicas if (kind is QKVParallelLinear and p > 0) else 1
            shard, n_shards = base.tp_rank // replicas, base.tp_size // replicas
            partitions.append(Partition(start, start + local, (shard * local, (shard + 1) * local)))
            full.append(local * n_shards)
            start += local
        return _Layout(False, base.input_size, base.input_size, (0, base.input_size), partitions, full)

    def _build_stack(self, layout: _Layout, entries: list) -> StackedLora:
        blocks = []
        for module, expert, rank, scale, index, parts in entries:
            parts = list(range(len(layout.partitions))) if parts is None else parts
            sizes = [layout.full[p] for p in parts]
            blocks.append(Block(f"{module}.{expert}", module, expert, rank, scale, index, parts, sizes))
        return StackedLora(
            layout.in_features, layout.a_cols, layout.partitions, blocks, self.xlora_dtype, embedding=layout.embedding
        )

    def _sparse_stacks(self) -> set[str]:
        """The stacks whose per-token mixture computes the chosen experts only (`SparseProjection`).

        Only under `top_k_lora`, in projections the gate routes (the dual pass's main pass, the layers after k of the
        single pass; fixed weights mix every expert), as the spec's `topk_compute` says: "dense", "sparse", or
        "auto", peft-xlora's own rule (`core.sparse.use_sparse`) for the experts on the projection, their largest
        rank, the device and many tokens: one traced forward serves every step, so the choice cannot follow each
        step's token count.
        """
        spec = self.xlora_spec
        k = spec.top_k_lora
        if k is None or spec.routing == "pinned":
            return set()
        out = set()
        for key, stack in self.xlora_stacks.items():
            routed = spec.routing == "dual_pass" or any(spec.is_late(b.module) for b in stack.blocks)
            n_here = len({b.expert for b in stack.blocks})
            rank = max(b.rank for b in stack.blocks)
            device = stack.A.device.type
            if routed and use_sparse(mode=spec.topk_compute, n_experts=n_here, k=k, device_type=device, rank=rank):
                out.add(key)
        return out

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The base weights through the architecture's own loader, then the ``xlora.*`` tensors; then the wrapping."""
        xlora: dict[str, torch.Tensor] = {}

        def base_weights():
            for name, tensor in weights:
                if name.startswith(WEIGHT_PREFIX):
                    xlora[name.removeprefix(WEIGHT_PREFIX)] = tensor
                else:
                    yield name, tensor

        loaded = super().load_weights(base_weights())
        self._load_xlora(xlora)
        if self._xlora_installed:
            return loaded
        name_of = {id(p): name for name, p in self.named_parameters()}
        self._install()
        # The wrappers renamed the parameters they hold (``...qkv_proj.base_layer.weight``); vLLM checks the loaded
        # names against `named_parameters()` after this returns.
        return loaded | {name for name, p in self.named_parameters() if name_of.get(id(p)) in loaded}

    @torch.no_grad()
    def _load_xlora(self, weights: dict[str, torch.Tensor]) -> None:
        spec = self.xlora_spec
        owner = {key: stack for stack in self.xlora_stacks.values() for key in stack.keys}
        expected = {f"classifier.{j}.{p}" for j in range(spec.classifier_depth) for p in ("weight", "bias")}
        if hasattr(self, "xlora_static_logits"):
            expected.add(STATIC_LOGITS)
        found: set[str] = set()
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in weights.items():
            if name.startswith("classifier."):
                _, j, part = name.split(".")
                target = getattr(self.xlora, f"{'weight' if part == 'weight' else 'bias'}{j}", None)
            elif name == STATIC_LOGITS:
                target = getattr(self, "xlora_static_logits", None)
            elif name.startswith("experts."):
                key, part = name.removeprefix("experts.").rsplit(".", 1)
                if key not in owner or part not in ("lora_A", "lora_B"):
                    raise XLoraServingError(
                        f"X-LoRA tensor {name!r} belongs to no (module, expert) of the spec; the export is damaged."
                    )
                pairs.setdefault(key, {})[part] = tensor
                continue
            else:
                raise XLoraServingError(f"Unexpected X-LoRA tensor {WEIGHT_PREFIX}{name!r} in the export.")
            if target is None or target.shape != tensor.shape:
                raise XLoraServingError(
                    f"X-LoRA tensor {name!r} of shape {tuple(tensor.shape)} does not fit the model the spec "
                    "describes; the export is damaged. Export again."
                )
            target.copy_(tensor.to(target.dtype))
            found.add(name)
        for key, parts in pairs.items():
            if set(parts) != {"lora_A", "lora_B"}:
                raise XLoraServingError(f"X-LoRA factor {key!r} has only {sorted(parts)} in the export.")
            owner[key].load(key, parts["lora_A"], parts["lora_B"])
        missing = sorted(k for stack in self.xlora_stacks.values() for k in stack.keys - stack.loaded)
        missing += sorted(expected - found)
        if missing:
            raise XLoraServingError(
                f"The export lacks X-LoRA tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}: it is "
                "incomplete. Export the checkpoint again."
            )

    # ------------------------------------------------------------------ wrapping

    def _static_weight(self) -> Callable[[str, int], float]:
        """Single pass: (module, expert) -> the static weight of an early mixture layer, as peft-xlora computes it."""
        spec = self.xlora_spec
        if spec.single_pass_static == "uniform":
            return lambda module, expert: 1.0 / spec.n_experts
        weights = torch.softmax(self.xlora_static_logits.float(), dim=-1).cpu()  # (n_early, n_experts)
        rows = {m: i for i, m in enumerate(spec.early_layers)}
        return lambda module, expert: float(weights[rows[module], expert])

    def _install(self) -> None:
        spec = self.xlora_spec
        wrapped: dict[str, nn.Module] = {}  # vLLM path -> the bare projection
        static = None
        if spec.routing == "single_pass":
            static = self._static_weight()
        elif spec.routing == "pinned":
            static = spec.pinned_weight  # every mixture layer "early": fixed weights, no gate
        for key, stack in self.xlora_stacks.items():
            stack.fold_scales()
            path = self._xlora_paths[key]
            base = self.get_submodule(path)
            modules = {b.module for b in stack.blocks}
            if static is not None and not any(spec.is_late(m) for m in modules):
                wrapper = FixedProjection(base, stack, stack.rank_weights(static))
            elif key in self._xlora_sparse:
                wrapper = SparseProjection(base, stack, SparseLora(stack, spec.n_experts), self.xlora)
            else:
                wrapper = MixedProjection(base, stack, self.xlora)
            parent, _, leaf = path.rpartition(".")
            setattr(self.get_submodule(parent), leaf, wrapper)
            wrapped[path] = base
        if spec.routing == "single_pass":
            k = spec.scaling_pass_layers
            if any(spec.is_late(m) for m in spec.mixture_layers):
                self.model.layers[k - 1] = RouteAfterLayer(self.model.layers[k - 1], self.xlora)
        elif spec.routing == "dual_pass":
            self._xlora_scaling_model = (self._scaling_model(wrapped),)
        self._xlora_installed = True

    def _scaling_model(self, wrapped: dict[str, nn.Module]) -> nn.Module:
        """The scaling pass: a shallow copy of the decoder stack over its first k layers (see the module doc)."""
        spec = self.xlora_spec
        n_layers = self._xlora_sizes[2]
        k = spec.scaling_pass_layers or n_layers
        weight = spec.scaling_pass_weight()
        stacks = {self._xlora_paths[key]: stack for key, stack in self.xlora_stacks.items()}

        def projection(path: str) -> nn.Module:
            if weight == 0.0:
                return wrapped[path]  # the plain base model
            stack = stacks[path]
            return FixedProjection(wrapped[path], stack, stack.rank_weights(lambda module, expert: weight))

        layers = []
        for i in range(k):
            layer_path = f"model.layers.{i}"
            layer = self.model.layers[i]
            name, _ = _only_attention(layer, i)
            replace = {name: self.xlora_scaling_attn[str(n_layers + i)]}
            for path in wrapped:
                if path.startswith(f"{layer_path}."):
                    replace[path.removeprefix(f"{layer_path}.")] = projection(path)
            layers.append(_shallow_copy(layer, replace))
        replace_top = {"layers": nn.ModuleList(layers)}
        embedding = next((p for p in wrapped if decoder_layer(p) is None), None)
        if embedding is not None:
            replace_top[embedding.removeprefix("model.")] = projection(embedding)
        if spec.scaling_pass_layers is not None:
            replace_top["norm"] = ResidualStream()  # the classifier reads the residual stream after layer k
        scaling = _shallow_copy(self.model, replace_top)
        scaling.start_layer, scaling.end_layer = 0, k
        return scaling

    # ------------------------------------------------------------------ forward

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings; refused when experts adapt them (their update needs the forward's scalings)."""
        if any(decoder_layer(m) is None for m in self.xlora_spec.modules):
            raise XLoraServingError(
                "This X-LoRA model adapts the input embeddings, so it needs token ids, not prompt embeddings."
            )
        return super().embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The model's own forward; in the dual pass, the scaling pass and the gate first. -> (num_tokens, hidden)."""
        if self._xlora_scaling_model:
            scaling_model = self._xlora_scaling_model[0]
            # The stack's fused norms may write into their input: the scaling pass gets its own copy of the embeds.
            embeds = None if inputs_embeds is None else inputs_embeds.clone()
            hidden = scaling_model.forward(input_ids, positions, None, embeds)  # (num_tokens, hidden)
            self.xlora.route(hidden)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


_DYNAMIC_DIMS = {
    "input_ids": {0: "b"},
    "positions": {-1: "b"},
    "intermediate_tensors": {0: "b"},
    "inputs_embeds": {0: "b"},
}


def _xlora_class(base: type[nn.Module]) -> type[nn.Module]:
    """Our class for one of vLLM's CausalLM classes: the X-LoRA mixin before it, traced as one forward."""
    name = ARCHITECTURES[base.__name__]
    cls = type(
        name,
        (XLoraCausalLM, base),
        {
            "__doc__": f"X-LoRA over vLLM's `{base.__name__}` (see `peft_xlora.serving.vllm.model`).",
            "__module__": __name__,
            "__qualname__": name,
        },
    )
    # Traced as one graph, so the scaling pass, the router and the model's own forward are captured together (vLLM
    # traces the inner decoder stack inline when it is called during this trace).
    return support_torch_compile(dynamic_arg_dims=_DYNAMIC_DIMS)(cls)


#: Our vLLM architecture name -> class, for the plugin.
MODEL_CLASSES = {
    ARCHITECTURES[base.__name__]: _xlora_class(base)
    for base in (
        LlamaForCausalLM,
        MistralForCausalLM,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Phi3ForCausalLM,
    )
}

__all__ = ["MODEL_CLASSES", "XLoraCausalLM", "read_spec"]
