"""Secure aggregation: exact sums, masked vectors that look uniform, dropout recovery, and double
masking: an aggregator that lies about who dropped still cannot unmask anyone."""

from __future__ import annotations

import random

import numpy as np
import pytest

from neuro_dask.federated import shamir
from neuro_dask.federated.errors import FixedPointOverflowError, ProtocolError, TooFewSurvivorsError
from neuro_dask.federated.secure_aggregation import (
    FixedPointCodec,
    MaskedUpdate,
    MaskingParticipant,
    Reveal,
    SecureAggregator,
    mask_stream,
    pair_sign,
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


def _reveals(parts, agg, round_id):
    """What an honest coordinator does: ask every survivor once, relaying its sealed shares."""
    survivors = set(agg.survivors)
    return {
        p.participant_id: p.reveal(round_id, agg.dropped, agg.survivors, agg.sealed_for(p.participant_id))
        for p in parts
        if p.participant_id in survivors
    }


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
    total = agg.finish(_reveals(parts, agg, 0))
    codec = agg.codec
    with np.errstate(over="ignore"):
        expected = codec.decode(sum(codec.encode(x) for x in xs))
    assert np.array_equal(total, expected)  # bit-exact: the masks cancel over Z_2^64
    assert np.max(np.abs(total - sum(xs))) <= n * 2.0**-codec.frac_bits


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
    total = agg.finish(_reveals(parts, agg, 3))
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
    real = _reveals(parts, agg, 0)
    fake = {s: Reveal(r.participant, r.self_shares, {"p2": b"\0" * 32}) for s, r in real.items()}
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
    m1 = parts[1].mask(np.zeros(4), 0, ids)
    parts[0].mask(np.zeros(4), 0, ids)
    sealed = {"p1": m1.sealed_shares["p0"]}
    with pytest.raises(ProtocolError):
        parts[0].reveal(0, dropped=["p1"], survivors=["p0", "p1", "p2"], sealed_for_me={})  # p1 both
    with pytest.raises(ProtocolError):
        parts[0].reveal(0, dropped=["p0"], survivors=["p1", "p2"], sealed_for_me={})  # asks p0 about itself
    with pytest.raises(ProtocolError):
        parts[2].reveal(0, dropped=["p1"], survivors=["p0", "p2"], sealed_for_me={})  # p2 sent nothing in round 0
    with pytest.raises(ProtocolError, match="no self-mask share"):
        parts[0].reveal(0, dropped=["p2"], survivors=["p0", "p1"], sealed_for_me={})
    answer = parts[0].reveal(0, dropped=["p2"], survivors=["p0", "p1"], sealed_for_me=sealed)
    assert set(answer.pair_seeds) == {"p2"} and set(answer.self_shares) == {"p0", "p1"}


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
    assert agg.needed == 2  # a majority of 3 must survive to recover the self-masks
    codec = FixedPointCodec(frac_bits=24, max_participants=1024)
    with pytest.raises(FixedPointOverflowError):
        codec.encode(np.array([codec.limit * 2]))
    with pytest.raises(FixedPointOverflowError):
        codec.encode(np.array([np.nan]))


def test_fixed_point_round_trip_negative_values():
    codec = FixedPointCodec(frac_bits=16)
    x = np.array([-1.5, 0.0, 2.25, -1e-3])
    assert np.allclose(codec.decode(codec.encode(x)), x, atol=2**-16)


# ---- double masking: an aggregator that lies about dropouts ----------------------------------------


def test_declaring_a_delivered_update_dropped_does_not_unmask_it():
    """The attack double masking stops: p2's vector arrived, the aggregator says p2 dropped, gets
    every survivor's pair seed with p2 and strips those masks: what is left is still masked by
    p2's self-mask (uniform, nowhere near the update). Asking again with p2 as a survivor, to get
    the shares of its self-mask too, is refused by every participant."""
    parts, agg = _federation(4, seed=3)
    ids = [p.participant_id for p in parts]
    update = np.full(20000, 2.5)
    agg.begin(0, ids)
    masked = {p.participant_id: p.mask(update, 0, ids) for p in parts}
    honest = [p for p in parts if p.participant_id != "p2"]
    lied = {
        p.participant_id: p.reveal(
            0,
            ["p2"],
            [q.participant_id for q in honest],
            {q: masked[q].sealed_shares[p.participant_id] for q in ("p0", "p1", "p3") if q != p.participant_id},
        )
        for p in honest
    }
    stripped = masked["p2"].values.copy()
    with np.errstate(over="ignore"):
        for s, r in lied.items():
            m = mask_stream(r.pair_seeds["p2"], stripped.size)
            stripped = stripped + m if pair_sign(s, "p2") > 0 else stripped - m  # undo p2's pair masks
    assert not np.allclose(agg.codec.decode(stripped), update, atol=1.0)
    assert _chi_square_top_byte(stripped) < 330.5  # still uniform: the self-mask stands
    assert all("p2" not in r.self_shares for r in lied.values())
    for p in honest:
        with pytest.raises(ProtocolError, match="already answered"):
            p.reveal(0, [], ids, {q: masked[q].sealed_shares[p.participant_id] for q in ids if q != p.participant_id})


def test_an_altered_sealed_share_is_refused():
    parts, agg = _federation(3, seed=4)
    ids = [p.participant_id for p in parts]
    agg.begin(0, ids)
    masked = [p.mask(np.ones(4), 0, ids) for p in parts]
    sealed = {"p1": masked[1].sealed_shares["p0"], "p2": masked[2].sealed_shares["p0"]}
    sealed["p1"] = bytes([sealed["p1"][0] ^ 1]) + sealed["p1"][1:]
    with pytest.raises(ProtocolError, match="altered"):
        parts[0].reveal(0, [], ids, sealed)


def test_a_survivor_whose_vector_arrived_but_who_never_answers_the_unmasking_is_recovered_by_the_others():
    """A self-mask needs only a majority of shares: with nobody dropped (so no pair seeds are
    needed), a survivor whose answer to the unmasking is lost does not sink the round."""
    parts, agg = _federation(5, seed=9)
    ids = [p.participant_id for p in parts]
    xs = _updates(5, 50, seed=2)
    agg.begin(0, ids)
    for p, x in zip(parts, xs):
        agg.receive(p.mask(x, 0, ids))
    answers = _reveals(parts, agg, 0)
    del answers["p3"]
    total = agg.finish({**answers, "p3": Reveal("p3", {}, {})})  # p3's answer lost: 4 of 5 shares each
    assert np.max(np.abs(total - sum(xs))) <= 5 * 2.0**-agg.codec.frac_bits


@pytest.mark.parametrize("n, t", [(1, 1), (3, 2), (5, 3), (10, 6)])
def test_shamir_any_threshold_of_shares_recovers_the_secret(n, t):
    rng = random.Random(n)
    secret = rng.randbytes(32)
    shares = shamir.split(secret, list(range(1, n + 1)), t, rng.randbytes)
    for _ in range(5):
        subset = dict(rng.sample(sorted(shares.items()), t))
        assert shamir.combine(subset, t) == secret
    if t > 1:
        with pytest.raises(ProtocolError):
            shamir.combine(dict(list(shares.items())[: t - 1]), t)


def test_shamir_refuses_bad_parameters():
    with pytest.raises(ProtocolError):
        shamir.split(b"x" * 32, [1, 2], 3)
    with pytest.raises(ProtocolError):
        shamir.split(b"x" * 32, [1, 1], 1)
    with pytest.raises(ProtocolError):
        shamir.split(b"x" * 32, [0, 2], 1)
