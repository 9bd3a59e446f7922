"""Secure aggregation: exact sums, masked vectors that look uniform, dropout recovery."""

from __future__ import annotations

import random

import numpy as np
import pytest

from neuro_dask.federated.errors import FixedPointOverflowError, ProtocolError, TooFewSurvivorsError
from neuro_dask.federated.secure_aggregation import (
    FixedPointCodec,
    MaskedUpdate,
    MaskingParticipant,
    SecureAggregator,
)


def _entropy(seed):
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


def _federation(n, seed=0, codec=None):
    codec = codec or FixedPointCodec()
    parts = [MaskingParticipant(f"p{i}", codec, _entropy(seed * 100 + i)) for i in range(n)]
    keys = {p.participant_id: p.public_key for p in parts}
    for p in parts:
        p.register_peers(keys)
    return parts, SecureAggregator(codec)


def _updates(n, length, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, scale, length) for _ in range(n)]


@pytest.mark.parametrize("n,length,scale", [(2, 1, 1.0), (3, 17, 1.0), (4, 1000, 0.01), (8, 257, 100.0)])
def test_sum_is_exact(n, length, scale):
    parts, agg = _federation(n)
    xs = _updates(n, length, seed=n, scale=scale)
    ids = [p.participant_id for p in parts]
    agg.begin(0, ids)
    for p, x in zip(parts, xs):
        agg.receive(p.mask(x, 0, ids))
    total = agg.finish({})
    codec = agg.codec
    with np.errstate(over="ignore"):
        expected = codec.decode(sum(codec.encode(x) for x in xs))
    assert np.array_equal(total, expected)  # bit-exact: the masks cancel over Z_2^64
    assert np.max(np.abs(total - sum(xs))) <= n * 2.0 ** -codec.frac_bits


@pytest.mark.parametrize("dropped", [["p3"], ["p0"], ["p1", "p4"]])
def test_dropout_recovery_gives_exact_sum_of_survivors(dropped):
    parts, agg = _federation(5, seed=1)
    xs = dict(zip([p.participant_id for p in parts], _updates(5, 64, seed=7)))
    ids = sorted(xs)
    agg.begin(3, ids)
    masked = {p.participant_id: p.mask(xs[p.participant_id], 3, ids) for p in parts}  # all trained and masked...
    for pid in ids:
        if pid not in dropped:  # ...but the dropped ones never delivered
            agg.receive(masked[pid])
    assert agg.dropped == sorted(dropped)
    revealed = {p.participant_id: p.reveal(3, agg.dropped, agg.survivors) for p in parts if p.participant_id not in dropped}
    total = agg.finish(revealed)
    codec = agg.codec
    with np.errstate(over="ignore"):
        expected = codec.decode(sum(codec.encode(xs[s]) for s in ids if s not in dropped))
    assert np.array_equal(total, expected)


def test_without_the_revealed_seeds_the_sum_is_garbage():
    parts, agg = _federation(3)
    ids = [p.participant_id for p in parts]
    xs = _updates(3, 32)
    agg.begin(0, ids)
    for p, x in zip(parts[:2], xs[:2]):
        agg.receive(p.mask(x, 0, ids))
    with pytest.raises(ProtocolError):
        agg.finish({})
    fake = {s: {"p2": b"\0" * 32} for s in agg.survivors}
    assert np.max(np.abs(agg.finish(fake) - xs[0] - xs[1])) > 1e6


def _chi_square_top_byte(values: np.ndarray) -> float:
    counts = np.bincount((values >> np.uint64(56)).astype(np.int64), minlength=256)
    expected = values.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("update", [np.zeros(20000), np.full(20000, 3.0), np.linspace(-5, 5, 20000)])
def test_coordinator_only_ever_holds_uniform_masked_vectors(update):
    """Everything the aggregator is handed is a MaskedUpdate whose values are uniform on Z_2^64
    whatever the update (zeros, a constant, a ramp): chi-square of the top byte, 255 degrees of
    freedom, below the 0.1% critical value 330.5; the low bits too."""
    parts, agg = _federation(3, seed=5)
    ids = [p.participant_id for p in parts]
    agg.begin(0, ids)
    for p in parts:
        agg.receive(p.mask(update, 0, ids))
    assert all(isinstance(m, MaskedUpdate) for m in agg.log)
    for m in agg.log:
        assert not np.array_equal(m.values, agg.codec.encode(update))
        assert _chi_square_top_byte(m.values) < 330.5
        low = (m.values & np.uint64(0xFF)).astype(np.int64)
        assert abs(np.bincount(low, minlength=256).std() - np.sqrt(len(low) / 256)) < 0.25 * np.sqrt(len(low) / 256)
        # independent of the update: correlation of masked values' top bits with the update ~ 0
        top = (m.values >> np.uint64(63)).astype(np.float64)
        if update.std() > 0:
            assert abs(np.corrcoef(top, update)[0, 1]) < 0.05


def test_aggregator_refuses_anything_but_masked_updates():
    _, agg = _federation(2)
    agg.begin(0, ["p0", "p1"])
    with pytest.raises(ProtocolError):
        agg.receive(np.zeros(3))


def test_participant_refuses_to_reveal_a_survivors_seed():
    parts, _ = _federation(3)
    ids = [p.participant_id for p in parts]
    parts[0].mask(np.zeros(4), 0, ids)
    with pytest.raises(ProtocolError):
        parts[0].reveal(0, dropped=["p1"], survivors=["p0", "p1", "p2"])  # p1 both dropped and surviving
    with pytest.raises(ProtocolError):
        parts[0].reveal(0, dropped=["p0"], survivors=["p1", "p2"])  # asks p0 about itself
    with pytest.raises(ProtocolError):
        parts[1].reveal(0, dropped=["p2"], survivors=["p0", "p1"])  # p1 sent nothing in round 0
    assert set(parts[0].reveal(0, dropped=["p2"], survivors=["p0", "p1"])) == {"p2"}


def test_masking_twice_in_one_round_is_refused():
    parts, _ = _federation(2)
    parts[0].mask(np.zeros(4), 0, ["p0", "p1"])
    with pytest.raises(ProtocolError):
        parts[0].mask(np.ones(4), 0, ["p0", "p1"])


def test_round_seeds_differ_between_rounds():
    parts, _ = _federation(2)
    a = parts[0].mask(np.zeros(8), 0, ["p0", "p1"]).values
    b = parts[0].mask(np.zeros(8), 1, ["p0", "p1"]).values
    assert not np.array_equal(a, b)


def test_too_few_survivors_and_overflow():
    parts, agg = _federation(3)
    ids = [p.participant_id for p in parts]
    agg.begin(0, ids)
    agg.receive(parts[0].mask(np.zeros(2), 0, ids))
    with pytest.raises(TooFewSurvivorsError):
        agg.finish({})
    codec = FixedPointCodec(frac_bits=24, max_participants=1024)
    with pytest.raises(FixedPointOverflowError):
        codec.encode(np.array([codec.limit * 2]))
    with pytest.raises(FixedPointOverflowError):
        codec.encode(np.array([np.nan]))


def test_fixed_point_round_trip_negative_values():
    codec = FixedPointCodec(frac_bits=16)
    x = np.array([-1.5, 0.0, 2.25, -1e-3])
    assert np.allclose(codec.decode(codec.encode(x)), x, atol=2**-16)
