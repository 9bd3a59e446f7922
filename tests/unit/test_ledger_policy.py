"""The ledger's pure rules (ledger/policy.py) as tables, plus property tests on the fee split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuro_dask.ledger import policy
from neuro_dask.ledger.policy import BPS, MONTH, UNIT, format_neuro, neuro, split_fee

# ---- amounts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given_, units",
    [
        (0, 0),
        (1, UNIT),
        (7, 7 * UNIT),
        ("0.5", UNIT // 2),
        ("1.000000001", UNIT + 1),
        ("-2", -2 * UNIT),
        ("3", 3 * UNIT),
        ("0.000000001", 1),
    ],
)
def test_neuro_converts_to_units(given_, units):
    assert neuro(given_) == units


@pytest.mark.parametrize("bad", ["1.0000000001", "abc", "1.2.3", "", "1e9", ".5", "-", True, None, 1e-10])
def test_neuro_refuses_what_is_not_an_amount(bad):
    with pytest.raises(ValueError):
        neuro(bad)


@pytest.mark.parametrize(
    "units, text",
    [(0, "0"), (UNIT, "1"), (UNIT // 2, "0.5"), (1234 * UNIT + 1, "1,234.000000001"), (-UNIT // 4, "-0.25")],
)
def test_format_neuro(units, text):
    assert format_neuro(units) == text
    assert neuro(text.replace(",", "")) == units


# ---- rule 1: the fee split ----------------------------------------------------------------------

FEE_TABLE = [
    # fee, work, treasury_bps, burn_bps
    (0, {}, 1_000, 2_000),
    (0, {"a": 3}, 1_000, 2_000),
    (1, {"a": 1}, 1_000, 2_000),
    (10, {"a": 1, "b": 1, "c": 1}, 1_000, 2_000),
    (100, {"a": 1, "b": 2}, 1_000, 2_000),
    (1_000_003, {"a": 7, "b": 11, "c": 13}, 1_000, 2_000),
    (UNIT, {"a": 1}, 0, 0),
    (UNIT, {"a": 1}, BPS, BPS),
    (UNIT, {"a": 1}, 5_000, BPS),
    (999, {"a": 0, "b": 0}, 1_000, 2_000),  # zero work: everything to the treasury (less the burn)
    (999, {}, 1_000, 2_000),
    (999, {"a": -5, "b": 3}, 1_000, 2_000),  # negative work counts as none
    (17, {f"p{i}": 1 for i in range(40)}, 1_000, 2_000),  # more providers than units: all rounds to 0
    (10**18, {"a": 1, "b": 10**9}, 3_333, 7_777),
]


@pytest.mark.parametrize("fee, work, treasury_bps, burn_bps", FEE_TABLE)
def test_split_fee_adds_up_to_the_fee(fee, work, treasury_bps, burn_bps):
    s = split_fee(fee, work, treasury_bps, burn_bps)
    assert s.total == fee
    assert sum(s.providers.values()) + s.treasury + s.burn == fee
    assert all(v > 0 for v in s.providers.values())
    assert s.treasury >= 0 and s.burn >= 0
    assert set(s.providers) <= {p for p, w in work.items() if w > 0}
    gross_treasury = fee * treasury_bps // BPS
    assert s.burn == gross_treasury * burn_bps // BPS


def test_split_fee_exact_numbers():
    # fee 100, 10% treasury = 10, 20% of that burned = 2; providers share 90 as 1:2 = 30, 60
    s = split_fee(100, {"a": 1, "b": 2}, 1_000, 2_000)
    assert s.providers == {"a": 30, "b": 60}
    assert (s.treasury, s.burn) == (8, 2)


def test_split_fee_remainder_goes_to_treasury():
    # fee 10: treasury 1, burn 0; providers' 9 among 2 equal -> 4 each, 1 left over -> treasury 2
    s = split_fee(10, {"a": 1, "b": 1}, 1_000, 2_000)
    assert s.providers == {"a": 4, "b": 4}
    assert (s.treasury, s.burn) == (2, 0)


def test_split_fee_without_work_pays_treasury_and_burn_only():
    s = split_fee(1_000, {}, 1_000, 2_000)
    assert s.providers == {}
    assert (s.treasury, s.burn) == (980, 20)
    assert split_fee(1_000, {"a": 0}, 1_000, 2_000) == s


def test_split_fee_is_proportional_and_rounds_down():
    s = split_fee(1_000_003, {"a": 7, "b": 11, "c": 13}, 1_000, 2_000)
    pool = 1_000_003 - 1_000_003 * 1_000 // BPS
    assert s.providers == {p: pool * w // 31 for p, w in {"a": 7, "b": 11, "c": 13}.items()}


@settings(max_examples=300, deadline=None)
@given(
    fee=st.integers(0, 10**18),
    work=st.dictionaries(st.text("abcdefgh", min_size=1, max_size=3), st.integers(-5, 10**12), max_size=8),
    treasury_bps=st.integers(0, BPS),
    burn_bps=st.integers(0, BPS),
)
def test_split_fee_property(fee, work, treasury_bps, burn_bps):
    s = split_fee(fee, work, treasury_bps, burn_bps)
    assert s.total == fee
    assert all(isinstance(v, int) and v > 0 for v in s.providers.values())
    assert s.treasury >= 0 and s.burn >= 0
    assert set(s.providers) <= {p for p, w in work.items() if w > 0}
    # nobody gets more than its exact proportional share of the providers' part
    positive = sum(w for w in work.values() if w > 0)
    pool = fee - fee * treasury_bps // BPS
    for p, amount in s.providers.items():
        assert amount * positive <= pool * work[p]
    # what rounding leaves is less than one unit per paid provider (plus the treasury's share)
    if positive:
        assert pool - sum(s.providers.values()) <= len([w for w in work.values() if w > 0])


# ---- rule 2: emissions --------------------------------------------------------------------------


def test_emission_schedule_decreases():
    initial, decay = 10_000 * UNIT, 9_990
    amounts = [policy.emission_for_epoch(e, initial, decay, 10**30) for e in range(200)]
    assert amounts[0] == initial
    assert all(b < a for a, b in zip(amounts, amounts[1:]))
    assert amounts[1] == initial * decay // BPS
    assert amounts[2] == (initial * decay // BPS) * decay // BPS


@pytest.mark.parametrize(
    "epoch, initial, decay, pool, expected",
    [
        (0, 100, 5_000, 1_000, 100),
        (1, 100, 5_000, 1_000, 50),
        (2, 100, 5_000, 1_000, 25),
        (3, 100, 5_000, 1_000, 12),
        (0, 100, 5_000, 40, 40),  # capped by the pool
        (1, 100, 5_000, 40, 40),
        (2, 100, 5_000, 40, 25),
        (0, 100, 5_000, 0, 0),  # empty pool
        (5, 100, 0, 1_000, 0),  # decay 0: only epoch 0 pays
        (0, 100, 0, 1_000, 100),
        (50, 100, BPS, 1_000, 100),  # no decay
        (10_000, 100, 9_990, 1_000, 0),  # decays to nothing
        (0, 0, 9_990, 1_000, 0),
    ],
)
def test_emission_table(epoch, initial, decay, pool, expected):
    assert policy.emission_for_epoch(epoch, initial, decay, pool) == expected


@settings(max_examples=200, deadline=None)
@given(
    epoch=st.integers(0, 500), initial=st.integers(0, 10**17), decay=st.integers(0, BPS), pool=st.integers(0, 10**17)
)
def test_emission_never_exceeds_pool_and_never_grows(epoch, initial, decay, pool):
    a = policy.emission_for_epoch(epoch, initial, decay, pool)
    b = policy.emission_for_epoch(epoch + 1, initial, decay, pool)
    assert 0 <= a <= min(pool, initial)
    assert b <= a


def test_split_emission_keeps_remainder_in_pool():
    paid = policy.split_emission(10, {"a": 1, "b": 1, "c": 1})
    assert paid == {"a": 3, "b": 3, "c": 3}
    assert policy.split_emission(10, {}) == {}
    assert policy.split_emission(0, {"a": 1}) == {}


# ---- rule 3: vesting ----------------------------------------------------------------------------

TOTAL = 200_000_000 * UNIT


@pytest.mark.parametrize(
    "months_elapsed, expected",
    [
        (0, 0),
        (1, 0),
        (11, 0),
        (11.99, 0),  # before the cliff: nothing
        (12, TOTAL * 12 // 48),  # at the cliff: 12/48
        (13, TOTAL * 13 // 48),
        (24, TOTAL // 2),
        (47, TOTAL * 47 // 48),
        (47.99, TOTAL * 47 // 48),
        (48, TOTAL),
        (60, TOTAL),
        (1_000, TOTAL),  # all of it from the last month on
    ],
)
def test_vesting_schedule(months_elapsed, expected):
    start = 1_700_000_000.0
    assert policy.vested(TOTAL, start, start + months_elapsed * MONTH, 48, 12) == expected


def test_vesting_before_start_and_without_schedule():
    assert policy.vested(TOTAL, 1000.0, 0.0, 48, 12) == 0
    assert policy.vested(TOTAL, 1000.0, 0.0, 0, 0) == TOTAL  # no schedule: vested at once


def test_vesting_is_monotonic():
    values = [policy.vested(TOTAL, 0.0, d * 86_400.0, 48, 12) for d in range(0, 50 * 30, 7)]
    assert values == sorted(values)
    assert values[0] == 0 and values[-1] == TOTAL


# ---- rule 4: slashing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, others, correlation, cap, expected",
    [
        (1_000, 0, 10_000, BPS, 1_000),
        (1_000, 1, 10_000, BPS, 2_000),  # correlation 100%: each other provider adds the base again
        (1_000, 4, 10_000, BPS, 5_000),
        (1_000, 9, 10_000, BPS, BPS),
        (1_000, 50, 10_000, BPS, BPS),  # capped
        (1_000, 50, 10_000, 3_000, 3_000),
        (1_000, 2, 5_000, BPS, 2_000),  # 50% correlation: base x (1 + 0.5 x 2)
        (1_000, 3, 0, BPS, 1_000),  # no correlation
        (1_000, -3, 10_000, BPS, 1_000),  # never below the base
        (0, 10, 10_000, BPS, 0),
        (2_000, 0, 10_000, 1_000, 1_000),  # the cap binds even alone
    ],
)
def test_slash_bps_table(base, others, correlation, cap, expected):
    assert policy.slash_bps(base, others, correlation, cap) == expected


def test_slash_bps_grows_with_others_caught():
    values = [policy.slash_bps(500, n, 10_000, BPS) for n in range(30)]
    assert values == sorted(values)
    assert values[0] < values[5] < values[10]
    assert max(values) == BPS


@pytest.mark.parametrize(
    "amount, burn_bps, expected",
    [
        (100, 5_000, (50, 50)),
        (101, 5_000, (51, 50)),
        (0, 5_000, (0, 0)),
        (7, 0, (7, 0)),
        (7, BPS, (0, 7)),
    ],
)
def test_split_slash(amount, burn_bps, expected):
    assert policy.split_slash(amount, burn_bps) == expected
    assert sum(policy.split_slash(amount, burn_bps)) == amount


# ---- rule 5: governance tally --------------------------------------------------------------------


@pytest.mark.parametrize(
    "yes, no, total, quorum, threshold, quorum_met, passed",
    [
        (60, 40, 100, 3_300, 5_000, True, True),
        (50, 50, 100, 3_300, 5_000, True, False),  # exactly at the threshold: not passed
        (51, 49, 100, 3_300, 5_000, True, True),
        (33, 0, 100, 3_300, 5_000, True, True),  # exactly at quorum: met
        (32, 0, 100, 3_300, 5_000, False, False),  # just under quorum
        (0, 0, 100, 3_300, 5_000, False, False),
        (0, 0, 0, 3_300, 5_000, False, False),  # no stake at all
        (10, 0, 0, 3_300, 5_000, False, False),
        (0, 100, 100, 3_300, 5_000, True, False),
        (2, 1, 3, 1_000, 6_666, True, True),  # 2/3 = 6666.67 bps > 6666
        (2, 1, 3, 1_000, 6_667, True, False),  # 6666.67 < 6667
        (100, 0, 100, BPS, BPS, True, False),  # unanimity is never "more than" 100%
        (99, 0, 100, BPS, 5_000, False, False),  # 100% quorum needs everyone
        (100, 0, 100, BPS, 5_000, True, True),
    ],
)
def test_tally_table(yes, no, total, quorum, threshold, quorum_met, passed):
    t = policy.tally(yes, no, total, quorum, threshold)
    assert t.quorum_met is quorum_met
    assert t.passed is passed
    assert (t.yes, t.no, t.total_stake) == (yes, no, total)


@settings(max_examples=200, deadline=None)
@given(
    yes=st.integers(0, 10**15),
    no=st.integers(0, 10**15),
    extra=st.integers(0, 10**15),
    quorum=st.integers(1_000, BPS),
    threshold=st.integers(5_000, BPS),
)
def test_tally_property(yes, no, extra, quorum, threshold):
    total = yes + no + extra
    t = policy.tally(yes, no, total, quorum, threshold)
    if t.passed:
        assert t.quorum_met and yes > no and yes * BPS > threshold * (yes + no)
    if yes <= no:
        assert not t.passed
