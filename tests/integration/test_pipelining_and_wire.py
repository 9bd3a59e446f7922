"""On a cluster: pipelined lanes generate what one lane does, over either transport; bfloat16
hidden states halve the bytes on the wire and move the logits by far less than their spread."""

from __future__ import annotations

import dask
import pytest
import torch
from tiny_models import padded_batch

import neuro_dask as nd


@pytest.mark.parametrize("transport", ["direct", "futures"])
def test_pipelined_lanes_generate_like_one_lane(shared_cluster, sharded, transport):
    _, client = shared_cluster
    ids, mask = padded_batch((5, 9, 13, 7, 11, 6), seed=9)
    expected = nd.load(sharded("qwen2_moe")).generate(ids, mask, max_new_tokens=16)
    with (
        dask.config.set({"neuro.client.micro-batches": 3}),
        nd.load(sharded("qwen2_moe"), client=client, transport=transport) as model,
    ):
        assert model.micro_batches == 3
        assert torch.equal(model.generate(ids, mask, max_new_tokens=16), expected)


def test_bfloat16_on_the_wire_halves_the_bytes(shared_cluster, sharded):
    _, client = shared_cluster
    ids, mask = padded_batch((5, 9, 13), seed=5)
    local = nd.load(sharded("mixtral"))
    sent = {}
    logits = {}
    for wire in (None, "bfloat16"):
        with dask.config.set({"neuro.client.wire-dtype": wire}), nd.load(sharded("mixtral"), client=client) as model:
            logits[wire] = model.forward(ids, mask)
            sent[wire] = dict(model.executor.wire_bytes)
    # Same calls, half the bytes each way (float32 -> bfloat16).
    assert sent[None]["sent"] == 2 * sent["bfloat16"]["sent"] > 0
    assert sent[None]["received"] == 2 * sent["bfloat16"]["received"] > 0
    real = mask.bool()
    torch.testing.assert_close(logits[None][real], local.forward(ids, mask)[real], atol=1e-5, rtol=0)
    # bfloat16 keeps ~3 significant digits of each expert output: logits move by far less than
    # their spread, so greedy decoding of the tiny model does not change.
    drift = (logits["bfloat16"][real] - logits[None][real]).abs().max().item()
    assert drift < 0.05 * logits[None][real].std().item(), drift


def test_quorum_replicas_are_counted_on_the_wire(shared_cluster, sharded):
    """With trust on, every reply a quorum used (primary, replicas, hedges) is counted: a network
    of unestablished workers replicates every call, so at least twice the bytes of trust off."""
    _, client = shared_cluster
    ids, mask = padded_batch((5, 9, 13), seed=5)
    moved = {}
    for trust in (False, True):
        with (
            dask.config.set({"neuro.client.trust": trust, "neuro.client.spot-check": 1.0}),
            nd.load(sharded("mixtral"), client=client) as model,
        ):
            model.forward(ids, mask)
            moved[trust] = dict(model.executor.wire_bytes)
    assert moved[False]["sent"] > 0 and moved[False]["received"] > 0
    assert moved[True]["sent"] >= 2 * moved[False]["sent"] * 0.95, moved  # message headers differ a little
    assert moved[True]["received"] >= 2 * moved[False]["received"] * 0.95, moved
