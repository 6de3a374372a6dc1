"""Shared fixtures: the offline Hub endpoint, seeding, and distinct LoRA experts saved to disk (see helpers/)."""

from __future__ import annotations

import os
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Nothing may reach the real Hub: every Hub URL points at the test server of helpers/hub_server.py (started by the
# `hub` fixture in io/test_hub.py), and offline mode stays on except inside that fixture. huggingface_hub reads
# HF_ENDPOINT when it is imported, so this must come before any import of it.
os.environ.setdefault("PEFT_XLORA_TEST_HUB_PORT", str(_free_port()))
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{os.environ['PEFT_XLORA_TEST_HUB_PORT']}"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import peft_xlora  # noqa: E402, F401 - registers the method
from helpers.models import EXPERT_SPECS, make_expert  # noqa: E402

hf_logging.set_verbosity_error()
torch.set_num_threads(int(os.environ.get("PEFT_XLORA_TEST_THREADS", "2")))  # 1 where several suites share the cores


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def expert_dirs(tmp_path_factory):
    """{arch: {name: path}} of saved, distinct LoRA experts for each tiny architecture."""
    out = {}
    for arch, specs in EXPERT_SPECS.items():
        out[arch] = {}
        for seed, (name, spec) in enumerate(specs.items()):
            path = tmp_path_factory.mktemp(f"{arch}-{name}")
            out[arch][name] = make_expert(arch, spec, seed, str(path))
    return out
