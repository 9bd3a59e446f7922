"""Latency-aware routing (trust/latency.py): the book, the preference rule, the plan, the harness spec."""

from __future__ import annotations

import random

import pytest

from neuro_dask.client.dispatch.routes import RouteTable
from neuro_dask.client.dispatch.trusted import TrustedLayerRunner
from neuro_dask.errors import ConfigError
from neuro_dask.trust.latency import LatencyBook, LatencyPolicy, SimulatedLatency, tier_of


def book(ms: dict[str, float], **policy) -> LatencyBook:
    b = LatencyBook(LatencyPolicy(explore=0.0, **policy), random.Random(0))
    for w, v in ms.items():
        b.observe(w, v / 1000)
    return b


def test_the_estimate_is_an_ewma_of_small_calls():
    b = LatencyBook(LatencyPolicy(alpha=0.5, small_rows=8))
    assert b.estimate("a") is None
    b.observe("a", 0.010)
    b.observe("a", 0.020)
    b.observe("a", 1.0, rows=9)  # a prefill-sized call: not a round-trip sample
    assert b.estimate("a") == pytest.approx(0.015)
    assert b.samples == {"a": 2}


CHOOSE = [
    # (case, latencies ms, candidates in scheduler order, tiers, load, used, policy, chosen)
    ("nothing measured: fewest rows, scheduler's order", {}, "abc", {}, {}, "", {}, "a"),
    ("closest wins", {"a": 30, "b": 1, "c": 31}, "abc", {}, {}, "", {}, "b"),
    ("unmeasured counts as close (optimism)", {"a": 30, "b": 10}, "abc", {}, {"b": 1}, "", {"pack": False}, "c"),
    (
        "within the margin: equally close, fewest rows",
        {"a": 1.0, "b": 1.2},
        "ab",
        {},
        {"a": 1},
        "",
        {"pack": False},
        "b",
    ),
    (
        "within the margin, packing: the worker the layer already uses",
        {"a": 1.0, "b": 1.2},
        "ab",
        {},
        {"b": 1},
        "b",
        {"pack": True},
        "b",
    ),
    (
        "packing never trades a far worker for a close one",
        {"a": 1.0, "b": 30},
        "ab",
        {},
        {"b": 1},
        "b",
        {"pack": True},
        "a",
    ),
    (
        "trust first: a close newcomer never beats a far established worker",
        {"a": 30, "b": 1},
        "ab",
        {"a": 1, "b": 2},
        {},
        "",
        {},
        "a",
    ),
    ("latency reorders within a tier", {"a": 30, "b": 1, "c": 1}, "abc", {"a": 1, "b": 1, "c": 2}, {}, "", {}, "b"),
    ("absolute slack: 1 ms apart is equal", {"a": 0.5, "b": 1.4}, "ab", {}, {"a": 2}, "", {"pack": False}, "b"),
]


@pytest.mark.parametrize("case, ms, candidates, tiers, load, used, policy, chosen", CHOOSE, ids=[c[0] for c in CHOOSE])
def test_the_preference_rule(case, ms, candidates, tiers, load, used, policy, chosen):
    b = book(ms, **policy)
    assert b.choose(list(candidates), lambda w: tiers.get(w, 2), load, lambda w: w in used) == chosen


def test_exploration_tries_far_replicas_now_and_then():
    b = LatencyBook(LatencyPolicy(explore=0.1), random.Random(1))
    b.observe("near", 0.001)
    b.observe("far", 0.030)
    picks = [b.choose(["far", "near"], lambda w: 2, {}) for _ in range(2000)]
    assert 0.07 < picks.count("far") / len(picks) < 0.13
    assert b.explored == picks.count("far")
    b.observe("far", 0.0005)  # explored, and found faster now: its estimate moves
    assert b.estimate("far") < 0.030


@pytest.mark.parametrize(
    "trusted, established, routable, tier",
    [
        (True, True, True, 0),
        (True, False, False, 0),
        (False, True, True, 1),
        (False, False, True, 2),
        (False, True, False, 3),
    ],
)
def test_tiers(trusted, established, routable, tier):
    assert tier_of(trusted, established, routable) == tier


def table(routes, standing=None):
    msg = {"version": 1, "routes": [[l, e, ws] for (l, e), ws in routes.items()]}
    if standing:
        msg["standing"] = standing
    return RouteTable.from_message(msg)


def newcomer(**kw):
    return {"trusted": False, "established": False, "consecutive_valid": 0, "routable": True, **kw}


PLAN = [
    # (case, routes of layer 0, latencies ms, policy, plan)
    ("without a book: spread by rows", {0: "ab", 1: "ab"}, None, {}, {"a": [0], "b": [1]}),
    ("far replicas avoided", {0: "ab", 1: "ab", 2: "ba"}, {"a": 30, "b": 1}, {}, {"b": [0, 1, 2]}),
    ("equal latencies, packed: one message", {0: "ab", 1: "ba"}, {"a": 1, "b": 1}, {"pack": True}, {"a": [0, 1]}),
    ("equal latencies, spread (default)", {0: "ab", 1: "ba"}, {"a": 1, "b": 1}, {}, {"a": [0], "b": [1]}),
    ("only host is far: still planned", {0: "a", 1: "ab"}, {"a": 30, "b": 1}, {}, {"a": [0], "b": [1]}),
]


@pytest.mark.parametrize("case, routes, ms, policy, expected", PLAN, ids=[c[0] for c in PLAN])
def test_plan(case, routes, ms, policy, expected):
    t = table({(0, e): list(ws) for e, ws in routes.items()})
    plan, unroutable = t.plan(0, {e: 1 for e in routes}, latency=None if ms is None else book(ms, **policy))
    assert plan == expected and unroutable == []


def test_plan_keeps_trust_first():
    t = table({(0, 0): ["est", "new"]}, {"est": newcomer(established=True), "new": newcomer()})
    plan, _ = t.plan(0, {0: 1}, latency=book({"est": 40, "new": 1}))
    assert plan == {"est": [0]}
    t = table({(0, 0): ["bad", "new"]}, {"bad": newcomer(routable=False), "new": newcomer()})
    assert t.plan(0, {0: 1}, latency=book({"bad": 1, "new": 40}))[0] == {"new": [0]}


def test_plan_excludes_and_reports_unroutable():
    t = table({(0, 0): ["a"], (0, 1): ["a", "b"]})
    plan, unroutable = t.plan(0, {0: 1, 1: 1}, exclude={"a"}, latency=book({"b": 50}))
    assert plan == {"b": [1]} and unroutable == [0]


def test_trusted_primary_prefers_the_close_idle_replica():
    t = table({(0, 0): ["far", "near", "busy"]})
    b = book({"far": 30, "near": 1, "busy": 0.5})
    assert TrustedLayerRunner._primary_first(["far", "near", "busy"], t, {}, {"busy"}, b)[0] == "near"
    assert TrustedLayerRunner._primary_first(["far", "near", "busy"], t, {}, {"busy"}, None)[0] == "far"


def test_hedges_go_to_the_closest_idle_host_first():
    from neuro_dask.client.dispatch.trusted import _Unit
    from neuro_dask.trust.replication import Standing

    unit = _Unit(0, None, None, ["p", "far", "near"], tried={"p"})
    estimates = {"far": 0.030, "near": 0.001}
    picked = TrustedLayerRunner._alternates("p", [0], {0: unit}, lambda w: Standing(), estimate=estimates.get)
    assert picked == {"near": [0]}


SIMULATED = [
    (None, None),
    (0.02, SimulatedLatency(0.02, 0.0, {})),
    (
        {"delay": 0.02, "jitter": 0.005, "workers": {"tcp://a:1": {"delay": 0.03}, "tcp://b:2": 0.001}},
        SimulatedLatency(0.02, 0.005, {"tcp://a:1": (0.03, 0.005), "tcp://b:2": (0.001, 0.005)}),
    ),
]


@pytest.mark.parametrize("setting, expected", SIMULATED)
def test_simulated_latency_setting(setting, expected):
    assert SimulatedLatency.from_setting(setting) == expected


@pytest.mark.parametrize("setting", [{"delay": -1}, {"dealy": 0.01}, "20ms", {"delay": True}])
def test_simulated_latency_rejects_what_it_cannot_use(setting):
    with pytest.raises(ConfigError):
        SimulatedLatency.from_setting(setting)


def test_simulated_delays_are_seeded_and_bounded():
    sim = SimulatedLatency(0.01, 0.005, {"far": (0.03, 0.0)})
    a = [sim.sample("x", r) for r in [random.Random(3)] for _ in range(100)]
    b = [sim.sample("x", r) for r in [random.Random(3)] for _ in range(100)]
    assert a == b and all(0.005 <= s <= 0.015 for s in a) and len(set(a)) > 50
    assert sim.sample("far", random.Random(0)) == 0.03
    assert SimulatedLatency(0.001, 0.01).sample("x", random.Random(0)) >= 0.0


def test_a_route_table_is_anchorless_only_when_nothing_routed_or_known_anchors_it():
    routes = {(0, 0): ["a", "b"]}
    assert table(routes, {"a": newcomer(), "b": newcomer()}).anchorless
    known = RouteTable.from_message(
        {"version": 1, "routes": [[0, 0, ["a"]]], "standing": {"a": newcomer()}, "anchored": True}
    )
    assert not known.anchorless  # the scheduler knows an anchor that is not back yet
    assert not table(routes, {"a": newcomer(), "b": newcomer(established=True)}).anchorless
    lying = RouteTable.from_message({"version": 1, "routes": [], "anchored": "yes"})
    assert not lying.anchored  # only a real True counts
