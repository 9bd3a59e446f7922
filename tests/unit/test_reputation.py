from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import neuro_dask.trust.reputation as reputation_module
from neuro_dask.errors import ConfigError
from neuro_dask.trust.reputation import (
    LATE_MEMORY,
    Reputation,
    ReputationChange,
    ReputationPolicy,
    WorkerRecord,
    combined_score,
    squash_speed,
)

POLICY = ReputationPolicy()
DAY = POLICY.uptime_halflife


def fresh(*workers: str, now: float = 0.0) -> Reputation:
    rep = Reputation()
    for w in workers:
        rep.join(w, now=now)
    return rep


def validate(rep: Reputation, worker: str, n: int, now: float = 0.0) -> None:
    for i in range(n):
        rep.validated(worker, f"ok-{i}", now)


def perfect(worker: str = "w", speed: float = 0.5) -> Reputation:
    """A long record at c = t = u = 1, built through persistence (the rules only approach 1)."""
    state = {"present": True, "updated_at": 0.0, "consecutive_valid": 500, "validated": 500,
             "correctness": 1.0, "timeliness": 1.0, "speed": speed, "uptime": 1.0}  # fmt: skip
    return Reputation.from_dict({"version": 1, "workers": {worker: state}})


def established_worker(worker: str = "w") -> Reputation:
    """A worker with 100 validated results, present for 10 days."""
    rep = fresh(worker)
    for i in range(100):
        rep.validated(worker, f"ok-{i}", now=i * DAY / 10)
    assert rep.established(worker) and rep.score(worker) > 0.8
    return rep


def validations_until(rep: Reputation, worker: str, predicate) -> int:
    n = 0
    while not predicate(rep.record(worker)):
        rep.validated(worker, f"back-{n}", 0.0)
        n += 1
        assert n < 1000
    return n


# ---- newcomers and establishment -------------------------------------------------------------


def test_newcomer_scores_exactly_min_reputation_routable_but_not_established():
    rep = Reputation()
    change = rep.join("w", owner="alice", now=0.0)
    assert change == ReputationChange("w", "joined", 0.5, 0.5, "")
    rec = rep.record("w")
    assert (rec.owner, rec.trusted, rec.present) == ("alice", False, True)
    assert (rec.correctness, rec.timeliness, rec.speed, rec.uptime) == (0.5, 0.5, 0.5, 0.5)
    assert rec.score == 0.5 == POLICY.min_reputation
    assert rep.routable("w") and not rep.established("w")


@pytest.mark.parametrize("establish_after", [1, 5, 20])
def test_newcomer_needs_establish_after_consecutive_validated(establish_after):
    rep = Reputation(ReputationPolicy(establish_after=establish_after))
    rep.join("w")
    validate(rep, "w", establish_after - 1)
    assert not rep.established("w")
    rep.validated("w", "last", 0.0)
    assert rep.established("w")
    assert rep.record("w").consecutive_valid == establish_after


@pytest.mark.parametrize("breaker", ["invalid", "timeout", "crash"])
def test_invalid_timeout_and_crash_reset_the_streak(breaker):
    rep = fresh("w")
    validate(rep, "w", 19)
    getattr(rep, breaker)("w", "x", 0.0)
    assert rep.record("w").consecutive_valid == 0
    validate(rep, "w", 19)
    assert not rep.established("w")  # 19 + 19 validated, but never 20 in a row
    rep.validated("w", "x20", 0.0)
    assert rep.established("w")


def test_late_keeps_the_streak():
    rep = fresh("w")
    validate(rep, "w", 19)
    rep.late("w", "slow", 0.0)
    rep.validated("w", "slow", 0.0)
    assert rep.record("w").consecutive_valid == 20 and rep.established("w")


def test_slow_to_earn_correctness_trajectory():
    """Logistic growth from 0.5: 20 results -> 0.732; 44 to reach 0.9; 59 to reach 0.95."""
    rep = fresh("w")
    validate(rep, "w", 20)
    assert rep.record("w").correctness == pytest.approx(0.7322, abs=1e-4)
    assert validations_until(rep, "w", lambda r: r.correctness >= 0.9) == 44 - 20
    assert validations_until(rep, "w", lambda r: r.correctness >= 0.95) == 59 - 44


# ---- quick to lose ------------------------------------------------------------------------------


def test_one_invalid_drops_an_established_worker_out_of_routing_at_once():
    rep = established_worker()
    before = rep.score("w")
    change = rep.invalid("w", "task-7", now=10 * DAY)
    assert change == ReputationChange("w", "invalid", before, rep.score("w"), "task-7")
    rec = rep.record("w")
    assert rec.consecutive_valid == 0 and rec.invalid == 1 and rec.validated == 100
    assert rec.correctness == 0.25  # min(c, initial) * (1 - invalid_penalty)
    assert rec.score <= 0.25 < POLICY.min_reputation
    assert not rep.routable("w") and not rep.established("w")


def test_climbing_back_after_one_invalid_is_long():
    """From c = 0.25: established again after 20, routable after 23, back to 0.95 after 81."""
    rep = established_worker()
    rep.invalid("w", "bad", now=10 * DAY)
    assert validations_until(rep, "w", lambda r: r.established) == 20
    assert not rep.routable("w")  # established again, but still out of routing
    assert validations_until(rep, "w", lambda r: r.routable) == 3
    assert validations_until(rep, "w", lambda r: r.correctness >= 0.95) == 81 - 23


def test_a_second_offence_lengthens_the_way_back():
    rep = established_worker()
    rep.invalid("w", "bad-1", now=10 * DAY)
    rep.invalid("w", "bad-2", now=10 * DAY)
    assert rep.record("w").correctness == 0.125
    assert validations_until(rep, "w", lambda r: r.routable) == 40


@pytest.mark.parametrize("event", ["timeout", "crash", "late"])
def test_timeouts_crashes_and_lateness_cost_less_than_a_wrong_result(event):
    hit, wrong = established_worker(), established_worker()
    getattr(hit, event)("w", "x", now=10 * DAY)
    wrong.invalid("w", "x", now=10 * DAY)
    assert hit.routable("w") and hit.score("w") > wrong.score("w")


@pytest.mark.parametrize(
    "event, timeliness, uptime, score, present",
    [
        ("late", 0.9, 1.0, 0.8825, True),
        ("timeout", 0.9, 0.8, 0.8534, True),
        ("crash", 1.0, 0.8, 0.8716, False),
    ],
)
def test_single_event_effects_on_a_perfect_worker(event, timeliness, uptime, score, present):
    rep = perfect()
    assert rep.score("w") == pytest.approx(0.5**0.15)  # 0.901: speed at the median caps it
    change = getattr(rep, event)("w", "t1", now=0.0)
    rec = rep.record("w")
    assert (rec.timeliness, rec.uptime, rec.present) == (pytest.approx(timeliness), pytest.approx(uptime), present)
    assert rec.correctness == 1.0
    assert change.after == rec.score == pytest.approx(score, abs=1e-4)
    counters = {"late": rec.late, "timeout": rec.timeouts, "crash": rec.crashes}
    assert counters[event] == 1 and sum(counters.values()) == 1


def test_lateness_adds_up():
    """Timeliness below 0.5 after 7 late results; out of routing after 28 in a row."""
    rep = perfect()
    scores = []
    for k in range(1, 29):
        rep.late("w", f"late-{k}", 0.0)
        scores.append(rep.score("w"))
        if k == 6:
            assert rep.record("w").timeliness >= 0.5
        if k == 7:
            assert rep.record("w").timeliness < 0.5
        if k == 27:
            assert rep.routable("w")
    assert not rep.routable("w")
    assert scores == sorted(scores, reverse=True)


def test_a_late_result_then_validated_earns_correctness_but_not_timeliness():
    rep = perfect()
    rep.late("w", "t1", 0.0)
    after_late = rep.record("w")
    rep.validated("w", "t1", 0.0)
    rec = rep.record("w")
    assert rec.timeliness == after_late.timeliness and rec.late_pending == ()
    rep.validated("w", "t2", 0.0)  # on time: earns timeliness
    assert rep.record("w").timeliness == pytest.approx(0.9 + 0.05 * 0.1)


def test_late_memory_is_bounded():
    rep = fresh("w")
    for i in range(LATE_MEMORY + 10):
        rep.late("w", f"t{i}", 0.0)
    pending = rep.record("w").late_pending
    assert len(pending) == LATE_MEMORY and pending[-1] == f"t{LATE_MEMORY + 9}"


def test_a_newcomer_has_no_slack():
    for event in ("late", "timeout", "crash"):
        rep = fresh("w")
        getattr(rep, event)("w", "x", 0.0)
        assert not rep.routable("w"), event
    rep = fresh("w")
    rep.validated("w", "ok", 0.0)
    rep.late("w", "slow", 0.0)
    assert rep.routable("w")  # one validated result buys room for one late one


# ---- speed and uptime ---------------------------------------------------------------------------


@pytest.mark.parametrize("relative, expected", [(0.0, 0.0), (1.0, 0.5), (2.0, 2 / 3), (3.0, 0.75), (1e9, 1.0)])
def test_speed_squashing(relative, expected):
    assert squash_speed(relative) == pytest.approx(expected)
    rep = fresh("w")
    rep.observe_speed("w", relative)
    assert rep.record("w").speed == pytest.approx(expected)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, True, "fast"])
def test_bad_speed_raises(bad):
    with pytest.raises(ConfigError):
        fresh("w").observe_speed("w", bad)


def test_faster_workers_score_higher():
    rep = perfect("a")
    rep.observe_speed("a", 1.0)
    slow, fast = perfect("b"), perfect("c")
    slow.observe_speed("b", 0.5)
    fast.observe_speed("c", 2.0)
    assert slow.score("b") < rep.score("a") < fast.score("c")


@pytest.mark.parametrize(
    "present_days, absent_days, expected",
    [(1, 0, 0.75), (2, 0, 0.875), (1, 1, 0.375), (0, 1, 0.25), (0, 2, 0.125)],
)
def test_uptime_is_a_half_life_weighted_presence_fraction(present_days, absent_days, expected):
    rep = fresh("w", now=0.0)
    rep.leave("w", now=present_days * DAY)
    rep.join("w", now=(present_days + absent_days) * DAY)
    assert rep.record("w").uptime == pytest.approx(expected)


def test_crash_leaves_the_worker_absent_until_it_joins():
    rep = fresh("w", now=0.0)
    rep.crash("w", "boom", now=0.0)
    assert rep.record("w").uptime == pytest.approx(0.4)
    rep.join("w", now=DAY)  # a day away: uptime halves
    assert rep.record("w").uptime == pytest.approx(0.2)
    assert rep.record("w").present


def test_time_never_runs_backwards():
    rep = fresh("w", now=100.0)
    rep.validated("w", "a", now=50.0)
    rec = rep.record("w")
    assert rec.updated_at == 100.0 and rec.uptime == 0.5


def test_join_without_time_starts_the_clock_at_the_next_event():
    rep = Reputation()
    rep.join("w")
    rep.validated("w", "a", now=1.7e9)
    rep.validated("w", "b", now=1.7e9 + DAY)
    assert rep.record("w").uptime == pytest.approx(0.75)


# ---- membership, unknown workers, trust ---------------------------------------------------------


def test_rejoin_keeps_the_record():
    rep = established_worker()
    rep.leave("w", now=10 * DAY)
    kept = rep.record("w")
    assert not kept.present
    change = rep.join("w", now=10 * DAY)
    rec = rep.record("w")
    assert rec.present and rec.validated == 100 and rec.established
    assert rec.correctness == kept.correctness and rec.owner == kept.owner
    assert change.before == change.after == rec.score


def test_rejoin_updates_owner_only_when_given_and_keeps_a_trust_mark():
    rep = Reputation()
    rep.join("w", owner="alice", trusted=True)
    rep.join("w")
    assert rep.record("w").owner == "alice" and rep.record("w").trusted
    rep.join("w", owner="bob")
    assert rep.record("w").owner == "bob"


@pytest.mark.parametrize("event", ["validated", "invalid", "late", "timeout", "crash"])
def test_unknown_worker_in_an_event_joins_as_a_newcomer(event):
    rep = Reputation()
    change = getattr(rep, event)("ghost", "c1", 5.0)
    assert "ghost" in rep and change.before == 0.5 and change.cause == event
    rec = rep.record("ghost")
    assert rec.owner == "" and not rec.trusted and rec.updated_at == 5.0


def test_queries_do_not_join_unknown_workers():
    rep = Reputation()
    assert rep.record("ghost") == WorkerRecord("ghost", policy=POLICY)
    assert rep.score("ghost") == 0.5 and rep.routable("ghost") and not rep.established("ghost")
    assert rep.ranked(["ghost"]) == ["ghost"]
    assert "ghost" not in rep and rep.workers() == []


@pytest.mark.parametrize("bad", ["", None, 3])
def test_bad_worker_names_raise(bad):
    with pytest.raises(ConfigError):
        Reputation().join(bad)
    with pytest.raises(ConfigError):
        Reputation().score(bad)


def test_bad_now_raises():
    with pytest.raises(ConfigError):
        Reputation().validated("w", "a", now=math.nan)


def test_trusted_workers_are_established_and_routable_but_scored_honestly():
    rep = Reputation()
    change = rep.join("t", trusted=True, now=0.0)
    assert rep.established("t") and rep.routable("t")
    rep.invalid("t", "oops", 0.0)
    rec = rep.record("t")
    assert rec.correctness == 0.25 and rec.score <= 0.25  # operators see it
    assert rec.established and rec.routable  # but routing is their call
    assert change.cause == "joined"


def test_mark_trusted_changes_routing_not_score():
    rep = fresh("w")
    rep.invalid("w", "oops", 0.0)
    score = rep.score("w")
    assert rep.mark_trusted("w") == ReputationChange("w", "trusted", score, score, "")
    assert rep.routable("w") and rep.established("w")
    assert rep.mark_trusted("w", False) == ReputationChange("w", "untrusted", score, score, "")
    assert not rep.routable("w") and not rep.established("w")


# ---- ranking ------------------------------------------------------------------------------------


def test_ranked_highest_score_first_ties_by_name():
    rep = fresh("b", "a", "c", "d", "e")
    validate(rep, "c", 5)
    rep.invalid("d", "x", 0.0)
    rep.late("e", "x", 0.0)
    assert rep.ranked(["e", "d", "c", "b", "a", "zz-unknown", "a"]) == ["c", "a", "b", "zz-unknown", "e", "d"]
    assert rep.ranked([]) == []


# ---- persistence --------------------------------------------------------------------------------


def test_persistence_round_trip():
    rep = established_worker("w1")
    rep.join("w2", owner="bob", trusted=True, now=3.0)
    rep.late("w2", "pending", 4.0)
    rep.observe_speed("w2", 3.0)
    rep.crash("w3", "boom", 5.0)
    rep.leave("w1", 11 * DAY)
    rep.mark_trusted("w4")  # never saw a time
    data = rep.to_dict()
    text = json.dumps(data)
    back = Reputation.from_dict(json.loads(text), POLICY)
    assert back == rep and back.to_dict() == data
    assert [back.record(w) for w in back.workers()] == [rep.record(w) for w in rep.workers()]
    # The restored state goes on exactly as the original would.
    for r in (rep, back):
        r.validated("w2", "pending", 12 * DAY)
        r.join("w1", now=12 * DAY)
    assert back == rep


def test_from_dict_uses_the_given_policy():
    rep = fresh("w")
    validate(rep, "w", 5)
    strict = ReputationPolicy(establish_after=5, min_reputation=0.6)
    back = Reputation.from_dict(rep.to_dict(), strict)
    assert back.policy == strict and back.established("w") and not rep.established("w")


@pytest.mark.parametrize(
    "data",
    [
        None,
        {},
        {"version": 2, "workers": {}},
        {"version": 1, "workers": []},
        {"version": 1, "workers": {"": {}}},
        {"version": 1, "workers": {"w": 3}},
        {"version": 1, "workers": {"w": {"colour": "red"}}},
        {"version": 1, "workers": {"w": {"validated": -1}}},
        {"version": 1, "workers": {"w": {"validated": 1.5}}},
        {"version": 1, "workers": {"w": {"correctness": 1.5}}},
        {"version": 1, "workers": {"w": {"uptime": "high"}}},
        {"version": 1, "workers": {"w": {"updated_at": "noon"}}},
        {"version": 1, "workers": {"w": {"late_pending": [1]}}},
    ],
)
def test_from_dict_rejects_malformed_state(data):
    with pytest.raises(ConfigError):
        Reputation.from_dict(data, POLICY)


# ---- policy -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weights": (0.5, 0.2, 0.15, 0.1)},
        {"weights": (0.5, 0.5, 0.1, -0.1)},
        {"weights": (0.5, 0.5)},
        {"weights": (0.25, 0.25, 0.25, math.nan)},
        {"weights": 1.0},
        {"earn_rate": 0.0},
        {"earn_rate": 1.5},
        {"invalid_penalty": 0.0},
        {"late_penalty": -0.1},
        {"crash_penalty": 1.01},
        {"initial": 0.0},
        {"min_reputation": 0.0},
        {"min_reputation": 1.5},
        {"establish_after": 0},
        {"establish_after": 2.5},
        {"establish_after": True},
        {"uptime_halflife": 0.0},
        {"uptime_halflife": math.inf},
        {"initial": 1.0},  # 1.0 * 0.5 >= 0.5: a wrong result would leave a worker routable
        {"min_reputation": 0.2},  # 0.25 >= 0.2: same
    ],
)
def test_bad_policy_raises(kwargs):
    with pytest.raises(ConfigError):
        ReputationPolicy(**kwargs)


def test_policy_accepts_boundaries_and_lists():
    policy = ReputationPolicy(weights=[1, 0, 0, 0], earn_rate=1.0, invalid_penalty=1.0, establish_after=1)
    assert policy.weights == (1.0, 0.0, 0.0, 0.0)
    rep = Reputation(policy)
    rep.invalid("w", "x", 0.0)
    validate(rep, "w", 10)
    assert rep.score("w") == 0.0  # invalid_penalty = 1 bans for good


# ---- the formula --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "components, expected",
    [
        ((0.5, 0.5, 0.5, 0.5), 0.5),
        ((1.0, 1.0, 1.0, 1.0), 1.0),
        ((0.25, 1.0, 1.0, 1.0), 0.25),  # correctness is a ceiling
        ((1.0, 0.0, 1.0, 1.0), 0.0),  # one zero component zeroes the score
        ((1.0, 0.5, 0.5, 0.5), 0.5**0.5),
        ((0.8, 0.9, 0.6, 0.7), 0.8**0.5 * 0.9**0.2 * 0.6**0.15 * 0.7**0.15),
    ],
)
def test_combined_score(components, expected):
    assert combined_score(*components, POLICY.weights) == pytest.approx(expected)


def test_equal_components_give_exactly_that_value():
    for x in (0.1, 0.3, 0.5, 0.7, 0.9):
        for weights in [(0.5, 0.2, 0.15, 0.15), (0.1, 0.2, 0.3, 0.4), (0.7, 0.1, 0.1, 0.1)]:
            assert combined_score(x, x, x, x, weights) == x


def test_zero_weight_components_are_ignored():
    assert combined_score(0.6, 0.0, 0.0, 0.0, (1.0, 0.0, 0.0, 0.0)) == 0.6


def test_core_stays_pure():
    tree = ast.parse(Path(reputation_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"distributed", "bokeh", "torch", "time", "random", "datetime"}


# ---- properties ---------------------------------------------------------------------------------

EVENTS = ["validated", "invalid", "late", "timeout", "crash", "join", "leave", "speed", "trust", "untrust"]
event_strategy = st.tuples(
    st.sampled_from(EVENTS),
    st.sampled_from(["a", "b", "c"]),
    st.floats(min_value=0, max_value=30 * DAY),
    st.floats(min_value=0, max_value=100),
)


def apply(rep: Reputation, event: str, worker: str, now: float, value: float, i: int) -> ReputationChange | None:
    if event in ("validated", "invalid", "late", "timeout", "crash"):
        return getattr(rep, event)(worker, f"c{i % 4}", now)
    if event == "join":
        return rep.join(worker, now=now)
    if event == "leave":
        return rep.leave(worker, now)
    if event == "speed":
        return rep.observe_speed(worker, value)
    return rep.mark_trusted(worker, event == "trust")


@settings(max_examples=150, deadline=None)
@given(st.lists(event_strategy, max_size=60))
def test_score_always_in_unit_interval(events):
    rep = Reputation()
    for i, (event, worker, now, value) in enumerate(events):
        before = rep.score(worker)
        change = apply(rep, event, worker, now, value, i)
        rec = rep.record(worker)
        assert 0.0 <= rec.score <= rec.correctness <= 1.0
        for x in (rec.timeliness, rec.speed, rec.uptime):
            assert 0.0 <= x <= 1.0
        if change is not None:
            assert change.before == before and change.after == rec.score
        if event == "invalid":
            assert rec.score <= POLICY.initial * (1 - POLICY.invalid_penalty)
            assert rec.routable == rec.trusted
    assert Reputation.from_dict(json.loads(json.dumps(rep.to_dict())), POLICY) == rep


# ---- anchors: whether newcomers' agreement may decide (quorum rule 6) -------------------------


def test_a_network_is_anchored_while_an_anchor_is_present_or_briefly_away():
    from neuro_dask.trust.reputation import ANCHOR_MEMORY

    rep = fresh("new1", "new2")
    assert not rep.anchored(now=0.0)  # a first start: nobody has a record
    validate(rep, "est", POLICY.establish_after, now=0.0)
    assert rep.anchored(now=0.0)
    rep.leave("est", now=100.0)
    assert rep.anchored(now=100.0 + ANCHOR_MEMORY - 1)  # a scheduler restart, a network blip
    assert not rep.anchored(now=100.0 + ANCHOR_MEMORY)  # gone for good: newcomers must bootstrap again
    rep.mark_trusted("op")
    assert rep.anchored(now=1e9)  # an operator-trusted worker, present


def test_a_restarted_scheduler_counts_its_saved_workers_absent_since_their_last_event():
    rep = established_worker("est")
    saved = Reputation.from_dict(json.loads(json.dumps(rep.to_dict())))
    last = saved.record("est").updated_at
    assert saved.record("est").present
    saved.all_absent(now=last + 5)
    assert not saved.record("est").present and saved.record("est").updated_at == last
    assert saved.anchored(now=last + 5)  # still an anchor while it may be on its way back
    saved.join("est", now=last + 6)
    assert saved.record("est").present and saved.established("est")  # the record is kept
