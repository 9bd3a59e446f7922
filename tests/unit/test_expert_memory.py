"""ExpertMemory: an LRU of loaded experts within a byte budget."""

from __future__ import annotations

import pickle

import pytest
import torch

from neuro_dask.errors import ConfigError, NeuroDaskError
from neuro_dask.model.moe import ExpertWeights
from neuro_dask.runtime.expert_memory import (
    ExpertMemory,
    ExpertTooLargeError,
    weights_nbytes,
)


def expert(rows: int = 2, dtype: torch.dtype = torch.float32) -> ExpertWeights:
    """rows x 4 per tensor: 3 * rows * 4 elements."""
    return ExpertWeights(
        torch.zeros(rows, 4, dtype=dtype), torch.zeros(rows, 4, dtype=dtype), torch.zeros(4, rows, dtype=dtype)
    )


UNIT = weights_nbytes(expert())  # 3 tensors * 8 floats * 4 bytes


def test_size_counts_every_tensor_at_its_dtype():
    assert UNIT == 96
    assert weights_nbytes(expert(dtype=torch.bfloat16)) == 48


def test_evicts_least_recently_used_within_budget():
    mem = ExpertMemory(3 * UNIT)
    assert mem.put((0, 0), expert()) == [] and mem.put((0, 1), expert()) == [] and mem.put((0, 2), expert()) == []
    assert mem.bytes_used == 3 * UNIT and len(mem) == 3
    assert mem.put((1, 0), expert()) == [(0, 0)]
    assert mem.keys() == [(0, 1), (0, 2), (1, 0)]
    assert mem.put((1, 1), expert(rows=4)) == [(0, 1), (0, 2)]  # two units: evicted oldest first
    assert mem.keys() == [(1, 0), (1, 1)] and mem.bytes_used == 3 * UNIT
    assert (0, 0) not in mem and mem.get((0, 0)) is None


def test_get_refreshes_recency():
    mem = ExpertMemory(2 * UNIT)
    a = expert()
    mem.put("a", a)
    mem.put("b", expert())
    assert mem.get("a") is a
    assert mem.put("c", expert()) == ["b"]
    assert mem.keys() == ["a", "c"]


def test_put_again_replaces_without_counting_as_eviction():
    mem = ExpertMemory(2 * UNIT)
    mem.put("a", expert())
    mem.put("b", expert())
    assert mem.put("a", expert()) == []
    assert mem.keys() == ["b", "a"] and mem.bytes_used == 2 * UNIT


def test_oversize_expert_is_refused_and_nothing_is_evicted():
    mem = ExpertMemory(2 * UNIT)
    mem.put("a", expert())
    with pytest.raises(ExpertTooLargeError, match="raise the budget") as info:
        mem.put("big", expert(rows=8))
    assert isinstance(info.value, NeuroDaskError)
    assert mem.keys() == ["a"] and mem.bytes_used == UNIT
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value)


def test_discard_frees_bytes_and_ignores_unknown_keys():
    mem = ExpertMemory(2 * UNIT)
    mem.put("a", expert())
    mem.discard("a")
    mem.discard("never")
    assert len(mem) == 0 and mem.bytes_used == 0 and "a" not in mem


def test_budget_must_be_positive():
    with pytest.raises(ConfigError):
        ExpertMemory(0)
