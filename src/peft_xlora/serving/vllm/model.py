"""X-LoRA as vLLM model classes for the Llama family (Llama, Mistral, Qwen2): both passes inside one vLLM forward.

Each vLLM forward gets the tokens of every scheduled request flattened, with their positions. The X-LoRA forward on
them is (paper, section 3; peft-xlora's `XLoraModel`):

1. **Scaling pass**: the decoder with every expert at one constant weight (`scaling_pass_constant`), over the first
   `scaling_pass_layers` layers (all by default). It has its own paged KV cache: one extra weightless `Attention`
   per layer it runs, registered under its own layer index, so vLLM allocates, pages, prefix-caches and frees its
   blocks with the main pass's.
2. **Classifier and gate** on each token's scaling-pass hidden state (after the final norm, or the residual stream
   after layer k with `scaling_pass_layers=k`): (num_tokens, n_slots, n_experts) float32 scalings.
3. **Main pass**: the decoder again, every fused projection (qkv, o, gate_up, down; and the input embedding) adding
   its experts' gated LoRA update with the token's scalings (`ops.StackedLora`).

Every step of that is per token and causal, so continuous batching, chunked prefill and prefix caching stay exact.
The decoder layers are vLLM's own (weights, norms, rotary embedding, attention); only their composition is ours, so
that each pass can use its own attention modules and the updates are added to the fused projections' outputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaModel
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralModel
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2Model
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.sequence import IntermediateTensors

from .ops import Segment, StackedLora, classify, gate
from .spec import EMBEDDING, SPEC_KEY, WEIGHT_PREFIX, ServingSpec, XLoraServingError, fused_target

# transformers module names of each fused projection's sub-projections, in vLLM's output order.
_SUBMODULES = {
    "qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "down_proj": ("mlp.down_proj",),
}
_ROW_PARALLEL = ("o_proj", "down_proj")


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
            "fused projections the mixture adds to. Serve the X-LoRA export without --enable-lora."
        )
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise XLoraServingError(
            "Pipeline parallelism is not supported by the X-LoRA plugin (the classifier needs the scaling pass's "
            "last hidden state on the stage that starts the main pass). Use tensor parallelism "
            "(--tensor-parallel-size) instead."
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


class XLoraDualPass(nn.Module):
    """The X-LoRA parts of a vLLM Llama-family decoder stack and its dual-pass forward; mixed into vLLM's model.

    The class it is mixed into (vLLM's `LlamaModel`, `MistralModel`, `Qwen2Model`) provides `embed_tokens`,
    `layers` and `norm`; this class adds the scaling pass's attention modules, the classifier and the stacked
    expert factors, all as buffers filled by `load_xlora_weight` (vLLM checks that every *parameter* is loaded
    from the checkpoint, and these come from the X-LoRA weights file instead).
    """

    def _init_xlora(self, vllm_config: VllmConfig, prefix: str) -> None:
        spec = read_spec(vllm_config)
        config = vllm_config.model_config.hf_config
        self._check_layers(config)
        self.xlora_spec = spec
        self.xlora_dtype = vllm_config.model_config.dtype
        n_layers = config.num_hidden_layers
        # The scaling pass stops after layer k; the classifier then reads the residual stream there (no norm).
        self.xlora_scaling_layers = spec.scaling_pass_layers or n_layers
        self.xlora_route_after_norm = spec.scaling_pass_layers is None

        # One weightless Attention per scaling-pass layer, like the layer's own but named with index
        # n_layers + i: vLLM keys KV caches by layer index, so the scaling pass gets caches of its own.
        attns = {}
        for i in range(self.xlora_scaling_layers):
            main = self.layers[i].self_attn.attn
            index = str(n_layers + i)
            attns[index] = Attention(
                main.num_heads,
                main.head_size,
                self.layers[i].self_attn.scaling,
                num_kv_heads=main.num_kv_heads,
                cache_config=vllm_config.cache_config,
                quant_config=vllm_config.quant_config,
                per_layer_sliding_window=main.sliding_window,
                attn_type=main.attn_type,
                prefix=f"{prefix}.xlora_scaling_attn.{index}",
            )
        self.xlora_scaling_attn = nn.ModuleDict(attns)
        self._xlora_scaling_attn_list = [attns[str(n_layers + i)] for i in range(self.xlora_scaling_layers)]

        # Classifier: float32 whatever the model's dtype, so routing decisions are not quantised.
        sizes = [spec.hidden_size] + [spec.classifier_width] * (spec.classifier_depth - 1)
        sizes.append(spec.n_slots * spec.n_experts)
        for j in range(spec.classifier_depth):
            # dtype given: vLLM builds the model under the serving dtype as torch's default (bfloat16 on GPUs).
            weight = torch.zeros(sizes[j + 1], sizes[j], dtype=torch.float32)
            self.register_buffer(f"xlora_classifier_w{j}", weight, persistent=False)
            self.register_buffer(
                f"xlora_classifier_b{j}", torch.zeros(sizes[j + 1], dtype=torch.float32), persistent=False
            )
        self._xlora_classifier_loaded: set[str] = set()

        weight = spec.scaling_pass_weight()
        self.xlora_stacks = nn.ModuleDict()
        self._xlora_stack_of: dict[tuple[int, str], StackedLora] = {}  # (layer, fused projection) -> its stack
        for i in range(n_layers):
            for fused in _SUBMODULES:
                stack = self._build_stack(i, fused, spec, weight)
                if stack is not None:
                    self.xlora_stacks[f"{i}_{fused}"] = stack
                    self._xlora_stack_of[(i, fused)] = stack
        self.xlora_embedding = self._build_embedding_stack(config, spec, weight)

    def _check_layers(self, config) -> None:
        """Refuses the Llama-family variants whose layers compute more than this forward composes."""
        for option in ("llama_4_scaling", "ada_rms_norm_t_cond", "qk_norm", "dual_chunk_attention_config"):
            if getattr(config, option, None):
                raise XLoraServingError(
                    f"The base model's config sets `{option}`, which the X-LoRA plugin's decoder forward does not "
                    "implement. Supported: plain Llama, Mistral and Qwen2 decoder layers."
                )
        if not getattr(config, "is_causal", True):
            raise XLoraServingError("The X-LoRA plugin serves causal decoders only (config.is_causal is False).")

    def _build_stack(self, i: int, fused: str, spec: ServingSpec, weight: float) -> StackedLora | None:
        layer = self.layers[i]
        owner = layer.self_attn if fused in ("qkv_proj", "o_proj") else layer.mlp
        linear = getattr(owner, fused)
        modules = [f"model.layers.{i}.{sub}" for sub in _SUBMODULES[fused]]
        if not any(m in spec.modules for m in modules):
            return None
        tp_rank = linear.tp_rank
        segments = []
        if fused in _ROW_PARALLEL:
            # Row-parallel: this shard sees input columns [rank * in_shard, ...) and produces a partial sum.
            width = linear.input_size_per_partition
            a_cols = (tp_rank * width, (tp_rank + 1) * width)
            segments.append(Segment(0, linear.output_size, (0, linear.output_size)))
            in_features = width
        else:
            # Column-parallel: this shard sees the full input and produces its columns of each sub-projection.
            a_cols = (0, linear.input_size)
            in_features = linear.input_size
            start = 0
            for sub, local in enumerate(linear.output_partition_sizes):
                shard = tp_rank
                if fused == "qkv_proj" and sub > 0:
                    shard = tp_rank // linear.num_kv_head_replicas  # replicated KV heads: ranks share a shard
                segments.append(Segment(start, start + local, (shard * local, (shard + 1) * local)))
                start += local
        for seg, module in zip(segments, modules):
            for entry in spec.modules.get(module, []):
                index = spec.slot(module) * spec.n_experts + entry.expert
                seg.experts.append((f"{module}.{entry.expert}", entry.rank, index, entry.scale))
        return StackedLora(in_features, a_cols, segments, weight, self.xlora_dtype)

    def _build_embedding_stack(self, config, spec: ServingSpec, weight: float) -> StackedLora | None:
        if EMBEDDING not in spec.modules:
            return None
        dim = config.hidden_size
        seg = Segment(0, dim, (0, dim))
        for entry in spec.modules[EMBEDDING]:
            index = spec.slot(EMBEDDING) * spec.n_experts + entry.expert
            seg.experts.append((f"{EMBEDDING}.{entry.expert}", entry.rank, index, entry.scale))
        # The embedding's output is replicated across tensor-parallel ranks, so its update is too: full factors.
        return StackedLora(config.vocab_size, (0, config.vocab_size), [seg], weight, self.xlora_dtype, embedding=True)

    # ------------------------------------------------------------------ weights

    def _stacks(self) -> list[StackedLora]:
        stacks = list(self.xlora_stacks.values())
        return [*stacks, self.xlora_embedding] if self.xlora_embedding is not None else stacks

    def load_xlora_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Fills the classifier and the stacked factors from the export's X-LoRA tensors, then checks completeness.

        Args:
            weights: Name (without the ``xlora.`` prefix) -> tensor: ``classifier.<j>.{weight,bias}`` and
                ``experts.<module>.<expert index>.lora_{A,B}``.

        Raises:
            XLoraServingError: A tensor is missing, unexpected, or of the wrong shape.
        """
        spec = self.xlora_spec
        owner = {key: stack for stack in self._stacks() for key in stack.keys}
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in weights.items():
            if name.startswith("classifier."):
                _, j, part = name.split(".")
                target = getattr(self, f"xlora_classifier_{'w' if part == 'weight' else 'b'}{j}", None)
                if target is None or target.shape != tensor.shape:
                    raise XLoraServingError(
                        f"X-LoRA tensor {name!r} of shape {tuple(tensor.shape)} does not fit the classifier the spec "
                        "describes; the export is damaged. Export again."
                    )
                target.copy_(tensor.to(target.dtype))
                self._xlora_classifier_loaded.add(name)
            elif name.startswith("experts."):
                key, part = name.removeprefix("experts.").rsplit(".", 1)
                if key not in owner or part not in ("lora_A", "lora_B"):
                    raise XLoraServingError(
                        f"X-LoRA tensor {name!r} belongs to no (module, expert) of the spec; the export is damaged."
                    )
                pairs.setdefault(key, {})[part] = tensor
            else:
                raise XLoraServingError(f"Unexpected X-LoRA tensor {WEIGHT_PREFIX}{name!r} in the export.")
        for key, parts in pairs.items():
            if set(parts) != {"lora_A", "lora_B"}:
                raise XLoraServingError(f"X-LoRA factor {key!r} has only {sorted(parts)} in the export.")
            owner[key].load(key, parts["lora_A"], parts["lora_B"])
        missing = sorted(k for stack in self._stacks() for k in stack.keys - stack.loaded)
        expected = {f"classifier.{j}.{p}" for j in range(spec.classifier_depth) for p in ("weight", "bias")}
        missing += sorted(expected - self._xlora_classifier_loaded)
        if missing:
            raise XLoraServingError(
                f"The export lacks X-LoRA tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}: it is "
                "incomplete. Export the checkpoint again."
            )

    # ------------------------------------------------------------------ forward

    def _proj(self, i: int, fused: str, linear: nn.Module, x: torch.Tensor, scalings: torch.Tensor | None):
        """A fused projection's output plus its experts' update: (num_tokens, in_shard) -> (num_tokens, out)."""
        stack = self._xlora_stack_of.get((i, fused))
        if stack is None or (scalings is None and not stack.scaling_pass_active):
            return linear(x)[0]
        if fused not in _ROW_PARALLEL:
            return stack(linear(x)[0], x, scalings)
        # Row-parallel: add this shard's partial update before the all-reduce sums the shards (as vLLM's own
        # RowParallelLinear.forward does for its output), so the update costs no extra communication.
        bias = None if (linear.tp_rank > 0 or linear.skip_bias_add) else linear.bias
        out = stack(linear.quant_method.apply(linear, x, bias), x, scalings)
        if linear.reduce_results and linear.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out

    def _layer(self, i, positions, hidden, residual, attn, scalings):
        """Decoder layer i with attention module `attn`; the same arithmetic as vLLM's Llama/Qwen2 layer forward."""
        layer = self.layers[i]
        if residual is None:
            residual = hidden
            hidden = layer.input_layernorm(hidden)
        else:
            hidden, residual = layer.input_layernorm(hidden, residual)  # fused add + norm, may run in place
        sa = layer.self_attn
        qkv = self._proj(i, "qkv_proj", sa.qkv_proj, hidden, scalings)  # (T, q + 2 kv) this shard's heads
        q, k, v = qkv.split([sa.q_size, sa.kv_size, sa.kv_size], dim=-1)
        q, k = sa.rotary_emb(positions, q, k)
        hidden = self._proj(i, "o_proj", sa.o_proj, attn(q, k, v), scalings)  # (T, hidden)
        hidden, residual = layer.post_attention_layernorm(hidden, residual)
        mlp = layer.mlp
        gate_up = self._proj(i, "gate_up_proj", mlp.gate_up_proj, hidden, scalings)  # (T, 2 * intermediate shard)
        hidden = self._proj(i, "down_proj", mlp.down_proj, mlp.act_fn(gate_up), scalings)  # (T, hidden)
        return hidden, residual

    def _embed(self, input_ids, inputs_embeds, scalings):
        if inputs_embeds is not None:
            if self.xlora_embedding is not None:
                raise XLoraServingError(
                    "This X-LoRA model adapts the input embeddings, so it needs token ids, not prompt embeddings."
                )
            return inputs_embeds.clone()  # each pass gets its own copy: fused norms may write into their input
        hidden = self.embed_tokens(input_ids)  # (T, hidden), fresh per pass for the same reason
        if self.xlora_embedding is not None:
            hidden = self.xlora_embedding(hidden, input_ids, scalings)
        return hidden

    def xlora_scalings(self, input_ids, positions, inputs_embeds=None) -> torch.Tensor:
        """Runs the scaling pass, the classifier and the gate: (num_tokens, n_slots * n_experts) float32 scalings."""
        spec = self.xlora_spec
        hidden, residual = self._embed(input_ids, inputs_embeds, None), None
        for i, attn in enumerate(self._xlora_scaling_attn_list):
            hidden, residual = self._layer(i, positions, hidden, residual, attn, None)
        if self.xlora_route_after_norm:
            route_in, _ = self.norm(hidden, residual)  # transformers' last_hidden_state
        else:
            route_in = hidden + residual  # the residual stream leaving layer k, before any norm
        weights = [getattr(self, f"xlora_classifier_w{j}") for j in range(spec.classifier_depth)]
        biases = [getattr(self, f"xlora_classifier_b{j}") for j in range(spec.classifier_depth)]
        logits = classify(route_in, weights, biases)  # (T, n_slots * n_experts)
        scalings = gate(
            logits.unflatten(-1, (spec.n_slots, spec.n_experts)),
            temperature=spec.softmax_temperature,
            enable_softmax=spec.enable_softmax,
            top_k=spec.top_k_lora,
            softmax_topk=spec.enable_softmax_topk,
            global_weight=spec.global_scaling_weight,
        )  # (T, n_slots, n_experts) float32
        return scalings.flatten(1)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Both passes over this step's tokens: (num_tokens,) ids -> (num_tokens, hidden) final hidden states."""
        scalings = self.xlora_scalings(input_ids, positions, inputs_embeds)  # (T, n_slots * n_experts)
        hidden, residual = self._embed(input_ids, inputs_embeds, scalings), None
        for i, layer in enumerate(islice(self.layers, self.start_layer, self.end_layer)):
            hidden, residual = self._layer(i, positions, hidden, residual, layer.self_attn.attn, scalings)
        hidden, _ = self.norm(hidden, residual)
        return hidden


_DYNAMIC_DIMS = {
    "input_ids": {0: "b"},
    "positions": {-1: "b"},
    "intermediate_tensors": {0: "b"},
    "inputs_embeds": {0: "b"},
}


@support_torch_compile(dynamic_arg_dims=_DYNAMIC_DIMS)
class XLoraLlamaModel(XLoraDualPass, LlamaModel):
    """vLLM's `LlamaModel` with the X-LoRA dual-pass forward."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        LlamaModel.__init__(self, vllm_config=vllm_config, prefix=prefix, layer_type=LlamaDecoderLayer)
        self._init_xlora(vllm_config, prefix)


@support_torch_compile(dynamic_arg_dims=_DYNAMIC_DIMS)
class XLoraMistralModel(XLoraDualPass, MistralModel):
    """vLLM's `MistralModel` with the X-LoRA dual-pass forward."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        MistralModel.__init__(self, vllm_config=vllm_config, prefix=prefix, layer_type=MistralDecoderLayer)
        self._init_xlora(vllm_config, prefix)


@support_torch_compile(dynamic_arg_dims=_DYNAMIC_DIMS)
class XLoraQwen2Model(XLoraDualPass, Qwen2Model):
    """vLLM's `Qwen2Model` with the X-LoRA dual-pass forward."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        Qwen2Model.__init__(self, vllm_config=vllm_config, prefix=prefix, decoder_layer_type=Qwen2DecoderLayer)
        self._init_xlora(vllm_config, prefix)


class XLoraForCausalLM(nn.Module):
    """An X-LoRA causal LM for vLLM: the dual-pass decoder stack, vLLM's LM head and logits processor.

    Subclasses name the decoder stack (`model_cls`). Not a `SupportsLoRA` model: vLLM's own LoRA would wrap the
    fused projections that the mixture adds to.

    Args:
        vllm_config: vLLM's config of this model; its hf_config carries the X-LoRA spec.
        prefix: Name prefix of this model's modules.
    """

    model_cls: type[XLoraDualPass]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = self.model_cls(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The base model's input embeddings (without the experts' embedding update, which needs the scalings)."""
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states of the main pass, (num_tokens, hidden)."""
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits of the selected tokens' hidden states, (num_selected, vocab)."""
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads the base weights through vLLM's loader and the ``xlora.*`` tensors into the X-LoRA buffers."""
        xlora: dict[str, torch.Tensor] = {}

        def base_weights():
            for name, tensor in weights:
                if name.startswith(WEIGHT_PREFIX):
                    xlora[name.removeprefix(WEIGHT_PREFIX)] = tensor
                else:
                    yield name, tensor

        loaded = AutoWeightsLoader(self).load_weights(base_weights())
        self.model.load_xlora_weights(xlora)
        return loaded


class XLoraLlamaForCausalLM(XLoraForCausalLM):
    """X-LoRA over vLLM's Llama."""

    model_cls = XLoraLlamaModel


class XLoraMistralForCausalLM(XLoraForCausalLM):
    """X-LoRA over vLLM's Mistral (Llama layers; transformers-format weights)."""

    model_cls = XLoraMistralModel


class XLoraQwen2ForCausalLM(XLoraForCausalLM):
    """X-LoRA over vLLM's Qwen2 (biased qkv projection)."""

    model_cls = XLoraQwen2Model


#: Our vLLM architecture name -> class, for the plugin.
MODEL_CLASSES = {cls.__name__: cls for cls in (XLoraLlamaForCausalLM, XLoraMistralForCausalLM, XLoraQwen2ForCausalLM)}

__all__ = ["MODEL_CLASSES", "XLoraDualPass", "XLoraForCausalLM", "fused_target", "read_spec"]
