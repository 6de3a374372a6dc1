"""Docs that cannot rot: every public name is documented, every Python block of the docs runs, every example runs.

How code blocks in `docs/*.md` and `README.md` are tested (the convention page authors follow):

- Every fenced block whose info string is `python` runs; `bash`, `text`, `pycon`, plain fences and the rest do not.
- The blocks of one page run top to bottom in one namespace, like a notebook, in a fresh temporary working
  directory (so `save_pretrained("my-xlora")` writes there and a later block can load it back).
- Before the first block the namespace holds what a reader is assumed to have at hand (see `_prelude`):
  `base` (a fresh tiny random Llama, `LlamaForCausalLM`), `tokenizer` (a matching word-level tokenizer) and `ids`
  (a `(2, 8)` LongTensor of token ids). Everything else a block needs it imports or builds itself.
- Placeholder ids and paths in string literals (`"your/base-model"`, `"path/to/lora-math"`, `"cuda"`, ...) are
  replaced by local equivalents before running: the table is `_placeholders` below. A new placeholder needs a row.
  `max_new_tokens=N` runs with at most `MAX_NEW_TOKENS` tokens.
- A hidden setup may precede a block: an HTML comment `<!-- test-setup` ... `-->` right before the fence (blank lines
  between are allowed). Its body runs first in the same namespace and is not shown on the site. Use it when prose
  uses a name for something the prelude does not define (e.g. `model` meaning an X-LoRA model).
- A block that cannot run in tests (a GPU, a real 7B model, a network) is preceded by `<!-- no-test: reason -->`.
  Keep these few: the test lists them and fails if there are more than `MAX_UNTESTED`.

Every script in `examples/` runs with the small arguments of `EXAMPLE_ARGS`; a new example needs a row there. A
script that has no small arguments (a measurement at real sizes) shrinks itself when `PEFT_XLORA_EXAMPLE_SMOKE=1`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import peft_xlora
from helpers.models import EXPERT_SPECS, VOCAB, make_expert, tiny_llama
from helpers.tiny_tokenizer import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
MAX_UNTESTED = 6

# Script name -> arguments that make it finish in seconds. `{tmp}` is replaced by a fresh temporary folder. None: the
# script needs a world of its own, and a test of its own runs it.
EXAMPLE_ARGS: dict[str, list[str] | None] = {
    "quickstart.py": ["--steps", "2", "--out", "{tmp}"],
    "gating_heatmap.py": ["--steps", "2", "--out", "{tmp}/gating.png"],
    "train_with_trainer.py": ["--steps", "2", "--out", "{tmp}", "--gradient-checkpointing", "--train-experts"],
    "router_regularisers.py": ["--steps", "2"],
    "measure_checkpointing.py": [],  # sized down by PEFT_XLORA_EXAMPLE_SMOKE=1
    "own_xlora.py": None,  # needs a saved base model, LoRA folders and a Hub: tests/contract/test_own_xlora.py
}

EXPERT_NAMES = ["math", "code", "poetry"]
COMPAT_EXPERT_NAMES = ["adapter_1", "adapter_2", "adapter_3"]


def _placeholders(world: Path) -> dict[str, str]:
    """Placeholder string literal -> local replacement. Keys are matched as whole quoted strings only."""
    base = str(world / "base-model")
    table = {
        # base models: a saved tiny Llama with its tokenizer
        "your/base-model": base,
        "meta-llama/Llama-3.2-1B": base,
        "mistralai/Mistral-7B-Instruct-v0.1": base,
        "HuggingFaceH4/zephyr-7b-beta": base,
        # a trained X-LoRA checkpoint over experts adapter_1 and adapter_2
        "./path/to/saved/model": str(world / "xlora-checkpoint"),
        "path/to/xlora-checkpoint": str(world / "xlora-checkpoint"),
        "Mistral_v204-rerun_V51Zephyr/checkpoint-420/": str(world / "xlora-checkpoint"),
        "cuda": "cuda" if torch.cuda.is_available() else "cpu",
        "cuda:0": "cuda:0" if torch.cuda.is_available() else "cpu",
    }
    for name in EXPERT_NAMES:
        path = str(world / "experts" / name)
        table[f"path/to/lora-{name}"] = path
        table[f"user/lora-{name}"] = path
    for name in COMPAT_EXPERT_NAMES:
        path = str(world / "experts" / name)
        table[f"./path/to/{name}/"] = path
        table[f"./path/to/{name}"] = path
    return table


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The local stand-ins for the placeholders: a saved base model and tokenizer, experts, a trained checkpoint."""
    root = tmp_path_factory.mktemp("docs-world")
    tiny_llama().save_pretrained(root / "base-model")
    _tokenizer().save_pretrained(root / "base-model")
    specs = list(EXPERT_SPECS["llama"].values())
    for seed, name in enumerate(EXPERT_NAMES + COMPAT_EXPERT_NAMES):
        make_expert("llama", specs[seed % len(specs)], seed, str(root / "experts" / name))
    config = peft_xlora.XLoraConfig(
        task_type="CAUSAL_LM",
        adapters={name: str(root / "experts" / name) for name in COMPAT_EXPERT_NAMES[:2]},
        xlora_depth=2,
        xlora_size=16,
    )
    from peft import get_peft_model

    get_peft_model(tiny_llama(), config).save_pretrained(root / "xlora-checkpoint")
    return root


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first code line in the page
    code: str
    setup: str | None  # hidden setup code, if any
    setup_line: int
    skip_reason: str | None


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_NO_TEST = re.compile(r"^\s*<!--\s*no-test:\s*(?P<reason>\S.*?)\s*-->\s*$")
_SETUP_START = re.compile(r"^\s*<!--\s*test-setup\s*$")


def _closes(line: str, fence: str) -> bool:
    """Whether `line` closes a block opened by `fence` (the same character, at least as many, nothing else)."""
    stripped = line.strip()
    return len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def parse_blocks(page: Path) -> list[Block]:
    """The ```python blocks of a page, with their hidden setup or no-test marker."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    pending_setup: tuple[str, int] | None = None
    pending_skip: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if _SETUP_START.match(line):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->"), None)
            if end is None:
                raise AssertionError(f"{page.name}:{i + 1}: `<!-- test-setup` without a closing `-->` line")
            pending_setup = ("\n".join(lines[i + 1 : end]), i + 2)
            i = end + 1
            continue
        if m := _NO_TEST.match(line):
            pending_skip = m.group("reason")
            i += 1
            continue
        if "no-test" in line and line.strip().startswith("<!--"):
            raise AssertionError(f"{page.name}:{i + 1}: write `<!-- no-test: <reason> -->` (a reason is required)")
        m = _FENCE.match(line)
        if m:
            indent, fence, info = m.group("indent"), m.group("fence"), m.group("info").strip()
            end = next((j for j in range(i + 1, len(lines)) if _closes(lines[j], fence)), None)
            if end is None:
                raise AssertionError(f"{page.name}:{i + 1}: unclosed code fence")
            if info.split(" ")[0] == "python":
                body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[i + 1 : end]]
                setup, setup_line = pending_setup or (None, 0)
                blocks.append(Block(page, i + 2, "\n".join(body), setup, setup_line, pending_skip))
            elif pending_setup or pending_skip:
                raise AssertionError(f"{page.name}:{i + 1}: a test marker comes before a non-python block")
            pending_setup, pending_skip = None, None
            i = end + 1
            continue
        if line.strip() and (pending_setup or pending_skip):
            raise AssertionError(f"{page.name}:{i + 1}: a test marker must come right before a ```python fence")
        i += 1
    return blocks


MAX_NEW_TOKENS = 8


def _substitute(code: str, table: dict[str, str]) -> str:
    for key, value in table.items():
        for quote in ('"', "'"):
            code = code.replace(f"{quote}{key}{quote}", repr(value))
    # Realistic generation lengths cost minutes on a tiny model over many pages; the tokens add nothing to the test.
    return re.sub(r"\bmax_new_tokens=(\d+)", lambda m: f"max_new_tokens={min(int(m[1]), MAX_NEW_TOKENS)}", code)


def _tokenizer():
    tokenizer = tiny_tokenizer(VOCAB)
    tokenizer.pad_token = "<pad>"  # id 0, the tiny models' pad_token_id
    return tokenizer


def _prelude() -> dict:
    """What every page's code may assume: a base model, a tokenizer and a batch of token ids."""
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    return {"__name__": "__docs__", "base": tiny_llama(), "tokenizer": _tokenizer(), "ids": ids}


def _run(code: str, first_line: int, page: Path, namespace: dict) -> None:
    # Padding puts each statement on its line of the page, so tracebacks point into the Markdown file.
    compiled = compile("\n" * (first_line - 1) + code, str(page), "exec")
    exec(compiled, namespace)


def _pages_with_python() -> list[Path]:
    return [page for page in PAGES if any(b.skip_reason is None for b in parse_blocks(page))]


@pytest.mark.parametrize("page", _pages_with_python(), ids=lambda p: p.name)
def test_page_code_runs(page, world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    table = _placeholders(world)
    namespace = _prelude()
    ran = 0
    for block in parse_blocks(page):
        if block.skip_reason is not None:
            continue
        if block.setup is not None:
            _run(_substitute(block.setup, table), block.setup_line, page, namespace)
        _run(_substitute(block.code, table), block.line, page, namespace)
        ran += 1
    assert ran > 0


def test_untested_blocks_are_few():
    untested = [f"{b.page.name}:{b.line} ({b.skip_reason})" for p in PAGES for b in parse_blocks(p) if b.skip_reason]
    assert len(untested) <= MAX_UNTESTED, f"too many blocks marked no-test: {untested}"


def test_parser_reads_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n<!-- test-setup\nx = 1\n-->\n\n```python\ny = x + 1\n```\n\n"
        "<!-- no-test: needs a GPU -->\n```python\nimport nothing_here\n```\n\n```bash\necho hi\n```\n"
        "- item\n\n    ```python\n    z = 2\n    ```\n",
        encoding="utf-8",
    )
    blocks = parse_blocks(page)
    assert [(b.line, b.code, b.setup, b.setup_line, b.skip_reason) for b in blocks] == [
        (8, "y = x + 1", "x = 1", 4, None),
        (13, "import nothing_here", None, 0, "needs a GPU"),
        (22, "z = 2", None, 0, None),
    ]
    page.write_text("<!-- no-test -->\n```python\npass\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="reason is required"):
        parse_blocks(page)
    page.write_text("<!-- no-test: x -->\n\nsome prose\n```python\npass\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="right before"):
        parse_blocks(page)


def test_substitution_only_touches_whole_literals():
    table = {"path/to/lora-math": "/tmp/m"}
    code = 'a = "path/to/lora-math"; b = "path/to/lora-math2"; c = \'path/to/lora-math\''
    assert _substitute(code, table) == "a = '/tmp/m'; b = \"path/to/lora-math2\"; c = '/tmp/m'"
    assert _substitute("generate(x, max_new_tokens=128)", {}) == "generate(x, max_new_tokens=8)"
    assert _substitute("generate(x, max_new_tokens=3)", {}) == "generate(x, max_new_tokens=3)"


# ---- every public name is documented ----

_DIRECTIVE = re.compile(r"^:::\s*(?P<target>[\w.]+)", re.MULTILINE)


def _documented_targets() -> set[str]:
    return {m.group("target") for page in DOCS.glob("*.md") for m in _DIRECTIVE.finditer(page.read_text("utf-8"))}


@pytest.mark.parametrize("name", sorted(peft_xlora.__all__))
def test_public_name_is_documented(name):
    targets = _documented_targets()
    full = f"peft_xlora.{name}"
    by_directive = any(t == full or t.startswith(full + ".") for t in targets)
    # Values without docstrings (the version string) are documented by a mention of their full name on a page.
    by_mention = any(f"`{full}`" in page.read_text("utf-8") for page in DOCS.glob("*.md"))
    assert by_directive or by_mention, (
        f"{full} is exported but not documented: add `::: {full}` to docs/reference.md (or mention `{full}` on a page)"
    )


@pytest.mark.parametrize("name", sorted(peft_xlora.__all__))
def test_public_object_has_docstring(name):
    obj = getattr(peft_xlora, name)
    if isinstance(obj, str):  # constants and the version are documented on the pages
        return
    assert (obj.__doc__ or "").strip(), f"peft_xlora.{name} has no docstring; the API reference would be empty"


# ---- every example runs ----

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_every_example_is_listed():
    assert {p.name for p in EXAMPLES} == set(EXAMPLE_ARGS), "give each examples/*.py small arguments in EXAMPLE_ARGS"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    if EXAMPLE_ARGS[script.name] is None:
        pytest.skip(f"{script.name} is run by a test of its own")
    args = [a.replace("{tmp}", str(tmp_path / "out")) for a in EXAMPLE_ARGS[script.name]]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": str(ROOT / "src"),
        "PEFT_XLORA_EXAMPLE_SMOKE": "1",
    }
    result = subprocess.run(
        [sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


# ---- the CLI reference is generated from the parser ----


def test_cli_reference_is_the_parsers_help():
    import argparse
    import importlib.util

    from peft_xlora.cli import build_parser

    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    assert hooks.MARKER in (DOCS / "cli.md").read_text("utf-8")
    reference = hooks.render_cli_reference()
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in subparsers.choices.items():
        assert f"### `peft-xlora {name}`" in reference
        for action in sub._actions:
            for option in action.option_strings:
                assert option in reference, f"`peft-xlora {name} {option}` is missing from the generated reference"
