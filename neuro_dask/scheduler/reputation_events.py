"""What each observation the scheduler receives costs or earns a worker, and what it announces.

Pure: outcome kinds, names, verdicts and security refusals in; reputation events, causes and
yes/no decisions out. The `neuro_scheduler` plugin applies them to its `Reputation` and ledger.

Rules:
1. Clients report outcomes of kind OUTCOME_KINDS (protocol/records.py refuses any other). Every
   counted kind is tallied for the dashboard, but only `validated` moves reputation (a `validated`
   reputation event), and only for a named worker (whose verified receipts for the request cover it: the
   evidence desk decides that). `invalid` is proven with a dispute, never by a report; `late`,
   `timeout` and `error` are the client's own observations.
2. A validated result is announced only when it lifts the worker into routing (its score crosses
   min_reputation from below).
3. Presented receipts that were forged or not the presenter's own are a security event.
4. A dispute proven against a worker is an `invalid` event (cause `dispute:REQUEST:NAME`) for a
   worker the reputation knows, and a slash when the verdict is slashable and a ledger is on.
5. A security refusal whose peer is a worker the reputation knows counts as a wrong result (an
   `invalid` event, cause `security:KIND:TIME`); other peers cost nothing here.
6. A failed scheduler probe is a `timeout` event (cause `probe:TOKEN`, the token's first 12 characters).
"""

from __future__ import annotations

from collections.abc import Container, Mapping

from neuro_dask.protocol.records import OUTCOME_KINDS  # the kinds the wire admits

__all__ = [
    "OUTCOME_KINDS",
    "OUTCOME_EVENTS",
    "counted_outcome",
    "outcome_event",
    "entered_routing",
    "receipts_refused",
    "dispute_cause",
    "slashes",
    "security_penalty",
    "probe_cause",
]

# Rule 1: the reputation event an outcome kind means (None: it moves nothing).
OUTCOME_EVENTS: Mapping[str, str | None] = {
    "validated": "validated",
    "invalid": None,
    "late": None,
    "timeout": None,
    "error": None,
}


def counted_outcome(kind: object) -> bool:
    """Rule 1: a kind clients may report (it reaches the dashboard's tally)."""
    return kind in OUTCOME_KINDS


def outcome_event(kind: object, name: str | None) -> str | None:
    """Rule 1: the reputation event a reported outcome asks for, before the receipts are checked."""
    if name is None or not counted_outcome(kind):
        return None
    return OUTCOME_EVENTS[kind]  # type: ignore[index]


def entered_routing(before: float, after: float, min_reputation: float) -> bool:
    """Rule 2: the change lifted the score from below min_reputation to at least it."""
    return before < min_reputation <= after


def receipts_refused(offered: Mapping[str, int]) -> bool:
    """Rule 3: some presented receipts were forged or another client's."""
    return bool(offered.get("forged") or offered.get("not-yours"))


def dispute_cause(request: str, name: str) -> str:
    """Rule 4: the cause id of a proven dispute (one per request and worker)."""
    return f"dispute:{request}:{name}"


def slashes(slashable: bool, ledger_on: bool) -> bool:
    """Rule 4: a proven verdict costs stake only when an operator-trusted referee decided it and a ledger runs."""
    return slashable and ledger_on


def security_penalty(identity: str | None, kind: str, at: float, known: Container[str]) -> tuple[str, str] | None:
    """Rule 5: (worker name, cause id) of the `invalid` event a security refusal costs, or None.

    `identity` is the refused peer's `role:name` ("" when it had no certificate)."""
    role, _, name = (identity or "").partition(":")
    if role != "worker" or name not in known:
        return None
    return name, f"security:{kind}:{at}"


def probe_cause(token: str) -> str:
    """Rule 6: the cause id of a failed probe's timeout (`token`: a fresh random hex string)."""
    return f"probe:{token[:12]}"
