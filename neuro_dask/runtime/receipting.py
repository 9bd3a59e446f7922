"""The worker's side of tickets and receipts (trust/receipts.py): admit a call, sign its answer.

Before any compute, a call must carry a ticket the scheduler signed for an open hold, issued to
the calling certificate, for this model (TicketChecker), unless the scheduler runs a free
network (no ledger, or `neuro.scheduler.free-tier`); the scheduler's own calls (dispute
recomputations, probes) need none. After the compute, the answer carries a receipt signed with
this worker's key (its TLS certificate's on a TLS network): what was asked (digest of the rows
received), what was answered (digest of the rows returned), for which request, and the running
totals for that request. The scheduler pays and credits only such receipts, and settles a
client's complaint only on them. No Dask here: plugins/neuro_worker.py calls this from its
handlers, on the compute thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from neuro_dask.security.signing import Signer
from neuro_dask.trust.receipts import Receipt, RequestTally, Ticket, TicketChecker, digest, sign_receipt

log = logging.getLogger(__name__)


def load_signer(key_file: str | None) -> Signer:
    """The worker's signing key: its TLS certificate's key when it has one (receipts are then
    attributable to the certificate), else a key made for this process (a plain TCP network,
    where the scheduler learns it from the worker's registration)."""
    if key_file:
        return Signer.from_pem_file(key_file)
    return Signer.generate()


class Receipting:
    def __init__(self, signer: Signer, name: Callable[[], str], clock: Callable[[], float] = time.time):
        self.signer = signer
        self.name = name  # the worker's name at the scheduler (its certificate's on TLS)
        self.tickets = TicketChecker(clock)
        self.tally = RequestTally(time.monotonic)

    def set_policy(self, policy: Mapping[str, Any] | None) -> None:
        """What the scheduler said with its assignment: its ticket key and whether calls need tickets."""
        if policy:
            self.tickets.set_key(policy.get("key") or None, bool(policy.get("required")))

    def admit(self, msg: Mapping[str, Any], caller: str | None, from_scheduler: bool) -> Ticket | None:
        """The call's ticket (None when none is needed); TicketError when the call may not run."""
        if from_scheduler:
            return None
        return self.tickets.check(msg.get("ticket"), str(msg.get("model")), caller)

    def sign(
        self, kind: str, msg: Mapping[str, Any], response: dict[str, Any], ticket: Ticket | None
    ) -> dict[str, Any]:
        """`response` with the receipt of this answer added (none for a call outside any request:
        there is nothing to pay or credit it to)."""
        experts, counts = tuple(int(e) for e in response["experts"]), tuple(int(c) for c in response["counts"])
        request = ticket.request if ticket is not None else _plain_id(msg.get("request"))
        if not request:
            return response
        seq, rows_total, units_total = self.tally.count(request, sum(counts), len(experts))
        receipt = Receipt.of_own_answer(
            worker=self.name(),
            kind=kind,
            model=str(msg["model"]),
            layer=int(msg["layer"]),
            step=str(msg.get("step") or ""),
            experts=experts,
            counts=counts,
            dtype=str(msg["dtype"]) if kind == "expert" else "int64",
            hidden=int(msg["hidden"]) if kind == "expert" else int(msg["width"]),
            in_digest=digest(msg["data"]),
            out_digest=digest(response["data"]),
            request=request,
            call=_plain_id(msg.get("call")),
            seq=seq,
            rows_total=rows_total,
            units_total=units_total,
            frac_bits=int(msg["frac_bits"]) if kind == "share" else 0,
        )
        response["receipt"] = sign_receipt(self.signer, receipt)
        return response


def _plain_id(value: object) -> str:
    """A client-chosen id as it goes into a receipt: a short printable string, else ""."""
    return value if isinstance(value, str) and len(value) <= 128 and value.isprintable() else ""
