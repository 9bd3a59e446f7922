from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neuro_dask.scheduler.placement as placement_module
from neuro_dask.errors import ConfigError
from neuro_dask.scheduler.placement import (
    ExpertSpec,
    Placement,
    PlacementPolicy,
    WorkerCapacity,
    diff_assignments,
    plan_placement,
)

BIG = 10**9  # a budget that never binds


def W(address: str, budget: int = BIG, speed: float = 1.0, owner: str = "") -> WorkerCapacity:
    return WorkerCapacity(address, budget, speed, owner)


def E(expert: int, size: int = 100, layer: int = 0, model: str = "m") -> ExpertSpec:
    return ExpertSpec((model, layer, expert), size)


def K(expert: int, layer: int = 0, model: str = "m") -> tuple:
    return (model, layer, expert)


def experts(n: int, size: int = 100) -> list[ExpertSpec]:
    return [E(i, size) for i in range(n)]


def workers(n: int, **kw) -> list[WorkerCapacity]:
    return [W(f"w{i}", **kw) for i in range(n)]


def pairs(p: Placement) -> set[tuple[tuple, str]]:
    return {(key, addr) for key, addrs in p.replicas.items() for addr in addrs}


def owners_of(p: Placement, key: tuple, ws: list[WorkerCapacity]) -> list[str]:
    owner = {w.address: w.owner_id for w in ws}
    return [owner[a] for a in p.workers_for(key)]


# --- rule 1: target and distinct workers ----------------------------------------------------


@pytest.mark.parametrize(
    "n_workers, replicas, expected",
    [(4, 2, 2), (4, 3, 3), (4, 4, 4), (2, 2, 2), (3, 1, 1), (1, 2, 1), (2, 5, 2)],
)
def test_each_expert_gets_target_replicas_on_distinct_workers(n_workers, replicas, expected):
    p = plan_placement(experts(6), workers(n_workers), PlacementPolicy(replicas=replicas))
    for addrs in p.replicas.values():
        assert len(addrs) == expected
        assert len(set(addrs)) == len(addrs)
    assert p.unplaced == frozenset()


@pytest.mark.parametrize("n_workers, replicas", [(1, 2), (2, 3), (3, 5)])
def test_fewer_workers_than_replicas_is_under_replicated(n_workers, replicas):
    p = plan_placement(experts(3), workers(n_workers), PlacementPolicy(replicas=replicas))
    assert p.under_replicated == {K(i) for i in range(3)}
    assert all(len(p.workers_for(K(i))) == n_workers for i in range(3))


# --- rule 2: distinct owners ----------------------------------------------------------------


def test_replicas_go_to_distinct_owners_even_when_one_owner_is_faster():
    ws = [
        W("a1", speed=10, owner="alice"),
        W("a2", speed=10, owner="alice"),
        W("b1", speed=1, owner="bob"),
        W("b2", speed=1, owner="bob"),
    ]
    p = plan_placement(experts(8), ws, PlacementPolicy(replicas=2))
    for i in range(8):
        assert sorted(owners_of(p, K(i), ws)) == ["alice", "bob"]


def test_empty_owner_means_the_address_is_the_owner():
    assert W("w0").owner_id == "w0"
    assert W("w0", owner="alice").owner_id == "alice"


@pytest.mark.parametrize(
    "bob_budget, expected_owners",
    [
        (0, {K(0): ["alice", "alice"], K(1): ["alice", "alice"]}),  # bob has no room: share
        (200, {K(0): ["alice", "bob"], K(1): ["alice", "alice"]}),  # room for one: the bigger one
        (BIG, {K(0): ["alice", "bob"], K(1): ["alice", "bob"]}),
    ],
)
def test_owner_is_shared_only_when_no_other_owner_has_room(bob_budget, expected_owners):
    ws = [W("a1", owner="alice"), W("a2", owner="alice"), W("b1", bob_budget, owner="bob")]
    p = plan_placement([E(0, 200), E(1, 100)], ws, PlacementPolicy(replicas=2))
    assert {key: sorted(owners_of(p, key, ws)) for key in p.replicas} == expected_owners


# --- rule 3: budgets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "budgets, sizes, replicas",
    [
        ([250, 250, 250], [100] * 6, 2),
        ([100, 1000, 50], [60, 40, 30, 30, 20], 2),
        ([0, 0, 500], [100, 200, 300], 1),
        ([99, 99], [100], 2),
    ],
)
def test_budget_is_never_exceeded(budgets, sizes, replicas):
    ws = [W(f"w{i}", b) for i, b in enumerate(budgets)]
    es = [E(i, s) for i, s in enumerate(sizes)]
    used = plan_placement(es, ws, PlacementPolicy(replicas=replicas)).bytes_used(es)
    for i, budget in enumerate(budgets):
        assert used[f"w{i}"] <= budget


# --- rule 8: unplaced / under-replicated ----------------------------------------------------


def test_expert_with_no_room_anywhere_is_unplaced():
    p = plan_placement([E(0, 500), E(1, 50)], [W("w0", 100), W("w1", 100)])
    assert p.unplaced == {K(0)}
    assert p.workers_for(K(0)) == ()
    assert p.replicas[K(0)] == ()
    assert p.under_replicated == frozenset()
    assert set(p.workers_for(K(1))) == {"w0", "w1"}


def test_no_workers_leaves_everything_unplaced():
    p = plan_placement(experts(3), [])
    assert p.unplaced == {K(0), K(1), K(2)}
    assert p.under_replicated == frozenset()
    assert p.assignments() == {}


def test_no_experts_gives_idle_workers():
    p = plan_placement([], workers(2))
    assert p.replicas == {}
    assert p.assignments() == {"w0": frozenset(), "w1": frozenset()}


# --- rule 5: preference among feasible workers ----------------------------------------------


@pytest.mark.parametrize(
    "ws, expected",
    [
        ([W("a", speed=1), W("b", speed=3)], "b"),  # faster wins on an empty cluster
        ([W("b"), W("a")], "a"),  # full tie: lowest address
        ([W("a", 1000, speed=1), W("b", 100, speed=1)], "a"),  # same free fraction: address
    ],
)
def test_new_replica_goes_to_best_score(ws, expected):
    p = plan_placement([E(0)], ws, PlacementPolicy(replicas=1))
    assert p.workers_for(K(0)) == (expected,)


def test_score_weights_speed_by_free_fraction_of_budget():
    # b is 3x faster, but after hosting the 800-byte expert it has 20% free: 3 * 0.2 < 1 * 1.0.
    p = plan_placement([E(0, 800), E(1, 100)], [W("a", 1000, 1.0), W("b", 1000, 3.0)], PlacementPolicy(replicas=1))
    assert p.workers_for(K(0)) == ("b",)
    assert p.workers_for(K(1)) == ("a",)


def test_small_experts_spread_over_workers_of_different_speeds():
    # Budgets dwarf the experts: the free fraction barely moves, the hosted count must spread them.
    ws = [W("a", 10**12, 1.0), W("b", 10**12, 2.0), W("c", 10**12, 3.0)]
    p = plan_placement(experts(16), ws, PlacementPolicy(replicas=2))
    counts = {w: len(v) for w, v in p.assignments().items()}
    assert all(counts.values()), counts
    assert counts["c"] >= counts["b"] >= counts["a"]


def test_load_spreads_over_workers():
    p = plan_placement(experts(40), workers(8, budget=10_000), PlacementPolicy(replicas=2))
    counts = [len(v) for v in p.assignments().values()]
    assert max(counts) - min(counts) <= 1


# --- rule 6: order ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "es, load, budget, placed",
    [
        ([E(0, 100), E(1, 100)], {K(1): 10.0}, 100, K(1)),  # hot first
        ([E(0, 4), E(1, 7)], None, 10, K(1)),  # larger first
        ([E(1, 5), E(0, 5)], None, 5, K(0)),  # then key order
        ([E(0, 10), E(1, 5)], {K(1): 10.0}, 10, K(1)),  # hot beats larger
    ],
)
def test_expert_order_hot_then_larger_then_key(es, load, budget, placed):
    p = plan_placement(es, [W("w0", budget)], load=load)
    assert {k for k, v in p.replicas.items() if v} == {placed}


def test_scarce_memory_gives_every_expert_one_copy_before_any_gets_two():
    p = plan_placement([E(0, 100), E(1, 100)], [W("w0", 100), W("w1", 100)], PlacementPolicy(replicas=2))
    assert p.unplaced == frozenset()
    assert p.under_replicated == {K(0), K(1)}


# --- rule 7: fastest first ------------------------------------------------------------------


def test_replicas_are_listed_fastest_first_then_by_address():
    ws = [W("a", speed=1), W("b", speed=5), W("c", speed=5), W("d", speed=2)]
    p = plan_placement([E(0)], ws, PlacementPolicy(replicas=4))
    assert p.workers_for(K(0)) == ("b", "c", "d", "a")


# --- hot experts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "load, hot",
    [
        ({K(0): 10, K(1): 1, K(2): 1, K(3): 1}, {K(0)}),  # mean 3.25, 10 >= 6.5
        ({K(0): 2, K(1): 1, K(2): 1, K(3): 0}, {K(0)}),  # exactly 2x the mean counts as hot
        ({K(0): 1, K(1): 1, K(2): 1, K(3): 1}, set()),  # uniform: nothing is hot
        ({}, set()),
        ({K(9): 100}, set()),  # load for unknown experts is ignored
        ({K(0): 0, K(1): 0}, set()),  # all idle: nothing is hot
    ],
)
def test_hot_experts_get_an_extra_replica(load, hot):
    p = plan_placement(experts(4), workers(5), PlacementPolicy(replicas=2, hot_extra_replicas=1), load=load)
    assert {k for k, v in p.replicas.items() if len(v) == 3} == hot
    assert all(len(p.workers_for(k)) == 2 for k in p.replicas if k not in hot)


def test_hot_extra_is_capped_by_worker_count_and_reported():
    p = plan_placement(experts(2), workers(2), load={K(0): 10.0})
    assert len(p.workers_for(K(0))) == 2
    assert p.under_replicated == {K(0)}


# --- rule 4: stability -----------------------------------------------------------------------


def test_worker_leaving_keeps_every_surviving_pair_and_rehomes_its_replicas():
    ws = workers(4)
    es = experts(10)
    before = plan_placement(es, ws)
    lost = {k for k, v in before.replicas.items() if "w3" in v}
    assert lost
    after = plan_placement(es, ws[:3], previous=before)
    assert {(k, a) for k, a in pairs(before) if a != "w3"} <= pairs(after)
    assert all(len(v) == 2 for v in after.replicas.values())
    diff = diff_assignments(before, after)
    assert diff["w3"] == (frozenset(), before.assignments()["w3"])
    added = [k for addr, (add, drop) in diff.items() if addr != "w3" for k in add]
    assert all(not drop for addr, (add, drop) in diff.items() if addr != "w3")
    assert sorted(added) == sorted(lost)


def test_worker_joining_a_fully_replicated_cluster_moves_nothing():
    es = experts(10)
    before = plan_placement(es, workers(3))
    after = plan_placement(es, workers(4), previous=before)
    assert after.replicas == before.replicas
    assert after.assignments()["w3"] == frozenset()
    assert diff_assignments(before, after) == {}


def test_worker_joining_receives_under_replicated_experts():
    es = experts(5)
    before = plan_placement(es, [W("w0")])
    assert before.under_replicated == {K(i) for i in range(5)}
    after = plan_placement(es, [W("w0"), W("w1")], previous=before)
    assert after.under_replicated == frozenset()
    assert diff_assignments(before, after) == {"w1": (frozenset(K(i) for i in range(5)), frozenset())}


def test_worker_joining_receives_unplaced_experts_only():
    es = [E(0, 100), E(1, 100)]
    before = plan_placement(es, [W("w0", 100)], PlacementPolicy(replicas=1))
    assert before.unplaced == {K(1)}
    after = plan_placement(es, [W("w0", 100), W("w1", 100)], PlacementPolicy(replicas=1), previous=before)
    assert after.workers_for(K(0)) == before.workers_for(K(0))
    assert after.workers_for(K(1)) == ("w1",)


def test_previous_pair_is_dropped_when_budget_shrinks():
    es = [E(0, 100), E(1, 100)]
    before = plan_placement(es, [W("w0", 200), W("w1", 200)], PlacementPolicy(replicas=1))
    after = plan_placement(es, [W("w0", 100), W("w1", 200)], PlacementPolicy(replicas=1), previous=before)
    assert after.bytes_used(es)["w0"] <= 100
    assert all(len(v) == 1 for v in after.replicas.values())


def test_previous_excess_replicas_are_trimmed_to_target_keeping_distinct_owners():
    ws = [W("a1", owner="alice"), W("a2", owner="alice"), W("b1", owner="bob")]
    previous = Placement({K(0): ("a1", "a2", "b1")})
    p = plan_placement([E(0)], ws, PlacementPolicy(replicas=2), previous=previous)
    assert set(p.workers_for(K(0))) == {"a1", "b1"}


def test_previous_experts_that_are_gone_are_dropped():
    before = plan_placement(experts(3), workers(2))
    after = plan_placement(experts(2), workers(2), previous=before)
    assert set(after.replicas) == {K(0), K(1)}
    dropped = {k for add, drop in diff_assignments(before, after).values() for k in drop}
    assert dropped == {K(2)}


# --- Placement helpers and diff_assignments -------------------------------------------------


def test_assignments_lists_every_worker_and_bytes_used_sums_sizes():
    es = [E(0, 10), E(1, 20)]
    p = Placement({K(0): ("a", "b"), K(1): ("b",)}, workers=("c", "a", "b"))
    assert p.assignments() == {"a": frozenset({K(0)}), "b": frozenset({K(0), K(1)}), "c": frozenset()}
    assert p.bytes_used(es) == {"a": 10, "b": 30, "c": 0}
    with pytest.raises(ConfigError):
        p.bytes_used([E(0, 10)])


def test_placement_is_read_only_and_rejects_a_repeated_worker():
    source = {K(0): ["a"]}
    p = Placement(source)
    source[K(0)].append("b")
    assert p.workers_for(K(0)) == ("a",)
    assert p.workers_for(K(5)) == ()
    with pytest.raises(TypeError):
        p.replicas[K(1)] = ("a",)  # type: ignore[index]
    with pytest.raises(ConfigError):
        Placement({K(0): ("a", "a")})


@pytest.mark.parametrize(
    "old, new, expected",
    [
        (None, Placement({K(0): ("a",)}, workers=("a", "b")), {"a": ({K(0)}, set())}),
        (Placement({K(0): ("a",)}), Placement({K(0): ("a",)}), {}),
        (Placement({K(0): ("a",)}), Placement({K(0): ("b",)}), {"a": (set(), {K(0)}), "b": ({K(0)}, set())}),
        (
            Placement({K(0): ("a", "b"), K(1): ("a",)}),
            Placement({K(0): ("a", "c"), K(1): ("a",), K(2): ("c",)}),
            {"b": (set(), {K(0)}), "c": ({K(0), K(2)}, set())},
        ),
        (Placement({K(0): ("a",)}, workers=("a", "z")), Placement({K(0): ("a",)}), {}),
    ],
)
def test_diff_assignments(old, new, expected):
    diff = diff_assignments(old, new)
    assert {a: (set(add), set(drop)) for a, (add, drop) in diff.items()} == expected
    assert all(isinstance(x, frozenset) for pair in diff.values() for x in pair)


# --- determinism, validation, purity --------------------------------------------------------


def test_same_input_gives_equal_plan_whatever_the_input_order():
    ws = [W(f"w{i}", 300 + 50 * (i % 3), 1.0 + i % 2, owner=f"o{i % 3}") for i in range(7)]
    es = [E(i, 50 + 10 * (i % 4), layer=i % 3) for i in range(20)]
    load = {es[0].key: 9.0, es[5].key: 7.0}
    first = plan_placement(es, ws, load=load)
    assert plan_placement(es, ws, load=load) == first
    assert plan_placement(es[::-1], ws[::-1], load=load) == first


@pytest.mark.parametrize(
    "build",
    [
        lambda: PlacementPolicy(replicas=0),
        lambda: PlacementPolicy(replicas=-1),
        lambda: PlacementPolicy(hot_extra_replicas=-1),
        lambda: PlacementPolicy(hot_threshold=0),
        lambda: PlacementPolicy(hot_threshold=float("nan")),
        lambda: W("w0", speed=0),
        lambda: W("w0", budget=-1),
        lambda: W(""),
        lambda: E(0, -1),
        lambda: plan_placement(experts(1), [W("w0"), W("w0")]),
        lambda: plan_placement([E(0), E(0)], workers(1)),
        lambda: plan_placement(experts(1), workers(1), load={K(0): -1.0}),
    ],
)
def test_bad_input_raises_config_error(build):
    with pytest.raises(ConfigError):
        build()


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        plan_placement(experts(1), workers(1), PlacementPolicy(replicas=0))


def test_module_is_pure():
    tree = ast.parse(Path(placement_module.__file__).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"distributed", "dask", "bokeh", "torch", "time", "random", "datetime"}


# --- property tests --------------------------------------------------------------------------

worker_lists = st.lists(
    st.builds(
        lambda i, budget, speed, owner: (budget, speed, owner),
        st.integers(),
        st.integers(0, 600),
        st.sampled_from([0.5, 1.0, 2.0, 3.0]),
        st.sampled_from(["", "o1", "o2", "o3"]),
    ),
    max_size=7,
).map(lambda rows: [W(f"w{i}", b, s, o) for i, (b, s, o) in enumerate(rows)])
expert_lists = st.lists(st.integers(0, 250), max_size=14).map(lambda sizes: [E(i, s) for i, s in enumerate(sizes)])
policies = st.builds(PlacementPolicy, replicas=st.integers(1, 4), hot_extra_replicas=st.integers(0, 2))
loads = st.none() | st.dictionaries(st.integers(0, 13).map(K), st.floats(0, 100), max_size=14)

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def hot_keys(es, load, policy):
    if not load or not es:
        return set()
    mean = sum(load.get(e.key, 0.0) for e in es) / len(es)
    return {e.key for e in es if mean > 0 and load.get(e.key, 0.0) >= policy.hot_threshold * mean}


def check_invariants(p, es, ws, policy, load):
    by_addr = {w.address: w for w in ws}
    size = {e.key: e.bytes for e in es}
    hot = hot_keys(es, load, policy)
    assert set(p.replicas) == set(size)
    used = p.bytes_used(es)
    free = {a: by_addr[a].memory_budget - used[a] for a in by_addr}
    assert all(f >= 0 for f in free.values())  # rule 3
    for key, addrs in p.replicas.items():
        wanted = policy.replicas + (policy.hot_extra_replicas if key in hot else 0)
        target = min(wanted, len(ws))
        assert len(set(addrs)) == len(addrs) <= target  # rule 1
        assert set(addrs) <= set(by_addr)
        assert list(addrs) == sorted(addrs, key=lambda a: (-by_addr[a].speed, a))  # rule 7
        assert (key in p.unplaced) == (not addrs)  # rule 8
        assert (key in p.under_replicated) == (0 < len(addrs) < wanted)
        if len(addrs) < target:  # short only because no other worker had room
            assert all(free[a] < size[key] for a in by_addr if a not in addrs)
        owners = [by_addr[a].owner_id for a in addrs]
        if len(set(owners)) < len(owners):  # rule 2: shared only when no other owner had room
            assert all(free[w.address] < size[key] for w in ws if w.owner_id not in owners)


@PROPERTY
@given(es=expert_lists, ws=worker_lists, policy=policies, load=loads)
def test_property_invariants_hold_for_any_input(es, ws, policy, load):
    p = plan_placement(es, ws, policy, load=load)
    check_invariants(p, es, ws, policy, load)
    assert plan_placement(es, ws, policy, previous=p, load=load) == p  # re-planning is a no-op


@PROPERTY
@given(es=expert_lists, ws=worker_lists, policy=policies, data=st.data())
def test_property_a_leaving_worker_moves_nothing_else(es, ws, policy, data):
    before = plan_placement(es, ws, policy)
    gone = data.draw(st.sets(st.sampled_from([w.address for w in ws]))) if ws else set()
    left = [w for w in ws if w.address not in gone]
    after = plan_placement(es, left, policy, previous=before)
    check_invariants(after, es, left, policy, None)
    assert {(k, a) for k, a in pairs(before) if a not in gone} <= pairs(after)


def scan_plan(es, ws, policy):
    """Rules 1-8 by a plain scan over every worker per replica: the reference for the indexed search."""
    by_addr = {w.address: w for w in ws}
    free = {w.address: w.memory_budget for w in ws}
    hosts = {e.key: [] for e in es}
    target = {e.key: min(policy.replicas, len(ws)) for e in es}
    order = sorted(es, key=lambda e: (-e.bytes, e.key))
    for round_no in range(1, max(target.values(), default=0) + 1):
        for e in order:
            if len(hosts[e.key]) >= min(round_no, target[e.key]):
                continue
            used = {by_addr[a].owner_id for a in hosts[e.key]}
            feasible = [a for a in free if a not in hosts[e.key] and free[a] >= e.bytes]
            fresh = [a for a in feasible if by_addr[a].owner_id not in used]

            def key(a):
                budget = by_addr[a].memory_budget
                hosted = sum(a in h for h in hosts.values())
                return (-(by_addr[a].speed * free[a] / budget / (1 + hosted) if budget else 0.0), a)

            if fresh or feasible:
                best = min(fresh or feasible, key=key)
                free[best] -= e.bytes
                hosts[e.key].append(best)
    return {k: sorted(v) for k, v in hosts.items()}


@PROPERTY
@given(es=expert_lists, ws=worker_lists, policy=policies)
def test_property_indexed_search_matches_a_plain_scan(es, ws, policy):
    p = plan_placement(es, ws, policy)
    assert {k: sorted(v) for k, v in p.replicas.items()} == scan_plan(es, ws, policy)


def test_excluded_pairs_are_never_planned_and_the_expert_goes_elsewhere():
    workers = [WorkerCapacity(f"w{i}", 10_000, 1.0) for i in range(3)]
    experts = [ExpertSpec(("m", 0, e), 100) for e in range(4)]
    first = plan_placement(experts, workers, PlacementPolicy(replicas=2))
    bad_worker = first.workers_for(("m", 0, 1))[0]
    again = plan_placement(
        experts, workers, PlacementPolicy(replicas=2), previous=first, exclude={(bad_worker, ("m", 0, 1))}
    )
    assert bad_worker not in again.workers_for(("m", 0, 1))
    assert len(again.workers_for(("m", 0, 1))) == 2
    only = plan_placement(experts, workers[:1], PlacementPolicy(replicas=1), exclude={("w0", ("m", 0, 2))})
    assert ("m", 0, 2) in only.unplaced


def test_anchors_take_a_replica_of_every_expert_that_fits():
    ws = [W(f"w{i}") for i in range(5)]
    p = plan_placement(experts(12), ws, PlacementPolicy(replicas=2), anchors={"w3"})
    assert all("w3" in p.workers_for(e.key) and len(p.workers_for(e.key)) == 2 for e in experts(12))
    small = [W("a", 250), W("b"), W("c")]
    q = plan_placement(experts(4), small, PlacementPolicy(replicas=2), anchors={"a"})
    assert sum("a" in q.workers_for(e.key) for e in experts(4)) == 2  # only what fits its budget


def test_an_anchor_that_joins_last_still_takes_every_expert_and_nothing_moves_for_it():
    """After a scheduler restart the operator-trusted worker may come back after the others have
    re-taken both replicas of every expert: it still hosts a copy of each, as a third replica."""
    ws = [W(f"w{i}") for i in range(4)]
    before = plan_placement(experts(8), ws, PlacementPolicy(replicas=2))
    anchor = W("trusted")
    after = plan_placement(experts(8), [*ws, anchor], PlacementPolicy(replicas=2), previous=before, anchors={"trusted"})
    for e in experts(8):
        assert set(after.workers_for(e.key)) == set(before.workers_for(e.key)) | {"trusted"}
    assert not after.under_replicated and not after.unplaced
    gone = [w for w in ws if w.address != before.workers_for(experts(8)[0].key)[0]]  # a host leaves
    later = plan_placement(
        experts(8), [*gone, anchor], PlacementPolicy(replicas=2), previous=after, anchors={"trusted"}
    )
    assert all("trusted" in later.workers_for(e.key) and len(later.workers_for(e.key)) >= 2 for e in experts(8))
