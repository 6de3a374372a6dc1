"""The library benchmark (issue 26): X-LoRA with top-2 sparse routing over 16 LoRA experts, against Arrow top-2.

It is the routing benchmark's engine (`benchmarks.routing.bench.RoutingBench`: the demo's base model, data, expert
training and caching, held-out sets, bootstrap) over a library of 16 domains of `benchmarks/corpora.py` instead of
six. Its experts are the routing benchmark's (same recipe, same cache keys: the six of `corpora.ROUTING_SUBSET` are
reused as they are, in the same positions, and the other ten are trained once and cached beside them).

What it adds to the routing benchmark:

- the gate: X-LoRA with `top_k_lora=2` and `topk_compute="sparse"` (each token computes only its two experts'
  updates), in single-pass routing, trained on the routing benchmark's gate batches;
- PEFT's Arrow with top-2 over the same library (training-free), the uniform mixture, each expert alone (the best
  single expert is the row with the lowest mean) and the two oracles;
- each expert alone scored as its plain PEFT LoRA model (16 LoRA passes, not 16 passes over all 16 experts);
- the inference cost per token of X-LoRA (sparse and dense top-2) and Arrow top-2, measured side by side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks import corpora
from benchmarks.routing.bench import ARROW2, BASE, ORACLE, TOKEN_ORACLE, UNIFORM, RoutingBench
from benchmarks.routing.variants import Variant
from peft_xlora.cli.demo import data as demo_data
from peft_xlora.cli.demo.evaluate import Losses, evaluate, evaluate_pinned, oracles
from peft_xlora.cli.demo.settings import DemoSettings

# The library: 16 experts of SmolLM2-135M, all with the demo's expert recipe (LoRA r 8 on every linear layer, 4 x 128
# tokens per step at lr 3e-3, bf16 autocast), reusing every expert already in the cache:
# - the routing benchmark's six (`corpora.ROUTING_SUBSET`, 40 steps), first and in the same order, so each keeps its
#   training seed `seed + 10 + position` and its training data;
# - man-fr (40 steps, trained for this benchmark with the routing benchmark's settings);
# - six more corpus domains with 20 steps (half the others': sized to the shared cores; see `SHORT_EXPERT_STEPS`);
# - the demo's three experts (`peft-xlora demo`: Shakespeare, Python's codec tables, Python's reference docs; 40 steps
#   on documents of up to 60,000 characters), scored here on their held-out documents cut to 20,000 characters like
#   every other domain.
# Left out of the corpus: cpp-headers (close to c-headers), vim-help, x11-compose (time), and licences, whose 17 files
# are mostly versions of the same few licences, so its held-out documents repeat its training documents nearly word
# for word.
ROUTING_DOMAINS = tuple(corpora.ROUTING_SUBSET)
SHORT_DOMAINS = ("copyright", "c-headers", "vim-script", "texinfo", "mime-xml", "bash-completion")
DEMO_DOMAINS = tuple(demo_data.SOURCES)  # shakespeare, codecs, pydoc
DOMAINS = (*ROUTING_DOMAINS, "man-fr", *SHORT_DOMAINS, *DEMO_DOMAINS)
LEFT_OUT = ("cpp-headers", "vim-help", "x11-compose", "licences")
SHORT_EXPERT_STEPS = 20
DEMO_MAX_CHARS = 60_000  # the demo's documents: part of its experts' cache keys

XLORA_SINGLE = "X-LoRA top-2, single pass"
XLORA_DUAL = "X-LoRA top-2, dual pass"
XLORA_SOFT = "X-LoRA soft-trained, top-2 single pass"

# SmolLM2-135M. The expert recipe and the training data are the routing benchmark's (`benchmarks.routing.bench.REAL`,
# restated here so a change of that benchmark's gate settings cannot change these experts' cache keys): 40 steps of
# 4 x 128 tokens at lr 3e-3, LoRA r 8 on every linear layer, bf16 autocast. `router_steps` stays 100 because it sizes
# the training token stream the experts' batches are drawn from. Held out (sized to fit the 2 shared cores): 2
# windows of 256 tokens per domain and 8 mixed documents of 4 segments (24 switches), 10,240 tokens in all.
REAL = DemoSettings(
    router_steps=100,
    router_lr=1e-3,
    router_depth=1,
    router_size=2048,
    router_layerwise=False,
    scaling_pass_layers=None,
    router_distillation_coef=0.0,
    eval_pure=2,
    eval_mixed=8,
    eval_segments=4,
    max_chars=20_000,
    n_boot=2000,
)
# The smoke version: the demo's random 2-layer Llama with a character tokenizer, on the same real text.
TINY = replace(
    REAL,
    tiny=True,
    seq_len=48,
    batch_size=4,
    expert_steps=2,
    expert_lr=1e-2,
    lora={"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    router_steps=3,
    eval_seq_len=64,
    eval_pure=2,
    eval_mixed=3,
    eval_segments=3,
    max_chars=2_000,
    n_boot=50,
    precision="fp32",
)

# The gate. Single pass (issue 16): the classifier reads the hidden state after decoder layer 10 of 30 and routes
# layers 11-30; layers 1-10 mix every expert with fixed uniform weights (`single_pass_static="uniform"`: nothing
# before layer 10 trains, so the backward stops there). Top-2 with the softmax renormalised over the two kept
# experts (as Arrow's top-2 does), computed sparse. A random classifier initialisation: the uniform one gives every
# token the same logits, so every token would start on the same two experts. 80 steps at lr 2e-3 (the routing
# benchmark's gates take 100 at 1e-3): sized to the shared cores.
SPARSE_TOP2 = {"top_k_lora": 2, "enable_softmax_topk": True, "topk_compute": "sparse"}
SINGLE_PASS = {"routing": "single_pass", "scaling_pass_layers": 10, "single_pass_static": "uniform"}


@dataclass(frozen=True)
class LibraryGate(Variant):
    """A gate trained with `options` and evaluated with `inference` changed on top (`update_config`).

    Attributes:
        inference: Config fields changed after training, before scoring and timing (empty: none).
    """

    inference: dict[str, Any] = field(default_factory=dict)

    def recipe(self) -> dict[str, Any]:
        """What makes this gate and how it is run, for its cache keys."""
        return {**super().recipe(), "inference": self.inference}


GATES = {
    XLORA_SINGLE: Variant(
        XLORA_SINGLE,
        options={
            "routing": "single_pass",
            "scaling_pass_layers": 10,
            "single_pass_static": "uniform",
            "classifier_init": "random",
            **SPARSE_TOP2,
        },
        steps=80,
        lr=2e-3,
    ),
    XLORA_DUAL: Variant(XLORA_DUAL, options={"classifier_init": "random", **SPARSE_TOP2}, steps=80, lr=2e-3),
    # Trained as a soft gate over all 16 experts (every expert's logit gets a gradient on every token; the config's
    # default uniform initialisation), then run with top-2 renormalised and sparse: the same single pass at inference.
    XLORA_SOFT: LibraryGate(XLORA_SOFT, options=dict(SINGLE_PASS), steps=80, lr=2e-3, inference=SPARSE_TOP2),
}
# The uniform mixture is scored on a plain X-LoRA model pinned to 1/16 per expert.
PINNED_DENSE = Variant("pinned")


class LibraryBench(RoutingBench):
    """One seed of the library benchmark (the routing benchmark over the 16 domains of `DOMAINS`)."""

    def load_gate(self, v: Variant) -> torch.nn.Module:
        """The variant's trained model, with its inference changes (a `LibraryGate`'s `inference`) applied."""
        from peft_xlora.core.model import find_tuner

        model = super().load_gate(v)
        if getattr(v, "inference", None):
            find_tuner(model).update_config(**v.inference)
        return model

    def _gate_key(self, recipe: dict[str, Any]) -> str:
        return super()._gate_key({"library": True, **recipe})

    # ------------------------------------------------------------------ the library's domains and experts

    def read_domains(self) -> demo_data.Split:
        """Corpus domains (`benchmarks/corpora.py`) and the demo's, in `self.domain_names` order."""
        corpus = [d for d in self.domain_names if d not in DEMO_DOMAINS]
        split = corpora.read_domains(corpus, self.s.max_chars, self.max_docs)
        if any(d in DEMO_DOMAINS for d in self.domain_names):
            split.update(demo_data.real_domains(self.s.max_chars))
        return {d: split[d] for d in self.domain_names}

    def source_of(self, domain: str) -> str:
        """The demo's description for its domains (as its experts' cache keys have it), else the corpus's."""
        return demo_data.SOURCES[domain] if domain in DEMO_DOMAINS else super().source_of(domain)

    def expert_settings(self, domain: str) -> DemoSettings:
        """The settings an expert was trained with: the demo's document size for its domains, fewer steps for some."""
        if self.s.tiny:
            return self.s
        if domain in DEMO_DOMAINS:
            return replace(self.s, max_chars=DEMO_MAX_CHARS)
        if domain in SHORT_DOMAINS:
            return replace(self.s, expert_steps=SHORT_EXPERT_STEPS)
        return self.s

    def expert_dir(self, domain: str) -> Path:
        """The expert's cache folder under the current settings (the key `Demo.prepare_expert` uses)."""
        s = self.s
        key = self._recipe(
            domain=domain, source=self.source_of(domain), steps=s.expert_steps, lr=s.expert_lr, lora=s.lora
        )
        return self.cache_dir / "experts" / f"{domain}-{key}"

    def prepare_expert(self, i: int, domain: str) -> None:
        """The cached expert of the domain (trained now if missing; the demo's must come from `peft-xlora demo`)."""
        settings, self.s = self.s, self.expert_settings(domain)
        try:
            if domain in DEMO_DOMAINS and not self.s.tiny and not self.expert_dir(domain).is_dir():
                raise demo_data.DataError(
                    f"The demo's {domain} expert is not in the cache ({self.expert_dir(domain)}): run "
                    "`peft-xlora demo` once (it trains it), then this benchmark again."
                )
            super().prepare_expert(i, domain)
        finally:
            self.s = settings

    def score_fixed(self) -> dict[str, Losses]:
        """Base model, each expert alone, the uniform mixture, and the two oracles; cached per row.

        Each expert alone is its plain PEFT LoRA model and the base model the plain base model (the reference, one
        LoRA's cost per token); the uniform mixture (every expert at 1/16, dense by definition) is the X-LoRA model
        pinned to those weights, as the routing benchmark scores it.
        """
        from peft import PeftModel

        s = self.s
        n = len(self.domains)
        results: dict[str, Losses] = {}
        key = self._recipe(kind="library-plain")
        for d in self.domains:
            name = f"expert: {d}"

            def plain(d: str = d, name: str = name) -> Losses:
                model = PeftModel.from_pretrained(self.new_base(), self.expert_dirs[d]).eval()
                return evaluate(model, self.eval_set, s.eval_batch, name, True)

            results[name] = self._cached_losses(name, key, plain)
        results[BASE] = self._cached_losses(
            BASE, key, lambda: evaluate(self.new_base().eval(), self.eval_set, s.eval_batch, BASE, True)
        )
        uniform = {UNIFORM: torch.full((n,), 1.0 / n)}
        results[UNIFORM] = self._cached_losses(
            UNIFORM,
            self._recipe(kind="library-fixed", pinned=PINNED_DENSE.recipe()),
            lambda: evaluate_pinned(self.build_gate(PINNED_DENSE), self.eval_set, uniform, s.eval_batch, True)[
                UNIFORM
            ],
        )
        experts = {d: results[f"expert: {d}"] for d in self.domains}
        results[ORACLE], results[TOKEN_ORACLE] = oracles(experts, self.eval_set)
        return results

    def score_arrow2(self) -> dict[str, Losses]:
        """PEFT's training-free Arrow routing, top-2, over the library."""
        key = self._recipe(kind="arrow", top_k=2)
        losses = self._cached_losses(
            ARROW2, key, lambda: evaluate(self.arrow_model(2), self.eval_set, self.s.eval_batch, ARROW2, True)
        )
        return {ARROW2: losses}

    def inference_cost(self, gates: list[Variant], repeats: int = 5) -> dict[str, dict[str, Any]]:
        """CPU seconds per token of one forward over 1 x eval_seq_len held-out tokens, side by side.

        Each trained gate as trained (sparse top-2) and switched to the dense top-2 path (`update_config`), Arrow
        top-2 and the base model, timed in interleaved repeats after one warm-up each; CPU-time medians.
        """
        from peft_xlora.core.model import find_tuner

        models: dict[str, torch.nn.Module] = {}
        for v in gates:
            models[f"{v.label} (sparse)"] = self.load_gate(v)
            dense = self.load_gate(v)
            find_tuner(dense).update_config(topk_compute="dense")
            models[f"{v.label} (dense)"] = dense
        models[ARROW2] = self.arrow_model(2)
        models[BASE] = self.new_base().eval()
        ids = self.eval_set.mixed.input_ids[:1]  # (1, eval_seq_len)
        times: dict[str, list[float]] = {label: [] for label in models}
        with torch.no_grad():
            for model in models.values():
                model(input_ids=ids, use_cache=False)  # warm-up
            for _ in range(repeats):
                for label, model in models.items():
                    start = time.process_time()
                    model(input_ids=ids, use_cache=False)
                    times[label].append(time.process_time() - start)
        tokens = ids.numel()
        out = {}
        for label, t in times.items():
            median = sorted(t)[len(t) // 2]
            out[label] = {
                "median_cpu_s": round(median, 4),
                "cpu_s": [round(x, 4) for x in t],
                "tokens": tokens,
                "cpu_ms_per_token": round(1000 * median / tokens, 3),
            }
        return out


def domain_info(bench: LibraryBench, domain: str) -> dict[str, Any]:
    """Where a domain's text comes from, and its expert (folder, recipe, whether the cache had it)."""
    if domain in DEMO_DOMAINS:
        info = {
            "source": demo_data.SOURCES[domain],
            "package": "the demo's (docs/demo.md)",
            "licence": "see docs/demo.md",
        }
    else:
        d = corpora.DOMAINS[domain]
        info = {"source": d.source, "package": d.package, "licence": d.licence}
    s = bench.expert_settings(domain)
    info.update(
        expert=Path(bench.expert_dirs[domain]).name,
        expert_steps=s.expert_steps,
        expert_max_chars=s.max_chars,
        expert_cached_before_this_run=bench.cache_hits.get(f"expert {domain}"),
    )
    return info
