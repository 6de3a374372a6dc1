"""A guard that turns a large tensor allocation into an immediate `MemoryError`, for tests of refusals by size.

A refusal of a hostile size (`xlora_depth=10**9`) must come before anything is allocated. Timing it would make a
timed test; letting the unfixed code run would take the machine's memory. Inside `no_large_allocation()`, every
`torch.empty` and `torch.zeros` (what `nn.Linear` and `XLoraLayer` allocate with) counts its elements, and the first
call that would bring the total over the limit raises `MemoryError` instead of allocating: code that allocates before
refusing fails at once, with a `MemoryError` the test does not expect.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

#: Elements a refusal may allocate in all (a few tiny tensors: 4 MiB in float32).
LIMIT = 2**20


def _numel(size: tuple) -> int:
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = tuple(size[0])
    return math.prod(int(s) for s in size) if all(isinstance(s, int) for s in size) else 0


@contextlib.contextmanager
def no_large_allocation(limit: int = LIMIT) -> Iterator[list[int]]:
    """Raises `MemoryError` in the code under test once tensors of more than `limit` elements in all are created.

    Yields:
        A one-element list holding the number of elements counted so far.
    """
    counted = [0]
    originals = {name: getattr(torch, name) for name in ("empty", "zeros")}

    def count(n: int, what: str) -> None:
        counted[0] += n
        if counted[0] > limit:
            raise MemoryError(f"{what} of {n:,} elements: over the {limit:,} elements this refusal may allocate")

    def guarded(name: str):
        def allocate(*size, **kwargs):
            count(_numel(size), f"torch.{name}")
            return originals[name](*size, **kwargs)

        return allocate

    try:
        for name in originals:
            setattr(torch, name, guarded(name))
        yield counted
    finally:
        for name, original in originals.items():
            setattr(torch, name, original)
