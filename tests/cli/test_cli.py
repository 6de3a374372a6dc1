"""The `peft-xlora` command line end to end on a tiny random Llama: build -> train -> generate -> inspect -> export
-> reload, clear errors, and the `--tiny` demo (twice: the second run reuses every cached artefact)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from helpers.allocations import no_large_allocation
from peft_xlora import XLoraConfig
from peft_xlora.cli import main
from peft_xlora.cli.demo.base import load_base, tiny_base

TEXT = {  # not in alphabetical order: the gate's order must survive JSON's sorted keys
    "letters": " ".join(["abba", "cddc", "effe", "ghhg"] * 40),
    "digits": "".join(f"{i * 7 % 100} + {i} = {i * 8 % 100}\n" for i in range(60)),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny base model (with tokenizer), two distinct LoRA experts, and data files."""
    root = tmp_path_factory.mktemp("cli")
    base_dir = tiny_base(root / "cache")
    experts = {}
    for seed, name in enumerate(TEXT):
        lora = get_peft_model(
            load_base(base_dir),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        torch.manual_seed(100 + seed)
        with torch.no_grad():
            for param in lora.parameters():
                if param.requires_grad:
                    param.normal_(0.0, 0.2)
        lora.save_pretrained(root / name)
        experts[name] = root / name
    (root / "a.txt").write_text(TEXT["digits"])
    (root / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXT["letters"].split("ghhg")))
    return root, base_dir, experts


def run(*argv: str) -> int:
    return main(["--threads", "1", *map(str, argv)])


def test_every_subcommand_has_help(capsys):
    for command in ("build", "train", "generate", "inspect", "export", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: peft-xlora {command}" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "peft_xlora", "--help"], capture_output=True, text=True, check=True, timeout=120
    )
    for command in ("build", "train", "generate", "inspect", "export", "demo"):
        assert command in out.stdout


@pytest.mark.parametrize(("flag", "saved"), [(None, 1), ("auto", 1), ("all", None), ("2", 2)])
def test_build_saves_the_scaling_pass_layers_it_was_given(flag, saved, workspace, tmp_path):
    _, base_dir, experts = workspace
    adapters = [f"--adapter={name}={path}" for name, path in experts.items()]
    given = [] if flag is None else ["--scaling-pass-layers", flag]
    assert run("build", "--base", base_dir, *adapters, "--out", tmp_path / "b", "--size", 16, *given) == 0
    # The tiny base has 2 decoder layers: "auto" is round(2 * 2 / 3) = 1.
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["scaling_pass_layers"] == saved


def test_a_default_build_is_refused_by_the_mistralrs_export_with_the_way_out(workspace, tmp_path, capsys):
    _, base_dir, experts = workspace
    adapters = [f"--adapter={name}={path}" for name, path in experts.items()]
    assert run("build", "--base", base_dir, *adapters, "--out", tmp_path / "b", "--size", 16) == 0
    capsys.readouterr()
    assert run("export", tmp_path / "b", "--format", "mistralrs", "--out", tmp_path / "m") == 2
    assert "scaling_pass_layers=None" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_build_train_generate_inspect_export_reload(workspace, tmp_path, capsys):
    root, base_dir, experts = workspace
    built = tmp_path / "built"
    adapters = [f"--adapter={name}={path}" for name, path in experts.items()]
    # The whole model in the scaling pass: the mistral.rs export below needs it.
    build = ["build", "--base", base_dir, *adapters, "--depth", 2, "--size", 16]
    assert run(*build, "--out", built, "--scaling-pass-layers", "all") == 0
    assert (built / "adapter_model.safetensors").is_file()

    trained = tmp_path / "trained"
    args = [
        "train",
        built,
        "--data",
        root / "a.txt",
        root / "b.jsonl",
        "--out",
        trained,
        "--seq-len",
        32,
        "--batch-size",
        2,
        "--lr",
        5e-2,
        "--eval-fraction",
        0.2,
    ]
    assert run(*args, "--steps", 4, "--save-steps", 2) == 0
    first = json.loads((trained / "train_metrics.json").read_text())
    assert first["steps"] == 4 and "eval_loss" in first
    assert (trained / "checkpoints" / "checkpoint-4").is_dir()
    # Resuming continues from step 4 to step 6; a folder of another name (a copy kept as the best) is not a step.
    shutil.copytree(trained / "checkpoints" / "checkpoint-4", trained / "checkpoints" / "checkpoint-best")
    assert run(*args, "--steps", 6, "--save-steps", 2, "--resume") == 0
    assert json.loads((trained / "train_metrics.json").read_text())["steps"] == 6
    before = PeftModel.from_pretrained(load_base(base_dir), built).base_model.xlora_classifier.state_dict()
    after = PeftModel.from_pretrained(load_base(base_dir), trained).base_model.xlora_classifier.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training did not change the classifier"

    capsys.readouterr()
    heatmap = tmp_path / "gate.png"
    assert (
        run(
            "generate",
            trained,
            "--prompt",
            "12 + 3 =",
            "--prompt",
            "abba c",
            "--max-new-tokens",
            6,
            "--heatmap",
            heatmap,
            "--json",
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert [g["prompt"] for g in result["generations"]] == ["12 + 3 =", "abba c"]
    assert heatmap.stat().st_size > 1000
    # Greedy generation from the CLI equals generation by the loaded model itself.
    model = PeftModel.from_pretrained(load_base(base_dir), trained).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok("12 + 3 =", return_tensors="pt").input_ids
    ref = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert result["generations"][0]["continuation"] == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)

    # Pinned to one expert, the CLI generates what that expert's gate gives in the loaded model.
    args = ["generate", trained, "--prompt", "12 + 3 =", "--max-new-tokens", 6, "--json"]
    assert run(*args, "--static", "digits=1") == 0
    pinned = json.loads(capsys.readouterr().out)["generations"][0]["continuation"]
    model.set_static_scalings({"digits": 1.0})
    ref = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    model.set_static_scalings(None)
    assert pinned == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    assert run(*args, "--mode", "prompt") == 0
    assert len(json.loads(capsys.readouterr().out)["generations"]) == 1

    plot = tmp_path / "inspect.png"
    assert run("inspect", trained, "--text", "abba 12", "--plot", plot, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["expert_order"] == ["letters", "digits"]
    assert list(info["experts"]) == ["letters", "digits"]
    assert info["experts"]["digits"]["r"] == 4
    assert info["parameters"]["classifier"] == 48 * 16 + 16 + 16 * 2 + 2
    assert info["parameters"]["experts"] == 2 * 2 * 2 * (4 * 48) + 2 * 2 * (4 * 48 + 4 * 24)
    assert sum(info["mean_gate"].values()) == pytest.approx(1.0, abs=1e-4)
    assert plot.is_file()

    exported = tmp_path / "fixed"
    assert run("export", trained, "--format", "lora", "--weights", "digits=0.7,letters=0.3", "--out", exported) == 0
    lora = PeftModel.from_pretrained(load_base(base_dir), exported).eval()
    model.set_static_scalings({"digits": 0.7, "letters": 0.3})
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    assert run("export", trained, "--format", "mistralrs", "--out", tmp_path / "mistralrs") == 0
    assert (tmp_path / "mistralrs" / "xlora-ordering.json").is_file()

    served = tmp_path / "vllm"
    assert run("export", trained, "--format", "vllm", "--out", served) == 0
    config = json.loads((served / "config.json").read_text())
    assert config["architectures"] == ["XLoraLlamaForCausalLM"] and "xlora" in config
    assert run("export", trained, "--format", "vllm", "--out", served) == 0  # over its own earlier export: fine
    assert run("export", trained, "--format", "vllm", "--out", tmp_path / "built") == 2  # a checkpoint: refused
    assert run("export", trained, "--format", "vllm", "--weights", "digits=1", "--out", served) == 2


def test_errors_are_one_line_with_exit_status_2(workspace, tmp_path, capsys):
    _, base_dir, experts = workspace
    assert run("inspect", tmp_path / "nowhere") == 2
    assert "not an X-LoRA checkpoint" in capsys.readouterr().err
    assert run("build", "--base", base_dir, f"--adapter=x={tmp_path}", "--out", tmp_path / "o") == 2
    assert "not a LoRA checkpoint folder" in capsys.readouterr().err
    assert run("build", "--base", tmp_path, f"--adapter=x={experts['digits']}", "--out", tmp_path / "o") == 2
    assert "not a base model folder" in capsys.readouterr().err
    assert main(["build", "--base", str(base_dir), "--adapter", "no-equals-sign", "--out", str(tmp_path)]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


@pytest.fixture(scope="module")
def mistakes(workspace):
    """A built checkpoint and the damaged files and folders that the user-error cases point at."""
    root, base_dir, experts = workspace
    built = root / "mistakes" / "built"
    adapters = [f"--adapter={name}={path}" for name, path in experts.items()]
    assert run("build", "--base", base_dir, *adapters, "--out", built, "--size", 8) == 0
    damaged = {"not-json": b"{not json", "list": b"[1, 2]", "not-utf8": b"\xff\xfe"}
    for name, data in damaged.items():
        shutil.copytree(built, root / "mistakes" / name)
        (root / "mistakes" / name / "adapter_config.json").write_bytes(data)
    shutil.copytree(built, root / "mistakes" / "truncated")
    weights = root / "mistakes" / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    (root / "mistakes" / "a-file").write_text("mine")
    (root / "mistakes" / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    (root / "mistakes" / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    edits = {
        "experts-list": lambda c: c.update(experts=list(c["experts"])),
        "order-string": lambda c: c.update(expert_order="letters"),
        "depth-huge": lambda c: c.update(xlora_depth=10**9),
        "base-elsewhere": lambda c: c.update(base_model_name_or_path=str(root / "mistakes" / "base-not-json")),
    }
    for name, edit in edits.items():
        shutil.copytree(built, root / "mistakes" / name)
        config = json.loads((built / "adapter_config.json").read_text())
        edit(config)
        (root / "mistakes" / name / "adapter_config.json").write_text(json.dumps(config))
    (root / "mistakes" / "base-without-weights").mkdir()
    shutil.copy(base_dir / "config.json", root / "mistakes" / "base-without-weights")
    shutil.copytree(base_dir, root / "mistakes" / "base-not-json")
    (root / "mistakes" / "base-not-json" / "config.json").write_text("{not json")
    shutil.copytree(experts["digits"], root / "mistakes" / "their-lora")  # someone's LoRA adapter
    (root / "mistakes" / "resume-best" / "checkpoints" / "checkpoint-best").mkdir(parents=True)
    (root / "mistakes" / "resume-cut" / "checkpoints" / "checkpoint-3").mkdir(parents=True)  # no trainer_state.json
    (root / "mistakes" / "short.txt").write_text("abba " * 8)  # two windows of 16 tokens
    shutil.copytree(base_dir, root / "mistakes" / "damaged-cache" / "tiny-llama")  # the demo's cached base model
    (root / "mistakes" / "damaged-cache" / "tiny-llama" / "config.json").write_text("{not json")
    single = get_peft_model(
        load_base(base_dir),
        XLoraConfig(
            task_type="CAUSAL_LM",
            adapters={name: str(path) for name, path in experts.items()},
            routing="single_pass",
            scaling_pass_layers=1,
            xlora_size=8,
        ),
    )
    single.peft_config["default"].base_model_name_or_path = str(base_dir)
    single.save_pretrained(root / "mistakes" / "single-pass")
    # Folders for `build --adapters-dir`: empty; one LoRA beside a folder of notes and an X-LoRA checkpoint; one LoRA.
    (root / "mistakes" / "empty-lib").mkdir()
    (root / "mistakes" / "empty-lib" / "README.md").write_text("no experts yet")
    shutil.copytree(experts["digits"], root / "mistakes" / "mixed-lib" / "digits")
    (root / "mistakes" / "mixed-lib" / "notes").mkdir()
    (root / "mistakes" / "mixed-lib" / "notes" / "todo.txt").write_text("train more experts")
    shutil.copytree(built, root / "mistakes" / "mixed-lib" / "xlora")
    shutil.copytree(experts["digits"], root / "mistakes" / "lib" / "digits")
    return root / "mistakes", base_dir


_TRAIN = ["--data", "{root}/../a.txt", "--out", "{root}/trained", "--seq-len", "16", "--batch-size", "2"]
_BUILD = ["--adapter", "x={root}/../digits", "--out", "{root}/b"]
_OUT = ["--out", "{root}/b"]
# Each case as a new user might type it; every one must be refused in one line with exit status 2.
USER_ERRORS = {
    "threads-negative": ["--threads", "-3", "inspect", "{built}"],
    "threads-zero": ["--threads", "0", "inspect", "{built}"],
    "max-new-tokens-zero": ["generate", "{built}", "--prompt", "1 +", "--max-new-tokens", "0"],
    "max-new-tokens-negative": ["generate", "{built}", "--prompt", "1 +", "--max-new-tokens", "-2"],
    "max-new-tokens-past-the-positions": ["generate", "{built}", "--prompt", "1 +", "--max-new-tokens", "600"],
    "max-new-tokens-huge": ["generate", "{built}", "--prompt", "1 +", "--max-new-tokens", "100000000"],
    "heatmap-in-missing-folder": [
        "generate",
        "{built}",
        "--prompt",
        "1",
        "--max-new-tokens",
        "1",
        "--heatmap",
        "{root}/no/such/folder/gate.png",
    ],
    "generate-truncated-weights": ["generate", "{root}/truncated", "--prompt", "1 +"],
    "steps-zero": ["train", "{built}", *_TRAIN, "--steps", "0"],
    "steps-negative": ["train", "{built}", *_TRAIN, "--steps", "-1"],
    "seq-len-zero": ["train", "{built}", *_TRAIN, "--seq-len", "0"],
    "batch-size-zero": ["train", "{built}", *_TRAIN, "--batch-size", "0"],
    "lr-nan": ["train", "{built}", *_TRAIN, "--lr", "nan"],
    "lr-inf": ["train", "{built}", *_TRAIN, "--lr", "inf"],
    "lr-negative": ["train", "{built}", *_TRAIN, "--lr", "-1e-3"],
    "eval-fraction-one": ["train", "{built}", *_TRAIN, "--eval-fraction", "1"],
    "eval-fraction-negative": ["train", "{built}", *_TRAIN, "--eval-fraction", "-0.1"],
    "eval-fraction-nan": ["train", "{built}", *_TRAIN, "--eval-fraction", "nan"],
    "eval-steps-zero": ["train", "{built}", *_TRAIN, "--eval-steps", "0"],
    "save-steps-zero": ["train", "{built}", *_TRAIN, "--save-steps", "0"],
    "train-out-on-a-file": ["train", "{built}", *_TRAIN, "--out", "{root}/a-file"],
    "data-not-utf8": ["train", "{built}", *_TRAIN, "--data", "{root}/latin1.txt"],
    "jsonl-not-utf8": ["train", "{built}", *_TRAIN, "--data", "{root}/latin1.jsonl"],
    "build-out-on-a-file": ["build", "--base", "{base}", "--adapter", "x={root}/../digits", "--out", "{root}/a-file"],
    "build-seed-negative": [
        "build",
        "--base",
        "{base}",
        "--adapter",
        "x={root}/../digits",
        "--out",
        "{root}/b",
        "--seed",
        "-1",
    ],
    "inspect-config-not-json": ["inspect", "{root}/not-json"],
    "inspect-config-a-list": ["inspect", "{root}/list"],
    "inspect-config-not-utf8": ["inspect", "{root}/not-utf8"],
    "inspect-truncated-weights": ["inspect", "{root}/truncated"],
    "export-out-on-a-file": [
        "export",
        "{built}",
        "--format",
        "lora",
        "--weights",
        "digits=1",
        "--out",
        "{root}/a-file",
    ],
    "demo-cache-dir-on-a-file": ["demo", "--tiny", "--cache-dir", "{root}/a-file", "--out", "{root}/demo"],
    "demo-out-on-a-file": ["demo", "--tiny", "--cache-dir", "{root}/cache", "--out", "{root}/a-file"],
    "demo-expert-steps-zero": ["demo", "--tiny", "--cache-dir", "{root}/cache", "--expert-steps", "0"],
    "demo-router-steps-negative": ["demo", "--tiny", "--cache-dir", "{root}/cache", "--router-steps", "-1"],
    # issue 22: each of these ended in a traceback, or was accepted and lost the user's files
    "build-base-without-weights": ["build", "--base", "{root}/base-without-weights", *_BUILD],
    "build-base-config-not-json": ["build", "--base", "{root}/base-not-json", *_BUILD],
    "build-scaling-pass-layers-not-a-count": ["build", "--base", "{base}", *_BUILD, "--scaling-pass-layers", "most"],
    "build-scaling-pass-layers-beyond-the-model": ["build", "--base", "{base}", *_BUILD, "--scaling-pass-layers", "9"],
    "build-depth-huge": ["build", "--base", "{base}", *_BUILD, "--depth", "1000000000"],
    "build-size-huge": ["build", "--base", "{base}", *_BUILD, "--depth", "2", "--size", "1000000000000"],
    "build-size-over-16x-hidden": ["build", "--base", "{base}", *_BUILD, "--depth", "2", "--size", "100000"],
    "build-out-holds-a-lora": [
        "build",
        "--base",
        "{base}",
        "--adapter",
        "x={root}/../digits",
        "--out",
        "{root}/their-lora",
    ],
    "inspect-text-blank": ["inspect", "{built}", "--text", "   "],
    "inspect-text-empty": ["inspect", "{built}", "--text", ""],
    "inspect-experts-a-list": ["inspect", "{root}/experts-list"],
    "inspect-expert-order-a-string": ["inspect", "{root}/order-string"],
    "inspect-depth-huge": ["inspect", "{root}/depth-huge", "--text", "ab"],
    "inspect-base-config-not-json": ["inspect", "{built}", "--text", "ab", "--base", "{root}/base-not-json"],
    "generate-experts-a-list": ["generate", "{root}/experts-list", "--prompt", "1 +"],
    "generate-single-pass-prompt-mode": ["generate", "{root}/single-pass", "--prompt", "1 +", "--mode", "prompt"],
    "generate-base-without-weights": [
        "generate",
        "{built}",
        "--prompt",
        "1 +",
        "--base",
        "{root}/base-without-weights",
    ],
    "train-resume-checkpoint-best": ["train", "{built}", *_TRAIN, "--out", "{root}/resume-best", "--resume"],
    "train-resume-incomplete": ["train", "{built}", *_TRAIN, "--out", "{root}/resume-cut", "--resume"],
    "train-experts-a-list": ["train", "{root}/experts-list", *_TRAIN],
    "train-eval-takes-every-window": [
        "train",
        "{built}",
        *_TRAIN,
        "--data",
        "{root}/short.txt",
        "--eval-fraction",
        "0.9",
    ],
    "train-out-holds-a-lora": ["train", "{built}", *_TRAIN, "--out", "{root}/their-lora"],
    "export-vllm-config-not-json": ["export", "{root}/not-json", "--format", "vllm", "--out", "{root}/v"],
    "export-vllm-config-not-utf8": ["export", "{root}/not-utf8", "--format", "vllm", "--out", "{root}/v"],
    "export-vllm-config-a-list": ["export", "{root}/list", "--format", "vllm", "--out", "{root}/v"],
    "export-vllm-experts-a-list": ["export", "{root}/experts-list", "--format", "vllm", "--out", "{root}/v"],
    "export-vllm-expert-order-a-string": ["export", "{root}/order-string", "--format", "vllm", "--out", "{root}/v"],
    "export-vllm-truncated-weights": ["export", "{root}/truncated", "--format", "vllm", "--out", "{root}/v"],
    "export-vllm-depth-huge": ["export", "{root}/depth-huge", "--format", "vllm", "--out", "{root}/v"],
    "export-vllm-base-config-not-json": ["export", "{root}/base-elsewhere", "--format", "vllm", "--out", "{root}/v"],
    "export-vllm-no-checkpoint": ["export", "{root}/nowhere", "--format", "vllm", "--out", "{root}/v"],
    "demo-damaged-cache": ["demo", "--tiny", "--quiet", "--cache-dir", "{root}/damaged-cache", "--out", "{root}/d"],
    # issue 26: `build --adapters-dir`, a folder of LoRAs
    "build-no-experts": ["build", "--base", "{base}", "--out", "{root}/b"],
    "build-adapters-dir-missing": ["build", "--base", "{base}", "--adapters-dir", "{root}/no-lib", *_OUT],
    "build-adapters-dir-a-file": ["build", "--base", "{base}", "--adapters-dir", "{root}/a-file", *_OUT],
    "build-adapters-dir-empty": ["build", "--base", "{base}", "--adapters-dir", "{root}/empty-lib", *_OUT],
    "build-adapters-dir-not-all-loras": [
        "build",
        "--base",
        "{base}",
        "--adapters-dir",
        "{root}/mixed-lib",
        "--out",
        "{root}/b",
    ],
    "build-adapters-dir-is-a-lora": [
        "build",
        "--base",
        "{base}",
        "--adapters-dir",
        "{root}/their-lora",
        "--out",
        "{root}/b",
    ],
    "build-adapters-dir-name-clash": [
        "build",
        "--base",
        "{base}",
        "--adapter",
        "digits={root}/../digits",
        "--adapters-dir",
        "{root}/lib",
        "--out",
        "{root}/b",
    ],
    "build-adapters-dir-twice": [
        "build",
        "--base",
        "{base}",
        "--adapters-dir",
        "{root}/lib",
        "--adapters-dir",
        "{root}/lib",
        "--out",
        "{root}/b",
    ],
}


@pytest.mark.parametrize("case", USER_ERRORS)
def test_user_errors_are_one_line_never_a_traceback(mistakes, case, capsys):
    from transformers.utils import logging as hf_logging

    root, base_dir = mistakes
    argv = [a.format(root=root, built=root / "built", base=base_dir) for a in USER_ERRORS[case]]
    command = next(a for a in argv if a in ("build", "train", "generate", "inspect", "export", "demo"))
    hf_logging.disable_progress_bar()  # transformers' loading bars also write to stderr
    try:
        with no_large_allocation(2**22):  # a refusal allocates no more than the tiny model (a huge size: at once)
            status = main(argv)
    finally:
        hf_logging.enable_progress_bar()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"peft-xlora {command}: error: "), err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "sizes",
    [["--depth", "1000000000"], ["--depth", "2", "--size", "1000000000000"], ["--depth", "2", "--size", "100000"]],
    ids=["depth", "size", "size-over-16x-hidden"],
)
def test_build_refuses_a_huge_classifier_before_allocating_it(mistakes, sizes, capsys):
    # Before: `--depth 1000000000` built layer after layer until the machine ran out of memory. The guard turns any
    # allocation past a few MiB (the tiny base model is far less) into a MemoryError, so the refusal must come first.
    root, base_dir = mistakes
    adapter = f"x={root.parent / 'digits'}"
    with no_large_allocation():
        assert run("build", "--base", base_dir, "--adapter", adapter, "--out", root / "b", *sizes) == 2
    assert "error:" in capsys.readouterr().err
    assert not (root / "b").exists()


def test_build_with_a_lora_folder_without_weights_names_the_missing_file(mistakes, tmp_path, capsys):
    # Before: "Repo id must be in the form 'repo_name' or 'namespace/repo_name'" (PEFT took the folder for a Hub id).
    root, base_dir = mistakes
    lora = tmp_path / "no-weights"
    lora.mkdir()
    shutil.copy(root.parent / "digits" / "adapter_config.json", lora)
    assert run("build", "--base", base_dir, "--adapter", f"x={lora}", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"the folder {lora} has no adapter_model.safetensors" in err and "Repo id" not in err, err
    assert not (tmp_path / "out").exists()


def test_build_adapters_dir_names_what_is_not_a_lora_and_writes_nothing(mistakes, capsys):
    root, base_dir = mistakes
    assert run("build", "--base", base_dir, "--adapters-dir", root / "mixed-lib", "--out", root / "b") == 2
    err = capsys.readouterr().err
    assert "2 of its 3 subfolders are not LoRA checkpoint folders" in err, err
    assert "notes/ (no adapter_config.json)" in err and "xlora/ (a PEFT_XLORA adapter, not LORA)" in err, err
    assert not (root / "b").exists()
    clash = ["--adapter", f"digits={root / 'lib' / 'digits'}", "--adapters-dir", root / "lib"]
    assert run("build", "--base", base_dir, *clash, "--out", root / "b") == 2
    assert "Two experts are named 'digits'" in capsys.readouterr().err
    assert not (root / "b").exists()


def test_build_adapters_dir_equals_the_model_built_in_python(workspace, tmp_path, capsys):
    # Each subfolder an expert named after it, in sorted order whatever the order they were made in; files and hidden
    # folders beside them are ignored, and so is the --out folder inside the library (a rebuild). The checkpoint
    # must be the model built directly from Python with those experts in that order (same seed).
    from peft_xlora.cli.common import load_base as cli_load_base

    _, base_dir, experts = workspace
    lib = tmp_path / "lib"
    for name in ("letters", "digits"):  # made in reverse order
        shutil.copytree(experts[name], lib / name)
    (lib / "README.md").write_text("two experts")
    (lib / ".cache").mkdir()
    out = lib / "xlora"
    argv = ["build", "--base", base_dir, "--adapters-dir", lib, "--out", out, "--size", 8, "--top-k", 1, "--seed", 3]
    for _ in range(2):  # the second build finds its own earlier output inside the library and skips it
        assert run(*argv) == 0
        assert "Built X-LoRA over 2 experts (digits, letters)" in capsys.readouterr().out
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["expert_order"] == ["digits", "letters"]

    torch.manual_seed(3)  # as `build --seed 3` does before it loads the base model
    adapters = {"digits": str(lib / "digits"), "letters": str(lib / "letters")}
    config = XLoraConfig(task_type="CAUSAL_LM", adapters=adapters, xlora_size=8, top_k_lora=1)
    direct = get_peft_model(cli_load_base(base_dir), config).eval()
    loaded = PeftModel.from_pretrained(load_base(base_dir), out).eval()
    assert list(loaded.base_model.expert_names) == ["digits", "letters"]
    want, got = direct.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, direct(input_ids=ids).logits)


def test_build_adapter_and_adapters_dir_together_keep_the_named_ones_first(workspace, tmp_path, capsys):
    _, base_dir, experts = workspace
    lib = tmp_path / "lib"
    shutil.copytree(experts["digits"], lib / "b-digits")
    shutil.copytree(experts["digits"], lib / "a-digits")
    adapter = f"z-letters={experts['letters']}"
    assert run("build", "--base", base_dir, "--adapter", adapter, "--adapters-dir", lib, "--out", tmp_path / "o") == 0
    saved = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert saved["expert_order"] == ["z-letters", "a-digits", "b-digits"]


def test_refused_saves_leave_the_users_lora_as_it_was(mistakes):
    # Before: `build --out` or `train --out` onto someone's LoRA folder replaced its adapter files with X-LoRA's.
    root, base_dir = mistakes
    lora = root / "their-lora"
    before = {path.name: path.read_bytes() for path in lora.iterdir()}
    assert run("build", "--base", base_dir, "--adapter", f"x={root.parent / 'digits'}", "--out", lora) == 2
    assert run("train", root / "built", "--data", root.parent / "a.txt", "--out", lora, "--seq-len", 16) == 2
    assert {path.name: path.read_bytes() for path in lora.iterdir()} == before


# ------------------------------------------------------------------------------ the CLI's column of the table


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Base folders, experts and checkpoints the command line does not run: sequence classification, BART."""
    from helpers import seq_cls
    from helpers.models import make_seq2seq_expert, tiny_bart
    from peft_xlora.cli.demo.base import char_tokenizer

    root = tmp_path_factory.mktemp("foreign")
    tokenizer = char_tokenizer()
    for name, model in (("cls-base", seq_cls.build("llama")), ("bart-base", tiny_bart())):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    cls_experts = {f"e{i}": seq_cls.save_expert("llama", root / f"cls-e{i}", i, ["q_proj"]) for i in range(2)}
    bart_experts = {f"e{i}": make_seq2seq_expert(["q_proj", "fc1"], i, str(root / f"bart-e{i}")) for i in range(2)}
    checkpoints = {
        "cls": (seq_cls.xlora("llama", cls_experts), "cls-base"),
        "bart": (
            get_peft_model(
                tiny_bart(), XLoraConfig(task_type="SEQ_2_SEQ_LM", adapters=bart_experts, xlora_size=8)
            ).eval(),
            "bart-base",
        ),
    }
    for name, (model, base) in checkpoints.items():
        model.peft_config["default"].base_model_name_or_path = str(root / base)
        model.save_pretrained(root / name)
    return root


# One case per refusal of the ``cli`` column, keyed (row, index of the refusal in its cell), as a user would type it.
CLI_CASES = {
    ("task_type", 0): ["generate", "{foreign}/cls", "--prompt", "ab"],
    ("heads", 0): ["build", "--base", "{base}", "--adapter", "e0={foreign}/cls-e0", "--out", "{out}"],
    ("encoder_decoder", 0): ["generate", "{foreign}/bart", "--prompt", "ab"],
    ("generate_modes", 0): ["generate", "{root}/single-pass", "--prompt", "1 +", "--mode", "prompt"],
    ("topk_compute", 0): ["generate", "{built}", "--prompt", "ab", "--topk-compute", "sparse"],
}
# The same refusals at every command that loads a model, and the exporters' columns checked before it loads.
MORE_CLI_REFUSALS = {
    "train-seq-cls": ("task_type", ["train", "{foreign}/cls", "--data", "{root}/../a.txt", "--out", "{out}"]),
    "inspect-text-seq-cls": ("task_type", ["inspect", "{foreign}/cls", "--text", "ab"]),
    "export-lora-seq-cls": ("task_type", ["export", "{foreign}/cls", "--format", "lora", "--weights", "e0=1"]),
    "train-bart": ("encoder_decoder", ["train", "{foreign}/bart", "--data", "{root}/../a.txt", "--out", "{out}"]),
    "inspect-text-bart": ("encoder_decoder", ["inspect", "{foreign}/bart", "--text", "ab"]),
    "export-mistralrs-bart": ("encoder_decoder", ["export", "{foreign}/bart", "--format", "mistralrs"]),
    "build-on-bart": (
        "encoder_decoder",
        ["build", "--base", "{foreign}/bart-base", "--adapter", "e0={foreign}/bart-e0"],
    ),
    "build-topk-compute-without-top-k": (
        "topk_compute",
        ["build", "--base", "{base}", "--adapter", "e0={root}/../digits", "--topk-compute", "dense"],
    ),
    "train-topk-compute-without-top-k": (
        "topk_compute",
        ["train", "{built}", "--data", "{root}/../a.txt", "--out", "{out}", "--topk-compute", "auto"],
    ),
    "export-mistralrs-single-pass": (
        "export_mistralrs:routing",
        ["export", "{root}/single-pass", "--format", "mistralrs"],
    ),
}


def _cli_refusals() -> dict:
    from peft_xlora.core.combinations import places

    return {
        (place.name, row, i): refusal
        for place in places().values()
        if place.layer == "cli"
        for row, cell in place.cells.items()
        for i, refusal in enumerate(cell.refusals)
    }


def test_every_cli_refusal_has_a_case():
    assert {(row, i) for _, row, i in _cli_refusals()} == set(CLI_CASES)
    assert {place for place, _, _ in _cli_refusals()} == {"cli"}


def _refused_before_loading(argv: list[str], message: str, out, monkeypatch, capsys) -> None:
    """`argv` exits 2 with one line holding `message`'s fixed parts, having loaded no model and written nothing."""
    import re

    from transformers import AutoModelForCausalLM

    def no_loading(*args, **kwargs):
        raise AssertionError("the command loaded a model before refusing")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    status = main(["--threads", "1", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith(f"peft-xlora {argv[0]}: error: "), err
    fixed = re.split(r"\{[^}]*\}", message)  # the message's fixed parts, around its placeholders
    assert all(" ".join(part.split()) in lines[0] for part in fixed if part.strip()), (message, err)
    assert not out.exists()


def _argv(template: list[str], mistakes, foreign, out) -> list[str]:
    root, base_dir = mistakes
    argv = [a.format(root=root, built=root / "built", base=base_dir, foreign=foreign, out=out) for a in template]
    if argv[0] in ("build", "export") and "--out" not in argv:
        argv += ["--out", str(out)]
    return argv


@pytest.mark.parametrize("key", sorted(CLI_CASES), ids=["-".join(map(str, k)) for k in sorted(CLI_CASES)])
def test_cli_refusal_comes_from_the_table_before_loading(mistakes, foreign, tmp_path, key, monkeypatch, capsys):
    out = tmp_path / "out"
    refusal = _cli_refusals()[("cli", *key)]
    _refused_before_loading(_argv(CLI_CASES[key], mistakes, foreign, out), refusal.message, out, monkeypatch, capsys)


@pytest.mark.parametrize("case", sorted(MORE_CLI_REFUSALS))
def test_every_command_that_loads_a_model_refuses_first(mistakes, foreign, tmp_path, case, monkeypatch, capsys):
    from peft_xlora.core.combinations import places

    row, template = MORE_CLI_REFUSALS[case]
    place, _, row = row.rpartition(":")
    out = tmp_path / "out"
    message = places()[place or "cli"].cells[row].refusals[0].message
    _refused_before_loading(_argv(template, mistakes, foreign, out), message, out, monkeypatch, capsys)


def test_inspect_without_text_describes_what_the_cli_cannot_run(foreign, capsys):
    # Reading the files is supported for every task and model: only the commands that load a model refuse.
    for name, expert_order in (("cls", ["e0", "e1"]), ("bart", ["e0", "e1"])):
        assert run("inspect", foreign / name, "--json") == 0
        assert json.loads(capsys.readouterr().out)["expert_order"] == expert_order


# Each option the table lets the command line read, set on a checkpoint built directly from Python (two experts:
# top-k 1): row -> (config fields, extra `generate` arguments). tests/core/test_supported_cells.py accounts for them.
CLI_OPTIONS = {
    "enable_softmax": ({"enable_softmax": False}, []),
    "enable_softmax_topk": ({"top_k_lora": 1, "enable_softmax_topk": True}, []),
    "softmax_temperature": ({"softmax_temperature": 0.5}, []),
    "top_k_lora": ({"top_k_lora": 1}, []),
    "layerwise_scalings": ({"layerwise_scalings": True}, []),
    "global_scaling_weight": ({"global_scaling_weight": 0.5}, []),
    "use_trainable_adapters": ({"use_trainable_adapters": True}, []),
    "scaling_pass_value": ({"scaling_pass_value": 0.5}, []),
    "scalings_mode": ({"scalings_mode": "prompt"}, []),
    "scaling_pass_layers": ({"scaling_pass_layers": 1}, []),
    "router_load_balancing_coef": ({"router_load_balancing_coef": 0.3}, []),
    "router_entropy_coef": ({"router_entropy_coef": 0.3}, []),
    "router_distillation_coef": ({"router_distillation_coef": 0.3}, []),
    "router_distillation_temperature": ({"router_distillation_coef": 0.3, "router_distillation_temperature": 0.5}, []),
    "distillation": ({"router_distillation_coef": 0.3}, []),
    "routing": ({"routing": "single_pass", "scaling_pass_layers": 1}, []),
    "single_pass_static": ({"routing": "single_pass", "scaling_pass_layers": 1, "single_pass_static": "uniform"}, []),
    "xlora_depth": ({"xlora_depth": 3}, []),
    "xlora_size": ({"xlora_size": 4}, []),
    "xlora_dropout_p": ({"xlora_dropout_p": 0.1}, []),
    "classifier_init": ({"classifier_init": "uniform"}, []),
    "hidden_size": ({"hidden_size": 48}, []),
    "inference_mode": ({"inference_mode": True}, []),
    "pins": ({}, ["--static", "digits=0.7,letters=0.2"]),
    "generate_modes": ({}, ["--mode", "prompt"]),
    "elastic_changes": ({}, []),  # built with one expert, the other added
    "topk_compute": ({"top_k_lora": 1, "topk_compute": "sparse"}, []),
}


@pytest.mark.filterwarnings("ignore::peft_xlora.ExpertChangeWarning")
@pytest.mark.parametrize("row", sorted(CLI_OPTIONS))
def test_cli_with_each_option_equals_python(workspace, tmp_path, row, capsys):
    # `generate` and `inspect --text` of a checkpoint with the option give what the checkpoint loaded in Python gives.
    from transformers import AutoTokenizer

    from peft_xlora.core.single_pass import STATIC_NAME

    _, base_dir, experts = workspace
    options, extra = CLI_OPTIONS[row]
    adapters = {name: str(path) for name, path in experts.items()}
    first = {"digits": adapters["digits"]} if row == "elastic_changes" else adapters
    torch.manual_seed(5)
    config = XLoraConfig(task_type="CAUSAL_LM", adapters=first, **{"classifier_init": "random", **options})
    model = get_peft_model(load_base(base_dir), config)
    if row == "elastic_changes":
        model.add_expert("letters", adapters["letters"])
    with torch.no_grad():
        for name, param in model.named_parameters():  # trained: a gate, static weights, factors off their start
            if param.requires_grad or STATIC_NAME in name:
                param.add_(torch.randn_like(param) * 0.5)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(tmp_path / "ck")

    prompt, text = "12 + 3 =", "abba 12"
    assert run("generate", tmp_path / "ck", "--prompt", prompt, "--max-new-tokens", 5, "--json", *extra) == 0
    continuation = json.loads(capsys.readouterr().out)["generations"][0]["continuation"]
    loaded = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "ck").eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": tok.pad_token_id}
    if row == "pins":
        loaded.set_static_scalings({"digits": 0.7, "letters": 0.2})
    if row == "generate_modes":
        kwargs["scalings_mode"] = "prompt"
    expected = loaded.generate(input_ids=ids, **kwargs)
    assert continuation == tok.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    if row == "pins":
        return
    assert run("inspect", tmp_path / "ck", "--text", text, "--json") == 0
    gate = json.loads(capsys.readouterr().out)["mean_gate"]
    with torch.no_grad():
        loaded(input_ids=tok(text, return_tensors="pt").input_ids, use_cache=False)
    mean = loaded.get_latest_scalings()[0].float().mean(dim=(0, 1))  # (n_experts,)
    assert list(gate) == list(loaded.base_model.expert_names)
    assert gate == pytest.approx(dict(zip(gate, mean.tolist())), abs=1e-4)


def _count_sparse_calls(monkeypatch) -> list[int]:
    """Counts the mixture layers' calls of the sparse path (`layer.sparse_mixture`), which stays as it computes."""
    import peft_xlora.core.layer as layer_module

    calls = [0]
    real = layer_module.sparse_mixture

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_module, "sparse_mixture", counted)
    return calls


def test_topk_compute_is_built_saved_overridden_and_trained_with(workspace, tmp_path, monkeypatch, capsys):
    # `build --topk-compute` writes the config Python writes; `generate --topk-compute` switches the mixture layers'
    # path for its run (the text the same as the checkpoint's path gives, within float tolerance: the same greedy
    # tokens here); `train --topk-compute` trains on that path and saves it.
    root, base_dir, experts = workspace
    adapters = [f"--adapter={name}={path}" for name, path in experts.items()]
    built = tmp_path / "built"
    assert run("build", "--base", base_dir, *adapters, "--out", built, "--size", 8, "--top-k", 1, "--topk-compute",
               "dense") == 0  # fmt: skip
    saved = json.loads((built / "adapter_config.json").read_text())
    python = XLoraConfig(task_type="CAUSAL_LM", adapters={n: str(p) for n, p in experts.items()}, top_k_lora=1,
                         topk_compute="dense", xlora_size=8)  # fmt: skip
    assert (saved["top_k_lora"], saved["topk_compute"]) == (python.top_k_lora, python.topk_compute) == (1, "dense")

    capsys.readouterr()
    calls = _count_sparse_calls(monkeypatch)
    prompt = ["--prompt", "12 + 3 =", "--max-new-tokens", 4, "--json"]
    assert run("generate", built, *prompt) == 0
    dense_text = json.loads(capsys.readouterr().out)["generations"][0]["continuation"]
    assert calls[0] == 0  # the checkpoint's "dense"
    assert run("generate", built, *prompt, "--topk-compute", "sparse") == 0
    sparse_text = json.loads(capsys.readouterr().out)["generations"][0]["continuation"]
    assert calls[0] > 0 and sparse_text == dense_text
    assert json.loads((built / "adapter_config.json").read_text())["topk_compute"] == "dense"  # generate saves none

    calls[0] = 0
    trained = tmp_path / "trained"
    train = ["train", built, "--data", root / "a.txt", "--out", trained, "--steps", 1, "--batch-size", 2]
    assert run(*train, "--seq-len", 16, "--eval-fraction", 0, "--topk-compute", "sparse") == 0
    assert calls[0] > 0
    assert json.loads((trained / "adapter_config.json").read_text())["topk_compute"] == "sparse"


def test_tiny_demo_runs_and_reuses_its_cache(tmp_path, capsys):
    threads = torch.get_num_threads()
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = ["demo", "--tiny", "--quiet", "--cache-dir", cache, "--out", out, "--expert-steps", 15, "--router-steps", 8]
    assert run(*args) == 0
    report = json.loads((out / "results.json").read_text())
    table = report["table"]
    domains = ["prose", "arithmetic", "shouting"]
    expected_rows = [
        "base model",
        *(f"expert: {d}" for d in domains),
        "uniform mixture",
        "Arrow top-1",
        "Arrow top-2",
        "PEFT built-in X-LoRA",
        "X-LoRA (peft-xlora)",
        "oracle",
        "per-token oracle",
    ]
    assert list(table) == expected_rows
    for d in domains:  # the pure-domain oracle is that domain's expert
        assert table["oracle"][d] == table[f"expert: {d}"][d]
    for row in table.values():
        assert all(torch.isfinite(torch.tensor(v)) for v in row.values())
    for column, value in table["per-token oracle"].items():  # each token's best expert: below every expert
        assert all(value <= table[f"expert: {d}"][column] + 1e-6 for d in domains), column
    for variant, row in table.items():  # every cell has its interval, around its mean
        for column, value in row.items():
            low, high = report["intervals_95"][variant][column]
            assert low - 1e-6 <= value <= high + 1e-6, (variant, column)
    for rival in ("Arrow top-1", "Arrow top-2", "PEFT built-in X-LoRA"):
        for column in ("mixed", "after switch"):
            diff, low, high = report["paired_95"][rival][column]
            assert diff == pytest.approx(table["X-LoRA (peft-xlora)"][column] - table[rival][column])
            assert low <= high
    assert len(report["checks"]) == 15
    assert report["precision"] == "fp32"  # --tiny: float32 unless asked
    assert (out / "gating_heatmap.png").stat().st_size > 1000
    assert "| X-LoRA (peft-xlora) |" in (out / "results.md").read_text()
    assert not any(report["cache_hits"].values())

    assert run(*args) == 0
    again = json.loads((out / "results.json").read_text())
    assert all(again["cache_hits"].values())
    assert again["table"] == table  # same cached artefacts, same held-out data: the same numbers
    assert again["threads"] == 1
    assert torch.get_num_threads() == threads  # the tiny demo's single thread does not outlive it


def test_demo_reads_the_gate_by_expert_name_not_position(tmp_path):
    # A cached gate keeps the expert order it was built with, which may differ from the demo's domain order.
    from types import SimpleNamespace

    from peft_xlora.cli.demo import Demo, preset

    demo = Demo(preset(True), tmp_path, tmp_path)
    demo.domains = ["shakespeare", "python", "pydoc"]
    demo.xlora = SimpleNamespace(base_model=SimpleNamespace(expert_names=["python", "shakespeare", "pydoc"]))
    scalings = torch.tensor([[0.7, 0.2, 0.1]])  # (seq, n_experts) in the gate's order
    torch.testing.assert_close(scalings[:, demo._gate_columns()], torch.tensor([[0.2, 0.7, 0.1]]))  # domain order


def test_demo_bf16_stages_train_with_updated_weights(tmp_path):
    """Under the demo's bf16 autocast, every step's forward sees the weights the step before updated.

    A stage-wide autocast keeps its bf16 copies of the weights until it exits: without dropping them after each update,
    every forward saw the first step's weights, the loss never moved and the experts drifted off (regression test).
    """
    from peft_xlora.cli.demo import Demo, preset

    demo = Demo(preset(True, precision="bf16"), tmp_path / "cache", tmp_path / "out", quiet=True, log=lambda *a: None)
    demo.prepare_base()
    model = get_peft_model(demo.new_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    batch = torch.randint(4, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    from peft_xlora.cli.demo.train import train_steps

    losses = demo._stage("train", lambda: train_steps(model, [batch] * 8, 8, 1e-2, "t", quiet=True))
    assert len(set(losses)) == len(losses)  # each step saw new weights
    assert losses[-1] < losses[0]


def test_inspect_shows_classification_heads(tmp_path, capsys):
    # SEQ_CLS experts with their own heads: inspect names each expert's head and counts the heads apart.
    from helpers import seq_cls

    experts = {f"e{i}": seq_cls.save_expert("bert", tmp_path / f"e{i}", i, ["query"]) for i in range(2)}
    seq_cls.xlora("bert", experts, trainable_head=True).save_pretrained(tmp_path / "ckpt")
    assert run("inspect", tmp_path / "ckpt", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert [e["head"] for e in info["experts"].values()] == ["classifier", "classifier"]
    assert info["parameters"]["heads"] == 3 * (3 * 16 + 3)  # two experts' heads and the shared one
    assert info["config"]["trainable_head"] is True
    assert run("inspect", tmp_path / "ckpt") == 0
    assert "head=classifier" in capsys.readouterr().out
