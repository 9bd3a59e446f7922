"""The scheduler plugin's rules without a cluster: tables of inputs -> the decisions the plugin enacts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from neuro_dask.ledger.policy import SHARE_ROWS_PER_PRIVATE_TOKEN
from neuro_dask.scheduler import reports, requests, routing
from neuro_dask.scheduler.coordinator import Coordinator
from neuro_dask.scheduler.placement import PlacementPolicy, WorkerCapacity
from neuro_dask.scheduler.reputation_events import (
    OUTCOME_KINDS,
    counted_outcome,
    dispute_cause,
    entered_routing,
    outcome_event,
    probe_cause,
    receipts_refused,
    security_penalty,
    slashes,
)
from neuro_dask.scheduler.versions import last_proposal_seen, reads_votes, ready_adoptions
from neuro_dask.trust.disputes import Referee
from neuro_dask.trust.reputation import ReputationPolicy, WorkerRecord

# ---- routing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ledger_on, name, staked, ok",
    [
        (False, None, set(), True),  # no ledger: everyone
        (False, "w1", set(), True),
        (True, "w1", {"w1"}, True),
        (True, "w1", {"w2"}, False),
        (True, None, {"w1"}, False),  # an unnamed worker has no stake
    ],
)
def test_stake_ok(ledger_on, name, staked, ok):
    assert routing.stake_ok(ledger_on, name, staked) is ok


@pytest.mark.parametrize(
    "routes, unstaked, paused, routed",
    [
        ({(0, 0): ("a", "b")}, set(), set(), {"a", "b"}),
        ({(0, 0): ("a", "b"), (0, 1): ("b", "c")}, {"c"}, set(), {"a", "b"}),
        ({(0, 0): ("a", "b")}, set(), {"a"}, {"b"}),
        ({(0, 0): ()}, set(), set(), set()),
        ({(0, 0): ("a",)}, {"a"}, {"a"}, set()),
    ],
)
def test_routed_workers_have_the_stake_and_are_not_paused(routes, unstaked, paused, routed):
    assert routing.routed_workers(routes, lambda w: w not in unstaked, paused) == routed


POLICY = ReputationPolicy()


@pytest.mark.parametrize(
    "record, routable",
    [
        (WorkerRecord("w"), True),  # a newcomer: 0.5 == min_reputation
        (WorkerRecord("w", correctness=0.3), False),
        (WorkerRecord("w", correctness=0.3, trusted=True), True),  # trusted: always routable
        (WorkerRecord("w", correctness=0.9, timeliness=0.9, speed=0.9, uptime=0.9), True),
    ],
)
def test_standing_is_the_record_routable_included(record, routable):
    standing = routing.standing_of(record)
    assert standing == {
        "trusted": record.trusted,
        "established": record.established,
        "consecutive_valid": record.consecutive_valid,
        "owner": record.owner,
        "score": record.score,
        "routable": routable,
    }
    assert standing["routable"] == (record.trusted or record.score >= record.policy.min_reputation)


@pytest.mark.parametrize(
    "standing, named, scores",
    [
        ({"a": {"score": 0.9}, "b": {"score": 0.2}}, {"a", "b"}, {"a": 0.9, "b": 0.2}),
        ({"a": {"score": 0.9}, "b": {"score": 0.2}}, {"a"}, {"a": 0.9, "b": routing.UNNAMED_SCORE}),
        ({"a": {"score": 0.1}}, set(), {"a": 0.5}),  # unnamed: the newcomer's 0.5, whatever its record says
        ({}, {"a"}, {}),
    ],
)
def test_rank_scores_default_unnamed_workers_to_a_newcomer(standing, named, scores):
    assert routing.rank_scores(standing, named) == scores


@pytest.mark.parametrize(
    "routes, scores, ranked",
    [
        ({(0, 0): ("a", "b")}, {"a": 0.5, "b": 0.9}, [[0, 0, ["b", "a"]]]),
        ({(0, 0): ("a", "b")}, {"a": 0.7, "b": 0.7}, [[0, 0, ["a", "b"]]]),  # ties keep fastest-first
        ({(0, 0): ("a", "b", "c")}, {"a": 0.6, "c": 0.8}, [[0, 0, ["c", "a"]]]),  # b not routed (paused, unstaked)
        ({(0, 0): (), (1, 2): ("a",)}, {"a": 0.5}, [[0, 0, []], [1, 2, ["a"]]]),
    ],
)
def test_rank_routes_best_score_first(routes, scores, ranked):
    assert routing.rank_routes(routes, scores) == ranked


@pytest.mark.parametrize(
    "unloadable, errors, reasons",
    [
        ([(0, 1)], {("m", 0, 1): "w says: bad file"}, [[0, 1, "w says: bad file"]]),
        ([(0, 1), (2, 3)], {}, [[0, 1, ""], [2, 3, ""]]),
        ([(0, 1)], {("other", 0, 1): "x"}, [[0, 1, ""]]),
    ],
)
def test_unloadable_reasons(unloadable, errors, reasons):
    assert routing.unloadable_reasons("m", unloadable, errors) == reasons


RECORDS = {
    "n1": WorkerRecord("n1", owner="o1", trusted=True),
    "n2": WorkerRecord("n2"),
    "n3": WorkerRecord("n3", owner="o3", correctness=0.3),
}


@pytest.mark.parametrize(
    "hosts, identity, paused, referees",
    [
        (
            ["a", "b"],
            {"a": "n1", "b": "n2"},
            set(),
            [("a", Referee("n1", "o1", True, RECORDS["n1"].score)), ("b", Referee("n2", "n2", False, 0.5))],
        ),
        (["a", "b"], {"a": "n1"}, set(), [("a", Referee("n1", "o1", True, RECORDS["n1"].score))]),  # b unnamed
        (["a", "c"], {"a": "n1", "c": "n3"}, {"a"}, [("c", Referee("n3", "o3", False, RECORDS["n3"].score))]),
        ([], {"a": "n1"}, set(), []),
    ],
)
def test_referee_candidates_are_named_unpaused_hosts(hosts, identity, paused, referees):
    assert routing.referee_candidates(hosts, identity, paused, RECORDS.__getitem__) == referees


IDENTITY = {"tcp://a:1": "alice", "tcp://b:1": "bob"}


@pytest.mark.parametrize(
    "worker, resolved",
    [
        ("tcp://a:1", ("tcp://a:1", "alice")),
        ("alice", ("tcp://a:1", "alice")),
        ("carol", ("carol", "carol")),  # unknown: stands for both
        ("tcp://z:1", ("tcp://z:1", "tcp://z:1")),
    ],
)
def test_resolve_worker_by_address_or_name(worker, resolved):
    assert routing.resolve_worker(IDENTITY, worker) == resolved


@pytest.mark.parametrize("name, address", [("alice", "tcp://a:1"), ("bob", "tcp://b:1"), ("carol", None)])
def test_address_of(name, address):
    assert routing.address_of(IDENTITY, name) == address


@pytest.mark.parametrize(
    "name, model, precision",
    [
        ("alice", "m", "int8"),
        ("alice", "other", "float32"),
        ("bob", "m", "float32"),
        ("carol", "m", "float32"),  # not connected
    ],
)
def test_precision_of(name, model, precision):
    assert routing.precision_of({("tcp://a:1", "m"): "int8"}, IDENTITY, name, model) == precision


# ---- reputation events ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, name, counted, event",
    [
        ("validated", "w", True, "validated"),
        ("validated", None, True, None),  # an unknown worker: counted for the dashboard, moves nothing
        ("invalid", "w", True, None),  # proven only by a dispute
        ("late", "w", True, None),
        ("timeout", "w", True, None),
        ("error", "w", True, None),
        ("quorum_caught", "w", False, None),
        ("", "w", False, None),
        (3, "w", False, None),
    ],
)
def test_outcome_kinds_and_their_reputation_events(kind, name, counted, event):
    assert counted_outcome(kind) is counted
    assert (kind in OUTCOME_KINDS) is counted
    assert outcome_event(kind, name) == event


@pytest.mark.parametrize(
    "before, after, entered",
    [
        (0.45, 0.5, True),
        (0.45, 0.6, True),
        (0.5, 0.55, False),  # already routable
        (0.3, 0.45, False),  # still below
        (0.6, 0.4, False),
    ],
)
def test_a_validated_result_is_announced_only_when_it_enters_routing(before, after, entered):
    assert entered_routing(before, after, 0.5) is entered


@pytest.mark.parametrize(
    "offered, refused",
    [
        ({}, False),
        ({"accepted": 3}, False),
        ({"accepted": 1, "forged": 1}, True),
        ({"not-yours": 2}, True),
        ({"forged": 0, "not-yours": 0, "malformed": 4}, False),
    ],
)
def test_forged_or_foreign_receipts_are_a_security_event(offered, refused):
    assert receipts_refused(offered) is refused


@pytest.mark.parametrize(
    "slashable, ledger_on, slash",
    [
        (True, True, True),
        (True, False, False),
        (False, True, False),
        (False, False, False),
    ],
)
def test_only_slashable_verdicts_slash_and_only_with_a_ledger(slashable, ledger_on, slash):
    assert slashes(slashable, ledger_on) is slash


@pytest.mark.parametrize(
    "identity, known, penalty",
    [
        ("worker:w1", {"w1"}, ("w1", "security:ticket:12.5")),  # a refusal counts as a wrong result
        ("worker:w1", set(), None),  # a worker the reputation does not know
        ("client:w1", {"w1"}, None),  # clients carry no reputation
        ("scheduler:s", {"s"}, None),
        ("", {""}, None),
        (None, {"w1"}, None),  # no certificate
    ],
)
def test_a_security_refusal_of_a_known_worker_costs_a_wrong_result(identity, known, penalty):
    assert security_penalty(identity, "ticket", 12.5, known) == penalty


@pytest.mark.parametrize("token, cause", [("0123456789abcdef", "probe:0123456789ab"), ("abc", "probe:abc")])
def test_probe_cause(token, cause):
    assert probe_cause(token) == cause


def test_dispute_cause_names_request_and_worker():
    assert dispute_cause("r1", "w1") == "dispute:r1:w1"


# ---- requests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, published, retired, ok",
    [
        ("m", {"m"}, {}, True),
        ("m", set(), {"m": "ch"}, True),
        ("m", {"x"}, {"y": "ch"}, False),
    ],
)
def test_a_request_begins_on_a_published_or_retired_model(model, published, retired, ok):
    assert requests.may_begin(model, published, retired) is ok


@pytest.mark.parametrize(
    "open_by, who, limit, full",
    [
        ([], "c1", 1, False),
        (["c1"], "c1", 1, True),
        (["c2", "c2"], "c1", 1, False),
        (["c1", "c2"], "c1", 2, False),
        (["c1", "c1"], "c1", 2, True),
    ],
)
def test_open_requests_per_client(open_by, who, limit, full):
    open_requests = {f"r{i}": {"who": w} for i, w in enumerate(open_by)}
    assert requests.at_open_limit(open_requests, who, limit) is full


@pytest.mark.parametrize("began, who, ok", [("c1", "c1", True), ("c1", "c2", False)])
def test_only_the_beginner_ends_a_request(began, who, ok):
    assert requests.may_end({"who": began}, who) is ok


@pytest.mark.parametrize(
    "identity, client",
    [
        (None, None),
        (SimpleNamespace(name="alice", role="client"), "alice"),
        (SimpleNamespace(name="gw", role="gateway"), "gw"),
        (SimpleNamespace(name="sched", role="scheduler"), None),
    ],
)
def test_the_hold_checks_the_calling_certificate(identity, client):
    assert requests.charging_client(identity) == client


@pytest.mark.parametrize(
    "held, attempt",
    [
        ({"status": "error", "reason": "not-granted", "message": "no"}, True),
        ({"status": "error", "reason": "funds", "message": "no"}, False),
        ({"status": "error", "message": "no"}, False),
        ({"status": "OK", "held": 5}, False),
    ],
)
def test_a_hold_refused_as_not_granted_is_a_charge_attempt(held, attempt):
    assert requests.charge_attempt(held) is attempt


@pytest.mark.parametrize(
    "work, cap, paid",
    [
        ({"a": 5, "b": 5}, None, {}),  # the other tier's receipts pay nothing
        ({"a": 5, "b": 5}, 10, {"a": 5, "b": 5}),
        ({"a": 5, "b": 5}, 20, {"a": 5, "b": 5}),
        ({"a": 6, "b": 2}, 4, {"a": 3, "b": 1}),  # pro rata
        ({"a": 9, "b": 1}, 5, {"a": 4}),  # rounding down to 0 drops a worker
        ({}, 0, {}),
        ({"a": 3}, 0, {}),
    ],
)
def test_capped_work(work, cap, paid):
    assert requests.capped(work, cap) == paid


@pytest.mark.parametrize(
    "begun, work, shares, paid",
    [
        ({"tier": "standard", "expert_tokens": 4}, {"a": 8}, {"a": 8}, ({"a": 4}, {})),
        (
            {"tier": "private", "expert_tokens": 1},
            {"a": 8},
            {"a": 8},
            ({}, {"a": min(8, SHARE_ROWS_PER_PRIVATE_TOKEN)}),
        ),
        ({"tier": "private", "expert_tokens": 10}, {}, {"a": 8}, ({}, {"a": 8})),
        ({}, {"a": 8}, {"a": 8}, ({}, {})),  # an expired request this scheduler did not begin
    ],
)
def test_settlement_pays_at_most_what_was_held(begun, work, shares, paid):
    assert requests.settlement(work, shares, begun) == paid


@pytest.mark.parametrize(
    "request_id, open_requests, action, orphan",
    [
        ("r1", {"r1"}, "end", False),
        ("r2", {"r1"}, "close", True),
        ("r1", set(), "close", True),
    ],
)
def test_expired_requests_and_holds(request_id, open_requests, action, orphan):
    assert requests.expired_action(request_id, open_requests) == action
    assert requests.orphan_hold(request_id, open_requests) is orphan


# ---- reports -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "info, capacity",
    [
        ({"memory_budget": 100, "speed": 2.5, "owner": "o"}, WorkerCapacity("w", 100, 2.5, "o")),
        ({"memory_budget": "100", "speed": 0.0}, WorkerCapacity("w", 100, 1.0, "")),  # no benchmark: 1.0
        ({"memory_budget": 7, "speed": 3, "owner": None}, WorkerCapacity("w", 7, 3.0, "")),
    ],
)
def test_capacity_of_a_joining_worker(info, capacity):
    assert reports.capacity_of("w", info) == capacity


@pytest.mark.parametrize(
    "name, address, trusted, ok",
    [
        ("n", "a", ["n"], True),
        ("n", "a", ["a"], True),
        ("n", "a", ["x"], False),
        ("n", "a", [], False),
    ],
)
def test_operator_trusted_by_name_or_address(name, address, trusted, ok):
    assert reports.operator_trusted(name, address, trusted) is ok


@pytest.mark.parametrize(
    "load, cap, counted",
    [
        ([[0, 0, 3]], 10.0, {("m", 0, 0): 3.0}),
        ([[0, 0, 30]], 10.0, {("m", 0, 0): 10.0}),  # capped per report
        ([[5, 5, 3]], 10.0, {}),  # not a published expert
        ([["0", "1", "2"]], 10.0, {("m", 0, 1): 2.0}),
    ],
)
def test_counted_load(load, cap, counted):
    assert reports.counted_load("m", load, {(0, 0), (0, 1)}, cap) == counted


@pytest.mark.parametrize(
    "failed, published, reasons",
    [
        ([[0, 0, "corrupt"]], {(0, 0)}, {("m", 0, 0): "w1 says: corrupt"}),
        ([[0, 0, "x" * 400]], {(0, 0)}, {("m", 0, 0): "w1 says: " + "x" * 300}),
        ([[9, 9, "nope"]], {(0, 0)}, {}),  # not a real expert
        ([[0, 0, "gone"]], None, {}),  # the model is not published (any more)
        ([[0, 0, "a"], [0, 0, "b"]], {(0, 0)}, {("m", 0, 0): "w1 says: b"}),
    ],
)
def test_load_failure_reasons(failed, published, reasons):
    assert reports.load_failure_reasons("w1", "m", failed, published) == reasons


def test_load_failure_reasons_read_at_most_max_failures():
    failed = [[0, e, "bad"] for e in range(reports.MAX_FAILURES + 5)]
    published = {(0, e) for e in range(reports.MAX_FAILURES + 5)}
    assert len(reports.load_failure_reasons("w", "m", failed, published)) == reports.MAX_FAILURES


@pytest.mark.parametrize(
    "was, paused, changed",
    [
        (False, True, True),
        (True, False, True),
        (True, True, False),
        (False, False, False),
        (False, 1, True),
    ],
)
def test_only_a_change_of_pause_state_changes_routes(was, paused, changed):
    assert reports.pause_changed(was, paused) is changed


@pytest.mark.parametrize("reason, kept", [("busy", "busy"), ("x" * 300, "x" * 200), (None, "None")])
def test_pause_reason(reason, kept):
    assert reports.pause_reason(reason) == kept


@pytest.mark.parametrize("summary, width", [({"hidden_size": 64}, 64), ({}, 0), ({"hidden_size": None}, 0)])
def test_probe_width(summary, width):
    assert reports.probe_width(summary) == width


@pytest.mark.parametrize(
    "reply, paused",
    [
        ({"status": "error", "message": "paused: owner busy"}, True),
        ({"status": "error", "message": "dropped"}, False),
        ({"status": "OK"}, False),
        ("paused", False),
        (None, False),
    ],
)
def test_a_paused_reply_passes_a_probe(reply, paused):
    assert reports.paused_reply(reply) is paused


# ---- adoption by vote ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "adoption, ledger_on, reads",
    [
        ("vote", True, True),
        ("vote", False, False),
        ("operator", True, False),
        ("operator", False, False),
    ],
)
def test_votes_are_read_only_where_they_decide_and_a_ledger_holds_them(adoption, ledger_on, reads):
    assert reads_votes(adoption, ledger_on) is reads


@pytest.mark.parametrize(
    "seen, passed, last",
    [
        (0, [], 0),
        (3, [{"proposal": 5}], 5),
        (7, [{"proposal": 5}], 7),
        (0, [{"proposal": "2"}, {"proposal": 9}], 9),
    ],
)
def test_last_proposal_seen(seen, passed, last):
    assert last_proposal_seen(seen, passed) == last


@pytest.mark.parametrize(
    "due, served, ready",
    [
        ([("ch", "m2")], {"m2"}, [("ch", "m2")]),
        ([("ch", "m2")], set(), []),  # approved, not served yet: waits
        ([("a", "m1"), ("b", "m2")], {"m2"}, [("b", "m2")]),
    ],
)
def test_approved_versions_are_adopted_once_served(due, served, ready):
    assert ready_adoptions(due, served.__contains__) == ready


# ---- coordinator state the plugin used to change directly -----------------------------------------


def test_routes_changed_moves_the_version_and_fully_served_needs_every_planned_replica():
    from neuro_dask.scheduler.coordinator import LoadExperts, PublishedModel

    c = Coordinator(PlacementPolicy(replicas=1))
    c.worker_joined(WorkerCapacity("a", 10_000, 1.0))
    assert not c.fully_served("m")  # not published
    actions = c.model_published(PublishedModel("m", "/s", {(0, 0): 10, (0, 1): 10}))
    assert not c.fully_served("m")
    for a in actions:
        if isinstance(a, LoadExperts):
            c.experts_loaded(a.worker, a.model, a.experts)
    assert c.fully_served("m")
    version = c.version
    c.routes_changed()
    assert c.version == version + 1
    assert c.latest_model() == "m" and Coordinator().latest_model() == ""
    assert c.replica_counts("m") == {(0, 0): 1, (0, 1): 1} and c.replica_counts("x") == {}
    assert c.planned_counts("m") == {(0, 0): 1, (0, 1): 1} and c.planned_counts("x") == {}
    c.report_load({("m", 0, 1): 3.0, ("x", 0, 1): 1.0})
    assert c.model_load("m") == {(0, 1): 3.0}
