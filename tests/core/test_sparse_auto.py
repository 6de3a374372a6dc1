"""The "auto" choice of `topk_compute` (core/sparse.py `use_sparse`): its thresholds per device type and rank, and
that the CPU table in the code is the one the crossover benchmark recorded (benchmarks/results/
sparse-topk-crossover-cpu.json, written by `python -m benchmarks.sparse_topk crossover`).

That both paths give the same outputs and gradients is tests/core/test_sparse.py's concern; here, which one runs.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from peft_xlora.core import sparse
from peft_xlora.core.sparse import GATHER_MAX_PAIRS, sparse_from, use_sparse

RECORDED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "sparse-topk-crossover-cpu.json"
# A table whose entries all differ, so that each case shows which entry was read.
TABLE = {8: (12, 24), 16: (6, 12), 32: (4, 8)}


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setitem(sparse.SPARSE_FROM_RANK, "cpu", dict(TABLE))
    monkeypatch.setitem(sparse.SPARSE_FROM, "cpu", (10, 20))
    return TABLE


@pytest.mark.parametrize(
    "rank, entry",
    [
        (8, (12, 24)),
        (16, (6, 12)),
        (32, (4, 8)),
        (12, (12, 24)),  # between two measured ranks: the lower rank's (later) threshold
        (31, (6, 12)),
        (64, (4, 8)),  # above the table: its largest rank's
        (4, (24, 48)),  # below the table: its smallest rank's, scaled by 8 / 4 (the dense work halves)
        (5, (20, 39)),  # 12 * 8 / 5 = 19.2 and 24 * 8 / 5 = 38.4, rounded up
        (None, (10, 20)),  # rank unknown: SPARSE_FROM, as before the rank was taken into account
    ],
)
def test_thresholds_by_rank(table, rank, entry):
    assert sparse_from("cpu", rank) == entry
    many, few = entry
    prefill, decode = 512, 1  # tokens of a call: many, and one (k * tokens <= GATHER_MAX_PAIRS)
    assert use_sparse("auto", many * 2, 2, "cpu", prefill, rank=rank)
    assert not use_sparse("auto", many * 2 - 1, 2, "cpu", prefill, rank=rank)
    assert use_sparse("auto", many * 2, 2, "cpu", None, rank=rank)  # tokens unknown: many
    assert use_sparse("auto", few * 2, 2, "cpu", decode, rank=rank)
    assert not use_sparse("auto", few * 2 - 1, 2, "cpu", decode, rank=rank)
    assert use_sparse("auto", many, 1, "cpu", prefill, rank=rank)  # experts per kept expert: k = 1
    assert not use_sparse("auto", many * 4 - 1, 4, "cpu", prefill, rank=rank)
    assert prefill * 2 > GATHER_MAX_PAIRS


def test_rank_table_is_per_device_type(table):
    # A device without a rank table ignores the rank: the conservative SPARSE_FROM entry, or the default.
    for rank in (None, 8, 64):
        assert sparse_from("cuda", rank) == sparse.SPARSE_FROM["cuda"]
        assert sparse_from("mps", rank) == sparse.SPARSE_FROM_DEFAULT
    many, _ = sparse.SPARSE_FROM["cuda"]
    assert not use_sparse("auto", many * 2 - 1, 2, "cuda", 512, rank=8)
    assert use_sparse("auto", many * 2, 2, "cuda", 512, rank=8)


@pytest.mark.parametrize("rank", [None, 4, 16, 64])
def test_forced_modes_ignore_the_rank(table, rank):
    assert not use_sparse("dense", 128, 2, "cpu", 512, rank=rank)
    assert use_sparse("sparse", 3, 2, "cpu", 1, rank=rank)
    assert not use_sparse("sparse", 2, 2, "cpu", 512, rank=rank)  # every expert kept: nothing to skip
    assert not use_sparse("auto", 2, 2, "cpu", 512, rank=rank)


def test_positional_call_without_rank_is_unchanged():
    # The vLLM plugin and older callers: (mode, n_experts, k, device_type, n_tokens), the rank only by keyword.
    many, few = sparse.SPARSE_FROM["cpu"]
    assert use_sparse("auto", many * 2, 2, "cpu", 512) and not use_sparse("auto", many * 2 - 1, 2, "cpu", 512)
    assert use_sparse("auto", few * 2, 2, "cpu", 1) and not use_sparse("auto", few * 2 - 1, 2, "cpu", 1)
    with pytest.raises(TypeError):
        use_sparse("auto", 16, 2, "cpu", 512, 8)  # rank is keyword-only


def test_cpu_table_is_the_recorded_crossover():
    # The code's CPU thresholds are the crossover benchmark's `sparse_from_rank`, rank by rank (a rerun that moves
    # them must update SPARSE_FROM_RANK, and the other way round).
    recorded = json.loads(RECORDED.read_text())
    assert recorded["provenance"]["gpu"] is None and recorded["kernel_workload"]["device"] == "cpu"
    measured = {int(rank): (e["many"], e["few"]) for rank, e in recorded["sparse_from_rank"].items()}
    assert measured == sparse.SPARSE_FROM_RANK["cpu"]
    assert sorted(measured) == [8, 16, 32]
    # A lower rank makes the dense mixture cheaper, so sparse never starts earlier at a lower rank.
    ranks = sorted(measured)
    for low, high in itertools.pairwise(ranks):
        assert measured[low][0] >= measured[high][0] and measured[low][1] >= measured[high][1]
