"""What a client reports about each reply, and the slash proof: when a disagreement is proven.

Rules:
  1. Every judged reply becomes an Outcome: validated (it agreed with the accepted answer, and
     counts its rows), invalid (the accepted answer refuted it), late (a primary overtaken by
     its hedge), timeout or error. Outcomes move routing and, as far as receipts go, reputation.
  2. A reply is refuted when the answer that decided its unit (a quorum's, a trusted worker's,
     or the canonical one a late answer is judged against) disagrees with it.
  3. A refuted reply is proven, and becomes a Dispute, only when it carries the worker's signed
     receipt: the scheduler then recomputes the call and judges it itself. A refuted reply
     without a receipt costs the worker this client's routing, nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


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
    return {
        "receipt": dict(receipt),
        "expert": int(expert),
        "dtype": msg["dtype"],
        "hidden": int(msg["hidden"]),
        "inputs": bytes(msg["data"]),
        "outputs": bytes(response["data"]),
    }


def proof(worker: str, layer: int, expert: int, msg: Mapping | None, response: Mapping | None) -> Dispute | None:
    """Rule 3: the Dispute that proves `worker`'s refuted reply, or None when there is nothing to
    hold it to (no request or answer on record, or no receipt in the answer)."""
    if msg is None or response is None:
        return None
    evidence = evidence_of(msg, response, expert)
    return None if evidence is None else Dispute(worker, layer, expert, evidence)


def judged(worker: str, agreed: bool, cause: str, layer: int, expert: int, rows: int) -> Outcome:
    """Rule 1 for a compared reply: validated with its rows when it agreed, else invalid."""
    return (
        Outcome(worker, "validated", cause, layer, expert, rows)
        if agreed
        else Outcome(worker, "invalid", cause, layer, expert)
    )


def refuted(verdicts: Sequence[tuple[str, bool]]) -> list[str]:
    """Rule 2: the workers whose replies the deciding answer refuted, in the order judged."""
    return [worker for worker, agreed in verdicts if not agreed]
