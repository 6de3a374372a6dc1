"""The demo's settings: the real run on SmolLM2-135M and the `--tiny` run on a random 2-layer Llama."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides what the demo trains and measures; cached artefacts are keyed by these values.

    Attributes:
        tiny: Random tiny model and synthetic domains instead of SmolLM2 and real text.
        seed: Seed of data sampling and training.
        seq_len: Tokens per training sequence.
        batch_size: Sequences per training step (experts and gates).
        expert_steps: Optimiser steps per LoRA expert.
        expert_lr: Peak learning rate of the experts.
        lora: LoraConfig arguments of every expert.
        router_steps: Optimiser steps of each X-LoRA gate (ours and PEFT's built-in, trained the same way).
        router_lr: Peak learning rate of the gates.
        router_depth: Linear layers in the gate's classifier.
        router_size: Hidden width of the classifier.
        router_layerwise: One scaling per adapted layer and expert (`layerwise_scalings`), for both gates.
        scaling_pass_layers: Our gate reads the hidden state after this many decoder layers (`scaling_pass_layers`;
            None: after all of them). PEFT's built-in X-LoRA has no such option and always reads the last one.
        router_distillation_coef: Weight of our gate's distillation term from the experts' own per-token losses
            (`XLoraConfig.router_distillation_coef`; 0: off). PEFT's built-in X-LoRA has no such option.
        router_distillation_temperature: Temperature (nats) of that term's target softmax(-loss / T).
        router_pretrain_steps: Steps of distillation alone (`peft_xlora.distillation_loss`) before our gate's
            usual training (0: none).
        train_segments: Domain segments per mixed training sequence (half of each batch is mixed, half pure).
        eval_seq_len: Tokens per held-out sequence.
        eval_pure: Held-out sequences per domain.
        eval_mixed: Held-out mixed documents.
        eval_segments: Domain segments per held-out mixed document.
        eval_batch: Sequences per evaluation forward (the fixed mixtures score each one once per mixture in it).
        n_boot: Bootstrap replicates of the intervals (over documents).
        max_chars: Characters kept per source document.
        gen_tokens: Tokens generated per domain at the end.
        precision: "bf16" runs every stage under CPU autocast to bfloat16 (trainable weights, the gates and the
            losses stay float32), about 1.5x faster than "fp32" on CPUs with AVX512-BF16 or AMX, and far slower on
            CPUs without them; "auto" picks bf16 only where the CPU has them (see `precision.resolve_precision`).
    """

    tiny: bool = False
    seed: int = 0
    seq_len: int = 128
    batch_size: int = 4
    expert_steps: int = 40
    expert_lr: float = 3e-3  # 5e-4 left the experts 3-8% below the base model (docs/demo.md)
    lora: dict[str, Any] = field(
        default_factory=lambda: {
            "r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            # Every linear layer: the MLPs hold most of what makes a domain, and train as fast per step on a CPU.
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        }
    )
    router_steps: int = 30
    router_lr: float = 5e-3
    router_depth: int = 2
    router_size: int = 64
    router_layerwise: bool = True
    scaling_pass_layers: int | None = 20  # of SmolLM2's 30: measured in docs/demo.md
    router_distillation_coef: float = 1.0
    router_distillation_temperature: float = 1.0
    router_pretrain_steps: int = 0
    train_segments: int = 4  # three switches per mixed training sequence: the gate sees many switches
    eval_seq_len: int = 256
    eval_pure: int = 4
    eval_mixed: int = 6
    eval_segments: int = 3
    eval_batch: int = 4
    n_boot: int = 2000
    max_chars: int = 60_000
    gen_tokens: int = 24
    precision: str = "auto"

    def recipe(self, *fields: str) -> dict[str, Any]:
        """The named settings as a dict (all when none named), for cache keys."""
        data = asdict(self)
        return {k: data[k] for k in fields} if fields else data


REAL = DemoSettings()
TINY = DemoSettings(
    tiny=True,
    seq_len=48,
    batch_size=8,
    expert_steps=60,
    expert_lr=1e-2,
    lora={
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
    },
    router_steps=40,
    router_lr=1e-2,
    router_size=16,
    scaling_pass_layers=None,
    eval_seq_len=64,
    eval_pure=4,
    eval_mixed=4,
    eval_batch=4,
    gen_tokens=16,
    precision="fp32",  # a hidden size of 48 gains nothing from bfloat16
)


# `--thorough`: four times the held-out documents (18k tokens per variant instead of 4.6k on the real demo); only
# the evaluation grows, so the trained experts and gates are the default run's, from the cache.
THOROUGH = {"eval_pure": 16, "eval_mixed": 24}


def preset(tiny: bool, thorough: bool = False, **overrides: Any) -> DemoSettings:
    """The real or tiny settings (optionally with the thorough evaluation), fields replaced (None values ignored)."""
    settings = TINY if tiny else REAL
    if thorough:
        settings = replace(settings, **THOROUGH)
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})
