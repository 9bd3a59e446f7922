"""Adaptive replication and hedging rules as tables; randomness and time injected."""

from __future__ import annotations

import random

import pytest

from neuro_dask.errors import ConfigError
from neuro_dask.trust.hedging import HedgePolicy, LatencyTracker
from neuro_dask.trust.replication import (
    CallPlan,
    ReplicationPolicy,
    Standing,
    plan_call,
    replication_probability,
)

POLICY = ReplicationPolicy(spot_check=0.05, establish_after=20)


@pytest.mark.parametrize(
    "standing, p",
    [
        (Standing(), 1.0),  # newcomer: always checked
        (Standing(established=True, consecutive_valid=20), 1.0),  # just established
        (Standing(established=True, consecutive_valid=40), 0.5),  # halves as the record doubles
        (Standing(established=True, consecutive_valid=200), 0.1),
        (Standing(established=True, consecutive_valid=10**6), 0.05),  # never below the spot-check rate
        (Standing(trusted=True), 0.05),
    ],
)
def test_replication_probability(standing, p):
    assert replication_probability(standing, POLICY) == pytest.approx(p)


STANDINGS = {
    "new1": Standing(owner="n1"),
    "new2": Standing(owner="n2"),
    "est1": Standing(established=True, consecutive_valid=10**6, owner="e1"),
    "est1b": Standing(established=True, consecutive_valid=10**6, owner="e1"),
    "tru": Standing(trusted=True, owner="t"),
}


def test_newcomer_is_checked_against_a_worker_with_a_record():
    plan = plan_call(["new1", "new2", "est1"], STANDINGS.get, POLICY, random.Random(0))
    assert plan == CallPlan(("new1", "est1"), 2)


def test_replicas_never_share_an_owner():
    plans = [plan_call(["est1", "est1b", "new1"], STANDINGS.get, POLICY, random.Random(s)) for s in range(200)]
    replicated = [p for p in plans if len(p.workers) > 1]
    assert replicated and all(p.workers == ("est1", "new1") for p in replicated)


def test_spot_check_rate_of_a_long_record_is_about_five_percent():
    rng = random.Random(1)
    plans = [plan_call(["est1", "tru"], STANDINGS.get, POLICY, rng) for _ in range(4000)]
    rate = sum(len(p.workers) > 1 for p in plans) / len(plans)
    assert 0.04 < rate < 0.06
    assert all(p.quorum == len(p.workers) for p in plans)


def test_no_other_owner_means_unchecked():
    plan = plan_call(["new1"], STANDINGS.get, POLICY, random.Random(0))
    assert plan.unchecked and plan.workers == ("new1",) and plan.quorum == 1


def test_latency_quantile_drives_hedge_time_and_deadline():
    t = LatencyTracker(HedgePolicy(min_samples=5, hedge_slack=1.0, deadline_factor=10, min_deadline=0.001))
    assert t.hedge_after("w", 1) == pytest.approx(0.05)  # default before any measurement
    for ms in range(1, 21):
        t.observe("w", ms / 1000, rows=1)
    assert t.hedge_after("w", 1) == pytest.approx(0.020)  # p95 of 1..20 ms
    assert t.hedge_after("w", 4) == pytest.approx(0.080)  # scales with rows
    assert t.deadline("w", 1) == pytest.approx(0.2)
    assert t.hedge_after("fresh", 1) == pytest.approx(0.020)  # falls back to everyone's


def test_timeouts_in_a_row_double_the_deadline_up_to_the_cap_and_an_answer_resets_it():
    t = LatencyTracker(HedgePolicy(min_samples=5, deadline_factor=10, min_deadline=0.5, max_deadline=10.0))
    for _ in range(20):
        t.observe("w", 0.001, rows=1)
    patience = t.hedge_after("w", 1)
    deadlines = [t.deadline("w", 1)]
    for _ in range(6):
        t.timed_out("w")
        deadlines.append(t.deadline("w", 1))
    assert deadlines == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0])  # capped: a hung worker
    assert t.hedge_after("w", 1) == patience  # timeouts never delay its hedges
    t.observe("w", 0.001, rows=1)
    assert t.deadline("w", 1) == pytest.approx(0.5)


def test_hedges_are_capped_at_ten_percent_of_calls():
    t = LatencyTracker()
    hedged = 0
    for _ in range(1000):
        t.count_call()
        if t.may_hedge():
            t.count_hedge()
            hedged += 1
    assert hedged == 100


@pytest.mark.parametrize(
    "kw",
    [
        dict(hedge_quantile=1.0),
        dict(hedge_cap=1.5),
        dict(hedge_slack=0.5),
        dict(min_deadline=0),
        dict(min_deadline=2.0, max_deadline=1.0),
    ],
)
def test_bad_hedge_policy(kw):
    with pytest.raises(ConfigError):
        HedgePolicy(**kw)


@pytest.mark.parametrize(
    "finished, total, expected",
    [
        ([], 4, None),  # nobody has answered yet
        ([0.002], 4, None),  # one of four: below the peer quorum of half
        ([0.001, 0.002], 4, 0.004),  # half answered: 2 x the slowest of them
        ([0.001, 0.002, 0.003], 4, 0.006),
        ([0.002], 1, None),  # a call alone in its round has no peers
        ([0.002], 2, 0.004),
    ],
)
def test_peer_patience(finished, total, expected):
    t = LatencyTracker(HedgePolicy(peer_factor=2.0, peer_quorum=0.5))
    got = t.peer_patience(finished, total)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize("kw", [dict(peer_factor=0.5), dict(peer_quorum=0), dict(peer_quorum=1.5)])
def test_bad_peer_policy(kw):
    with pytest.raises(ConfigError):
        HedgePolicy(**kw)
