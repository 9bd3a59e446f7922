"""The trusted layer runner against a scripted transport: late answers, moot checks, hedge targets.

The transport here answers at once or plays a straggler that loses its hedge race, as the
direct transport would report it; every expert computes rows * 2 (a wrong worker adds 1).
"""

from __future__ import annotations

import random

import pytest
import torch

from neuro_dask.client.dispatch.routes import ExpertUnavailableError, RouteTable
from neuro_dask.client.dispatch.transports import CallTimeoutError, HedgeView, LateReply, Reply
from neuro_dask.client.dispatch.trusted import TrustedLayerRunner, TrustPolicy
from neuro_dask.protocol.wire import decode_request, encode_response
from neuro_dask.trust.layer_quorums import UnitState
from neuro_dask.trust.quorum import Quorum, QuorumExhaustedError, QuorumPolicy
from neuro_dask.trust.replication import ReplicationPolicy, Standing

TRUSTED, EST, NEW = Standing(trusted=True), Standing(established=True, consecutive_valid=10_000), Standing()


class ScriptedTransport:
    """behave: worker -> "ok" | "wrong" | "int8" (off by 0.05, as a quantized replica) |
    "slow" (loses a hedge race, answers late and right) |
    "slow-wrong" (the same, but its late answer is wrong) | "dead" (connection refused) |
    "timeout" (no answer by the deadline)."""

    name = "scripted"

    def __init__(self, behave: dict[str, str]):
        self.behave = behave
        self.sent: list[tuple[str, list[int]]] = []
        self._late: list[LateReply] = []

    def respond(self, worker: str, msg: dict) -> dict | BaseException:
        if self.behave.get(worker) == "dead":
            return ConnectionRefusedError(f"{worker} is gone")
        if self.behave.get(worker) == "timeout":
            return CallTimeoutError(worker, self.timeout)
        outputs = {e: x * 2 for e, x in decode_request(msg).inputs.items()}
        if self.behave.get(worker, "ok").endswith("wrong"):
            outputs = {e: y + 1 for e, y in outputs.items()}
        if self.behave.get(worker) == "int8":  # honest, within a quantized expert's error
            outputs = {e: y + 0.05 for e, y in outputs.items()}
        return encode_response(outputs)

    def call_hedged(self, calls, timeout, budget, peer_patience=None):
        self.timeout = timeout
        slow = {w for w in calls if self.behave.get(w, "ok").startswith("slow")}
        answered: dict[int, set[str]] = {}
        for w, call in calls.items():
            self.sent.append((w, list(call.msg["experts"])))
            if w not in slow:
                for e in call.msg["experts"]:
                    answered.setdefault(e, set()).add(w)
        replies = {}
        for w, call in calls.items():
            if w not in slow:
                replies[w] = Reply(
                    ((w, self.respond(w, call.msg)),), 0.001, False, w, calls=(call.msg["call"],), durations=(0.001,)
                )
                continue
            view = HedgeView(
                frozenset(call.msg["experts"]),
                frozenset(slow),
                frozenset(),
                {e: frozenset(ws) for e, ws in answered.items()},
            )
            alternates, settled = call.alternates(view)
            if not alternates and not settled:  # nobody to hedge to: the straggler's answer is waited for
                replies[w] = Reply(
                    ((w, self.respond(w, call.msg)),), 0.05, False, w, calls=(call.msg["call"],), durations=(0.05,)
                )
                continue
            budget.count_hedge(len(alternates))
            self.sent += [(aw, list(m["experts"])) for aw, m in alternates]
            self._late.append(LateReply(w, call.msg["call"], self.respond(w, call.msg), 0.05))
            replies[w] = Reply(
                tuple((aw, self.respond(aw, m)) for aw, m in alternates),
                0.01,
                True,
                w,
                abandoned=(call.msg["call"],),
                settled=frozenset(settled),
                calls=tuple(m["call"] for _, m in alternates),
                durations=(0.001,) * len(alternates),
            )
        return replies

    def busy(self) -> set[str]:
        return set()

    def drain_late(self) -> list[LateReply]:
        late, self._late = self._late, []
        return late


def runner(behave: dict[str, str], spot_check: float) -> tuple[TrustedLayerRunner, ScriptedTransport]:
    transport = ScriptedTransport(behave)
    policy = TrustPolicy(replication=ReplicationPolicy(spot_check=spot_check))
    return TrustedLayerRunner("m", transport, policy, random.Random(0)), transport


def routes(hosts: list[str], standing: dict[str, Standing]) -> RouteTable:
    return RouteTable(1, {(0, 0): tuple(hosts)}, standing)


ROWS = {0: torch.arange(8.0).reshape(2, 4)}


def kinds(outcomes, worker: str) -> list[str]:
    return [o.kind for o in outcomes if o.worker == worker]


def test_a_straggler_loses_to_its_hedge_and_its_late_answer_is_credited_when_it_agrees():
    r, transport = runner({"b": "slow"}, spot_check=0.0)
    table = routes(["b", "a"], {"a": TRUSTED, "b": EST})
    results, outcomes = r.run(0, ROWS, table, set())
    assert torch.equal(results[0], ROWS[0] * 2)
    assert kinds(outcomes, "b") == ["late"] and kinds(outcomes, "a") == ["validated"]
    assert ("a", [0]) in transport.sent  # the hedge
    _, later = r.run(0, ROWS, table, set())  # the late answer is compared at the next layer
    assert "validated" in kinds(later, "b") and r.late_checked == 1
    cause = next(o.cause_id for o in outcomes if o.worker == "b")
    assert any(o.cause_id == cause and o.kind == "validated" for o in later if o.worker == "b")


def test_a_late_answer_that_disagrees_is_invalid():
    r, _ = runner({"b": "slow-wrong"}, spot_check=0.0)
    table = routes(["b", "a"], {"a": TRUSTED, "b": EST})
    r.run(0, ROWS, table, set())
    _, later = r.run(0, ROWS, table, set())
    assert "invalid" in kinds(later, "b")


def test_a_check_whose_subject_straggles_is_waived_when_the_checker_counts():
    r, transport = runner({"b": "slow"}, spot_check=1.0)  # every call replicated: b checked by a
    table = routes(["b", "a"], {"a": EST, "b": EST})  # (a trusted checker would also win by fallback)
    results, outcomes = r.run(0, ROWS, table, set())
    assert torch.equal(results[0], ROWS[0] * 2)
    assert sorted(transport.sent) == [("a", [0]), ("b", [0])]  # no hedge message: a's answer was already in
    assert r.accepted_from == {("a",): 1}
    assert kinds(outcomes, "b") == ["late"]


def test_a_check_is_never_waived_for_a_checker_without_a_record():
    r, transport = runner({"b": "slow"}, spot_check=1.0)
    table = routes(["b", "n"], {"b": EST, "n": NEW})
    results, _ = r.run(0, ROWS, table, set())
    assert torch.equal(results[0], ROWS[0] * 2)
    assert r.accepted_from == {("b", "n"): 1}  # the newcomer alone would not do: b's answer was waited for


def unit(expert: int, candidates: list[str], tried: set[str], hedged: set[str] = frozenset()) -> UnitState:
    q = Quorum(QuorumPolicy(), counts=lambda w: True)
    return UnitState(expert, 1, q, candidates, tried=set(tried), hedge_hosts=set(hedged))


def test_hedge_targets_skip_tried_hedged_and_same_owner_hosts_and_prefer_idle_then_busy_then_slow_ones():
    standing = {"p": Standing(owner="o1"), "twin": Standing(owner="o1")}.get
    units = {0: unit(0, ["p", "tried", "hedged", "slow", "twin", "busy", "idle"], {"p", "tried"}, {"hedged"})}
    picked = TrustedLayerRunner._alternates(
        "p", [0], units, lambda w: standing(w) or Standing(), avoid=frozenset({"slow"}), occupied=frozenset({"busy"})
    )
    assert picked == {"idle": [0]}
    assert units[0].hedge_hosts == {"hedged", "idle"}
    # The idle host taken, the busy one is next, and a host whose own message is overdue is
    # last, but not excluded: with two replicas it is often the only host left.
    again = TrustedLayerRunner._alternates(
        "p", [0], units, lambda w: standing(w) or Standing(), avoid=frozenset({"slow"}), occupied=frozenset({"busy"})
    )
    assert again == {"busy": [0]}
    last = TrustedLayerRunner._alternates(
        "p", [0], units, lambda w: standing(w) or Standing(), avoid=frozenset({"slow"}), occupied=frozenset({"busy"})
    )
    assert last == {"slow": [0]}
    again_p = TrustedLayerRunner._alternates("p", [0], units, lambda w: standing(w) or Standing())
    assert again_p == {"p": [0]}  # every other host asked: the late worker itself, on a fresh call
    assert TrustedLayerRunner._alternates("p", [0], units, lambda w: standing(w) or Standing()) == {}


def test_no_hedge_target_for_one_unit_means_no_hedge_and_nothing_recorded():
    units = {0: unit(0, ["p", "x"], {"p"}), 1: unit(1, ["p"], {"p"}, {"p"})}  # 1: p asked again already
    assert TrustedLayerRunner._alternates("p", [0, 1], units, lambda w: Standing()) == {}
    assert units[0].hedge_hosts == set()


@pytest.mark.parametrize(
    "behave, standing",
    [
        ({"a": "dead", "b": "dead"}, {"a": TRUSTED, "b": EST}),  # every host gone
        ({"a": "dead"}, {"a": TRUSTED, "n": NEW}),  # the only answer is a newcomer's: it cannot decide alone
    ],
)
def test_too_few_live_hosts_is_an_availability_wait_not_an_exhausted_quorum(behave, standing):
    r, _ = runner(behave, spot_check=1.0)
    with pytest.raises(ExpertUnavailableError):  # the executor waits for fresh routes and runs it again
        r.run(0, ROWS, routes(list(standing), standing), set())


def test_a_dispute_nobody_can_settle_exhausts_the_quorum():
    r, _ = runner({"n2": "wrong"}, spot_check=1.0)
    standing = {"n1": NEW, "n2": NEW, "e": EST}  # e could settle it, but is excluded (a suspect)
    with pytest.raises(QuorumExhaustedError):
        r.run(0, ROWS, routes(["n1", "n2", "e"], standing), {"e"})


@pytest.mark.parametrize(
    "precision, behave, expected",
    [
        ("float32", "int8", "invalid"),  # a float32 replica must match closely: 0.05 off is wrong
        ("int8", "int8", "validated"),  # an int8 replica is judged within int8's measured error
        ("int8", "wrong", "invalid"),  # and still caught when it is really wrong
    ],
)
def test_replicas_at_another_precision_are_judged_within_its_tolerance(precision, behave, expected):
    from dataclasses import replace

    r, _ = runner({"b": behave}, spot_check=1.0)
    table = routes(["b", "a"], {"a": TRUSTED, "b": replace(NEW, precision=precision)})
    results, outcomes = r.run(0, ROWS, table, set())
    # The accepted answer is the anchor's, or one that agrees with it within the tolerance.
    torch.testing.assert_close(results[0], ROWS[0] * 2, atol=0.25 if expected == "validated" else 0, rtol=0)
    assert kinds(outcomes, "b") == [expected]


def test_a_worker_that_keeps_timing_out_gets_a_longer_deadline_instead_of_timing_out_forever():
    # A machine that became busy: its calls now take longer than 10 x what they used to. Each
    # timeout is booked at its deadline, so once timeouts pass the estimate's tail share the
    # deadline grows with them, where before it stayed at 10 x the old estimate.
    r, _ = runner({"b": "timeout"}, spot_check=0.0)
    for _ in range(50):
        r.latency.observe("b", 0.01, 2)  # the healthy past: 10 ms calls
    before = r.latency.deadline("b", 2)
    table = routes(["b", "a"], {"a": EST, "b": EST})
    seen = [before]
    for _ in range(40):
        r.run(0, ROWS, table, set())  # b times out and a answers instead
        seen.append(r.latency.deadline("b", 2))
    assert before == pytest.approx(0.5)  # 10 x 10 ms, raised to the 0.5 s floor
    assert seen == sorted(seen) and seen[-1] > before  # it grew, and never shrank meanwhile
