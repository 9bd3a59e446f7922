"""One MoE layer's expert calls under the trust policy: replicas, quorums, fallbacks, outcomes.

Each (layer, expert) is a unit of work with its own Quorum. Replication (trust/replication.py)
picks the unit's workers; units are then grouped by worker so that one message per worker per
round still carries all of that worker's units. Rounds repeat until every unit is accepted:
disagreement or errors add one replica at a time; an exhausted unit falls back to a trusted
worker or raises QuorumExhaustedError. Every validated, invalid or failed reply becomes an
Outcome the client reports; the scheduler moves reputation only on evidence: a validated
reply counts as far as the worker's signed receipts go, and a reply the quorum refuted becomes
a Dispute carrying the worker's signed answer, which the scheduler recomputes and judges itself
(neuro_dask/scheduler/evidence_desk.py). Late, timed-out and failed replies change this client's routing
(its suspects), never anyone's reputation.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Mapping

import torch

from neuro_dask.client.dispatch.routes import ExpertUnavailableError, RouteTable
from neuro_dask.client.dispatch.transports import CallTimeoutError, HedgedCall, HedgeView, Transport
from neuro_dask.trust.hedging import HedgePolicy, LatencyTracker
from neuro_dask.trust.latency import LatencyBook
from neuro_dask.trust.quorum import Accepted, Exhausted, Quorum, QuorumExhaustedError, QuorumPolicy
from neuro_dask.trust.replication import ReplicationPolicy, Standing, plan_call
from neuro_dask.trust.validation import ValidationPolicy, agree, tolerance_for
from neuro_dask.protocol.wire import decode_response, encode_request

AWAIT_LIMIT = 1024  # abandoned calls remembered for a late comparison; older ones are forgotten


@dataclass(frozen=True)
class Outcome:
    worker: str
    kind: str  # validated | invalid | late | timeout | error
    cause_id: str
    layer: int
    expert: int
    rows: int = 0  # validated: (token, expert) pairs computed


@dataclass(frozen=True)
class Dispute:
    """A reply the quorum refuted, with what the scheduler needs to judge it: the worker's signed
    answer and the bytes it signs (trust/disputes.py's Evidence wire form)."""

    worker: str
    layer: int
    expert: int
    evidence: dict


def evidence_of(msg: Mapping, response: Mapping, expert: int) -> dict | None:
    """The evidence wire form for `expert` of one call (its request `msg`, the worker's
    `response`), or None when the answer carries no receipt to hold the worker to."""
    receipt = response.get("receipt") if isinstance(response, Mapping) else None
    if not isinstance(receipt, Mapping):
        return None
    return {"receipt": dict(receipt), "expert": int(expert), "dtype": msg["dtype"], "hidden": int(msg["hidden"]),
            "inputs": bytes(msg["data"]), "outputs": bytes(response["data"])}


@dataclass
class TrustPolicy:
    quorum: QuorumPolicy = field(default_factory=QuorumPolicy)
    replication: ReplicationPolicy = field(default_factory=ReplicationPolicy)
    validation: ValidationPolicy = field(default_factory=ValidationPolicy)
    hedging: HedgePolicy = field(default_factory=HedgePolicy)


@dataclass
class _Unit:
    expert: int
    rows: torch.Tensor
    quorum: Quorum
    candidates: list[str]
    tried: set[str] = field(default_factory=set)
    owners: set[str] = field(default_factory=set)
    hedge_hosts: set[str] = field(default_factory=set)  # where this unit's hedges went
    result: torch.Tensor | None = None
    answers: dict = field(default_factory=dict)  # worker -> (its reply, the call id), every round


class TrustedLayerRunner:
    def __init__(self, model_id: str, transport: Transport, policy: TrustPolicy, rng: random.Random,
                 latency: LatencyTracker | None = None, count_wire: Callable[[int, int], None] | None = None,
                 on_receipt: Callable[[str, Mapping], None] | None = None):
        self.model_id = model_id
        self.on_receipt = on_receipt or (lambda worker, response: None)  # each answer's signed receipt
        self.disputes: list[Dispute] = []  # refuted replies, for the scheduler to judge
        self._stamp: dict = {}  # the request id and ticket every call of this layer carries
        self._calls: dict[str, tuple] = {}  # call id -> (message, experts, its answer or None), this layer
        self.count_wire = count_wire or (lambda sent, received: None)  # payload bytes, both ways
        self.transport = transport
        self.policy = policy
        self.rng = rng
        self.latency = latency or LatencyTracker(policy.hedging)
        self.replicas_sent = 0
        self.units = 0
        self.unchecked = 0
        self.accepted_from: Counter[tuple[str, ...]] = Counter()  # which workers' agreement decided
        # Abandoned calls (hedge losers) whose answer may still come: call id -> (cause, layer, units, msg)
        self._awaiting: OrderedDict[str, tuple[str, int, list[_Unit], dict]] = OrderedDict()
        self.late_checked = 0

    @property
    def hedges(self) -> int:
        """Extra calls sent as hedges (rule 3 of trust/hedging.py caps them)."""
        return self.latency.hedges

    def run(self, layer: int, groups: Mapping[int, torch.Tensor], routes: RouteTable,
            exclude: set[str], stamp: Mapping | None = None) -> tuple[dict[int, torch.Tensor], list[Outcome]]:
        """`stamp`: the fields every call carries (the request id and its ticket)."""
        self._stamp = dict(stamp or {})
        self._calls = {}
        self.apply_params(routes.params)
        standing = routes.standing_of
        anchorless = not any(s.trusted or s.established for s in routes.standing.values())
        outcomes: list[Outcome] = self.check_late()
        busy = self.transport.busy()
        units: dict[int, _Unit] = {}
        planned_rows: dict[str, int] = {}
        for expert, rows in groups.items():
            candidates = self._primary_first([w for w in routes.ranked(layer, expert) if w not in exclude],
                                             routes, planned_rows, busy, self._route_latency)
            if not candidates:
                raise ExpertUnavailableError(self.model_id, layer, [expert], 0.0)
            planned_rows[candidates[0]] = planned_rows.get(candidates[0], 0) + rows.shape[0]
            plan = plan_call(candidates, standing, self.policy.replication, self.rng)
            self.unchecked += plan.unchecked
            # Replicas at different precisions (int8 next to float32) agree only within their
            # measured error: the tolerance of the loosest precision among the candidates.
            validation = tolerance_for({standing(w).precision for w in candidates}, self.policy.validation)
            quorum = Quorum(self.policy.quorum, counts=lambda w: standing(w).trusted or standing(w).established,
                            quorum=plan.quorum, validation=validation, anchorless=anchorless,
                            owner_of=lambda w: standing(w).owner or w)
            units[expert] = _Unit(expert, rows, quorum, candidates)
            for w in plan.workers:
                self._assign(units[expert], w, standing)
        self.units += len(units)
        cause = uuid.uuid4().hex[:12]
        round_work = {e: list(u.tried) for e, u in units.items()}
        while round_work:
            replies, lost = self._send(layer, cause, units, round_work, standing)
            outcomes += [Outcome(w, "late", cause, layer, -1) for w in lost]
            round_work = {}
            for expert, unit in units.items():
                if unit.result is not None:
                    continue
                for worker, (reply, _call) in replies.get(expert, {}).items():
                    if isinstance(reply, BaseException):
                        unit.quorum.add_error(worker)
                        kind = "timeout" if isinstance(reply, (CallTimeoutError, TimeoutError)) else "error"
                        outcomes.append(Outcome(worker, kind, cause, layer, expert))
                    else:
                        unit.quorum.add_result(worker, {expert: reply})
                    unit.answers[worker] = (reply, _call)
                decision = unit.quorum.decide()
                if isinstance(decision, Accepted):
                    unit.result = decision.canonical[expert]
                    self.accepted_from[tuple(sorted(decision.valid))] += 1
                    n = unit.rows.shape[0]
                    outcomes += [Outcome(w, "validated", cause, layer, expert, n) for w in decision.valid]
                    outcomes += [Outcome(w, "invalid", cause, layer, expert) for w in decision.invalid]
                    self._dispute(layer, expert, decision.invalid, unit.answers)
                    continue
                exhausted = isinstance(decision, Exhausted)
                nxt = None if exhausted else self._next_worker(unit, standing, fallback=False)
                if nxt is None:
                    # Fallback (quorum rule 4): a trusted worker's answer decides, as it is.
                    anchored = next((g for g in unit.quorum.groups if any(standing(w).trusted for w, _ in g)), None)
                    if anchored is not None:
                        unit.result = anchored[0][1][expert]
                        valid = {w for w, _ in anchored}
                        self.accepted_from[tuple(sorted(valid))] += 1
                        n = unit.rows.shape[0]
                        # The trusted worker's answer decided: whoever disagreed is refuted by it.
                        wrong = [w for g in unit.quorum.groups for w, _ in g if w not in valid]
                        outcomes += [Outcome(w, "validated", cause, layer, expert, n) if w in valid else
                                     Outcome(w, "invalid", cause, layer, expert)
                                     for g in unit.quorum.groups for w, _ in g]
                        self._dispute(layer, expert, wrong, unit.answers)
                        continue
                    nxt = self._next_worker(unit, standing, fallback=True)
                    if nxt is None and len(unit.quorum.groups) <= 1:
                        # No dispute, just too few live hosts that can decide (dead, unreachable,
                        # or without a record): a matter of availability, so the caller waits
                        # for fresh routes (replacements, re-placed experts) and runs it again.
                        raise ExpertUnavailableError(self.model_id, layer, [expert], 0.0)
                    if nxt is None:
                        groups, errors = len(unit.quorum.groups), len(unit.quorum.errors)
                        raise QuorumExhaustedError(layer, [expert], sum(map(len, unit.quorum.groups)), groups, errors)
                    unit.quorum = Quorum(self.policy.quorum, counts=lambda w: True, quorum=1,
                                         validation=self.policy.validation)
                self._assign(unit, nxt, standing)
                round_work[expert] = [nxt]
        return {e: u.result for e, u in units.items()}, outcomes

    @property
    def _route_latency(self) -> LatencyBook | None:
        return getattr(self.transport, "route_latency", None)

    @staticmethod
    def _primary_first(candidates: list[str], routes: RouteTable, planned_rows: Mapping[str, int],
                       busy: set[str] = frozenset(), latency: LatencyBook | None = None) -> list[str]:
        """The primary is the routable candidate that is not still busy with an abandoned call
        (a new call would queue behind it) and has the fewest rows planned in this layer (ties:
        the scheduler's order), so a layer's work spreads over workers instead of piling on the
        best-ranked one. With a latency book (neuro.client.latency-aware) it is instead the
        book's choice among the idle routable candidates (trust/latency.py): close ones first.
        Every routable worker is one tier here, since replication already decides who checks
        whom. The others keep their order for replicas, busy workers last."""
        ordered = [w for w in candidates if w not in busy] + [w for w in candidates if w in busy]
        routable = [w for w in ordered if routes.routable is None or w in routes.routable]
        if not routable:
            return ordered
        if latency is not None:
            idle = [w for w in routable if w not in busy] or routable
            primary = latency.choose(idle, lambda w: 0, planned_rows)  # never packs: straggler tails (docs/trust.md)
        else:
            primary = min(routable, key=lambda w: (w in busy, planned_rows.get(w, 0)))
        return [primary] + [w for w in ordered if w != primary]

    def _dispute(self, layer: int, expert: int, wrong, answers: Mapping) -> None:
        """Each refuted reply with a receipt becomes a Dispute: the scheduler judges it."""
        for worker in wrong:
            _reply, call = answers.get(worker, (None, None))
            entry = self._calls.get(call)
            if entry is None or entry[2] is None:
                continue
            evidence = evidence_of(entry[0], entry[2], expert)
            if evidence is not None:
                self.disputes.append(Dispute(worker, layer, expert, evidence))

    def take_disputes(self) -> list[Dispute]:
        disputes, self.disputes = self.disputes, []
        return disputes

    def apply_params(self, params: Mapping[str, int]) -> None:
        """Governed trust parameters handed out with the routes (ledger on): spot-check, quorum."""
        if not params:
            return
        replication = replace(self.policy.replication, spot_check=params.get("spot_check_bps", 0) / 10_000
                              or self.policy.replication.spot_check,
                              min_quorum=int(params.get("min_quorum", self.policy.replication.min_quorum)))
        quorum = replace(self.policy.quorum, min_quorum=replication.min_quorum,
                         target_replicas=max(self.policy.quorum.target_replicas, replication.min_quorum),
                         max_total_replicas=max(self.policy.quorum.max_total_replicas, replication.min_quorum))
        self.policy = replace(self.policy, replication=replication, quorum=quorum)

    def check_late(self) -> list[Outcome]:
        """Quorum rule: a result that arrives after the decision is still compared, and credited
        only if it agrees with the canonical result (under the same cause id, so a primary that
        was late earns correctness but not timeliness)."""
        outcomes = []
        for late in self.transport.drain_late():
            entry = self._awaiting.pop(late.call, None)
            if entry is None:
                continue
            cause, layer, units, msg = entry
            decided = [u for u in units if u.result is not None]
            if not decided:
                continue
            try:
                if isinstance(late.outcome, BaseException):
                    raise late.outcome
                got = decode_response(late.outcome, {u.expert: u.rows for u in units})
            except Exception:  # dropped on our request, or failed: nothing to compare
                continue
            self.count_wire(0, len(late.outcome["data"]))
            self.on_receipt(late.worker, late.outcome)
            self.late_checked += 1
            for u in decided:
                ok = agree({u.expert: u.result}, {u.expert: got[u.expert]}, self.policy.validation)
                outcomes.append(Outcome(late.worker, "validated", cause, layer, u.expert, u.rows.shape[0]) if ok else
                                Outcome(late.worker, "invalid", cause, layer, u.expert))
                evidence = None if ok else evidence_of(msg, late.outcome, u.expert)
                if evidence is not None:
                    self.disputes.append(Dispute(late.worker, layer, u.expert, evidence))
        return outcomes

    def _await_late(self, call: str, cause: str, layer: int, units: list[_Unit]) -> None:
        self._awaiting[call] = (cause, layer, units, self._calls.get(call, ({}, None, None))[0])
        while len(self._awaiting) > AWAIT_LIMIT:
            self._awaiting.popitem(last=False)

    def _assign(self, unit: _Unit, worker: str, standing: Callable[[str], Standing]) -> None:
        unit.tried.add(worker)
        unit.owners.add(standing(worker).owner or worker)
        self.replicas_sent += 1

    def _next_worker(self, unit: _Unit, standing: Callable[[str], Standing], fallback: bool) -> str | None:
        """One more replica: an untried worker of a new owner, workers with a record first;
        on exhaustion only a trusted worker (rule 4 of the quorum)."""
        fresh = [w for w in unit.candidates if w not in unit.tried]
        if fallback:  # a trusted worker that has not answered yet (it may have lost a hedge race)
            answered = {w for g in unit.quorum.groups for w, _ in g} | set(unit.quorum.errors)
            return next((w for w in unit.candidates if standing(w).trusted and w not in answered), None)
        new_owner = [w for w in fresh if (standing(w).owner or w) not in unit.owners] or fresh
        anchored = [w for w in new_owner if standing(w).trusted or standing(w).established]
        return (anchored or new_owner or [None])[0]

    def _send(self, layer: int, cause: str, units: Mapping[int, _Unit], work: Mapping[int, list[str]],
              standing: Callable[[str], Standing]) -> tuple[dict[int, dict[str, tuple]], list[str]]:
        """One round: every worker's units in one message, hedged to alternate hosts when the
        primary is slower than its latency estimate; replies split back per unit.
        Returns (expert -> {responder: (outputs or failure, call id)}, primaries that lost to a hedge)."""
        by_worker: dict[str, list[int]] = {}
        for expert, workers in work.items():
            for w in workers:
                by_worker.setdefault(w, []).append(expert)
        calls = {}
        covers: dict[str, list[int]] = {}  # call id -> the experts it carries
        for w, es in by_worker.items():
            rows = sum(units[e].rows.shape[0] for e in es)
            calls[w] = HedgedCall(self._request(layer, units, es, covers), self.latency.hedge_after(w, rows),
                                  partial(self._hedge_requests, layer, w, es, units, standing, covers))
            self.latency.count_call()
        timeout = max(self.latency.deadline(w, sum(units[e].rows.shape[0] for e in es)) for w, es in by_worker.items())

        answers = self.transport.call_hedged(calls, timeout, self.latency, self.latency.peer_patience)
        replies: dict[int, dict[str, tuple]] = {}
        lost: list[str] = []
        for w in by_worker:
            reply = answers[w]
            if not reply.by_primary:
                lost.append(w)
            for call in reply.abandoned:  # the losing side may still answer: compare it then
                self._await_late(call, cause, layer, [units[e] for e in covers[call]])
            for e in reply.settled:  # its other replica's answer stands alone (quorum rule 7)
                units[e].quorum.waive()
            for (responder, outcome), call, seconds in zip(reply.parts, reply.calls, reply.durations, strict=True):
                mine = covers[call]
                sent = {e: units[e].rows for e in mine}
                for e in mine:
                    units[e].tried.add(responder)
                try:
                    if isinstance(outcome, BaseException):
                        raise outcome
                    decoded = decode_response(outcome, sent)
                    self.count_wire(0, len(outcome["data"]))
                    self.latency.observe(responder, seconds, sum(x.shape[0] for x in sent.values()))
                    self.on_receipt(responder, outcome)
                    msg, experts, _ = self._calls[call]
                    self._calls[call] = (msg, experts, outcome)
                    for e in mine:
                        replies.setdefault(e, {})[responder] = (decoded[e], call)
                except Exception as exc:  # refused, closed, timed out or malformed: a failed reply
                    for e in mine:
                        replies.setdefault(e, {})[responder] = (exc, call)
        return replies, lost

    def _request(self, layer: int, units: Mapping[int, _Unit], experts: list[int],
                 covers: dict[str, list[int]]) -> dict:
        call = uuid.uuid4().hex
        covers[call] = experts
        msg = encode_request(self.model_id, layer, {e: units[e].rows for e in experts}, call=call)
        msg.update(self._stamp)
        self._calls[call] = (msg, experts, None)  # (message, experts, the answer once it came)
        self.count_wire(len(msg["data"]), 0)
        return msg

    def _hedge_requests(self, layer: int, worker: str, experts: list[int], units: Mapping[int, _Unit],
                        standing: Callable[[str], Standing], covers: dict[str, list[int]],
                        view: HedgeView) -> tuple[tuple[tuple[str, dict], ...], frozenset[int]]:
        """Called by the transport when a hedge is due (on its event loop, while `run` waits):
        (hedge messages for the message's unanswered experts, experts settled without one)."""
        todo = [e for e in experts if e in view.missing]
        settled = frozenset(e for e in todo if self._settled_elsewhere(units[e], worker, view, standing))
        todo = [e for e in todo if e not in settled]
        book = self._route_latency
        picked = self._alternates(worker, todo, units, standing, view.avoid, view.occupied,
                                  book.estimate if book is not None else None) if todo else {}
        if todo and not picked:
            return (), frozenset()
        return tuple((aw, self._request(layer, units, aes, covers)) for aw, aes in picked.items()), settled

    @staticmethod
    def _settled_elsewhere(unit: _Unit, worker: str, view: HedgeView, standing: Callable[[str], Standing]) -> bool:
        """Quorum rule 7: `worker` only made a replicated unit's quorum, and another replica that
        counts has already answered for it, so that answer can stand alone if `worker` is late."""
        if unit.quorum.anchorless or unit.quorum.quorum < 2:
            return False
        return any(w != worker and w in unit.tried and (standing(w).trusted or standing(w).established)
                   for w in view.answered.get(unit.expert, ()))

    @staticmethod
    def _alternates(worker: str, experts: list[int], units: Mapping[int, _Unit],
                    standing: Callable[[str], Standing], avoid: frozenset[str] = frozenset(),
                    occupied: frozenset[str] = frozenset(),
                    estimate: Callable[[str], float | None] | None = None) -> dict[str, list[int]]:
        """Hedge targets covering every unit of the message: for each unit a host not yet used
        or hedged to for it, of another owner than the primary and not slow right now (`avoid`), idle hosts
        before occupied ones (the hedge might queue behind their call), reusing a target
        already picked when it can (fewer messages); with latency estimates, the closest first
        within idle and within occupied hosts (unmeasured ones count as close). Empty when some
        unit has no such host."""
        owner = standing(worker).owner or worker
        picked: dict[str, list[int]] = {}
        for e in experts:
            hosts = [w for w in units[e].candidates if w not in units[e].tried and w not in units[e].hedge_hosts
                     and w != worker and w not in avoid and (standing(w).owner or w) != owner]
            hosts = [w for w in hosts if w not in occupied] + [w for w in hosts if w in occupied]
            if estimate is not None:  # sorted is stable: the order above breaks ties
                hosts.sort(key=lambda w: (w in occupied, estimate(w) or 0.0))
            if not hosts:
                return {}
            target = next((w for w in hosts if w in picked), hosts[0])
            picked.setdefault(target, []).append(e)
        for target, es in picked.items():
            for e in es:
                units[e].hedge_hosts.add(target)
        return picked
