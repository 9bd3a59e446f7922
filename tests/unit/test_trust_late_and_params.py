"""Late checks, the slash proof and governed parameters as tables: inputs -> decisions."""

from __future__ import annotations

import pytest
import torch

from neuro_dask.trust.late_checks import Awaited, LateBook, judge_late, late_verdict
from neuro_dask.trust.layer_quorums import UnitState
from neuro_dask.trust.policy import TrustPolicy, governed
from neuro_dask.trust.quorum import Quorum, QuorumPolicy
from neuro_dask.trust.replication import ReplicationPolicy
from neuro_dask.trust.validation import ValidationPolicy
from neuro_dask.trust.verdicts import Dispute, proof, refuted

MSG = {"dtype": "float32", "hidden": 4, "data": b"in"}
SIGNED = {"data": b"out", "receipt": {"sig": "s"}}
EVIDENCE = {"receipt": {"sig": "s"}, "expert": 0, "dtype": "float32", "hidden": 4, "inputs": b"in", "outputs": b"out"}


def rows(value: float) -> torch.Tensor:
    return torch.full((2, 4), value)


@pytest.mark.parametrize(
    "canonical, late, expected",
    [
        ({0: rows(1.0)}, {0: rows(1.0 + 1e-6)}, "validated"),  # within tolerance
        ({0: rows(1.0)}, {0: rows(1.05)}, "invalid"),
        (None, {0: rows(1.0)}, None),  # nothing decided: nothing to judge
    ],
)
def test_late_verdict(canonical, late, expected):
    assert late_verdict(canonical, late, ValidationPolicy()) == expected


def unit(expert: int, result: torch.Tensor | None) -> UnitState:
    return UnitState(expert, 2, Quorum(QuorumPolicy(), counts=lambda w: True), ["w"], result=result)


@pytest.mark.parametrize(
    "late, response, expected, disputes",
    [
        (1.0, SIGNED, [("validated", 0, 2)], []),
        (2.0, SIGNED, [("invalid", 0, 0)], [Dispute("w", 5, 0, EVIDENCE)]),  # refuted and signed: proven
        (2.0, {"data": b"out"}, [("invalid", 0, 0)], []),  # refuted, nothing to hold it to
    ],
)
def test_judge_late_judges_decided_units_only(late, response, expected, disputes):
    awaited = Awaited("cause", 5, [unit(0, rows(1.0)), unit(1, None)], MSG, {})
    outcomes, proven = judge_late(awaited, "w", {0: rows(late), 1: rows(late)}, response, ValidationPolicy())
    assert [(o.kind, o.expert, o.rows) for o in outcomes] == expected
    assert {(o.worker, o.cause_id, o.layer) for o in outcomes} == {("w", "cause", 5)}
    assert proven == disputes


def test_the_late_book_remembers_the_newest_calls_once():
    book = LateBook(limit=2)
    for call in ("c1", "c2", "c3"):
        book.expect(call, Awaited("cause", 0, [], {}, {}))
    assert book.claim("c1") is None  # forgotten: the oldest beyond the limit
    assert book.claim("c3") is not None and book.claim("c3") is None


@pytest.mark.parametrize(
    "msg, response, expected",
    [
        (MSG, SIGNED, Dispute("w", 1, 0, EVIDENCE)),
        (MSG, {"data": b"out"}, None),  # no receipt
        (MSG, None, None),  # no answer on record
        (None, SIGNED, None),  # no request on record
    ],
)
def test_proof(msg, response, expected):
    assert proof("w", 1, 0, msg, response) == expected


@pytest.mark.parametrize(
    "verdicts, expected",
    [
        ([("a", True), ("b", False), ("c", False)], ["b", "c"]),
        ([("a", True)], []),
    ],
)
def test_refuted(verdicts, expected):
    assert refuted(verdicts) == expected


BASE = TrustPolicy(QuorumPolicy(2, 2, 5, 3), ReplicationPolicy(spot_check=0.05, min_quorum=2))


@pytest.mark.parametrize(
    "params, spot_check, min_quorum, target, max_total",
    [
        ({}, 0.05, 2, 2, 5),  # none handed out: the local policy stands
        ({"spot_check_bps": 2500}, 0.25, 2, 2, 5),
        ({"spot_check_bps": 0}, 0.05, 2, 2, 5),  # 0 keeps the local rate
        ({"min_quorum": 3}, 0.05, 3, 3, 5),  # the target grows with the minimum
        ({"min_quorum": 6, "spot_check_bps": 10_000}, 1.0, 6, 6, 6),  # and so does the maximum
    ],
)
def test_governed_parameters(params, spot_check, min_quorum, target, max_total):
    policy = governed(BASE, params)
    assert policy.replication.spot_check == spot_check and policy.replication.min_quorum == min_quorum
    assert (policy.quorum.min_quorum, policy.quorum.target_replicas, policy.quorum.max_total_replicas) == (
        min_quorum,
        target,
        max_total,
    )
    assert policy.validation == BASE.validation and policy.hedging == BASE.hedging
