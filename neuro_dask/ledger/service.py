"""What the network does with the books: the scheduler plugin's ledger duties, without Dask.

- Holds and settlements: a client's request is quoted and held before any work is sent, and
  settled after it by the validated work the client reported: each validated replica's rows
  (token, expert pairs) are expert-tokens computed, paid for at the price list's rate and
  shared among the providers that computed them (policy rule 1).
- The private tier (docs/privacy.md): a request held with tier="private" is quoted at
  `price_per_private_expert_token`; clients report each share holder's rows per step as kind
  `private`, and every SHARE_ROWS_PER_PRIVATE_TOKEN of them are one private expert-token. Shares
  cannot be validated, so private work is paid from the client's fee (the client asked and paid
  for it) but earns no emission credit and moves no reputation.
- Credits: the validated work, per worker and epoch, for emissions and the leaderboard.
- Slashing: only for proven fraud, i.e. an `invalid` outcome the client marks `proven` (the
  quorum's canonical result was confirmed by an operator-trusted worker). Timeouts, crashes and
  lateness cost reputation only, never stake.
- The stake gate: a worker is routable only with at least `min_stake` locked.
- Emissions: once an epoch is over, its emission is paid (policy rule 2).
Time comes in as `now`; the caller runs this off its event loop (every call may touch disk).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from neuro_dask.ledger.books import Ledger
from neuro_dask.ledger.errors import InsufficientFundsError, LedgerError, UnknownAccountError
from neuro_dask.ledger.params import LedgerConfig
from neuro_dask.ledger.policy import SHARE_ROWS_PER_PRIVATE_TOKEN, TIERS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judged:
    """One judged reply, as the client reports it (worker by name)."""

    worker: str
    kind: str  # validated | invalid | late | timeout | error | private (a share holder's rows, unvalidated)
    cause: str
    rows: int = 0
    request: str = ""
    proven: bool = False


class LedgerService:
    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.work: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # request -> worker -> rows
        self.share_rows: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # private tier
        self.tiers: dict[str, str] = {}  # request -> tier, from its hold
        self.owners: dict[str, str] = {}
        self._emitted_through = -1

    @classmethod
    def open(cls, url: str, now: float, config: LedgerConfig | None = None) -> LedgerService:
        return cls(Ledger.open(url, config or LedgerConfig.from_dask_config(), now=now))

    def epoch(self, now: float) -> int:
        return self.ledger.epoch(now)

    # ---- providers --------------------------------------------------------------------------

    def join(self, worker: str, owner: str) -> None:
        """Every worker gets provider accounts when it joins (stake is its owner's business)."""
        self.owners[worker] = owner or worker
        self.ledger.open_provider(worker, owner or worker, exist_ok=True)

    def staked(self, workers: Iterable[str]) -> set[str]:
        """The workers with at least the minimum stake locked: the only ones routed to."""
        minimum = self.ledger.params()["min_stake"]
        return {w for w in workers if self.ledger.stake_of(w) >= minimum}

    def trust_params(self) -> dict[str, int]:
        p = self.ledger.params()
        return {"spot_check_bps": p["spot_check_bps"], "min_quorum": p["min_quorum"]}

    # ---- requests ---------------------------------------------------------------------------

    def hold(self, account: str, request: str, expert_tokens: int, now: float, tier: str = "standard") -> dict:
        """Quote and hold before any work: {"status": "OK", "held": units} or a refusal."""
        if tier not in TIERS:
            return {"status": "error", "message": f"unknown tier {tier!r}: one of {', '.join(TIERS)}"}
        try:
            amount = (self.ledger.quote(0, private_tokens=expert_tokens) if tier == "private"
                      else self.ledger.quote(expert_tokens))
            self.ledger.hold(account, request, amount, now=now)
        except UnknownAccountError:
            return {"status": "error", "message": f"no ledger account user:{account}: open and fund it "
                                                  f"(`neuro-dask ledger open {account}`)"}
        except InsufficientFundsError as exc:
            return {"status": "error", "message": f"insufficient funds for this request: {exc}"}
        except LedgerError as exc:
            return {"status": "error", "message": str(exc)}
        self.tiers[request] = tier
        return {"status": "OK", "held": amount, "tier": tier}

    def record(self, judged: Iterable[Judged], now: float, idem: str) -> list[str]:
        """Outcomes in: validated work is credited; proven fraud is slashed. Returns who was slashed."""
        epoch = self.epoch(now)
        credits: dict[str, int] = defaultdict(int)
        slashed = []
        for j in judged:
            if j.kind == "validated" and j.rows > 0:
                credits[j.worker] += j.rows
                if j.request:
                    self.work[j.request][j.worker] += j.rows
            elif j.kind == "private" and j.rows > 0 and self.tiers.get(j.request) == "private":
                self.share_rows[j.request][j.worker] += j.rows  # paid by this request's fee only
            elif j.kind == "invalid" and j.proven:
                try:
                    receipt = self.ledger.slash(j.worker, j.cause, now)
                except UnknownAccountError:
                    continue
                if receipt.postings:
                    slashed.append(j.worker)
        if credits:
            self.ledger.credit_work({w: (self.owners.get(w, w), n) for w, n in credits.items()}, epoch, idem, now)
        return slashed

    def settle(self, request: str, now: float) -> dict:
        """The fee for the request's validated (standard) or share-computed (private) expert-tokens,
        split among who computed them, pro rata to their rows (a request has one tier)."""
        tier = self.tiers.pop(request, "standard")
        work = dict(self.work.pop(request, {}))
        shares = dict(self.share_rows.pop(request, {}))
        tokens = sum(work.values())
        private_tokens = -(-sum(shares.values()) // SHARE_ROWS_PER_PRIVATE_TOKEN)
        fee = self.ledger.quote(tokens, private_tokens=private_tokens)
        for worker, rows in shares.items():
            work[worker] = work.get(worker, 0) + rows
        try:
            receipt = self.ledger.settle(request, fee, work, now=now)
        except LedgerError as exc:
            return {"status": "error", "message": str(exc)}
        return {"status": "OK", "tier": tier, "fee": fee, "expert_tokens": tokens, "private_expert_tokens": private_tokens,
                "paid": {p.credit: p.amount for p in receipt.postings}}

    # ---- epochs -----------------------------------------------------------------------------

    def tick(self, now: float) -> list[int]:
        """Pay every finished epoch's emission that has not been paid (once each, idempotent)."""
        current = self.epoch(now)
        paid = []
        start = self._emitted_through + 1 if self._emitted_through >= 0 else max(0, current - 1)
        for epoch in range(start, current):
            self.ledger.emit(epoch, now)
            paid.append(epoch)
        self._emitted_through = max(self._emitted_through, current - 1)
        return paid

    def report(self) -> Mapping[str, int]:
        return self.ledger.report()
