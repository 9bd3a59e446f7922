"""The scheduler's decisions, without a scheduler: events in, actions out."""

from __future__ import annotations

from neuro_dask.scheduler.coordinator import Coordinator, DropExperts, LoadExperts, PublishedModel
from neuro_dask.scheduler.placement import PlacementPolicy, WorkerCapacity

MODEL = PublishedModel("m", "/store", {(0, e): 100 for e in range(4)} | {(1, e): 100 for e in range(4)})


def W(addr, speed=1.0, owner=""):
    return WorkerCapacity(addr, 10_000, speed, owner)


def loads(actions):
    return {a.worker: set(a.experts) for a in actions if isinstance(a, LoadExperts)}


def coordinator(workers=("a", "b", "c"), replicas=2):
    c = Coordinator(PlacementPolicy(replicas=replicas))
    for w in workers:
        c.worker_joined(W(w))
    return c


def test_publishing_tells_workers_to_load_every_expert_twice():
    c = coordinator()
    actions = c.model_published(MODEL)
    assert all(isinstance(a, LoadExperts) and a.store_url == "/store" for a in actions)
    placed = [(w, le) for w, les in loads(actions).items() for le in les]
    assert len(placed) == 16 and {le for _, le in placed} == set(MODEL.experts)


def test_routes_list_only_replicas_that_reported_loaded():
    c = coordinator()
    actions = loads(c.model_published(MODEL))
    assert c.routes("m").missing == tuple(sorted(MODEL.experts))
    worker, experts = next(iter(actions.items()))
    c.experts_loaded(worker, "m", experts)
    snap = c.routes("m")
    assert all(snap.routes[le] == (worker,) for le in experts)
    assert set(snap.missing) == set(MODEL.experts) - experts
    assert set(snap.pending) >= set(experts)  # their second replica is not loaded yet


def test_a_leaving_worker_gets_its_experts_re_placed_on_the_others():
    c = coordinator(("a", "b", "c", "d"))
    first = loads(c.model_published(MODEL))
    for w, les in first.items():
        c.experts_loaded(w, "m", les)
    actions = loads(c.worker_left("a"))
    assert set().union(*actions.values()) == first.get("a", set())
    assert "a" not in actions
    assert all("a" not in ws for ws in c.routes("m").routes.values())


def test_a_failed_load_is_never_planned_on_that_worker_again():
    c = coordinator()
    first = loads(c.model_published(MODEL))
    worker, experts = next(iter(first.items()))
    bad = sorted(experts)[0]
    actions = c.load_failed(worker, "m", [bad])
    new_homes = [w for w, les in loads(actions).items() if bad in les]
    assert new_homes and worker not in new_homes
    assert worker not in c.placement.workers_for(("m", *bad))


def test_unreachable_report_stops_routing_until_reloaded():
    c = coordinator()
    for w, les in loads(c.model_published(MODEL)).items():
        c.experts_loaded(w, "m", les)
    le = (0, 0)
    victim = c.routes("m").routes[le][0]
    c.worker_unreachable(victim, "m", [le])
    assert victim not in c.routes("m").routes[le]


def test_an_expert_lost_to_a_failed_probe_is_reloaded_where_it_is_planned():
    c = coordinator()
    for w, les in loads(c.model_published(MODEL)).items():
        c.experts_loaded(w, "m", les)
    victim = c.routes("m").routes[(0, 3)][0]
    actions = c.worker_unreachable(victim, "m", [(0, 3)])
    assert [(a.worker, a.experts) for a in actions] == [(victim, ((0, 3),))]  # asked to reload it
    assert victim not in c.routes("m").routes[(0, 3)]  # not routed until it has
    c.experts_loaded(victim, "m", [(0, 3)])
    assert victim in c.routes("m").routes[(0, 3)]


def test_a_dropped_replica_leaves_the_routes_at_once():
    c = Coordinator(PlacementPolicy(replicas=1))
    for w in ("a", "b"):
        c.worker_joined(W(w))
    small = PublishedModel("m", "/store", {(0, e): 100 for e in range(4)})
    for w, les in loads(c.model_published(small)).items():
        c.experts_loaded(w, "m", les)
    for w, les in loads(c.report_load({("m", 0, 1): 1000.0})).items():  # hot: an extra replica
        c.experts_loaded(w, "m", les)
    assert len(c.routes("m").routes[(0, 1)]) == 2
    actions = c.report_load({("m", 0, e): 5000.0 for e in (0, 2, 3)})  # cools down: the extra goes
    dropped = [a for a in actions if isinstance(a, DropExperts) and (0, 1) in a.experts]
    assert dropped
    assert dropped[0].worker not in c.routes("m").routes[(0, 1)]  # never routed to what it dropped
    assert c.routes("m").routes[(0, 1)]  # the planned replica still serves it


def test_hot_experts_get_an_extra_replica():
    c = coordinator(("a", "b", "c", "d"))
    c.model_published(MODEL)
    actions = c.report_load({("m", 0, 0): 1000.0, **{("m", *le): 1.0 for le in MODEL.experts if le != (0, 0)}})
    assert len(c.placement.workers_for(("m", 0, 0))) == 3
    assert any((0, 0) in les for les in loads(actions).values())
    assert not [a for a in actions if isinstance(a, DropExperts)]


def test_a_new_version_loads_beside_the_old_and_retiring_the_old_drops_only_its_experts():
    c = coordinator()
    for w, experts in loads(c.model_published(MODEL)).items():
        c.experts_loaded(w, "m", experts)
    v2 = PublishedModel("m2", "/store-v2", dict(MODEL.experts))
    added = c.model_published(v2)
    assert not [a for a in added if isinstance(a, DropExperts)]  # the old version keeps serving
    assert {a.model for a in added} == {"m2"}
    for w, experts in loads(added).items():
        c.experts_loaded(w, "m2", experts)
    assert c.routes("m").missing == () and c.routes("m2").missing == ()
    dropped = c.model_retired("m")
    assert dropped and all(isinstance(a, DropExperts) and a.model == "m" for a in dropped)
    assert len({(a.worker, le) for a in dropped for le in a.experts}) == 16  # every replica of every expert
    assert "m" not in c.models and all(k[0] == "m2" for keys in c.serving.values() for k in keys)
    assert c.model_retired("m") == []  # once
    c.experts_loaded("a", "m", [(0, 0)])  # a load that finishes after the retirement is ignored
    assert all(k[0] == "m2" for keys in c.serving.values() for k in keys)


def test_a_worker_claiming_experts_it_was_never_assigned_enters_no_route():
    c = coordinator()
    actions = loads(c.model_published(MODEL))
    worker, experts = next(iter(actions.items()))
    others = set(MODEL.experts) - experts
    version = c.version
    # 200,000 invented experts and every expert it was not given: none counted.
    claimed = [(l, e) for l in range(100, 500) for e in range(500)] + sorted(others)
    assert c.experts_loaded(worker, "m", claimed) == len(set(claimed) - experts)
    assert c.version == version  # nothing changed, no routes rebuilt for clients
    assert all(worker not in c.routes("m").routes.get(le, ()) for le in others)
    # Its real assignment still counts.
    assert c.experts_loaded(worker, "m", sorted(experts)) == 0
    assert all(worker in c.routes("m").routes[le] for le in experts)
