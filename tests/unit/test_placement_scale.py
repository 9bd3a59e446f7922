"""Placement and routes at the scale of 1,000 volunteers and a Mixtral-8x7B-shaped model.

What the plan guarantees, checked where it matters most: many workers of shared owners, real
expert sizes, churn and hot experts. No timing here (benchmarks/bench_scale.py measures it).
"""

from __future__ import annotations

import copy
import random

import pytest

from neuro_dask.scheduler.coordinator import Coordinator, DropExperts, LoadExperts, PublishedModel
from neuro_dask.scheduler.placement import ExpertSpec, PlacementPolicy, WorkerCapacity
from neuro_dask.testing.simulated import (
    MIXTRAL_EXPERT_BYTES_FP16,
    mixtral_shaped_experts,
    simulated_address,
    simulated_capacities,
)

WORKERS = 1_000


def serve(c: Coordinator, actions) -> None:
    for a in actions:
        if isinstance(a, LoadExperts):
            c.experts_loaded(a.worker, a.model, a.experts)


@pytest.fixture(scope="module")
def capacities():
    return simulated_capacities(WORKERS, random.Random(0))


@pytest.fixture(scope="module")
def placed(capacities):
    c = Coordinator(PlacementPolicy(replicas=2))
    for cap in capacities:
        c.worker_joined(cap)
    serve(c, c.model_published(PublishedModel("mx", "/store", mixtral_shaped_experts())))
    return c


@pytest.fixture
def network(placed):
    # Each test changes its own copy; a plan is immutable, so the copies share it.
    return copy.deepcopy(placed, {id(placed.placement): placed.placement})


def test_every_expert_gets_two_replicas_of_distinct_owners_within_budgets(network):
    c = network
    p = c.placement
    assert not p.unplaced and not p.under_replicated
    assert len(p.replicas) == 256
    for key, hosts in p.replicas.items():
        assert len(hosts) == 2
        assert len({c.workers[w].owner_id for w in hosts}) == 2, key
    used = p.bytes_used([ExpertSpec(("mx", l, e), MIXTRAL_EXPERT_BYTES_FP16) for l in range(32) for e in range(8)])
    assert all(used[w] <= c.workers[w].memory_budget for w in used)
    assert not c.routes("mx").missing and not c.routes("mx").pending


def test_a_leaving_worker_moves_only_its_own_experts(network):
    c = network
    before = c.placement.assignments()
    leaver = next(w for w, keys in before.items() if keys)
    actions = c.worker_left(leaver)
    assert not any(isinstance(a, DropExperts) for a in actions)
    moved = {("mx", *le) for a in actions for le in a.experts}
    assert moved == set(before[leaver])
    after = c.placement.assignments()
    for w, keys in before.items():
        if w != leaver:
            assert keys <= after[w]  # nobody lost an expert
    assert not c.placement.under_replicated and not c.placement.unplaced


def test_a_joining_worker_changes_nothing_when_every_expert_has_its_replicas(network):
    c = network
    before = c.placement.replicas
    assert c.worker_joined(WorkerCapacity(simulated_address(WORKERS), 8 * 2**30, 99.0, "newcomer")) == []
    assert dict(c.placement.replicas) == dict(before)


def test_hot_experts_get_a_third_replica_and_nothing_else_moves(network):
    c = network
    before = c.placement.assignments()
    load = {("mx", l, e): 10.0 if e < 2 else 1.0 for l in range(32) for e in range(8)}
    actions = c.report_load(load)
    assert all(isinstance(a, LoadExperts) for a in actions)
    assert sum(len(a.experts) for a in actions) == 64
    for key, hosts in c.placement.replicas.items():
        assert len(hosts) == (3 if key[2] < 2 else 2)
    after = c.placement.assignments()
    assert all(keys <= after[w] for w, keys in before.items())


def reference_routes(c: Coordinator, model_id: str):
    """Coordinator.routes as first written (O(experts x workers)): the fast one must agree."""
    model = c.models[model_id]
    routes, missing, pending = {}, [], []
    for le in sorted(model.experts):
        key = (model_id, *le)
        planned = c.placement.workers_for(key) if c.placement else ()
        serving = tuple(w for w in planned if key in c.serving.get(w, ()))
        extra = tuple(
            sorted(
                (w for w, keys in c.serving.items() if key in keys and w not in planned),
                key=lambda w: (-c.workers[w].speed, w),
            )
        )
        routes[le] = serving + extra
        if not routes[le]:
            missing.append(le)
        if len(serving) < len(planned):
            pending.append(le)
    return routes, tuple(missing), tuple(pending)


def test_routes_agree_with_the_reference_through_churn(capacities):
    rng = random.Random(1)
    c = Coordinator(PlacementPolicy(replicas=2))
    for cap in capacities[:200]:
        c.worker_joined(cap)
    c.model_published(PublishedModel("mx", "/store", mixtral_shaped_experts(layers=8)))
    c.model_published(PublishedModel("other", "/store2", mixtral_shaped_experts(layers=2, experts=4)))
    for step in range(30):
        # Some workers report part of what they were told, some report experts they were not
        # told to host (loaded before a re-plan moved them), some are unreachable.
        for w, keys in c.placement.assignments().items():
            chosen = [k for k in keys if rng.random() < 0.7]
            for model in ("mx", "other"):
                c.experts_loaded(w, model, [(l, e) for m, l, e in chosen if m == model])
        stray = rng.choice(sorted(c.workers))
        c.experts_loaded(stray, "mx", [(rng.randrange(8), rng.randrange(8))])
        if step % 3 == 0:
            c.worker_left(rng.choice(sorted(c.workers)))
        if step % 5 == 0:
            c.worker_unreachable(rng.choice(sorted(c.workers)), "mx", [(0, 0), (1, 1)])
        for model in ("mx", "other"):
            snap = c.routes(model)
            assert (snap.routes, snap.missing, snap.pending) == reference_routes(c, model)


def test_a_worker_still_serving_a_moved_expert_is_routed_after_the_planned_replicas():
    c = Coordinator(PlacementPolicy(replicas=1))
    for addr, speed in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        c.worker_joined(WorkerCapacity(addr, 10_000, speed, addr))
    c.model_published(PublishedModel("m", "/s", {(0, 0): 100}))
    (planned,) = c.placement.workers_for(("m", 0, 0))
    others = sorted(w for w in "abc" if w != planned)
    c.experts_loaded(planned, "m", [(0, 0)])
    # The others loaded it under an earlier plan and serve it until they are told to drop it
    # (experts_loaded now counts only current assignments, so the earlier plan is set directly).
    for w in others:
        c.serving[w].add(("m", 0, 0))
    expected_extra = tuple(sorted(others, key=lambda w: -c.workers[w].speed))
    assert c.routes("m").routes[(0, 0)] == (planned, *expected_extra)


def test_assignments_are_a_fresh_dict_each_call(network):
    p = network.placement
    first = p.assignments()
    first.clear()
    assert len(p.assignments()) == len(p.workers) > 0
