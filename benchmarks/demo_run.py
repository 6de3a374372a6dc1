"""The demo's published runs: `peft-xlora demo`, its report kept as a result file with provenance.

Usage (from the repository root)::

    python -m benchmarks.demo_run --heatmap docs/assets/gating_heatmap.png   # -> results/demo-default.json
    python -m benchmarks.demo_run --thorough                                 # -> results/demo-thorough.json
    python -m benchmarks.demo_run --tiny --out /tmp/demo-tiny.json           # the random tiny model (tests)

It runs the command line's own demo in this process (the same code as `bash scripts/demo.sh`, with `--threads`
threads, one by default), then writes the report the demo wrote to its `results.json` as the payload of a result file
(`benchmarks/provenance.py`), so the tables of README.md and docs/demo.md are generated from it. The demo's cache
(`$PEFT_XLORA_CACHE`, else `~/.cache/peft-xlora`) is used as usual: a first run trains the experts and gates, a
rerun only evaluates; the report's `cache_hits` says which.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .provenance import module_command, provenance, write_result

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the demo, writes the result file (and the heatmap where asked); returns the demo's report."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--thorough", action="store_true", help="four times the held-out documents")
    p.add_argument("--tiny", action="store_true", help="the random tiny model (checks the script only)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", help="the demo's cache (default: the demo's own default)")
    p.add_argument("--out", type=Path, help="the result file (default: benchmarks/results/demo-<run>.json)")
    p.add_argument("--heatmap", type=Path, help="also copy the gating heatmap here")
    args = p.parse_args(argv)
    run = "tiny" if args.tiny else "thorough" if args.thorough else "default"
    out = args.out or RESULTS / f"demo-{run}.json"
    flags = [*(["--tiny"] if args.tiny else []), *(["--thorough"] if args.thorough else [])]
    flags += ["--cache-dir", args.cache_dir] if args.cache_dir else []

    from peft_xlora.cli import main as cli

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    block = provenance(module_command("benchmarks.demo_run", argv))
    try:
        with tempfile.TemporaryDirectory(prefix="xlora-demo-") as tmp:
            status = cli(["--threads", str(args.threads), "demo", "--quiet", "--out", tmp, *flags])
            if status != 0:
                raise SystemExit(f"peft-xlora demo exited with status {status}")
            report = json.loads((Path(tmp) / "results.json").read_text())
            if args.heatmap:
                args.heatmap.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(report["heatmap"], args.heatmap)
    finally:
        torch.set_num_threads(threads)
    report["heatmap"] = os.path.relpath(args.heatmap, RESULTS.parent.parent) if args.heatmap else None
    demo_command = " ".join(["peft-xlora", "--threads", str(args.threads), "demo", *flags])
    write_result(str(out), {"run": run, "demo_command": demo_command, **report}, block)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
