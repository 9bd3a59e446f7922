"""The quorums of one MoE layer call, as a pure state machine: replies in, decisions out.

Each (layer, expert) is a unit with its own Quorum (trust/quorum.py). The machine holds no
transport, reads no clock and draws randomness only from the rng it is handed; the answers
it compares are opaque to it except through the quorum's `agree`.

States of a unit:  OPEN (replies awaited) -> ACCEPTED
                   OPEN -> FALLING BACK (a fresh quorum of one, a trusted worker asked) -> ACCEPTED
                   OPEN | FALLING BACK -> GIVEN UP
Events:     open (plan the unit), answered / failed / tried_by / waive (replies of a round,
            buffered), lost (a primary overtaken by its hedge), close_round (judge the round),
            hedge_due (a message is slow: where its hedges go).
Decisions:  Send (primary, replica, more, fallback), Accept (quorum or trusted), Prove (a
            refuted reply, to be disputed with its evidence), GiveUp (unavailable or exhausted).

Rules of a round, per open unit, after its replies are added to the quorum:
  1. Accepted by the quorum: its answer stands; its group is validated, the others invalid.
  2. Otherwise, unless exhausted, one more replica: an untried worker of a new owner, workers
     with a record first.
  3. Fallback (quorum rule 4), when no replica is left or the quorum is exhausted: an answer a
     trusted worker gave decides as it is, and refutes whoever disagreed with it.
  4. Else a trusted candidate that has not answered yet (it may have lost a hedge race) is
     asked under a fresh quorum of one.
  5. Else give up: with at most one answer group it is a matter of availability (too few live
     hosts that can decide: the caller waits for fresh routes); with a real disagreement the
     quorum is exhausted.
Every refuted reply becomes a Prove decision (trust/verdicts.py says when it is proven).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from neuro_dask.trust.policy import TrustPolicy
from neuro_dask.trust.quorum import Accepted, Exhausted, Quorum
from neuro_dask.trust.replication import Standing, plan_call
from neuro_dask.trust.validation import tolerance_for
from neuro_dask.trust.verdicts import Outcome, judged, refuted

StandingOf = Callable[[str], Standing]


@dataclass(frozen=True)
class Failed:
    """A reply that failed: refused, closed, malformed ("error") or past its deadline ("timeout")."""

    kind: str


@dataclass
class UnitState:
    expert: int
    rows: Any  # the unit's row count (opaque to the rules: it only rides along into Outcomes)
    quorum: Quorum
    candidates: list[str]
    tried: set[str] = field(default_factory=set)
    owners: set[str] = field(default_factory=set)
    hedge_hosts: set[str] = field(default_factory=set)  # where this unit's hedges went
    result: Any = None  # the accepted answer
    answers: dict[str, str | None] = field(default_factory=dict)  # worker -> the call id of its reply
    inbox: dict[str, tuple[Any, str | None]] = field(default_factory=dict)  # this round: worker -> (reply, call)


@dataclass(frozen=True)
class Send:
    expert: int
    worker: str
    role: str  # primary | replica (planned) | more (rule 2) | fallback (rule 4)


@dataclass(frozen=True)
class Accept:
    expert: int
    result: Any
    valid: tuple[str, ...]
    by: str  # quorum (rule 1) | trusted (rule 3)


@dataclass(frozen=True)
class Prove:
    worker: str
    layer: int
    expert: int
    call: str | None  # the call whose answer was refuted: its request and answer are the evidence


@dataclass(frozen=True)
class GiveUp:
    expert: int
    unavailable: bool  # rule 5: availability (wait for routes) rather than an exhausted quorum
    results: int
    groups: int
    errors: int


Decision = Send | Accept | Prove | GiveUp


@dataclass
class TrustTally:
    """Counts across layer calls, for the drills and the dashboard."""

    replicas_sent: int = 0
    units: int = 0
    unchecked: int = 0
    late_checked: int = 0
    accepted_from: Counter = field(default_factory=Counter)  # which workers' agreement decided


def counts(standing: Standing) -> bool:
    """A worker whose answer counts toward a quorum (quorum rule 2)."""
    return standing.trusted or standing.established


def owner(worker: str, standing: StandingOf) -> str:
    return standing(worker).owner or worker


def next_replica(unit: UnitState, standing: StandingOf) -> str | None:
    """Rule 2: an untried worker of a new owner, workers with a record first."""
    fresh = [w for w in unit.candidates if w not in unit.tried]
    new_owner = [w for w in fresh if owner(w, standing) not in unit.owners] or fresh
    anchored = [w for w in new_owner if counts(standing(w))]
    return (anchored or new_owner or [None])[0]


def trusted_group(quorum: Quorum, standing: StandingOf) -> list | None:
    """Rule 3: the first answer group holding a trusted worker's answer, or None."""
    return next((g for g in quorum.groups if any(standing(w).trusted for w, _ in g)), None)


def fallback_worker(unit: UnitState, standing: StandingOf) -> str | None:
    """Rule 4: a trusted candidate that has not answered yet."""
    answered = {w for g in unit.quorum.groups for w, _ in g} | set(unit.quorum.errors)
    return next((w for w in unit.candidates if standing(w).trusted and w not in answered), None)


def settled_elsewhere(
    unit: UnitState, worker: str, answered: Mapping[int, Iterable[str]], standing: StandingOf
) -> bool:
    """Quorum rule 7: `worker` only made a replicated unit's quorum, and another replica that
    counts has already answered for it, so that answer can stand alone if `worker` is late."""
    if unit.quorum.anchorless or unit.quorum.quorum < 2:
        return False
    return any(w != worker and w in unit.tried and counts(standing(w)) for w in answered.get(unit.expert, ()))


def settles_elsewhere_later(unit: UnitState, worker: str, standing: StandingOf) -> bool:
    """Quorum rule 7, ahead: `worker` only made a replicated unit's quorum, and another replica
    that counts is still on its way; once it answers, that answer can stand alone."""
    if unit.quorum.anchorless or unit.quorum.quorum < 2:
        return False
    return any(w != worker and counts(standing(w)) for w in unit.tried)


def hedge_targets(
    worker: str,
    experts: list[int],
    units: Mapping[int, UnitState],
    standing: StandingOf,
    avoid: frozenset[str] = frozenset(),
    occupied: frozenset[str] = frozenset(),
    estimate: Callable[[str], float | None] | None = None,
    may_wait: frozenset[int] = frozenset(),
) -> dict[str, list[int]]:
    """Hedge targets covering every unit of the message: for each unit a host not yet used
    or hedged to for it, of another owner than the primary, idle hosts first, then occupied
    ones (the hedge might queue behind their call), then hosts whose own message of this round
    is overdue (`avoid`: slow right now, or only their answer is late on the network while they
    are idle, which the client cannot tell apart; with two replicas per expert such a host is
    often the only one left, and waiting on the straggler is certain to be slow), reusing a
    target already picked when it can (fewer messages); with latency estimates, the closest
    first within each of those groups (unmeasured ones count as close). A unit of `may_wait`
    without such a host is left out (another replica of it is on its way); any other unit
    without one goes to the late worker itself once more; empty when a unit has nothing left,
    or when no unit has a target. The units record the hosts picked."""
    primary_owner = owner(worker, standing)
    picked: dict[str, list[int]] = {}

    def rank(w: str) -> int:
        return 2 if w in avoid else 1 if w in occupied else 0

    for e in experts:
        hosts = [
            w
            for w in units[e].candidates
            if w not in units[e].tried
            and w not in units[e].hedge_hosts
            and w != worker
            and owner(w, standing) != primary_owner
        ]
        hosts.sort(key=rank)  # stable: the candidates' order breaks ties
        if estimate is not None:
            hosts.sort(key=lambda w: (rank(w), estimate(w) or 0.0))
        if not hosts and e in may_wait:
            continue
        if not hosts and worker not in units[e].hedge_hosts:
            # Every other host is asked already: ask the late worker itself once more, on a fresh
            # call (a slow path, a lost answer); its answer is still its own, whichever comes first.
            hosts = [worker]
        if not hosts:
            return {}
        target = next((w for w in hosts if w in picked), hosts[0])
        picked.setdefault(target, []).append(e)
    for target, es in picked.items():
        for e in es:
            units[e].hedge_hosts.add(target)
    return picked


class LayerQuorums:
    """The trust decisions of one layer call (see the module docstring for its rules)."""

    def __init__(
        self,
        layer: int,
        cause: str,
        policy: TrustPolicy,
        standing: StandingOf,
        anchorless: bool,
        tally: TrustTally | None = None,
    ):
        self.layer, self.cause, self.policy, self.standing = layer, cause, policy, standing
        self.anchorless = anchorless  # no trusted or established worker exists (quorum rule 6)
        self.tally = tally if tally is not None else TrustTally()
        self.units: dict[int, UnitState] = {}
        self.outcomes: list[Outcome] = []

    # --- planning -------------------------------------------------------------------------

    def open(self, expert: int, rows: int, candidates: list[str], rng: random.Random) -> list[Send]:
        """Plan a unit over `candidates` (the primary first): its replicas and its quorum."""
        plan = plan_call(candidates, self.standing, self.policy.replication, rng)
        self.tally.unchecked += plan.unchecked
        unit = UnitState(expert, rows, self._quorum(candidates, plan.quorum), candidates)
        self.units[expert] = unit
        return [self._send(unit, w, "primary" if i == 0 else "replica") for i, w in enumerate(plan.workers)]

    def start(self) -> None:
        """Every unit is planned: the call goes out."""
        self.tally.units += len(self.units)

    def _quorum(self, candidates: Sequence[str], quorum: int) -> Quorum:
        standing = self.standing
        # Replicas at different precisions (int8 next to float32) agree only within their
        # measured error: the tolerance of the loosest precision among the candidates.
        validation = tolerance_for({standing(w).precision for w in candidates}, self.policy.validation)
        return Quorum(
            self.policy.quorum,
            counts=lambda w: counts(standing(w)),
            quorum=quorum,
            validation=validation,
            anchorless=self.anchorless,
            owner_of=lambda w: owner(w, standing),
        )

    # --- replies of a round ---------------------------------------------------------------

    def tried_by(self, expert: int, worker: str) -> None:
        """`worker` answered (or failed) for the unit, as its primary, replica or hedge."""
        self.units[expert].tried.add(worker)

    def answered(self, expert: int, worker: str, result: Any, call: str | None) -> None:
        self.units[expert].inbox[worker] = (result, call)

    def failed(self, expert: int, worker: str, kind: str, call: str | None) -> None:
        self.units[expert].inbox[worker] = (Failed(kind), call)

    def waive(self, expert: int) -> None:
        """Quorum rule 7: the unit's other replica answered; this one's answer need not be waited for."""
        self.units[expert].quorum.waive()

    def lost(self, worker: str) -> None:
        """A primary overtaken by its hedges: late, for every unit it carried."""
        self.outcomes.append(Outcome(worker, "late", self.cause, self.layer, -1))

    def hedge_due(
        self,
        worker: str,
        experts: list[int],
        missing: frozenset[int],
        answered: Mapping[int, Iterable[str]],
        avoid: frozenset[str],
        occupied: frozenset[str],
        estimate: Callable[[str], float | None] | None,
    ) -> tuple[dict[str, list[int]], frozenset[int]]:
        """`worker`'s message is slow: (hedge targets for its unanswered units, units settled without
        one). Units whose other replicas that count are asked already may go without a target;
        nothing at all when another unanswered unit has none."""
        settled = self.settled(worker, experts, missing, answered)
        todo = [e for e in experts if e in missing and e not in settled]
        # A unit whose only other hosts are already asked waits for them (quorum rule 7 settles
        # it when one that counts answers) instead of holding back the hedge of the others.
        may_wait = frozenset(e for e in todo if settles_elsewhere_later(self.units[e], worker, self.standing))
        targets = hedge_targets(worker, todo, self.units, self.standing, avoid, occupied, estimate, may_wait)
        if todo and not targets:
            return {}, frozenset()
        return targets, settled

    def settled(
        self, worker: str, experts: list[int], missing: frozenset[int], answered: Mapping[int, Iterable[str]]
    ) -> frozenset[int]:
        """`worker`'s late message's units that another replica's answer already settles (rule 7)."""
        units = self.units
        return frozenset(
            e for e in experts if e in missing and settled_elsewhere(units[e], worker, answered, self.standing)
        )

    # --- judging a round ------------------------------------------------------------------

    def close_round(self) -> list[Decision]:
        """Judge every open unit on the round's replies; stops at the first GiveUp."""
        decisions: list[Decision] = []
        for unit in self.units.values():
            inbox, unit.inbox = unit.inbox, {}
            if unit.result is not None:
                continue
            decisions += self._judge(unit, inbox)
            if isinstance(decisions[-1], GiveUp):
                break
        return decisions

    def results(self) -> dict[int, Any]:
        return {e: u.result for e, u in self.units.items()}

    def _judge(self, unit: UnitState, inbox: Mapping[str, tuple[Any, str | None]]) -> list[Decision]:
        self._add_replies(unit, inbox)
        decision = unit.quorum.decide()
        if isinstance(decision, Accepted):
            verdicts = [(w, True) for w in decision.valid] + [(w, False) for w in decision.invalid]
            return self._accept(unit, decision.canonical[unit.expert], set(decision.valid), verdicts, "quorum")
        more = None if isinstance(decision, Exhausted) else next_replica(unit, self.standing)
        if more is not None:
            return [self._send(unit, more, "more")]
        return self._fall_back(unit)

    def _add_replies(self, unit: UnitState, inbox: Mapping[str, tuple[Any, str | None]]) -> None:
        for worker, (reply, call) in inbox.items():
            if isinstance(reply, Failed):
                unit.quorum.add_error(worker)
                self.outcomes.append(Outcome(worker, reply.kind, self.cause, self.layer, unit.expert))
            else:
                unit.quorum.add_result(worker, {unit.expert: reply})
            unit.answers[worker] = call

    def _fall_back(self, unit: UnitState) -> list[Decision]:
        anchored = trusted_group(unit.quorum, self.standing)
        if anchored is not None:  # rule 3: whoever disagreed with the trusted answer is refuted by it
            valid = {w for w, _ in anchored}
            verdicts = [(w, w in valid) for g in unit.quorum.groups for w, _ in g]
            return self._accept(unit, anchored[0][1][unit.expert], valid, verdicts, "trusted")
        worker = fallback_worker(unit, self.standing)
        if worker is None:
            return [self._give_up(unit)]
        unit.quorum = Quorum(self.policy.quorum, counts=lambda w: True, quorum=1, validation=self.policy.validation)
        return [self._send(unit, worker, "fallback")]

    def _accept(
        self, unit: UnitState, result: Any, valid: set[str], verdicts: list[tuple[str, bool]], by: str
    ) -> list[Decision]:
        unit.result = result
        self.tally.accepted_from[tuple(sorted(valid))] += 1
        self.outcomes += [judged(w, ok, self.cause, self.layer, unit.expert, unit.rows) for w, ok in verdicts]
        proofs = [Prove(w, self.layer, unit.expert, unit.answers.get(w)) for w in refuted(verdicts)]
        return [Accept(unit.expert, result, tuple(sorted(valid)), by), *proofs]

    def _give_up(self, unit: UnitState) -> GiveUp:
        groups = unit.quorum.groups
        return GiveUp(unit.expert, len(groups) <= 1, sum(map(len, groups)), len(groups), len(unit.quorum.errors))

    def _send(self, unit: UnitState, worker: str, role: str) -> Send:
        unit.tried.add(worker)
        unit.owners.add(owner(worker, self.standing))
        self.tally.replicas_sent += 1
        return Send(unit.expert, worker, role)
