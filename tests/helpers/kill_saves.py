"""Kills X-LoRA saves with SIGKILL at many points and checks, after each kill, that the target is the old or the new.

Run as ``python -m helpers.kill_saves WORKDIR`` (with ``tests`` on the path); prints one JSON line and exits 0
when every kill left the complete old or complete new checkpoint at the target. Each trial forks a child that calls
`model.save_pretrained` (PEFT's method, which `import peft_xlora` makes atomic) and is killed:

* at every file-system step: before and after each `os` call a save makes (counted in a dry run), the child kills
  itself, so every state the folder passes through is left behind once;
* at random instants: the child saves in a loop and the parent kills it after a random delay.

It runs twice: on a folder that holds only the checkpoint, then on one that also holds the user's files (a README.md,
a tokenizer file, a logs folder), which must be there, unchanged, after every kill.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time

import torch

torch.set_num_threads(1)

from peft import PeftModel, get_peft_model  # noqa: E402

import peft_xlora  # noqa: E402
from helpers.models import EXPERT_SPECS, make_expert, tiny_llama  # noqa: E402

#: The `os` functions a save calls that change the file system or flush it; each is a kill point before and after.
_STEPS = ("mkdir", "makedirs", "rename", "replace", "link", "symlink", "remove", "unlink", "rmdir", "fsync", "chmod")
USER_FILES = {"README.md": b"# My notes\n\nMine, not a model card.\n", "tokenizer.json": b"{}"}


def build(seed: int, experts: dict) -> PeftModel:
    model = get_peft_model(tiny_llama(), peft_xlora.XLoraConfig(task_type="CAUSAL_LM", adapters=experts))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.base_model.xlora_classifier.parameters():
            param.add_(torch.randn(param.shape, generator=g))
    return model.eval()


def contents(folder: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), folder)] = f.read()
    return out


def arm(kill_at: int) -> list[int]:
    """In the child: count every file-system step and SIGKILL this process at point `kill_at` (2 per step)."""
    counter = [0]

    def point() -> None:
        if counter[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        counter[0] += 1

    def wrap(fn):
        def step(*args, **kwargs):
            point()
            try:
                return fn(*args, **kwargs)
            finally:
                point()

        return step

    for name in _STEPS:
        setattr(os, name, wrap(getattr(os, name)))
    from peft_xlora.io import files

    files.exchange = wrap(files.exchange)
    return counter


def run(workdir: str, shared: bool) -> dict:
    experts = {
        name: make_expert("llama", spec, seed, os.path.join(workdir, "experts", name))
        for seed, (name, spec) in enumerate(EXPERT_SPECS["llama"].items())
    }
    models = {"old": build(1, experts), "new": build(2, experts)}
    refs = {}
    for which, model in models.items():
        peft_xlora.save_pretrained(model, os.path.join(workdir, f"ref-{which}"))
        refs[which] = contents(os.path.join(workdir, f"ref-{which}"))
    target = os.path.join(workdir, "out", "ckpt")
    os.makedirs(os.path.dirname(target))
    if shared:
        os.makedirs(os.path.join(target, "logs"))
        for name, data in {**USER_FILES, "logs/events": b"step 1"}.items():
            with open(os.path.join(target, name), "wb") as f:
                f.write(data)
        for which in refs:  # the user's README stays: no model card in the folder
            refs[which].pop("README.md")
            refs[which].update({**USER_FILES, "logs/events": b"step 1"})
    models["old"].save_pretrained(target)

    def state() -> str:
        found = contents(target) if os.path.isdir(target) else {}
        for which, ref in refs.items():
            if found == ref:
                return which
        raise AssertionError(f"{target} holds neither the old nor the new checkpoint: {sorted(found)}")

    def trial(kill_at: int | None, delay: float | None, which: str) -> int:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: save, and be killed
            os.close(read)
            try:
                counter = arm(kill_at if kill_at is not None else -1)
                order = [which, "old" if which == "new" else "new"]
                for i in range(1 if delay is None else 10**6):
                    models[order[i % 2]].save_pretrained(target)
                os.write(write, str(counter[0]).encode())
            finally:
                os._exit(0)
        os.close(write)
        if delay is not None:
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60  # a save takes well under a second: a child still there has hung
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError("a saving child process hung for 60 s")
            time.sleep(0.005)
        with os.fdopen(read) as f:
            passed = f.read()
        return int(passed) if passed else -1

    current = state()
    other = {"old": "new", "new": "old"}
    start = time.perf_counter()
    points = trial(None, None, other[current])  # dry run: not killed; counts the kill points of one save
    seconds = time.perf_counter() - start
    current = state()
    assert current == "new" and points > 0, (current, points)
    seen = {"old": 0, "new": 0}
    for kill_at in range(points):
        trial(kill_at, None, other[current])
        current = state()
        seen[current] += 1
    rng = random.Random(0)
    for _ in range(6):
        trial(None, rng.uniform(0, 3 * seconds), other[current])
        current = state()
        seen[current] += 1
    assert seen["old"] and seen["new"], seen  # kills landed both before and after the swap
    for which in ("old", "new"):  # what the bytes say, loading confirms
        if current != which:
            models[which].save_pretrained(target)
            current = which
        loaded = PeftModel.from_pretrained(tiny_llama(), target).eval()
        ids = torch.arange(3, 10)[None]
        with torch.no_grad():
            torch.testing.assert_close(
                loaded(input_ids=ids).logits, models[which](input_ids=ids).logits, rtol=0, atol=0
            )
    shutil.rmtree(os.path.join(workdir, "experts"))
    return {"points": points, "seen": seen, "save_seconds": round(seconds, 3)}


if __name__ == "__main__":
    results = {}
    for shared in (False, True):
        workdir = os.path.join(sys.argv[1], "shared" if shared else "alone")
        os.makedirs(workdir)
        results["shared" if shared else "alone"] = run(workdir, shared)
    print(json.dumps(results))
