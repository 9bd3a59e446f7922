"""What the network does with the books: the scheduler plugin's ledger duties, without Dask.

Money moves only on what the scheduler can check itself (docs/ledger.md, "On the network");
a client's say-so moves nothing.

- Holds: a request is quoted at its tier's price and held before any work is sent, charged to
  an account its client certificate may charge (its own, or one whose owner granted it:
  `neuro-dask ledger grant ACCOUNT CLIENT`). Every hold has a lease (`lease_seconds`): `expire`
  names the holds whose request never ended (a crashed client, a scheduler restart), and the
  scheduler settles each with the work it verified, possibly none.
- Settlements: the scheduler passes the rows it verified from worker-signed receipts, per
  worker: standard expert-tokens, and for the private tier (docs/privacy.md) the share holders'
  rows, every SHARE_ROWS_PER_PRIVATE_TOKEN of them one private expert-token. The fee is the
  request price plus those tokens at their tier's price, at most the hold, shared among the
  workers that computed them (policy rule 1); the rest goes back. Standard work is credited for
  emissions and the leaderboard in the same transaction; shares cannot be validated, so private
  work is paid from the client's fee only. A request is paid once (`Ledger.settle_verified`).
- Slashing: only for a fraud the scheduler proved itself (a recomputation on a trusted host or
  a quorum it picked); timeouts, crashes and lateness cost reputation only, never stake.
- The stake gate: a worker is routable only with at least `min_stake` locked.
- Emissions: once an epoch is over, its emission is paid (policy rule 2).
Time comes in as `now`; the caller runs this off its event loop (every call may touch disk).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

from neuro_dask.ledger.books import Ledger
from neuro_dask.ledger.errors import InsufficientFundsError, LedgerError, NotGrantedError, UnknownAccountError
from neuro_dask.ledger.params import LedgerConfig
from neuro_dask.ledger.policy import TIERS

log = logging.getLogger(__name__)

LEASE_SECONDS = 600.0  # a hold's default lease: longer than a generation takes, short enough to refund soon


class LedgerService:
    def __init__(self, ledger: Ledger):
        self.ledger = ledger
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

    def hold(
        self,
        account: str,
        request: str,
        expert_tokens: int,
        now: float,
        tier: str = "standard",
        client: str | None = None,
        lease_seconds: float = LEASE_SECONDS,
    ) -> dict:
        """Quote and hold before any work: {"status": "OK", "held": units, "tier", "expires"} or
        {"status": "error", "message"}. `account` is the user name charged; `client`, the name on
        the asking connection's certificate (None: the caller checked nothing, as in drills), must
        be the account's or granted by its owner."""
        if tier not in TIERS:
            return {"status": "error", "message": f"unknown tier {tier!r}: one of {', '.join(TIERS)}"}
        if (
            isinstance(lease_seconds, bool)
            or not isinstance(lease_seconds, (int, float))
            or not math.isfinite(lease_seconds)
            or lease_seconds <= 0
        ):
            return {
                "status": "error",
                "message": f"a hold's lease must be a positive number of seconds, not {lease_seconds!r}",
            }
        try:
            amount = (
                self.ledger.quote(0, private_tokens=expert_tokens)
                if tier == "private"
                else self.ledger.quote(expert_tokens)
            )
            receipt = self.ledger.hold(
                account, request, amount, now=now, expires_at=now + lease_seconds, tier=tier, by=client
            )
        except UnknownAccountError:
            return {
                "status": "error",
                "message": f"no ledger account user:{account}: open and fund it (`neuro-dask ledger open {account}`)",
            }
        except InsufficientFundsError as exc:
            return {"status": "error", "message": f"insufficient funds for this request: {exc}"}
        except NotGrantedError as exc:  # the certificate asked to spend an account not its own
            return {"status": "error", "message": str(exc), "reason": "not-granted"}
        except LedgerError as exc:
            return {"status": "error", "message": str(exc)}
        if receipt.replayed:  # a retried request: the first hold, its amount and its expiry stand
            first = self.ledger.hold_of(request) or {}
            if first.get("state", "open") != "open":
                return {
                    "status": "error",
                    "message": f"request {request!r} was held and settled before: a new request needs a new id",
                }
            return {
                "status": "OK",
                "held": first.get("amount", amount),
                "tier": first.get("tier", tier),
                "expires": first.get("expires_at", now + lease_seconds),
            }
        return {"status": "OK", "held": amount, "tier": tier, "expires": now + lease_seconds}

    def settle(
        self, request: str, now: float, work: Mapping[str, int], share_rows: Mapping[str, int] | None = None
    ) -> dict:
        """Charge the request for the rows the scheduler verified from worker-signed receipts
        (`work`: worker -> standard expert-token rows; `share_rows`: worker -> private-tier share
        rows), pay who computed them, refund the rest: {"status": "OK", "tier", "fee", "charged",
        "expert_tokens", "private_expert_tokens", "paid": {account: units}, "state", "replayed"}
        or {"status": "error", "message"}. Settling again returns the first result (same rows)
        or an error (other rows): a request is paid once."""
        try:
            s = self.ledger.settle_verified(request, work, share_rows, now=now)
        except LedgerError as exc:
            return {"status": "error", "message": str(exc)}
        if s.ignored:  # the scheduler passes only workers it verified: a name without accounts is its bug
            log.warning(
                "request %s: rows of %s, who have no provider account, were neither charged nor paid",
                request,
                ", ".join(s.ignored),
            )
        return {
            "status": "OK",
            "tier": s.tier,
            "fee": s.fee,
            "charged": s.charged,
            "expert_tokens": s.expert_tokens,
            "private_expert_tokens": s.private_expert_tokens,
            "paid": {p.credit: p.amount for p in s.receipt.postings},
            "state": s.state,
            "replayed": s.replayed,
        }

    def expire(self, now: float) -> list[str]:
        """The requests whose holds expired open: settle each with the work verified for it."""
        return self.ledger.expired_holds(now)

    def slash(self, worker: str, cause: str, now: float) -> bool:
        """Slash `worker` for one fraud the scheduler proved itself (`cause` names the proof; the
        same cause never slashes twice). Returns whether stake moved now."""
        try:
            receipt = self.ledger.slash(worker, cause, now)
        except UnknownAccountError:
            return False
        return bool(receipt.postings) and not receipt.replayed

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
