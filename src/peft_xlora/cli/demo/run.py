"""The demo pipeline: experts per domain -> X-LoRA gate -> held-out comparison table -> heatmap -> generations."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from . import base as base_models
from . import data as demo_data
from .evaluate import (
    Bootstrap,
    EvalSet,
    Losses,
    check_targets,
    evaluate,
    evaluate_pinned,
    markdown_paired,
    markdown_table,
    oracles,
    summarise,
)
from .precision import resolve_precision
from .settings import DemoSettings
from .train import load_trainable_state, recipe_key, train_lora_expert, train_steps, trainable_state

ORACLE = "oracle"
TOKEN_ORACLE = "per-token oracle"
OURS = "X-LoRA (peft-xlora)"
BASE = "base model"
ARROW = ["Arrow top-1", "Arrow top-2"]
BUILTIN = "PEFT built-in X-LoRA"

# Our X-LoRA variants: table row -> XLoraConfig settings on top of the demo's gate settings. Each gets its own gate,
# trained the same way, cached under its own recipe and evaluated; the targets are checked for OURS. A new routing
# mode is one more entry, e.g. "X-LoRA, single pass": {"routing": "single_pass"}.
VARIANTS: dict[str, dict[str, Any]] = {OURS: {}}


class Demo:
    """One run of the demo; each stage reuses what an earlier run cached under `cache_dir` for the same recipe.

    Args:
        settings: What to train and measure.
        cache_dir: Folder of the cached base model, experts and gates (kept between runs).
        out_dir: Where the table, the heatmap and the generations are written.
        quiet: No progress bars.
        log: Where progress lines go.
    """

    def __init__(
        self, settings: DemoSettings, cache_dir: Path, out_dir: Path, quiet: bool = False, log: Callable = print
    ) -> None:
        self.s, self.cache_dir, self.out_dir, self.quiet, self.log = (
            replace(settings, precision=resolve_precision(settings.precision, settings.tiny)),
            Path(cache_dir),
            Path(out_dir),
            quiet,
            log,
        )
        self.timings: dict[str, float] = {}
        self.cpu_times: dict[str, float] = {}  # CPU seconds: comparable across runs when other work shares the cores
        self.cache_hits: dict[str, bool] = {}

    # ------------------------------------------------------------------ stages

    def run(self) -> dict[str, Any]:
        """Runs every stage; returns the table, the target checks, the timings and the output paths."""
        start, cpu = time.perf_counter(), time.process_time()
        torch.manual_seed(self.s.seed)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._stage("base model", self.prepare_base)
        self._stage("data", self.prepare_data)
        self._stage("experts", self.prepare_experts)
        self._stage("X-LoRA gate", self.prepare_xlora)
        self._stage("built-in X-LoRA gate", self.prepare_builtin)
        results = self._stage("evaluation", self.evaluate_all)
        table = summarise(results, self.eval_set)
        boot = Bootstrap(self.eval_set, self.s.n_boot, self.s.seed)
        intervals = boot.intervals(results)
        paired = boot.paired(results, OURS, [*ARROW, BUILTIN])
        names = {"ours": OURS, "oracle": ORACLE, "base": BASE, "arrow": ARROW, "builtin": BUILTIN}
        checks = check_targets(table, paired, list(self.eval_set.pure), names)
        heatmap = self._stage("heatmap", self.heatmap)
        generations = self._stage("generation", self.generate)
        self.timings["total"] = time.perf_counter() - start
        self.cpu_times["total"] = time.process_time() - cpu
        report = {
            "table": table,
            "intervals_95": intervals,  # bootstrap over documents
            "paired_95": paired,  # ours minus each rival: [mean difference, low, high]
            "checks": checks,
            "precision": self.s.precision,
            "timings_s": {k: round(v, 1) for k, v in self.timings.items()},
            "cpu_s": {k: round(v, 1) for k, v in self.cpu_times.items()},
            "eval_s": self.eval_times,  # wall seconds of each variant's held-out pass
            "threads": torch.get_num_threads(),
            "cache_hits": self.cache_hits,
            "settings": self.s.recipe(),
            "heatmap": str(heatmap),
            "routing_match": round(self.routing_match, 3),  # on the heatmap's document
            "generations": generations,
        }
        self.write_report(report)
        return report

    def _stage(self, name: str, fn: Callable[[], Any]) -> Any:
        self.log(f"== {name}")
        t, cpu = time.perf_counter(), time.process_time()
        # Autocast caches the bf16 copy of each weight for the whole stage (a decoding step would otherwise cast the
        # whole model again); `train_steps` drops the copies after every update.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.s.precision == "bf16"):
            out = fn()
        self.timings[name] = time.perf_counter() - t
        self.cpu_times[name] = time.process_time() - cpu
        self.log(f"   {name}: {self.timings[name]:.1f} s (CPU {self.cpu_times[name]:.1f} s)")
        return out

    def prepare_base(self) -> None:
        """Finds (or makes, once) the base model's folder and loads its tokenizer."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if self.s.tiny:
            self.base_dir = base_models.tiny_base(self.cache_dir, self.s.seed)
        else:
            self.base_dir = base_models.smollm_base(self.cache_dir, self.log)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        except (OSError, ValueError, KeyError) as exc:  # a damaged cache folder
            raise base_models.DemoSetupError(base_models.damaged_cache(self.base_dir, exc)) from exc
        self.model_id = self.base_dir.name

    def new_base(self) -> torch.nn.Module:
        """A fresh copy of the base model (each variant adapts its own)."""
        return base_models.load_base(self.base_dir)

    def prepare_data(self) -> None:
        """Tokenizes train and held-out text per domain and builds the mixed documents."""
        s = self.s
        split = self.read_domains()
        rng = random.Random(s.seed)
        n_train = (s.expert_steps + s.router_steps) * s.batch_size * s.seq_len
        n_eval = (s.eval_pure + s.eval_mixed) * s.eval_seq_len
        self.train_chunks, held = {}, {}
        for domain, (train_docs, held_docs) in split.items():
            train_docs, held_docs = list(train_docs), list(held_docs)
            rng.shuffle(train_docs)
            rng.shuffle(held_docs)
            stream = demo_data.token_stream(self.tokenizer, train_docs, n_train)
            self.train_chunks[domain] = demo_data.chunks(stream, s.seq_len)
            held[domain] = demo_data.chunks(demo_data.token_stream(self.tokenizer, held_docs, n_eval), s.eval_seq_len)
            if held[domain].shape[0] < s.eval_pure + 1:
                raise demo_data.DataError(f"Too little held-out text for domain {domain!r}.")
        self.domains = list(split)
        g = torch.Generator().manual_seed(s.seed + 1)
        # Mixed held-out documents are cut from held-out windows not used for the pure evaluation.
        self.held = held  # domain -> (n, eval_seq_len) held-out windows
        mixed_source = {d: held[d][s.eval_pure :] for d in self.domains}
        mixed = demo_data.mixed_documents(mixed_source, s.eval_mixed, s.eval_seq_len, s.eval_segments, g)
        self.eval_set = EvalSet({d: held[d][: s.eval_pure] for d in self.domains}, mixed)
        counts = ", ".join(f"{d} {c.shape[0]}x{s.seq_len}" for d, c in self.train_chunks.items())
        self.log(f"   train windows: {counts}; held out: {s.eval_pure} pure per domain, {s.eval_mixed} mixed")

    def read_domains(self) -> demo_data.Split:
        """The domains' train and held-out documents (another benchmark overrides this and `source_of`)."""
        return demo_data.tiny_domains(self.s.seed) if self.s.tiny else demo_data.real_domains(self.s.max_chars)

    def source_of(self, domain: str) -> str | None:
        """Where a domain's text comes from, in words: part of its expert's cache key (None for `--tiny`)."""
        return None if self.s.tiny else demo_data.SOURCES[domain]

    def _recipe(self, **extra: Any) -> str:
        shared = self.s.recipe("tiny", "seed", "seq_len", "batch_size", "max_chars", "precision")
        base = {"model": self.model_id, **shared}
        return recipe_key({**base, **extra})

    def prepare_experts(self) -> None:
        """Trains one LoRA expert per domain, or reuses the cached one."""
        for i, domain in enumerate(self.domains):
            self.prepare_expert(i, domain)

    def prepare_expert(self, i: int, domain: str) -> None:
        """Trains the LoRA expert of the `i`-th domain, unless the cache has it; records its folder."""
        s = self.s
        if not hasattr(self, "expert_dirs"):
            self.expert_dirs: dict[str, str] = {}
        source = self.source_of(domain)
        key = self._recipe(domain=domain, source=source, steps=s.expert_steps, lr=s.expert_lr, lora=s.lora)
        path = self.cache_dir / "experts" / f"{domain}-{key}"
        self.expert_dirs[domain] = str(path)
        self.cache_hits[f"expert {domain}"] = path.is_dir()
        if path.is_dir():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(s.seed + 10 + i)
        batches = demo_data.batches(self.train_chunks[domain], s.batch_size, s.expert_steps, g)
        torch.manual_seed(s.seed + 10 + i)
        losses = train_lora_expert(
            self.new_base(), batches, path, s.expert_steps, s.expert_lr, s.lora, f"expert {domain}", quiet=self.quiet
        )
        self.log(f"   expert {domain}: loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f}")

    def router_batches(self, seed: int, steps: int | None = None):
        """Training batches of the gates: half mixed-domain sequences, half pure ones."""
        s = self.s
        g = torch.Generator().manual_seed(seed)
        n_mixed = max(1, s.batch_size // 2)
        for _ in range(s.router_steps if steps is None else steps):
            mixed = demo_data.mixed_documents(self.train_chunks, n_mixed, s.seq_len, s.train_segments, g).input_ids
            pure = []
            for _ in range(s.batch_size - n_mixed):
                domain = self.domains[int(torch.randint(len(self.domains), (1,), generator=g))]
                chunks = self.train_chunks[domain]
                pure.append(chunks[int(torch.randint(chunks.shape[0], (1,), generator=g))])
            yield torch.cat([mixed, torch.stack(pure)]) if pure else mixed

    def _router_recipe(self, kind: str, extra: dict[str, Any] | None = None) -> str:
        s = self.s
        experts = sorted(Path(p).name for p in self.expert_dirs.values())
        return self._recipe(
            kind=kind,
            experts=experts,
            **(extra or {}),
            **s.recipe(
                "router_steps", "router_lr", "router_depth", "router_size", "router_layerwise", "train_segments"
            ),
        )

    def prepare_xlora(self) -> None:
        """Builds and trains the gate of each of our variants (`VARIANTS`), or reuses the cached checkpoints."""
        self.xlora_dirs: dict[str, Path] = {}
        for label, options in VARIANTS.items():
            self.prepare_variant(label, options)

    def prepare_variant(self, label: str, options: dict[str, Any]) -> None:
        """Trains one of our X-LoRA gates (distillation pretraining, then the usual training), unless cached."""
        from peft import get_peft_model

        from ...core.config import XLoraConfig
        from ...core.training import distillation_loss

        s = self.s
        ours = s.recipe(
            "scaling_pass_layers",
            "router_distillation_coef",
            "router_distillation_temperature",
            "router_pretrain_steps",
        )
        path = self.cache_dir / f"xlora-{self._router_recipe('peft-xlora', {**ours, 'options': options})}"
        self.xlora_dirs[label] = path
        self.cache_hits[label] = path.is_dir()
        if path.is_dir():
            return
        config = XLoraConfig(task_type="CAUSAL_LM", **self.gate_config(options))
        torch.manual_seed(s.seed + 20)
        model = get_peft_model(self.new_base(), config)
        if s.router_pretrain_steps:
            # Distillation alone first (no main pass), on other batches than the usual training's.
            losses = train_steps(
                model,
                self.router_batches(s.seed + 40, s.router_pretrain_steps),
                s.router_pretrain_steps,
                s.router_lr,
                f"{label}: distillation",
                loss_fn=lambda m, ids: distillation_loss(m, input_ids=ids),
                quiet=self.quiet,
            )
            self.log(f"   {label} distillation: {losses[0]:.3f} -> {sum(losses[-5:]) / len(losses[-5:]):.3f}")
        losses = train_steps(
            model, self.router_batches(s.seed + 30), s.router_steps, s.router_lr, f"{label} gate", quiet=self.quiet
        )
        self.log(f"   {label} gate: loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f}")
        model.save_pretrained(path)

    def gate_config(self, options: dict[str, Any]) -> dict[str, Any]:
        """`XLoraConfig` arguments of one of our gates: the demo's gate settings, then `options` on top."""
        s = self.s
        return {
            "adapters": {d: self.expert_dirs[d] for d in self.domains},  # gate order = domain order
            "xlora_depth": s.router_depth,
            "xlora_size": s.router_size,
            "xlora_dropout_p": 0.0,
            "layerwise_scalings": s.router_layerwise,
            "scaling_pass_layers": s.scaling_pass_layers,
            "router_distillation_coef": s.router_distillation_coef,
            "router_distillation_temperature": s.router_distillation_temperature,
            **options,
        }

    def _builtin_model(self) -> torch.nn.Module:
        from peft import XLoraConfig as BuiltinXLoraConfig
        from peft import get_peft_model

        s = self.s
        base = self.new_base()
        base.config.use_cache = False  # PEFT's built-in X-LoRA refuses a model that caches
        # It needs experts named "0".."n-1".
        config = BuiltinXLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=base.config.hidden_size,
            adapters={str(i): self.expert_dirs[d] for i, d in enumerate(self.domains)},
            xlora_depth=s.router_depth,
            xlora_size=s.router_size,
            xlora_dropout_p=0.0,
            layerwise_scalings=s.router_layerwise,
        )
        return get_peft_model(base, config)

    def prepare_builtin(self) -> None:
        """Trains PEFT's built-in X-LoRA gate the same way (same data, steps, optimiser), or reuses the cache.

        Its own `save_pretrained` loses classifier layers (see FACTS), so the trainable weights are cached directly.
        """
        s = self.s
        self.builtin_file = self.cache_dir / f"peft-builtin-xlora-{self._router_recipe('peft-builtin')}.pt"
        self.cache_hits["built-in X-LoRA"] = self.builtin_file.is_file()
        if self.builtin_file.is_file():
            return
        torch.manual_seed(s.seed + 20)
        model = self._builtin_model()
        losses = train_steps(
            model,
            self.router_batches(s.seed + 30),
            s.router_steps,
            s.router_lr,
            "built-in X-LoRA gate",
            quiet=self.quiet,
        )
        self.log(f"   built-in X-LoRA gate: loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f}")
        tmp = self.builtin_file.with_suffix(".tmp")
        torch.save(trainable_state(model), tmp)
        tmp.replace(self.builtin_file)

    def load_xlora(self, label: str = OURS) -> torch.nn.Module:
        """One of our trained X-LoRA models, reloaded from its checkpoint."""
        from peft import PeftModel

        try:
            return PeftModel.from_pretrained(self.new_base(), self.xlora_dirs[label]).eval()
        except ValueError as exc:  # CheckpointError: a damaged cached checkpoint
            raise base_models.DemoSetupError(base_models.damaged_cache(self.xlora_dirs[label], exc)) from exc

    def evaluate_all(self) -> dict[str, Losses]:
        """Per-token held-out losses of every variant, plus the oracles."""
        s = self.s
        self.eval_times: dict[str, float] = {}

        def timed(name: str, fn: Callable[[], Any]) -> Any:
            start = time.perf_counter()
            out = fn()
            self.eval_times[name] = round(time.perf_counter() - start, 1)
            return out

        def ev(model: torch.nn.Module, name: str) -> Losses:
            return timed(name, lambda: evaluate(model, self.eval_set, s.eval_batch, name, quiet=self.quiet))

        results: dict[str, Losses] = {}
        self.xlora = model = self.load_xlora(OURS)
        with model.disable_adapter():
            results[BASE] = ev(model, BASE)
        # Each expert alone and the uniform mixture: one batched forward, each row pinned to its own mixture.
        names = list(model.base_model.expert_names)  # the gate's order
        n = len(names)
        fixed = {f"expert: {d}": torch.eye(n)[names.index(d)] for d in self.domains}
        fixed["uniform mixture"] = torch.full((n,), 1.0 / n)
        pinned = timed(
            "experts + uniform (one pass)",
            lambda: evaluate_pinned(model, self.eval_set, fixed, s.eval_batch, quiet=self.quiet),
        )
        results.update(pinned)
        experts = {d: pinned[f"expert: {d}"] for d in self.domains}
        for k, name in zip((1, 2), ARROW):
            arrow = self.arrow_model(k)
            results[name] = ev(arrow, name)
            del arrow
        builtin = self._builtin_model()
        load_trainable_state(builtin, torch.load(self.builtin_file, weights_only=True))
        results[BUILTIN] = ev(builtin.eval(), BUILTIN)
        del builtin
        for label in VARIANTS:
            results[label] = ev(model if label == OURS else self.load_xlora(label), label)
        results[ORACLE], results[TOKEN_ORACLE] = oracles(experts, self.eval_set)
        return results

    def arrow_model(self, top_k: int) -> torch.nn.Module:
        """PEFT's training-free Arrow routing over the experts (top-k), in eval mode."""
        from peft import ArrowConfig, create_arrow_model

        s = self.s
        torch.manual_seed(s.seed)
        arrow = create_arrow_model(
            self.new_base(), [self.expert_dirs[d] for d in self.domains], ArrowConfig(top_k=top_k, rng_seed=s.seed)
        ).eval()
        if s.precision == "bf16":
            # PEFT's Arrow fails under autocast (it scatters bf16 scores into a float32 tensor) unless its LoRA
            # weights are bf16 already; autocast would run those matmuls in bf16 anyway.
            for pname, param in arrow.named_parameters():
                if "lora_" in pname:
                    param.data = param.data.to(torch.bfloat16)
        return arrow

    def heatmap(self) -> Path:
        """Gating heatmap (tokens x experts) of our X-LoRA on the first held-out mixed document."""
        from .report import gating_heatmap

        ids = self.eval_set.mixed.input_ids[:1]
        with torch.no_grad():
            self.xlora(input_ids=ids, use_cache=False)
        # (seq, n_experts), averaged over layers, columns in domain order (a cached gate may order its experts
        # differently: its checkpoint keeps the order it was built with).
        scalings = self.xlora.get_latest_scalings()[0].mean(dim=1)[:, self._gate_columns()]
        tokens = [self.tokenizer.decode([t]) for t in ids[0].tolist()]
        path = self.out_dir / "gating_heatmap.png"
        domains = self.eval_set.mixed.domains[0]
        gating_heatmap(scalings, tokens, self.domains, domains, path)
        # Share of the document's tokens whose largest weight goes to their own domain's expert (chance: 1/3).
        self.routing_match = (scalings.argmax(-1) == domains).float().mean().item()
        self.log(f"   gate's top expert is the token's own domain on {100 * self.routing_match:.0f}% of the tokens")
        return path

    def _gate_columns(self) -> list[int]:
        """Index of each domain's expert among the gate's outputs."""
        names = list(self.xlora.base_model.expert_names)
        return [names.index(domain) for domain in self.domains]

    def generate(self) -> dict[str, str]:
        """A short greedy continuation per domain by our X-LoRA, from the start of a held-out window."""
        out = {}
        for domain in self.domains:
            prompt = self.eval_set.pure[domain][0, :24][None]  # (1, 24)
            with torch.no_grad():
                ids = self.xlora.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=self.s.gen_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                )
            scalings = self.xlora.get_latest_scalings()[..., self._gate_columns()]  # domain order
            out[domain] = {
                "prompt": self.tokenizer.decode(prompt[0]),
                "continuation": self.tokenizer.decode(ids[0, prompt.shape[1] :]),
                "last_gate": dict(zip(self.domains, [round(v, 3) for v in scalings[0, -1].mean(0).tolist()])),
            }
        return out

    def write_report(self, report: dict[str, Any]) -> None:
        """Writes results.md and results.json into the output folder."""
        md = [
            "# X-LoRA demo results",
            "",
            f"Base model: `{self.model_id}`; domains: {', '.join(self.domains)}. Mean next-token loss (nats) on "
            f"held-out text; in brackets the gap to the oracle. `after switch`: the {16} tokens after each domain "
            "switch in the mixed documents.",
            "",
            markdown_table(report["table"], ORACLE, report["intervals_95"]),
            "",
            "In square brackets: 95% bootstrap intervals over documents. `oracle`: the right expert on pure text, "
            "each token's own domain's expert on mixed documents (the segment oracle); `per-token oracle`: every "
            "token scored by its best expert.",
            "",
            "Paired differences (95% bootstrap over the same documents; negative: X-LoRA is better):",
            "",
            markdown_paired(report["paired_95"], "X-LoRA", ["mixed", "after switch"]),
            "",
            "## Targets",
            "",
            *[f"- {line}" for line in report["checks"]],
            "",
            f"## Timings: wall s (CPU s), {report['threads']} thread(s), precision {report['precision']}",
            "",
            *[f"- {k}: {v} ({report['cpu_s'][k]})" for k, v in report["timings_s"].items()],
            "",
            "## Generations (X-LoRA, greedy)",
            "",
        ]
        for domain, g in report["generations"].items():
            md += [
                f"### {domain}",
                "",
                "```",
                g["prompt"] + " ⟶ " + g["continuation"],
                "```",
                f"gate at the last token: {g['last_gate']}",
                "",
            ]
        (self.out_dir / "results.md").write_text("\n".join(md))
        (self.out_dir / "results.json").write_text(json.dumps(report, indent=2))
