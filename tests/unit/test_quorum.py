"""Quorum and fuzzy validation: the BOINC validator's cases as tables."""

from __future__ import annotations

import pytest
import torch

from neuro_dask.errors import ConfigError
from neuro_dask.trust.late_checks import late_verdict
from neuro_dask.trust.quorum import Accepted, Exhausted, NeedMore, Quorum, QuorumPolicy
from neuro_dask.trust.validation import ValidationPolicy, agree, malformed

BASE = {0: torch.linspace(-1, 1, 8).reshape(2, 4), 3: torch.ones(1, 4)}


def res(noise: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {e: t + noise * torch.randn(t.shape, generator=g) for e, t in BASE.items()}


ESTABLISHED = {"est1", "est2", "est3", "trusted"}


def quorum(q=2, anchorless=False, **policy):
    return Quorum(
        QuorumPolicy(**policy),
        counts=lambda w: w in ESTABLISHED,
        quorum=q,
        anchorless=anchorless,
        owner_of=lambda w: w.rstrip("0123456789"),
    )


@pytest.mark.parametrize("noise, expected", [(0.0, True), (1e-6, True), (2e-5, True), (0.05, False)])
def test_fuzzy_agreement(noise, expected):
    assert agree(res(), res(noise, seed=1)) is expected


def test_exact_mode_demands_bit_equality():
    assert agree(res(), res(), ValidationPolicy(exact=True))
    assert not agree(res(), res(1e-7, seed=1), ValidationPolicy(exact=True))


def test_malformed_results_are_named():
    shapes = {e: tuple(t.shape) for e, t in BASE.items()}
    assert malformed(res(), shapes, torch.float32) is None
    assert "covers experts" in malformed({0: BASE[0]}, shapes, torch.float32)
    bad = res()
    bad[3] = torch.full((1, 4), float("nan"))
    assert "non-finite" in malformed(bad, shapes, torch.float32)
    assert "shape" in malformed({0: BASE[0][:1], 3: BASE[3]}, shapes, torch.float32)


@pytest.mark.parametrize(
    "replies, expected",
    [
        # 2 of 2 agree (one established) -> accepted
        ([("est1", 0.0), ("new1", 1e-6)], Accepted),
        # 1 of 2 perturbed -> one more replica
        ([("est1", 0.0), ("new1", 0.05)], NeedMore),
        # ... the third agrees with the honest one -> 2 of 3 wins
        ([("est1", 0.0), ("new1", 0.05), ("est2", 1e-6)], Accepted),
        # two newcomers agreeing never suffice
        ([("new1", 0.0), ("new2", 0.0)], NeedMore),
        # budget spent with no quorum -> exhausted
        ([("est1", 0.0), ("new1", 0.05), ("new2", 0.1), ("new3", 0.2), ("new4", 0.3)], Exhausted),
    ],
)
def test_quorum_table(replies, expected):
    q = quorum()
    for i, (worker, noise) in enumerate(replies):
        q.add_result(worker, res(noise, seed=i))
    decision = q.decide()
    assert isinstance(decision, expected)
    if isinstance(decision, NeedMore):
        assert decision.replicas == 1


def test_accepted_names_valid_and_invalid_and_keeps_the_canonical_result():
    q = quorum()
    q.add_result("est1", res())
    q.add_result("new1", res(0.05, seed=1))
    q.add_result("est2", res(1e-6, seed=2))
    d = q.decide()
    assert d.valid == ("est1", "est2") and d.invalid == ("new1",)
    assert agree(d.canonical, res())


def test_colluders_agreeing_on_a_wrong_result_do_not_win():
    q = quorum()
    wrong = res(0.05, seed=9)
    q.add_result("new1", wrong)
    q.add_result("new2", wrong)
    q.add_result("est1", res())
    assert isinstance(q.decide(), NeedMore)  # the colluders' group has no counting member
    q.add_result("est2", res())
    d = q.decide()
    assert set(d.valid) == {"est1", "est2"} and set(d.invalid) == {"new1", "new2"}


def test_unreplicated_call_accepts_one_established_result():
    q = quorum(q=1)
    q.add_result("est1", res())
    assert isinstance(q.decide(), Accepted)


def test_errors_exhaust_the_budget():
    q = quorum(max_error_replicas=2)
    q.add_error("est1")
    assert isinstance(q.decide(), NeedMore)
    q.add_error("est2")
    assert isinstance(q.decide(), Exhausted)


def test_outstanding_replicas_are_awaited_before_more_are_sent_or_given_up():
    q = quorum(max_total_replicas=2)
    q.add_result("est1", res())
    assert q.decide(outstanding=1) == NeedMore(0)
    q.add_result("new1", res(0.05, seed=1))
    assert isinstance(q.decide(), Exhausted)


def test_anchorless_mode_accepts_agreement_of_distinct_owners_only():
    q = quorum(anchorless=True)
    q.add_result("alice1", res())
    q.add_result("alice2", res())
    assert isinstance(q.decide(), NeedMore)  # one owner's two workers count once
    q.add_result("bob1", res())
    assert isinstance(q.decide(), Accepted)


def test_anchorless_mode_never_takes_one_owners_word_even_for_an_unreplicated_call():
    # The hole a scheduler restart opened: the first volunteer back (a colluder) hosted every
    # expert alone, its calls went out unreplicated (quorum 1), and its answers were accepted
    # and credited until it was established and only spot-checked.
    lone = quorum(q=1, anchorless=True)
    lone.add_result("mallory", res())
    assert isinstance(lone.decide(), NeedMore)
    lone.add_result("bob1", res())
    assert isinstance(lone.decide(), Accepted)
    anchored = quorum(q=1)  # outside anchorless mode an established worker's lone answer stands
    anchored.add_result("est1", res())
    assert isinstance(anchored.decide(), Accepted)


def test_late_results_are_credited_only_if_they_agree():
    q = quorum()
    q.add_result("est1", res())
    q.add_result("est2", res())
    q.decide()
    assert late_verdict(q.decide().canonical, res(1e-6, seed=3), q.validation) == "validated"
    assert late_verdict(q.decide().canonical, res(0.05, seed=3), q.validation) == "invalid"


@pytest.mark.parametrize(
    "kw",
    [dict(min_quorum=0), dict(min_quorum=3, target_replicas=2), dict(target_replicas=6), dict(max_error_replicas=0)],
)
def test_bad_quorum_policy(kw):
    with pytest.raises(ConfigError):
        QuorumPolicy(**kw)


# --- rule 7: a check whose subject did not answer is waived ---------------------------------


def test_waiving_an_abandoned_replica_lets_a_counting_answer_stand_alone():
    q = quorum(q=2)
    q.add_result("est1", res())
    assert isinstance(q.decide(), NeedMore)
    assert q.waive() and q.quorum == 1
    decision = q.decide()
    assert isinstance(decision, Accepted) and decision.valid == ("est1",)


def test_waiving_never_lets_a_newcomer_decide_alone():
    q = quorum(q=2)
    q.add_result("new1", res())
    assert q.waive()
    assert isinstance(q.decide(), NeedMore)  # rule 2 still holds: one counting result is needed


def test_waiving_stops_at_one_and_never_applies_when_anchorless_or_decided():
    q = quorum(q=2)
    q.waive()
    q.waive()
    assert q.quorum == 1
    anchorless = quorum(q=2, anchorless=True)
    assert not anchorless.waive() and anchorless.quorum == 2
    decided = quorum(q=1)
    decided.add_result("est1", res())
    decided.decide()
    assert not decided.waive()
