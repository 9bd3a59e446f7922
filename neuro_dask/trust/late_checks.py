"""Late checks (quorum rule 5): an answer that comes after its unit was decided is still judged.

Rules:
  1. A call abandoned unanswered (the loser of a hedge race) is remembered, with its units, so
     its answer can be compared if it comes after all; only the newest `AWAIT_LIMIT` are kept.
  2. A late answer is judged only for the units of its call that were decided; an undecided
     unit has nothing to be judged against.
  3. It is credited (validated, with its rows) only if it agrees with the accepted answer under
     the client's validation policy, else it is invalid; it keeps the cause id of the call it
     answers, so a primary that was late earns correctness but not timeliness.
  4. A late answer that disagrees is refuted like any other (trust/verdicts.py rules 2-3).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from neuro_dask.trust.layer_quorums import UnitState
from neuro_dask.trust.validation import Result, ValidationPolicy, agree
from neuro_dask.trust.verdicts import Dispute, Outcome, judged, proof

AWAIT_LIMIT = 1024  # abandoned calls remembered for a late comparison; older ones are forgotten


def late_verdict(canonical: Result | None, late: Result, validation: ValidationPolicy) -> str | None:
    """Rules 2-3 for one unit: "validated" or "invalid", or None when nothing was decided yet."""
    if canonical is None:
        return None
    return "validated" if agree(canonical, late, validation) else "invalid"


@dataclass(frozen=True)
class Awaited:
    """An abandoned call: the cause and layer it worked for, its units, its request, and the
    inputs it carried (opaque here: what its answer is decoded against)."""

    cause: str
    layer: int
    units: Sequence[UnitState]
    msg: Mapping
    inputs: Mapping[int, Any]

    def decided(self) -> list[UnitState]:
        return [u for u in self.units if u.result is not None]


class LateBook:
    """Rule 1: the abandoned calls whose answers may still come."""

    def __init__(self, limit: int = AWAIT_LIMIT):
        self.limit = limit
        self._awaiting: OrderedDict[str, Awaited] = OrderedDict()

    def expect(self, call: str, awaited: Awaited) -> None:
        self._awaiting[call] = awaited
        while len(self._awaiting) > self.limit:
            self._awaiting.popitem(last=False)

    def claim(self, call: str) -> Awaited | None:
        """The call a late answer belongs to, once; None when forgotten or never abandoned."""
        return self._awaiting.pop(call, None)


def judge_late(
    awaited: Awaited, worker: str, got: Result, response: Mapping, validation: ValidationPolicy
) -> tuple[list[Outcome], list[Dispute]]:
    """Rules 2-4: the outcomes of `worker`'s late answer `got` (decoded from `response`) for each
    decided unit of its call, and the disputes that prove the refuted ones."""
    outcomes, disputes = [], []
    for unit in awaited.decided():
        verdict = late_verdict({unit.expert: unit.result}, {unit.expert: got[unit.expert]}, validation)
        outcomes.append(judged(worker, verdict == "validated", awaited.cause, awaited.layer, unit.expert, unit.rows))
        dispute = None if verdict == "validated" else proof(worker, awaited.layer, unit.expert, awaited.msg, response)
        if dispute is not None:
            disputes.append(dispute)
    return outcomes, disputes
