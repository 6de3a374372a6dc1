"""The routing benchmark (issue 25): LoRA experts on text domains the demo never used, gates, and their comparison.

It is the demo's engine (`peft_xlora.cli.demo.Demo`: base model, data, experts, router batches, built-in X-LoRA,
Arrow, evaluation, oracles, bootstrap) with other domains (`benchmarks/corpora.py`), more gates (`variants.py`),
and more columns (`metrics.py`: the tokens after each switch by distance). Everything it trains or scores is cached
under the demo's cache folder, keyed by what made it: experts per domain and settings, expert losses on the gate
batches (the distillation targets), gates, and per-variant held-out losses, so a rerun (or issue 26) reuses them.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks import corpora
from benchmarks.routing import features
from benchmarks.routing.metrics import MIXED_COLUMNS, bench_columns, check_targets, gaps, summary
from benchmarks.routing.variants import BASELINE, DEFAULTS_LABEL, RECIPE_LABEL, Variant
from peft_xlora.cli.demo import data as demo_data
from peft_xlora.cli.demo.evaluate import (
    Bootstrap,
    EvalSet,
    Losses,
    evaluate,
    evaluate_pinned,
    oracles,
    pinned_token_losses,
)
from peft_xlora.cli.demo.run import Demo
from peft_xlora.cli.demo.settings import DemoSettings
from peft_xlora.cli.demo.train import load_trainable_state, train_steps, trainable_state
from peft_xlora.core.distillation import gate_cross_entropy, soft_targets
from peft_xlora.core.model import find_tuner

BASE = "base model"
UNIFORM = "uniform mixture"
ARROW1, ARROW2 = "Arrow top-1", "Arrow top-2"
BUILTIN = "PEFT built-in X-LoRA"
ORACLE = "segment oracle"
TOKEN_ORACLE = "per-token oracle"

# SmolLM2-135M: the demo's expert recipe and data sizes; the gate batches of every variant come from one stream,
# long enough for the longest training (100 steps). Evaluation: 4 windows of 256 tokens per domain and 12 mixed
# documents of 4 segments (36 switches) per seed.
REAL = DemoSettings(
    router_steps=100,
    router_lr=1e-3,
    router_depth=1,
    router_size=2048,
    router_layerwise=False,
    scaling_pass_layers=None,
    router_distillation_coef=0.0,
    eval_pure=4,
    eval_mixed=12,
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
    expert_steps=4,
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
MAX_DOCS = {False: 300, True: 30}
# The check on the demo's own domains: the demo's experts (its text size, so its cached experts are reused) and its
# `--thorough` held-out set (16 windows per domain, 24 mixed documents of 3 segments).
DEMO_DOMAINS = {False: ("shakespeare", "codecs", "pydoc"), True: ("prose", "arithmetic", "shouting")}
DEMO_CHECK = replace(REAL, max_chars=60_000, eval_pure=16, eval_mixed=24, eval_segments=3)
DEMO_CHECK_TINY = replace(TINY, max_chars=60_000, eval_segments=3)
# Gate-training lengths whose distillation targets may be cached (a shorter one is a prefix of a longer one).
TARGET_STEPS = (30, 50, 100, 200)


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def distillation(
    logits: torch.Tensor, expert_losses: torch.Tensor, temperature: float, softmax_temperature: float
) -> torch.Tensor:
    """The library's distillation term (`peft_xlora.core.distillation`) from precomputed expert losses.

    Args:
        logits: The classifier's logits of the forward, (batch, seq, n_layers|1, n_experts), with grad.
        expert_losses: Every expert's own loss on each next token, (batch, seq - 1, n_experts).
        temperature: Of the target softmax(-loss / T).
        softmax_temperature: The gate's softmax temperature.
    """
    targets = soft_targets(expert_losses, temperature)  # (batch, seq - 1, n_experts)
    valid = torch.ones(targets.shape[:2], dtype=torch.bool)
    return gate_cross_entropy(logits, targets, softmax_temperature, valid)


class RoutingBench(Demo):
    """One seed of the routing benchmark.

    Args:
        settings: Data, expert and evaluation settings (`REAL` or `TINY`); the gates' own settings are the variants'.
        cache_dir: The demo's cache folder.
        domains: Corpus domains (`benchmarks/corpora.py`), at least two.
        seed: Seed of the gates (initialisation and batches) and of the held-out mixed documents; the experts and the
            pure held-out windows are the same for every seed.
        quiet: No progress bars.
        log: Where progress lines go.
    """

    def __init__(
        self,
        settings: DemoSettings,
        cache_dir: Path,
        domains: list[str],
        seed: int = 0,
        quiet: bool = True,
        log: Callable = print,
    ) -> None:
        super().__init__(settings, cache_dir, cache_dir / "routing-out", quiet=quiet, log=log)
        self.domain_names = list(domains)
        self.demo_domains = set(domains) <= set(DEMO_DOMAINS[settings.tiny])
        self.seed = seed
        self.max_docs = MAX_DOCS[settings.tiny]
        self.gate_cpu_s: dict[str, float] = {}

    # ------------------------------------------------------------------ the demo's hooks

    def read_domains(self) -> demo_data.Split:
        """The corpus domains instead of the demo's (or the demo's own, for the check on them)."""
        if self.demo_domains:
            split = demo_data.tiny_domains(self.s.seed) if self.s.tiny else demo_data.real_domains(self.s.max_chars)
            return {d: split[d] for d in self.domain_names}
        return corpora.read_domains(self.domain_names, self.s.max_chars, self.max_docs)

    def source_of(self, domain: str) -> str | None:
        """The corpus's description of the domain (and the document cap): part of the expert's cache key.

        On the demo's domains, the demo's own description, so the demo's cached experts are the ones used.
        """
        if self.demo_domains:
            return super().source_of(domain)
        return f"{corpora.DOMAINS[domain].source}; max_docs={self.max_docs}"

    def prepare(self) -> None:
        """Base model, data (with this seed's mixed documents) and experts."""
        self._stage("base model", self.prepare_base)
        from transformers import AutoConfig

        self.n_decoder_layers = AutoConfig.from_pretrained(self.base_dir).num_hidden_layers
        self._stage("data", self.prepare_data)
        if self.seed:
            g = torch.Generator().manual_seed(1000 * self.seed + self.s.seed + 1)
            source = {d: self.held[d][self.s.eval_pure :] for d in self.domains}
            mixed = demo_data.mixed_documents(source, self.s.eval_mixed, self.s.eval_seq_len, self.s.eval_segments, g)
            self.eval_set = EvalSet(self.eval_set.pure, mixed)
        self._stage("experts", self.prepare_experts)

    # ------------------------------------------------------------------ keys and files

    def _experts_key(self) -> list[str]:
        return sorted(Path(p).name for p in self.expert_dirs.values())

    def _gate_key(self, recipe: dict[str, Any]) -> str:
        s = self.s
        return self._recipe(
            bench="routing",
            experts=self._experts_key(),
            seed_gate=self.seed,
            train_segments=s.train_segments,
            **recipe,
        )

    def _eval_key(self) -> str:
        s = self.s
        return self._recipe(
            experts=self._experts_key(),
            seed_eval=self.seed,
            eval=s.recipe("eval_seq_len", "eval_pure", "eval_mixed", "eval_segments"),
        )

    def _cached_losses(self, name: str, key: str, compute: Callable[[], Losses]) -> Losses:
        path = self.cache_dir / "routing-losses" / f"{_slug(name)}-{key}-{self._eval_key()}.pt"
        if path.is_file():
            data = torch.load(path, weights_only=True)
            return Losses(pure=data["pure"], mixed=data["mixed"])
        start = time.process_time()
        losses = compute()
        self.log(f"   scored {name} in {time.process_time() - start:.0f} CPU s")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"pure": losses.pure, "mixed": losses.mixed}, tmp)
        tmp.replace(path)
        return losses

    # ------------------------------------------------------------------ gates

    def layer(self, k: int) -> int:
        """Decoder layer k of SmolLM2's 30, scaled to the tiny model's depth for the smoke version."""
        if not self.s.tiny:
            return k
        return max(1, min(self.n_decoder_layers, math.ceil(k * self.n_decoder_layers / 30)))

    def gate_options(self, v: Variant) -> dict[str, Any]:
        """`XLoraConfig` arguments of a variant: its options over `BASELINE`, experts in domain order.

        `BASELINE`, not the config's current defaults: a gate and its cache key do not change with those.
        """
        options = {**BASELINE, **v.options}
        if options.get("scaling_pass_layers") is not None:
            options["scaling_pass_layers"] = self.layer(options["scaling_pass_layers"])
        return {"adapters": {d: self.expert_dirs[d] for d in self.domains}, **options}

    def build_gate(self, v: Variant) -> torch.nn.Module:
        """A fresh X-LoRA model of the variant (untrained gate), with the multi-layer prototype if it has one."""
        from peft import get_peft_model

        from peft_xlora.core.config import XLoraConfig

        model = get_peft_model(self.new_base(), XLoraConfig(task_type="CAUSAL_LM", **self.gate_options(v)))
        if v.extra_layers:
            features.install(model, tuple(self.layer(k) for k in v.extra_layers))
        return model

    def expert_targets(self, steps: int) -> list[torch.Tensor]:
        """Every expert's per-token loss on the first `steps` gate batches of this seed, (batch, seq - 1, n) each.

        The same numbers the library's distillation term computes inside each forward (every expert scored alone,
        `expert_token_losses`), computed once per batch and shared by every variant that distils.
        """
        path = self._targets_file(steps)
        if path.is_file():
            return torch.load(path, weights_only=True)
        # The gate batches are one stream per seed, so the targets of a shorter training are the first batches of a
        # longer one: start from the longest cached prefix (or slice a longer one) instead of scoring them again.
        prefix: list[torch.Tensor] = []
        for other in TARGET_STEPS:
            if other != steps and self._targets_file(other).is_file():
                cached = torch.load(self._targets_file(other), weights_only=True)
                if len(cached) >= steps:
                    return cached[:steps]
                if len(cached) > len(prefix):
                    prefix = cached
        model = self.build_gate(Variant("targets"))
        n = len(self.domains)
        out = list(prefix)
        start = time.process_time()
        for i, ids in enumerate(self.router_batches(self.seed + 30, steps)):
            if i < len(prefix):
                continue
            losses = pinned_token_losses(model, ids, torch.eye(n), ids.shape[0])  # (n, batch, seq - 1)
            out.append(losses.permute(1, 2, 0).contiguous())
        self.log(
            f"   expert losses on gate batches {len(prefix) + 1}-{steps}: {time.process_time() - start:.0f} CPU s"
        )
        del model
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.replace(path)
        return out

    def _targets_file(self, steps: int) -> Path:
        key = self._recipe(bench="routing-targets", experts=self._experts_key(), seed_gate=self.seed, steps=steps)
        return self.cache_dir / "routing-targets" / f"{key}.pt"

    def gate_file(self, v: Variant) -> Path:
        """Where the variant's trained gate (its trainable parameters) is cached."""
        return self.cache_dir / "routing-gates" / f"{_slug(v.label)}-{self._gate_key(v.recipe())}.pt"

    def train_gate(self, v: Variant) -> Path:
        """Trains the variant's gate on this seed's batches (language-model loss + distillation), unless cached."""
        path = self.gate_file(v)
        if path.is_file():
            return path
        targets = self.expert_targets(v.steps) if v.distillation else None
        torch.manual_seed(self.seed + 20)
        model = self.build_gate(v)
        tuner = find_tuner(model)
        captured: dict[str, torch.Tensor] = {}
        tuner.xlora_classifier.register_forward_hook(lambda m, a, out: captured.__setitem__("logits", out))
        step = iter(range(v.steps))

        def loss_fn(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
            i = next(step)
            loss = m(input_ids=ids, labels=ids).loss
            if targets is None:
                return loss
            softmax_temperature = tuner.xlora_config.softmax_temperature
            return loss + v.distillation * distillation(
                captured["logits"], targets[i], v.temperature, softmax_temperature
            )

        start = time.process_time()
        batches = self.router_batches(self.seed + 30, v.steps)
        losses = train_steps(model, batches, v.steps, v.lr, v.label, loss_fn=loss_fn, quiet=self.quiet)
        self.gate_cpu_s[v.label] = round(time.process_time() - start, 1)
        self.log(
            f"   {v.label}: loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f} ({self.gate_cpu_s[v.label]} CPU s)"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state": trainable_state(model), "losses": losses, "cpu_s": self.gate_cpu_s[v.label]}, tmp)
        tmp.replace(path)
        return path

    def load_gate(self, v: Variant) -> torch.nn.Module:
        """The variant's model with its trained gate, in eval mode."""
        model = self.build_gate(v)
        load_trainable_state(model, torch.load(self.gate_file(v), weights_only=True)["state"])
        return model.eval()

    def builtin_file(self) -> Path:
        """Where PEFT's built-in X-LoRA gate of this seed is cached (trained like the defaults: 100 steps, 1e-3)."""
        s = self.s
        recipe = s.recipe("router_steps", "router_lr", "router_depth", "router_size", "router_layerwise")
        return self.cache_dir / "routing-gates" / f"peft-builtin-{self._gate_key({'builtin': recipe})}.pt"

    def train_builtin(self) -> Path:
        """Trains PEFT's built-in X-LoRA gate on this seed's batches, unless cached."""
        s = self.s
        path = self.builtin_file()
        if path.is_file():
            return path
        torch.manual_seed(self.seed + 20)
        model = self._builtin_model()
        start = time.process_time()
        batches = self.router_batches(self.seed + 30, s.router_steps)
        losses = train_steps(model, batches, s.router_steps, s.router_lr, BUILTIN, quiet=self.quiet)
        self.gate_cpu_s[BUILTIN] = round(time.process_time() - start, 1)
        self.log(
            f"   {BUILTIN}: loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f} ({self.gate_cpu_s[BUILTIN]} CPU s)"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state": trainable_state(model), "losses": losses, "cpu_s": self.gate_cpu_s[BUILTIN]}, tmp)
        tmp.replace(path)
        return path

    def cached_train_cpu_s(self, variants: list[Variant]) -> dict[str, float]:
        """CPU seconds each gate's training took when it was trained (recorded in its cached file), by label.

        A rerun from the cache keeps the training costs in its result file; they were measured under the load of
        the run that trained the gate (that run's result file has its load average).
        """
        files = {v.label: self.gate_file(v) for v in variants}
        files[BUILTIN] = self.builtin_file()
        out = {}
        for label, path in files.items():
            if path.is_file():
                cpu_s = torch.load(path, weights_only=True).get("cpu_s")
                if cpu_s is not None:
                    out[label] = cpu_s
        return out

    # ------------------------------------------------------------------ evaluation

    def score_baselines(self) -> dict[str, Losses]:
        """Base model, each expert alone, the uniform mixture, Arrow top-1/2, PEFT's built-in X-LoRA, the oracles."""
        return {**self.score_fixed(), **self.score_arrow(), BUILTIN: self.score_builtin()}

    def score_fixed(self) -> dict[str, Losses]:
        """The base model, each expert alone, the uniform mixture (one batched pass), and the two oracles."""
        s = self.s
        results: dict[str, Losses] = {}
        n = len(self.domains)
        fixed = {f"expert: {d}": torch.eye(n)[i] for i, d in enumerate(self.domains)}
        fixed[UNIFORM] = torch.full((n,), 1.0 / n)
        fixed[BASE] = torch.zeros(n)  # every expert at 0: the base model
        names = list(fixed)
        key = self._recipe(kind="fixed", names=names)

        pinned: dict[str, Losses] = {}

        def fixed_losses(name: str) -> Losses:
            if not pinned:  # every fixed mixture in one batched pass, the first time one is missing from the cache
                model = self.build_gate(Variant("pinned"))
                pinned.update(evaluate_pinned(model, self.eval_set, fixed, s.eval_batch, quiet=self.quiet))
            return pinned[name]

        for name in names:
            results[name] = self._cached_losses(name, key, lambda name=name: fixed_losses(name))
        experts = {d: results[f"expert: {d}"] for d in self.domains}
        results[ORACLE], results[TOKEN_ORACLE] = oracles(experts, self.eval_set)
        return results

    def score_arrow(self) -> dict[str, Losses]:
        """PEFT's training-free Arrow routing, top-1 and top-2."""
        s = self.s
        results = {}
        for k, name in ((1, ARROW1), (2, ARROW2)):
            akey = self._recipe(kind="arrow", top_k=k)
            results[name] = self._cached_losses(
                name,
                akey,
                lambda k=k, name=name: evaluate(self.arrow_model(k), self.eval_set, s.eval_batch, name, True),
            )
        return results

    def score_builtin(self) -> Losses:
        """PEFT's built-in X-LoRA (its gate trained first if needed)."""
        self.train_builtin()

        def builtin() -> Losses:
            model = self._builtin_model()
            load_trainable_state(model, torch.load(self.builtin_file(), weights_only=True)["state"])
            return evaluate(model.eval(), self.eval_set, self.s.eval_batch, BUILTIN, True)

        return self._cached_losses(BUILTIN, self.builtin_file().stem, builtin)

    def score_variant(self, v: Variant) -> Losses:
        """The variant's held-out losses (training its gate first if needed)."""
        self.train_gate(v)
        return self._cached_losses(
            v.label,
            self.gate_file(v).stem.split("-")[-1],
            lambda: evaluate(self.load_gate(v), self.eval_set, self.s.eval_batch, v.label, True),
        )

    def gate_cost(self, variants: list[Variant], repeats: int = 3) -> dict[str, dict[str, Any]]:
        """CPU seconds of one forward (1 x eval_seq_len tokens) per variant: medians of interleaved repeats."""
        models = {v.label: self.load_gate(v) for v in variants}
        ids = self.eval_set.mixed.input_ids[:1]
        times: dict[str, list[float]] = {label: [] for label in models}
        with torch.no_grad():
            for model in models.values():
                model(input_ids=ids, use_cache=False)  # warm-up
            for _ in range(repeats):
                for label, model in models.items():
                    start = time.process_time()
                    model(input_ids=ids, use_cache=False)
                    times[label].append(time.process_time() - start)
        return {
            label: {"median_cpu_s": sorted(t)[len(t) // 2], "cpu_s": [round(x, 4) for x in t], "tokens": ids.numel()}
            for label, t in times.items()
        }


def report(results: dict[str, Losses], data: EvalSet, n_boot: int, seed: int, ours: list[str]) -> dict[str, Any]:
    """Tables, gaps, intervals, paired differences against Arrow top-1 and PEFT's built-in, and the targets."""
    table = summary(results, data)
    boot = Bootstrap(data, n_boot, seed, columns=bench_columns)
    intervals = boot.intervals(results)
    rivals = [r for r in (ARROW1, BUILTIN) if r in results]  # a partial file may not have the built-in yet

    # Every other gate is also compared with the defaults, paired: what the evidence for a new default needs; and a
    # gate made from the demo's recipe ("recipe - ...", "recipe, ...") with the recipe, the gate it changes.
    def rivals_of(label: str) -> list[str]:
        out = [*rivals, DEFAULTS_LABEL] if DEFAULTS_LABEL in results and label != DEFAULTS_LABEL else list(rivals)
        if label.startswith("recipe") and RECIPE_LABEL in results:
            out.append(RECIPE_LABEL)
        return out

    paired = {label: boot.paired(results, label, rivals_of(label)) for label in ours}
    targets = {label: check_targets(table, paired[label], label, ORACLE, rivals) for label in ours}
    return {
        "table": table,
        "gaps": gaps(table, ORACLE),
        "intervals_95": intervals,
        "paired_95": paired,  # ours -> rival -> column -> [mean difference, low, high] (negative: ours better)
        "targets": targets,
        "columns": [*data.pure, "pure mean", *MIXED_COLUMNS],
    }


def pooled(per_seed: list[tuple[dict[str, Losses], EvalSet]]) -> tuple[dict[str, Losses], EvalSet]:
    """Several seeds' held-out sets and losses as one set of documents (for intervals over documents and seeds)."""
    names = set.intersection(*(set(r) for r, _ in per_seed))
    first = per_seed[0][1]
    data = EvalSet(
        pure={d: torch.cat([e.pure[d] for _, e in per_seed]) for d in first.pure},
        mixed=demo_data.MixedBatch(
            torch.cat([e.mixed.input_ids for _, e in per_seed]), torch.cat([e.mixed.domains for _, e in per_seed])
        ),
    )
    results = {
        name: Losses(
            pure={d: torch.cat([r[name].pure[d] for r, _ in per_seed]) for d in first.pure},
            mixed=torch.cat([r[name].mixed for r, _ in per_seed]),
        )
        for name in sorted(names)
    }
    return results, data


def to_json(obj: Any) -> Any:
    """Floats rounded for the result file."""
    if isinstance(obj, float):
        return round(obj, 5)
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    return obj


def dump(path: Path, data: Any) -> None:
    """A plain JSON file (for the logs beside a result file)."""
    path.write_text(json.dumps(to_json(data), indent=2))
