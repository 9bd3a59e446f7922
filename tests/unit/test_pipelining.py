"""Pipelined micro-batches: a generation's rows run as independent lanes whose expert calls are
in flight at the same time, with exactly the output of the unsplit generation."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import ARCHITECTURES, padded_batch

import neuro_dask as nd


class RendezvousExecutor:
    """Its first `lanes` calls wait until all of them have arrived: a generation whose lanes did
    not call their experts concurrently would break the barrier (and fail the test)."""

    def __init__(self, inner, lanes: int):
        self.inner = inner
        self.barrier = threading.Barrier(lanes, timeout=20)
        self.met = 0
        self._lock = threading.Lock()

    def run_layer(self, layer, groups):
        with self._lock:
            first = self.met < self.barrier.parties
            self.met += 1
        if first:
            self.barrier.wait()
        return self.inner.run_layer(layer, groups)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_two_lanes_call_their_experts_at_once_and_generate_the_same_tokens(sharded, variant):
    model = nd.load(sharded(variant))
    ids, mask = padded_batch((5, 9, 13, 7), seed=4)
    expected = model.generate(ids, mask, max_new_tokens=12)
    model.executor = RendezvousExecutor(model.executor, lanes=2)
    model.micro_batches = 2
    assert torch.equal(model.generate(ids, mask, max_new_tokens=12), expected)
    assert model.executor.met > 2 and not model.executor.barrier.broken


def test_lanes_never_outnumber_rows_and_seeded_sampling_repeats(sharded):
    model = nd.load(sharded("mixtral"))
    model.micro_batches = 4
    ids, mask = padded_batch((5, 9), seed=2)  # two rows: two lanes
    greedy = model.generate(ids, mask, max_new_tokens=6)
    model.micro_batches = 1
    assert torch.equal(greedy, model.generate(ids, mask, max_new_tokens=6))
    model.micro_batches = 2
    first = model.generate(ids, mask, max_new_tokens=6, do_sample=True, seed=11)
    assert torch.equal(first, model.generate(ids, mask, max_new_tokens=6, do_sample=True, seed=11))


def test_micro_batches_come_from_the_client_settings():
    import dask

    from neuro_dask.errors import ConfigFieldError
    from neuro_dask.settings import ClientSettings

    with dask.config.set({"neuro.client.micro-batches": 3}):
        assert ClientSettings.load().micro_batches == 3
    with pytest.raises(ConfigFieldError, match="micro-batches"):
        ClientSettings.load(micro_batches=0)
