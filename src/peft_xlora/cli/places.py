"""The command line's column in the table of what combines (`core.combinations`), and its situations.

`peft-xlora` loads every base model as a causal language model (`AutoModelForCausalLM`) and builds checkpoints with
`task_type="CAUSAL_LM"`; its flags set some options (`build --depth`, `generate --mode`, `--static`, ...), and every
other option comes from the checkpoint it reads. The ``cli`` place says, for every config field and named feature,
what the subcommands do with it. Each subcommand checks it once (`check_command`) with a situation made from the files
it was given (the checkpoint's `adapter_config.json`, the base model's `config.json`, the experts' configs), before it
loads a model or writes anything; an export also checks its exporter's own column there, so that a refusal does not
wait for the model to load. The refusal reaches the user through the command line's one-line error (exit status 2).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.combinations import (
    PROMPT_MODE,
    SET,
    SINGLE_PASS,
    Condition,
    Place,
    Situation,
    check,
    fact,
    irrelevant,
    places,
    refuse,
    refused,
    register_place,
    supported,
)
from ..core.config import XLoraConfig
from ..core.places import PROMPT_ON_SINGLE_PASS

#: Task types the command line runs: a causal LM, or the bare model (the `CAUSAL_LM` model's own head then decodes).
CLI_TASK_TYPES = (None, "CAUSAL_LM", "FEATURE_EXTRACTION")

# Facts of the situations below: which subcommand acts, and whether it loads the model (`build`, `train`, `generate`,
# `inspect --text`, `export --format lora|mistralrs`; `inspect` alone and the vLLM export read the files only).
LOADS_MODEL = fact("loads_model", "where the command loads the model")
_BUILD = Condition("in `build`", lambda s, r: s.facts.get("command") == "build")
_GENERATE = Condition("in `generate`", lambda s, r: s.facts.get("command") == "generate")
_OTHER_TASK = Condition(
    "task_type SEQ_CLS, TOKEN_CLS or QUESTION_ANS",
    lambda s, r: _task(s.config) not in (*CLI_TASK_TYPES, "SEQ_2_SEQ_LM"),  # SEQ_2_SEQ_LM: the encoder_decoder row
)

_FROM_CHECKPOINT = supported("read from the checkpoint (`build` leaves the default: set it from Python)")
# `--topk-compute` (build, generate, train): the value given, None when left out.
_TOPK_FLAG = Condition("`--topk-compute` given", lambda s, r: s.facts.get("topk_compute_flag") is not None)
_NO_TOP_K = Condition("without top_k_lora", lambda s, r: s.config.top_k_lora is None)
_FLAG = "`build {flag}`; the other commands read it from the checkpoint"

CLI_PLACE = Place(
    "cli",
    "the `peft-xlora` command line: `build`, `train`, `generate`, `inspect`, `export`",
    {
        **dict.fromkeys(
            ("peft_type", "auto_mapping", "peft_version", "revision", "peft_xlora_version"),
            irrelevant("bookkeeping"),
        ),
        "task_type": refused(
            refuse(
                "the checkpoint's task_type={value!r} needs its own model class (a classification head), and the "
                "command line loads base models as causal language models (AutoModelForCausalLM). Load it from "
                "Python: `PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), "
                "checkpoint)` (see docs/models.md); `inspect` without --text reads its files",
                _OTHER_TASK & LOADS_MODEL,
            ),
            note="`build` makes CAUSAL_LM checkpoints; the others run CAUSAL_LM, FEATURE_EXTRACTION or none",
        ),
        "base_model_name_or_path": supported("the base model folder the checkpoint records, unless --base is given"),
        "inference_mode": supported("`train` loads the checkpoint trainable, the other commands for inference"),
        "adapters": supported(
            "`build --adapter NAME=PATH` (in the order given) or `build --adapters-dir DIR` (each subfolder an "
            "expert, sorted by name); the others read them from the checkpoint"
        ),
        "hidden_size": supported("`build` infers it from the base model"),
        "xlora_depth": supported(_FLAG.format(flag="--depth (1 to 32)")),
        "xlora_size": supported(_FLAG.format(flag="--size (at most 16x the hidden size, or 4096)")),
        "xlora_dropout_p": supported(_FLAG.format(flag="--dropout")),
        "top_k_lora": supported(_FLAG.format(flag="--top-k")),
        "softmax_temperature": supported(_FLAG.format(flag="--temperature")),
        "layerwise_scalings": supported(_FLAG.format(flag="--layerwise")),
        "scaling_pass_value": supported(_FLAG.format(flag="--scaling-pass-value")),
        "scaling_pass_layers": supported(_FLAG.format(flag="--scaling-pass-layers (auto, all or K)")),
        **dict.fromkeys(
            (
                "enable_softmax",
                "enable_softmax_topk",
                "classifier_init",
                "use_trainable_adapters",
                "global_scaling_weight",
                "router_load_balancing_coef",
                "router_entropy_coef",
                "routing",
                "single_pass_static",
                "router_distillation_coef",
                "router_distillation_temperature",
            ),
            _FROM_CHECKPOINT,
        ),
        "topk_compute": refused(
            refuse(
                "--topk-compute chooses how a top-k mixture is computed, and this model keeps every expert for "
                "every token (top_k_lora is None): there is nothing to compute sparsely. Build the checkpoint with "
                "`--top-k K` (and --topk-compute there), or leave --topk-compute out",
                _TOPK_FLAG & _NO_TOP_K,
            ),
            note="`build --topk-compute` (with --top-k) saves it; `generate --topk-compute` runs with another value "
            "and `train --topk-compute` trains and saves with it; otherwise read from the checkpoint",
        ),
        "trainable_head": supported("sequence classification only: refused with its task_type where a model loads"),
        "scalings_mode": supported("`generate`'s default mode; `generate --mode` overrides it"),
        "experts": supported("`inspect` lists each expert's rank, alpha, targets and head"),
        "expert_order": supported("the gate's order, kept by every command"),
        "pins": supported("`generate --static NAME=W,...` pins shared weights; `export --format lora --weights`"),
        "per_row_pins": irrelevant("no flag: the command line pins shared weights"),
        "masks": irrelevant("no flag: every expert is active"),
        "heads": refused(
            refuse(
                "the experts carry classification heads (`modules_to_save`), and `peft-xlora build` builds causal "
                "language models (task_type='CAUSAL_LM'), which have no head to mix them into. Build the model from "
                "Python with task_type='SEQ_CLS' on a *ForSequenceClassification base model (see docs/models.md)",
                SET & _BUILD,
            ),
            note="`inspect` lists each expert's head; a SEQ_CLS checkpoint is refused where a model loads (task_type)",
        ),
        "encoder_decoder": refused(
            refuse(
                "{name} is an encoder-decoder model, and the command line builds and runs decoder-only causal "
                "language models (AutoModelForCausalLM). Build or load it from Python with AutoModelForSeq2SeqLM and "
                "task_type='SEQ_2_SEQ_LM' (see docs/models.md)",
                SET & LOADS_MODEL,
            ),
        ),
        "distillation": supported("`train`: transformers' Trainer reads the loss that holds the term"),
        "elastic_changes": supported("a checkpoint saved after `add_expert` / `remove_expert` reads like any other"),
        "generate_modes": refused(
            refuse(PROMPT_ON_SINGLE_PASS, PROMPT_MODE & SINGLE_PASS & _GENERATE),
            note="`generate --mode token|prompt`",
        ),
    },
    layer="cli",
)

register_place(CLI_PLACE)


def _task(config: Any) -> str | None:
    task = getattr(config, "task_type", None)
    return getattr(task, "value", task)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when the file is missing or not a JSON object (checked elsewhere)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def situation(
    config: XLoraConfig,
    command: str,
    base: str | Path | None,
    loads_model: bool,
    expert_configs: Mapping[str, Mapping[str, Any]] | None = None,
    **facts: Any,
) -> Situation:
    """What a subcommand knows before it loads anything: the config, and the features its files show.

    Args:
        config: The checkpoint's config, or the one `build` makes from its flags.
        command: The subcommand (``"build"``, ``"train"``, ...).
        base: The base model folder, when there is a local one (its `config.json` says whether it is an
            encoder-decoder model and names its class).
        loads_model: Whether the command loads the model (`AutoModelForCausalLM` and the checkpoint).
        expert_configs: The experts' LoRA configs (default the checkpoint's `experts`): a `modules_to_save` entry is a
            classification head.
        **facts: Command facts read by the cells: ``scalings_mode`` (`generate --mode`; default the checkpoint's),
            ``pins`` (`generate --static`).
    """
    base_config = read_json(Path(base) / "config.json") if base else None
    base_config = base_config or {}
    experts = config.experts if expert_configs is None else expert_configs
    features = set()
    if config.trainable_head or any((e or {}).get("modules_to_save") for e in (experts or {}).values()):
        features.add("heads")
    encoder_decoder = _task(config) == "SEQ_2_SEQ_LM" or bool(base_config.get("is_encoder_decoder"))
    if encoder_decoder:
        features.add("encoder_decoder")
    if config.router_distillation_coef:
        features.add("distillation")
    if facts.get("pins"):
        features.add("pins")
    if command == "generate":
        features.add("generate_modes")
    names = base_config.get("architectures") or [base_config.get("model_type") or "this model"]
    return Situation(
        config=config,
        features=frozenset(features),
        routing="encoder_decoder" if encoder_decoder else config.routing,
        model_name=str(names[0]),
        facts={"command": command, "loads_model": loads_model, **facts},
    )


def check_command(situation: Situation, exporter: str | None = None) -> None:
    """Checks the ``cli`` column (and an exporter's column, when registered) in `situation`; raises ValueError.

    Args:
        situation: From `situation`.
        exporter: The export's place (``"export_lora"``, ``"export_mistralrs"``, ``"export_vllm"``), checked too.
    """
    check(CLI_PLACE.name, situation)
    if exporter is not None and exporter in places():
        check(exporter, situation)
