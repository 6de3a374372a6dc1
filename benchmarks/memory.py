"""Peak memory of one benchmark step, as the operating system sees it (resident set size, Linux).

What is measured: the process's peak RSS (``VmHWM``) while one step runs, after a warm-up step, with the peak reset
(``/proc/self/clear_refs``) just before the step. This covers everything the step keeps resident: weights, activations
saved for backward, gradients, optimizer state, allocator slack. It is reported both in total and as the increase over
the RSS just before the step.

Each case runs in a fresh Python process so that one case's freed-but-cached memory cannot hide another's peak, with
glibc told to serve every allocation over 64 KiB by ``mmap`` (``MALLOC_MMAP_THRESHOLD_``): freed tensors then go back
to the system at once, and the RSS follows the live memory instead of the allocator's high-water mark.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from typing import Any

GIB = 1024**3
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def supported() -> bool:
    """Whether this system can reset and read the peak RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
    except OSError:
        return False
    return True


def measure_step(step: Any) -> dict[str, float]:
    """Runs `step` once (after the caller's warm-up) and returns its peak RSS, total and increase, in GiB."""
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    step()
    peak = _status_kib("VmHWM")
    return {"peak_rss_gib": peak * 1024 / GIB, "peak_increase_gib": (peak - before) * 1024 / GIB}


def run_case_here(spec: dict[str, Any]) -> dict[str, float]:
    """Builds the case described by `spec`, warms it up and measures one step (in this process)."""
    import torch

    from .cases import Workload, build_case

    torch.set_num_threads(spec["threads"])
    work = Workload(**spec["workload"])
    case = build_case(work, spec["method"], spec["phase"], spec["n"], spec["experts"], spec.get("options"))
    step = case.step
    if spec["phase"] == "generate":
        step = case.info["steps"][spec["new_tokens"]]
    step()
    return measure_step(step)


def run_case_subprocess(spec: dict[str, Any], timeout: float = 900) -> dict[str, float]:
    """Runs `run_case_here` in a fresh interpreter (see the module docstring) and returns its result."""
    env = {**os.environ, **_MALLOC_ENV}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        name = f"{spec['method']}/{spec['phase']}/N={spec['n']}"
        raise RuntimeError(f"memory case {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run_case_here(json.loads(sys.argv[1]))))
