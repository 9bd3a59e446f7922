"""The scheduler's evidence desk: tickets out, receipts and disputes in, only what it checks moves.

The `neuro_scheduler` plugin owns one. No Dask here: the plugin hands in a `call(address, msg)`
coroutine for the recomputations and probes the desk sends to workers, and applies the
verdicts (reputation, forfeits, slashes). The rules are trust/receipts.py's and
trust/disputes.py's; this module sequences them.

- `begin(...)` opens a request in the receipt book and signs its ticket (trust/receipts.py T1):
  workers serve only calls carrying it when the scheduler charges (a ledger without
  `free-tier`), and sign a receipt for every answer.
- `offer(...)` takes the cumulative receipts a client presents: each verified against the
  worker's key (its certificate's on TLS), for the presenting client's own request, once.
- `settle_dispute(...)` takes a client's complaint that a worker answered wrongly, with the
  worker's signed answer as evidence: the signature and digests are checked, then the scheduler
  recomputes the disputed rows on referees it picks (an operator-trusted worker first, else
  two of distinct owners) and judges. A complaint the recomputation refutes is a strike against
  the complainant; too many strikes in a window and its complaints are refused. Evidence that
  does not hold (a bad signature, digests that do not match) is refused before any
  recomputation, without a strike: checking it is cheap, and the rate limit bounds it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from neuro_dask.privacy.share_wire import decode_share_response, encode_share_request
from neuro_dask.protocol.wire import decode_response, encode_request
from neuro_dask.security.identity import peer_key
from neuro_dask.security.signing import Signer
from neuro_dask.trust.disputes import Evidence, Referee, StrikeBook, Verdict, judge, referee_order
from neuro_dask.trust.receipts import (
    BookError,
    EvidenceError,
    Receipt,
    ReceiptBook,
    RequestWork,
    Ticket,
    issue_ticket,
)
from neuro_dask.trust.validation import ValidationPolicy, agree, tolerance_for

log = logging.getLogger(__name__)

Call = Callable[[str, str, dict], Awaitable[Any]]  # (worker address, op, message) -> response

# Referees asked per dispute at most: one trusted worker decides alone, else two must agree.
MAX_REFEREES = 4


@dataclass(frozen=True)
class DisputeResult:
    status: str  # "OK" (a verdict was reached, or none could be) | "refused"
    verdict: Verdict | None = None
    accused: str = ""  # the worker's name
    request: str = ""
    why: str = ""

    def to_reply(self) -> dict[str, Any]:
        if self.verdict is None:
            return {"status": "error" if self.status == "refused" else "OK", "message": self.why}
        v = self.verdict
        return {
            "status": "OK",
            "verdict": v.kind,
            "slashable": v.slashable,
            "referees": list(v.referees),
            "why": v.why,
            "worker": self.accused,
        }


class EvidenceDesk:
    def __init__(
        self,
        signer: Signer,
        *,
        tickets_required: bool,
        max_unproven: int = 5,
        unproven_window: float = 3600.0,
        max_rows: int = 8192,
        validation: ValidationPolicy = ValidationPolicy(),
        clock: Callable[[], float] = time.time,
    ):
        self.signer = signer
        self.tickets_required = tickets_required
        self.book = ReceiptBook()
        self.strikes = StrikeBook(max_unproven, unproven_window, clock)
        self.keys: dict[str, bytes] = {}  # worker name -> the public key its receipts verify with
        self.max_rows = max_rows
        self.validation = validation
        self.clock = clock
        self.offers: Counter[str] = Counter()  # receipts presented, by outcome (accepted, stale, forged, ...)
        self.clients: dict[str, str] = {}  # open request -> the certificate name that began it ("" without TLS)

    # ---- tickets ---------------------------------------------------------------------------------

    def policy(self) -> dict[str, Any]:
        """What workers are told with each assignment: the key tickets verify with, and whether
        calls need one."""
        return {"key": self.signer.public_der, "required": self.tickets_required}

    def begin(
        self, request: str, model: str, client: str, account: str, tier: str, lease_seconds: float
    ) -> dict[str, Any]:
        """Open the request and sign its ticket (wire form). BookError when the book is full."""
        expires = self.clock() + lease_seconds
        self.book.open(request, client, account, tier, expires)
        self.clients[request] = client
        return issue_ticket(self.signer, Ticket(request, model, account, client, tier, expires))

    def own_ticket(self, model: str, seconds: float = 60.0) -> dict[str, Any]:
        """A ticket for the scheduler's own calls (recomputations, probes): no client, no account."""
        request = f"scheduler-{uuid.uuid4().hex}"
        return issue_ticket(self.signer, Ticket(request, model, "", "", "standard", self.clock() + seconds))

    def close(self, request: str) -> RequestWork:
        self.clients.pop(request, None)
        return self.book.close(request)

    def client_of(self, request: str) -> str | None:
        """The certificate name that began an open request ("" without TLS), None when not open."""
        return self.clients.get(request)

    def expired(self) -> list[str]:
        return self.book.expired(self.clock())

    # ---- receipts --------------------------------------------------------------------------------

    def set_key(self, worker: str, key: bytes | None) -> None:
        if key:
            self.keys[worker] = bytes(key)

    def offer(self, wires: Iterable[Any], reporter: str | None) -> Counter[str]:
        """Each presented receipt into the book; returns how many ended how."""
        results: Counter[str] = Counter()
        for wire in wires:
            try:
                receipt, sig = Receipt.from_wire(wire)
            except EvidenceError:
                results["malformed"] += 1
                continue
            results[self.book.offer(receipt, sig, self.keys.get, reporter)] += 1
        self.offers.update(results)
        return results

    def credit(self, request: str, worker: str, units: int) -> int:
        """How many of `units` validated units a client reports for `worker` may move reputation."""
        return self.book.take_units(request, worker, units) if request else 0

    # ---- disputes --------------------------------------------------------------------------------

    async def settle_dispute(
        self,
        wire: Any,
        reporter: str | None,
        reporter_key: str,
        candidates: Callable[[str, int, int], list[tuple[str, Referee]]],
        precision_of: Callable[[str, str], str],
        call: Call,
    ) -> DisputeResult:
        """Judge a client's complaint. `candidates(model, layer, expert)`: (address, Referee) of
        the workers serving that expert; `precision_of(worker name, model)`; `call(address, op, msg)`."""
        allowed, why = self.strikes.allowed(reporter_key)
        if not allowed:
            return DisputeResult("refused", why=why)
        # Evidence that does not hold is refused before any recomputation: checking it costs a
        # signature verification, so it earns no strike (the rate limit bounds it). A worker's bad
        # signature would otherwise strike the honest client that forwarded its answer.
        try:
            evidence = Evidence.from_wire(wire, self.max_rows)
        except EvidenceError as exc:
            return DisputeResult("refused", why=f"malformed evidence: {exc}")
        receipt = evidence.receipt
        refusal = self._check_evidence(evidence, reporter)
        if refusal:
            return DisputeResult("refused", accused=receipt.worker, request=receipt.request, why=refusal)
        accused_rows = evidence.rows("outputs")
        inputs = evidence.rows("inputs")
        pool = candidates(receipt.model, receipt.layer, evidence.expert)
        accused_owner = next((r.owner for _, r in pool if r.worker == receipt.worker), receipt.worker)
        # A share's referee must not hold the other share of its secret (disputes.py E2).
        pool = [(a, r) for a, r in pool if a not in evidence.exclude and r.worker not in evidence.exclude]
        address_of = {r.worker: a for a, r in pool}
        order = referee_order([r for _, r in pool], receipt.worker, accused_owner)
        answers: list[tuple[Referee, torch.Tensor | None]] = []
        verdict = judge(accused_rows, [], self._agree(receipt, ()))
        for referee in order[:MAX_REFEREES]:
            answers.append(
                (referee, await self._recompute(address_of[referee.worker], receipt, evidence.expert, inputs, call))
            )
            precisions = [precision_of(r.worker, receipt.model) for r, _ in answers]
            verdict = judge(
                accused_rows, answers, self._agree(receipt, precisions + [precision_of(receipt.worker, receipt.model)])
            )
            if verdict.kind != "undecided":
                break
        if verdict.kind == "proven":
            self.book.forfeit(receipt.request, receipt.worker)
        elif verdict.kind == "refuted":
            self.strikes.strike(reporter_key)
        return DisputeResult("OK", verdict, receipt.worker, receipt.request)

    def _check_evidence(self, evidence: Evidence, reporter: str | None) -> str | None:
        receipt = evidence.receipt
        key = self.keys.get(receipt.worker)
        if key is None:
            return f"no key is known for worker {receipt.worker!r}: it is not (or no longer) registered here"
        try:
            evidence.check(key)
        except EvidenceError as exc:
            return f"the evidence does not hold: {exc}"
        if receipt.request not in self.book:
            return f"request {receipt.request!r} is not open: disputes are filed while the request runs"
        if reporter is not None and self.clients.get(receipt.request, "") not in ("", reporter):
            return "only the client that made the call may dispute its answer"
        return None

    def _agree(self, receipt: Receipt, precisions: Iterable[str]) -> Callable[[torch.Tensor, torch.Tensor], bool]:
        """The validator of the quorums (trust/validation.py), at the tolerance of the loosest
        precision involved and of the wire dtype the rows travelled in; share answers are exact
        ring values, equal bit for bit or not at all."""
        if receipt.kind == "share":
            return torch.equal
        policy = tolerance_for(set(precisions) or {"float32"}, self.validation)
        if receipt.dtype in ("bfloat16", "float16"):
            from dataclasses import replace

            from neuro_dask.settings import WIRE_RTOL

            policy = replace(policy, rtol=max(policy.rtol, WIRE_RTOL[receipt.dtype]))
        return lambda a, b: agree({0: a.float()}, {0: b.float()}, policy)

    async def _recompute(
        self, address: str, receipt: Receipt, expert: int, inputs: torch.Tensor, call: Call
    ) -> torch.Tensor | None:
        """The referee's answer for the disputed rows, or None when it gave none."""
        if receipt.kind == "share":
            msg = encode_share_request(receipt.model, receipt.layer, receipt.step, receipt.frac_bits, {expert: inputs})
            op = "neuro_expert_share"
        else:
            msg = encode_request(receipt.model, receipt.layer, {expert: inputs}, call=uuid.uuid4().hex)
            op = "neuro_expert"
        msg["ticket"] = self.own_ticket(receipt.model)
        try:
            response = await call(address, op, msg)
            if receipt.kind == "share":
                return decode_share_response(response, {expert: inputs}, None)[expert]
            return decode_response(response, {expert: inputs})[expert]
        except Exception as exc:  # a referee that fails is one that did not answer
            log.info("referee %s gave no answer for layer %d expert %d: %s", address, receipt.layer, expert, exc)
            return None


reporter_key = peer_key  # whom strikes count against


__all__ = ["BookError", "DisputeResult", "EvidenceDesk", "reporter_key"]
