"""The layer-call state machine (trust/layer_quorums.py): reply sequences in, decisions out.

No transport and no clock: each case plans one unit over its candidates, feeds the replies of
each round and lists the decisions the machine takes after planning and after every round.
A number is an answer (every row that value; answers equal within tolerance agree),
"timeout" / "error" a failed reply.
"""

from __future__ import annotations

import random

import pytest
import torch

from neuro_dask.trust.layer_quorums import (
    Accept,
    GiveUp,
    LayerQuorums,
    Prove,
    Send,
    TrustTally,
    UnitState,
    fallback_worker,
    hedge_targets,
    next_replica,
    settled_elsewhere,
    trusted_group,
)
from neuro_dask.trust.policy import TrustPolicy
from neuro_dask.trust.quorum import Quorum, QuorumPolicy
from neuro_dask.trust.replication import Standing

TRUSTED, EST, NEW = Standing(trusted=True), Standing(established=True, consecutive_valid=10_000), Standing()
ALWAYS, NEVER = 0.0, 0.999  # rng draws: below every replication probability (replicate), above (don't)


class FixedRng(random.Random):
    def __init__(self, value: float):
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def summary(decision) -> tuple:
    if isinstance(decision, Send):
        return ("send", decision.worker, decision.role)
    if isinstance(decision, Accept):
        return ("accept", decision.valid, decision.by)
    if isinstance(decision, Prove):
        return ("prove", decision.worker)
    assert isinstance(decision, GiveUp)
    return ("unavailable" if decision.unavailable else "exhausted", decision.results, decision.groups, decision.errors)


def feed(machine: LayerQuorums, replies: dict[str, float | str]) -> None:
    for worker, reply in replies.items():
        machine.tried_by(0, worker)
        if isinstance(reply, str):
            machine.failed(0, worker, reply, f"call-{worker}")
        else:
            machine.answered(0, worker, torch.full((2, 4), float(reply)), f"call-{worker}")


def play(
    standing: dict[str, Standing],
    candidates: list[str],
    draw: float,
    rounds: list[dict],
    policy: TrustPolicy = TrustPolicy(),
) -> tuple[list[list[tuple]], LayerQuorums]:
    anchorless = not any(s.trusted or s.established for s in standing.values())
    machine = LayerQuorums(3, "cause", policy, standing.__getitem__, anchorless)
    log = [[summary(d) for d in machine.open(0, 2, candidates, FixedRng(draw))]]
    machine.start()
    for replies in rounds:
        feed(machine, replies)
        log.append([summary(d) for d in machine.close_round()])
    return log, machine


SMALL = TrustPolicy(quorum=QuorumPolicy(min_quorum=2, target_replicas=2, max_total_replicas=2))

CASES = {
    "agreement on the first quorum": (
        {"a": EST, "b": NEW},
        ["a", "b"],
        ALWAYS,
        TrustPolicy(),
        [{"a": 1.0, "b": 1.0}],
        [[("send", "a", "primary"), ("send", "b", "replica")], [("accept", ("a", "b"), "quorum")]],
    ),
    "an established primary unchecked goes out alone and is accepted alone": (
        {"a": EST, "b": EST},
        ["a", "b"],
        NEVER,
        TrustPolicy(),
        [{"a": 1.0}],
        [[("send", "a", "primary")], [("accept", ("a",), "quorum")]],
    ),
    "a newcomer is checked by a worker with a record, one more replica settles a disagreement": (
        {"n": NEW, "x": NEW, "e1": EST, "e2": EST},
        ["n", "x", "e1", "e2"],
        ALWAYS,
        TrustPolicy(),
        [{"n": 2.0, "e1": 1.0}, {"e2": 1.0}],
        [
            [("send", "n", "primary"), ("send", "e1", "replica")],
            [("send", "e2", "more")],
            [("accept", ("e1", "e2"), "quorum"), ("prove", "n")],
        ],
    ),
    "newcomers agreeing never decide: the trusted answer does, and refutes them": (
        {"n1": NEW, "t": TRUSTED, "n2": NEW},
        ["n1", "t", "n2"],
        ALWAYS,
        TrustPolicy(),
        [{"n1": 2.0, "t": 1.0}, {"n2": 2.0}],
        [
            [("send", "n1", "primary"), ("send", "t", "replica")],
            [("send", "n2", "more")],
            [("accept", ("t",), "trusted"), ("prove", "n1"), ("prove", "n2")],
        ],
    ),
    "an exhausted disagreement falls back to a trusted worker not yet asked": (
        {"e1": EST, "e2": EST, "t": TRUSTED},
        ["e1", "e2", "t"],
        ALWAYS,
        SMALL,
        [{"e1": 1.0, "e2": 2.0}, {"t": 2.0}],
        [
            [("send", "e1", "primary"), ("send", "e2", "replica")],
            [("send", "t", "fallback")],
            [("accept", ("t",), "quorum")],
        ],
    ),
    "a timeout asks one more replica": (
        {"e1": EST, "e2": EST},
        ["e1", "e2"],
        NEVER,
        TrustPolicy(),
        [{"e1": "timeout"}, {"e2": 1.0}],
        [[("send", "e1", "primary")], [("send", "e2", "more")], [("accept", ("e2",), "quorum")]],
    ),
    "a disagreement nobody can settle exhausts the quorum": (
        {"n1": NEW, "n2": NEW, "e": EST},
        ["n1", "n2"],
        ALWAYS,
        TrustPolicy(),
        [{"n1": 1.0, "n2": 2.0}],
        [[("send", "n1", "primary"), ("send", "n2", "replica")], [("exhausted", 2, 2, 0)]],
    ),
    "every host gone is an availability wait": (
        {"t": TRUSTED, "e": EST},
        ["t", "e"],
        ALWAYS,
        TrustPolicy(),
        [{"t": "error", "e": "error"}],
        [[("send", "t", "primary"), ("send", "e", "replica")], [("unavailable", 0, 0, 2)]],
    ),
    "a newcomer's lone answer is an availability wait, not a dispute": (
        {"t": TRUSTED, "n": NEW},
        ["t", "n"],
        ALWAYS,
        TrustPolicy(),
        [{"t": "error", "n": 1.0}],
        [[("send", "t", "primary"), ("send", "n", "replica")], [("unavailable", 1, 1, 1)]],
    ),
    "anchorless: agreement of two owners decides": (
        {"a": NEW, "b": NEW},
        ["a", "b"],
        ALWAYS,
        TrustPolicy(),
        [{"a": 1.0, "b": 1.0}],
        [[("send", "a", "primary"), ("send", "b", "replica")], [("accept", ("a", "b"), "quorum")]],
    ),
    "anchorless: a lone host's word is an availability wait, never accepted": (
        {"a": NEW},
        ["a"],
        ALWAYS,
        TrustPolicy(),
        [{"a": 1.0}],
        [[("send", "a", "primary")], [("unavailable", 1, 1, 0)]],
    ),
}


@pytest.mark.parametrize("standing, candidates, draw, policy, rounds, expected", CASES.values(), ids=CASES.keys())
def test_reply_sequences_lead_to_decisions(standing, candidates, draw, policy, rounds, expected):
    log, _ = play(standing, candidates, draw, rounds, policy)
    assert log == expected


@pytest.mark.parametrize(
    "rounds, expected",
    [
        ([{"n": 2.0, "e1": 1.0}, {"e2": 1.0}], [("e1", "validated", 2), ("e2", "validated", 2), ("n", "invalid", 0)]),
        (
            [{"n": "timeout", "e1": 1.0}, {"e2": 1.0}],
            [("n", "timeout", 0), ("e1", "validated", 2), ("e2", "validated", 2)],
        ),
    ],
)
def test_outcomes_follow_the_verdicts_in_order(rounds, expected):
    _, machine = play({"n": NEW, "e1": EST, "e2": EST}, ["n", "e1", "e2"], ALWAYS, rounds)
    assert [(o.worker, o.kind, o.rows) for o in machine.outcomes] == expected
    assert {(o.cause_id, o.layer, o.expert) for o in machine.outcomes} == {("cause", 3, 0)}


def test_a_lost_primary_is_late_and_its_hedge_decides():
    standing = {"p": EST, "h": EST}
    machine = LayerQuorums(3, "cause", TrustPolicy(), standing.__getitem__, anchorless=False)
    machine.open(0, 2, ["p", "h"], FixedRng(NEVER))
    machine.start()
    assert machine.hedge_due("p", [0], frozenset({0}), {}, frozenset(), frozenset(), None) == ({"h": [0]}, frozenset())
    machine.lost("p")
    feed(machine, {"h": 1.0})
    assert [summary(d) for d in machine.close_round()] == [("accept", ("h",), "quorum")]
    assert [(o.worker, o.kind, o.expert) for o in machine.outcomes] == [("p", "late", -1), ("h", "validated", 0)]


def test_a_waived_check_lets_the_counting_answer_stand_alone():
    standing = {"p": EST, "c": EST}
    machine = LayerQuorums(3, "cause", TrustPolicy(), standing.__getitem__, anchorless=False)
    machine.open(0, 2, ["p", "c"], FixedRng(ALWAYS))
    machine.start()
    assert machine.hedge_due("p", [0], frozenset({0}), {0: {"c"}}, frozenset(), frozenset(), None) == ({}, {0})
    machine.waive(0)
    feed(machine, {"c": 1.0})
    assert [summary(d) for d in machine.close_round()] == [("accept", ("c",), "quorum")]


def test_a_checked_unit_without_a_free_host_waits_for_its_checker_and_never_holds_back_the_others():
    # The straggler bench's commonest stuck layer: the slow message carries a spot-checked unit
    # (both of its hosts asked already) and an unchecked one; the unchecked one has a free host.
    standing = {"p": EST, "c": EST, "x": EST}
    machine = LayerQuorums(3, "cause", TrustPolicy(), standing.__getitem__, anchorless=False)
    machine.open(0, 2, ["p", "c"], FixedRng(ALWAYS))  # checked: p and c asked
    machine.open(1, 2, ["p", "x"], FixedRng(NEVER))  # unchecked: x is free
    machine.start()
    due = machine.hedge_due("p", [0, 1], frozenset({0, 1}), {}, frozenset(), frozenset(), None)
    assert due == ({"x": [1]}, frozenset())  # 0 waits for c, 1 is hedged at once
    assert machine.settled("p", [0, 1], frozenset({0}), {}) == frozenset()
    assert machine.settled("p", [0, 1], frozenset({0}), {0: {"c"}}) == {0}  # c answered: it stands alone


@pytest.mark.parametrize(
    "checker, anchorless",
    [
        (NEW, False),  # a checker without a record cannot stand alone
        (EST, True),  # rule 7 never applies anchorless
    ],
)
def test_a_unit_with_every_host_asked_and_no_checker_to_stand_alone_asks_the_late_worker_again_once(
    checker, anchorless
):
    # With two hosts per expert, a unit whose other host is asked already has no fresh host: a
    # new call to the late worker itself answers a slow path or a lost answer; only once.
    standing = {"p": EST, "c": checker, "x": EST}
    machine = LayerQuorums(3, "cause", TrustPolicy(), standing.__getitem__, anchorless=anchorless)
    machine.open(0, 2, ["p", "c"], FixedRng(ALWAYS))
    machine.open(1, 2, ["p", "x"], FixedRng(NEVER))
    machine.start()
    due = machine.hedge_due("p", [0, 1], frozenset({0, 1}), {}, frozenset(), frozenset(), None)
    assert due == ({"p": [0], "x": [1]}, frozenset())
    assert machine.hedge_due("p", [0, 1], frozenset({0, 1}), {}, frozenset(), frozenset(), None) == ({}, frozenset())


def test_the_tally_counts_sends_units_and_acceptances():
    tally = TrustTally()
    standing = {"a": EST, "b": NEW}
    machine = LayerQuorums(0, "cause", TrustPolicy(), standing.__getitem__, anchorless=False, tally=tally)
    machine.open(0, 2, ["a", "b"], FixedRng(ALWAYS))
    machine.start()
    feed(machine, {"a": 1.0, "b": 1.0})
    machine.close_round()
    assert (tally.replicas_sent, tally.units, tally.unchecked, tally.accepted_from) == (2, 1, 0, {("a", "b"): 1})
    assert torch.equal(machine.results()[0], torch.full((2, 4), 1.0))


def unit(candidates: list[str], tried: set[str], groups: list[list[str]] = (), errors: list[str] = ()) -> UnitState:
    quorum = Quorum(QuorumPolicy(), counts=lambda w: True)
    quorum.groups = [[(w, {0: torch.zeros(1)}) for w in g] for g in groups]
    quorum.errors = list(errors)
    return UnitState(0, 1, quorum, candidates, tried=set(tried), owners={"o-" + w for w in tried})


OWNED = {
    "a": Standing(owner="o-a"),
    "a2": Standing(owner="o-a", established=True),
    "b": Standing(owner="o-b"),
    "e": Standing(owner="o-e", established=True),
    "t": Standing(owner="o-t", trusted=True),
}


@pytest.mark.parametrize(
    "candidates, tried, expected",
    [
        (["a", "a2", "b"], {"a"}, "b"),  # a new owner before a record of a known owner
        (["a", "b", "e"], {"a"}, "e"),  # among new owners, a record first
        (["a", "a2"], {"a"}, "a2"),  # no new owner left: any untried worker
        (["a"], {"a"}, None),  # nobody left
    ],
)
def test_next_replica(candidates, tried, expected):
    assert next_replica(unit(candidates, tried), OWNED.__getitem__) == expected


@pytest.mark.parametrize(
    "candidates, groups, errors, expected",
    [
        (["a", "t"], [["a"]], [], "t"),  # a trusted worker that has not answered
        (["a", "t"], [["a"], ["t"]], [], None),
        (["a", "t"], [["a"]], ["t"], None),  # its failure counts as its answer
        (["a", "b"], [["a"]], [], None),  # no trusted candidate
    ],
)
def test_fallback_worker(candidates, groups, errors, expected):
    assert fallback_worker(unit(candidates, set(candidates), groups, errors), OWNED.__getitem__) == expected


@pytest.mark.parametrize(
    "groups, expected",
    [
        ([["a"], ["b", "t"]], ["b", "t"]),
        ([["a", "e"]], None),
    ],
)
def test_trusted_group(groups, expected):
    found = trusted_group(unit(["a"], set(), groups).quorum, OWNED.__getitem__)
    assert (None if found is None else [w for w, _ in found]) == expected


@pytest.mark.parametrize(
    "quorum, anchorless, answered, expected",
    [
        (2, False, {0: {"e"}}, True),  # a counting replica answered for it
        (2, False, {0: {"b"}}, False),  # only a replica without a record
        (2, False, {0: {"p"}}, False),  # only the slow worker itself
        (1, False, {0: {"e"}}, False),  # nothing replicated to settle
        (2, True, {0: {"e"}}, False),  # never in anchorless mode
    ],
)
def test_settled_elsewhere(quorum, anchorless, answered, expected):
    u = unit(["p", "e", "b"], {"p", "e", "b"})
    u.quorum.quorum, u.quorum.anchorless = quorum, anchorless
    assert settled_elsewhere(u, "p", answered, OWNED.get) == expected


def test_hedge_targets_reuse_one_target_for_several_units():
    units = {0: unit(["p", "x", "y"], {"p"}), 1: unit(["p", "x"], {"p"})}
    assert hedge_targets("p", [0, 1], units, lambda w: Standing()) == {"x": [0, 1]}
