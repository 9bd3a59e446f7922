"""One MoE layer's expert calls under the trust policy, carried out: the decisions are trust/'s.

The rules live in pure modules: trust/layer_quorums.py decides, unit by unit, whom to send to,
when an answer is accepted, when a trusted worker decides and when to give up;
trust/late_checks.py judges answers that come after the decision; trust/verdicts.py says what
each reply's outcome is and when a refuted reply is proven; trust/policy.py applies the
governed parameters. This runner only carries those decisions out: it orders the candidates
(routing), packs each round's units into one message per worker (hedged to alternates when the
primary is slow), decodes the replies and feeds them to the machine, turns its GiveUp into the
errors the executor waits or fails on, and its proofs into Disputes the scheduler recomputes
and judges itself (neuro_dask/scheduler/evidence_desk.py). Late, timed-out and failed replies
change this client's routing (its suspects), never anyone's reputation.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

from neuro_dask.client.dispatch.routes import ExpertUnavailableError, RouteTable
from neuro_dask.client.dispatch.transports import CallTimeoutError, HedgedCall, HedgeView, Reply, Transport
from neuro_dask.protocol.wire import decode_response, encode_request
from neuro_dask.trust.hedging import LatencyTracker
from neuro_dask.trust.late_checks import Awaited, LateBook, judge_late
from neuro_dask.trust.latency import LatencyBook
from neuro_dask.trust.layer_quorums import (
    Decision,
    GiveUp,
    LayerQuorums,
    Prove,
    Send,
    TrustTally,
    UnitState,
    hedge_targets,
)
from neuro_dask.trust.policy import TrustPolicy, governed
from neuro_dask.trust.quorum import QuorumExhaustedError
from neuro_dask.trust.verdicts import Dispute, Outcome, evidence_of, proof

# The trust types callers (the executor, settings, the private executor) import from here.
__all__ = ["Dispute", "Outcome", "TrustPolicy", "TrustedLayerRunner", "evidence_of"]

_Unit = UnitState  # a unit's trust state, under the name the routing tests build it by

Work = Mapping[int, list[str]]  # expert -> the workers its unit goes to this round


class TrustedLayerRunner:
    def __init__(
        self,
        model_id: str,
        transport: Transport,
        policy: TrustPolicy,
        rng: random.Random,
        latency: LatencyTracker | None = None,
        count_wire: Callable[[int, int], None] | None = None,
        on_receipt: Callable[[str, Mapping], None] | None = None,
    ):
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
        self.tally = TrustTally()
        self._late = LateBook()  # abandoned calls (hedge losers) whose answer may still come

    # Counts across layers, kept by the machine (the drills and the dashboard read them here).
    replicas_sent = property(lambda self: self.tally.replicas_sent)
    units = property(lambda self: self.tally.units)
    unchecked = property(lambda self: self.tally.unchecked)
    late_checked = property(lambda self: self.tally.late_checked)

    @property
    def accepted_from(self) -> Counter[tuple[str, ...]]:
        """Which workers' agreement decided, and how often."""
        return self.tally.accepted_from

    @property
    def hedges(self) -> int:
        """Extra calls sent as hedges (rule 3 of trust/hedging.py caps them)."""
        return self.latency.hedges

    def run(
        self,
        layer: int,
        groups: Mapping[int, torch.Tensor],
        routes: RouteTable,
        exclude: set[str],
        stamp: Mapping | None = None,
    ) -> tuple[dict[int, torch.Tensor], list[Outcome]]:
        """`stamp`: the fields every call carries (the request id and its ticket)."""
        self._stamp = dict(stamp or {})
        self._calls = {}
        self.apply_params(routes.params)
        outcomes = self.check_late()
        machine = self._machine(layer, routes)
        work = self._plan(machine, groups, routes, exclude)
        while work:
            self._send(machine, groups, work)
            work = self._carry_out(machine, machine.close_round())
        return machine.results(), outcomes + machine.outcomes

    def _machine(self, layer: int, routes: RouteTable) -> LayerQuorums:
        cause = uuid.uuid4().hex[:12]
        return LayerQuorums(layer, cause, self.policy, routes.standing_of, routes.anchorless, self.tally)

    def _plan(
        self, machine: LayerQuorums, groups: Mapping[int, torch.Tensor], routes: RouteTable, exclude: set[str]
    ) -> dict[int, list[str]]:
        """Open a unit per expert, the primary chosen here (routing), its replicas by the machine."""
        busy = self.transport.busy()
        planned_rows: dict[str, int] = {}
        work: dict[int, list[str]] = {}
        for expert, rows in groups.items():
            hosts = [w for w in routes.ranked(machine.layer, expert) if w not in exclude]
            candidates = self._primary_first(hosts, routes, planned_rows, busy, self._route_latency)
            if not candidates:
                raise ExpertUnavailableError(self.model_id, machine.layer, [expert], 0.0)
            planned_rows[candidates[0]] = planned_rows.get(candidates[0], 0) + rows.shape[0]
            work[expert] = [send.worker for send in machine.open(expert, rows.shape[0], candidates, self.rng)]
        machine.start()
        return work

    def _carry_out(self, machine: LayerQuorums, decisions: list[Decision]) -> dict[int, list[str]]:
        """Proofs become disputes, sends the next round's work; a GiveUp raises. Accepts need
        nothing done: the machine holds the results."""
        work: dict[int, list[str]] = {}
        for decision in decisions:
            if isinstance(decision, Send):
                work.setdefault(decision.expert, []).append(decision.worker)
            elif isinstance(decision, Prove):
                self._prove(decision)
            elif isinstance(decision, GiveUp):
                raise self._give_up_error(machine.layer, decision)
        return work

    def _give_up_error(self, layer: int, giving_up: GiveUp) -> Exception:
        if giving_up.unavailable:  # the caller waits for fresh routes (replacements, re-placed experts)
            return ExpertUnavailableError(self.model_id, layer, [giving_up.expert], 0.0)
        return QuorumExhaustedError(layer, [giving_up.expert], giving_up.results, giving_up.groups, giving_up.errors)

    def _prove(self, refuted: Prove) -> None:
        """A refuted reply with a receipt becomes a Dispute: the scheduler judges it."""
        msg, _experts, answer = self._calls.get(refuted.call, (None, None, None))
        dispute = proof(refuted.worker, refuted.layer, refuted.expert, msg, answer)
        if dispute is not None:
            self.disputes.append(dispute)

    @property
    def _route_latency(self) -> LatencyBook | None:
        return getattr(self.transport, "route_latency", None)

    @staticmethod
    def _primary_first(
        candidates: list[str],
        routes: RouteTable,
        planned_rows: Mapping[str, int],
        busy: set[str] = frozenset(),
        latency: LatencyBook | None = None,
    ) -> list[str]:
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

    _alternates = staticmethod(hedge_targets)  # hedge targets: a rule of trust/layer_quorums.py

    def take_disputes(self) -> list[Dispute]:
        disputes, self.disputes = self.disputes, []
        return disputes

    def apply_params(self, params: Mapping[str, int]) -> None:
        """Governed trust parameters handed out with the routes (ledger on): spot-check, quorum
        (trust/policy.py)."""
        self.policy = governed(self.policy, params)

    def check_late(self) -> list[Outcome]:
        """Answers of abandoned calls that came after all, judged against what was accepted
        (trust/late_checks.py): credited only if they agree, under the cause id of their call."""
        outcomes = []
        for late in self.transport.drain_late():
            awaited = self._late.claim(late.call)
            if awaited is None or not awaited.decided():
                continue
            got = self._decode_late(late.outcome, awaited)
            if got is None:
                continue
            self.count_wire(0, len(late.outcome["data"]))
            self.on_receipt(late.worker, late.outcome)
            self.tally.late_checked += 1
            judged, disputes = judge_late(awaited, late.worker, got, late.outcome, self.policy.validation)
            outcomes += judged
            self.disputes += disputes
        return outcomes

    @staticmethod
    def _decode_late(outcome: Any, awaited: Awaited) -> dict[int, torch.Tensor] | None:
        """The late answer's outputs, or None when it was dropped on our request or failed."""
        if isinstance(outcome, BaseException):
            return None
        try:
            return decode_response(outcome, awaited.inputs)
        except Exception:  # malformed: nothing to compare
            return None

    # --- one round on the wire ------------------------------------------------------------

    def _send(self, machine: LayerQuorums, groups: Mapping[int, torch.Tensor], work: Work) -> None:
        """One round: every worker's units in one message, hedged to alternate hosts when the
        primary is slower than its latency estimate; every reply fed back to the machine."""
        by_worker: dict[str, list[int]] = {}
        for expert, workers in work.items():
            for w in workers:
                by_worker.setdefault(w, []).append(expert)
        covers: dict[str, list[int]] = {}  # call id -> the experts it carries
        calls = {w: self._hedged_call(machine, groups, w, es, covers) for w, es in by_worker.items()}
        timeout = max(self.latency.deadline(w, self._rows(groups, es)) for w, es in by_worker.items())
        answers = self.transport.call_hedged(calls, timeout, self.latency, self.latency.peer_patience)
        for w in by_worker:
            self._receive(machine, groups, w, answers[w], covers)

    def _hedged_call(
        self,
        machine: LayerQuorums,
        groups: Mapping[int, torch.Tensor],
        worker: str,
        experts: list[int],
        covers: dict[str, list[int]],
    ) -> HedgedCall:
        msg = self._request(machine.layer, groups, experts, covers)
        self.latency.count_call()
        return HedgedCall(
            msg,
            self.latency.hedge_after(worker, self._rows(groups, experts)),
            partial(self._hedge_requests, machine, groups, worker, experts, covers),
            lambda view: machine.settled(worker, experts, view.missing, view.answered),
        )

    @staticmethod
    def _rows(groups: Mapping[int, torch.Tensor], experts: list[int]) -> int:
        return sum(groups[e].shape[0] for e in experts)

    def _receive(
        self,
        machine: LayerQuorums,
        groups: Mapping[int, torch.Tensor],
        primary: str,
        reply: Reply,
        covers: Mapping[str, list[int]],
    ) -> None:
        """One primary's reply: whether it lost, what was abandoned or settled, and every answer part."""
        if not reply.by_primary:
            machine.lost(primary)
        for call in reply.abandoned:  # the losing side may still answer: compare it then
            self._late.expect(
                call,
                Awaited(
                    machine.cause,
                    machine.layer,
                    [machine.units[e] for e in covers[call]],
                    self._calls.get(call, ({}, None, None))[0],
                    {e: groups[e] for e in covers[call]},
                ),
            )
        for e in reply.settled:  # its other replica's answer stands alone (quorum rule 7)
            machine.waive(e)
        for (responder, outcome), call, seconds in zip(reply.parts, reply.calls, reply.durations, strict=True):
            self._receive_part(machine, groups, responder, outcome, call, seconds, covers[call])

    def _receive_part(
        self,
        machine: LayerQuorums,
        groups: Mapping[int, torch.Tensor],
        responder: str,
        outcome: Any,
        call: str,
        seconds: float,
        experts: list[int],
    ) -> None:
        for e in experts:
            machine.tried_by(e, responder)
        try:
            decoded = self._accept_answer(responder, outcome, call, seconds, {e: groups[e] for e in experts})
        except Exception as exc:  # refused, closed, timed out or malformed: a failed reply
            kind = "timeout" if isinstance(exc, (CallTimeoutError, TimeoutError)) else "error"
            if isinstance(exc, CallTimeoutError):
                self.latency.timed_out(responder)  # its next deadline doubles (hedging rule 4)
            for e in experts:
                machine.failed(e, responder, kind, call)
            return
        for e in experts:
            machine.answered(e, responder, decoded[e], call)

    def _accept_answer(
        self, responder: str, outcome: Any, call: str, seconds: float, sent: Mapping[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        """Decode one answer and book it (bytes, latency, receipt, the call's record); raises
        whatever makes it a failed reply."""
        if isinstance(outcome, BaseException):
            raise outcome
        decoded = decode_response(outcome, sent)
        self.count_wire(0, len(outcome["data"]))
        self.latency.observe(responder, seconds, sum(x.shape[0] for x in sent.values()))
        self.on_receipt(responder, outcome)
        msg, experts, _ = self._calls[call]
        self._calls[call] = (msg, experts, outcome)
        return decoded

    def _request(
        self, layer: int, groups: Mapping[int, torch.Tensor], experts: list[int], covers: dict[str, list[int]]
    ) -> dict:
        call = uuid.uuid4().hex
        covers[call] = experts
        msg = encode_request(self.model_id, layer, {e: groups[e] for e in experts}, call=call)
        msg.update(self._stamp)
        self._calls[call] = (msg, experts, None)  # (message, experts, the answer once it came)
        self.count_wire(len(msg["data"]), 0)
        return msg

    def _hedge_requests(
        self,
        machine: LayerQuorums,
        groups: Mapping[int, torch.Tensor],
        worker: str,
        experts: list[int],
        covers: dict[str, list[int]],
        view: HedgeView,
    ) -> tuple[tuple[tuple[str, dict], ...], frozenset[int]]:
        """Called by the transport when a hedge is due (on its event loop, while `run` waits):
        (hedge messages for the message's unanswered experts, experts settled without one)."""
        book = self._route_latency
        picked, settled = machine.hedge_due(
            worker,
            experts,
            view.missing,
            view.answered,
            view.avoid,
            view.occupied,
            book.estimate if book is not None else None,
        )
        return tuple((aw, self._request(machine.layer, groups, aes, covers)) for aw, aes in picked.items()), settled
