"""Requests: who may begin and end one, what it may be paid for, what expired.

Pure: the open requests and what clients present in; decisions out. The `neuro_scheduler`
plugin leases versions, holds and settles fees (neuro_dask/ledger/service.py) as these say.

Rules:
1. A request may begin on a published model, or on a retired one (the refusal then names the
   version to load instead: versions.py rule 4).
2. One client (its reporter key) has at most `open_requests_per_client` requests open.
3. Only the client that began a request may end it.
4. A hold is charged to the calling certificate's own account or one granted to it; the
   scheduler's own certificate (and a connection without one) charges with no client check.
   A hold the ledger refuses as not granted is an attempt on someone else's account: reported.
5. Settlement pays at most what was held for: a standard request's receipts at most its
   expert-tokens rows, a private one's share rows at most SHARE_ROWS_PER_PRIVATE_TOKEN per
   expert-token; receipts of the other tier pay nothing. Over the cap, work is scaled down
   pro rata, rounding down (a colluding client and worker cannot inflate receipts).
6. A request whose receipt-book lease expired is ended like a request the client ended if it is
   still open here, else only closed in the book; a ledger hold that expired without an open
   request here (one from before a restart) is settled with no work.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from neuro_dask.ledger.policy import SHARE_ROWS_PER_PRIVATE_TOKEN

NO_ACCOUNT = (
    "this scheduler charges for requests: name the ledger account that pays (neuro.client.account, "
    "or the gateway's API key mapping)"
)


def may_begin(model: str, published: Collection[str], retired: Collection[str]) -> bool:
    """Rule 1."""
    return model in published or model in retired


def at_open_limit(open_requests: Mapping[str, Mapping[str, Any]], who: str, limit: int) -> bool:
    """Rule 2: `who` already has `limit` requests open."""
    return sum(1 for r in open_requests.values() if r["who"] == who) >= limit


def may_end(begun: Mapping[str, Any], who: str) -> bool:
    """Rule 3: `who` is the reporter key that began the request."""
    return begun["who"] == who


def charging_client(identity: Any) -> str | None:
    """Rule 4: the certificate name whose grants the hold is checked against (None: no check)."""
    return identity.name if identity is not None and identity.role != "scheduler" else None


def charge_attempt(held: Mapping[str, Any]) -> bool:
    """Rule 4: the ledger refused the hold because the account is not the caller's nor granted to it."""
    return held.get("reason") == "not-granted"


def capped(work: Mapping[str, int], cap: int | None) -> dict[str, int]:
    """Rule 5: `work` scaled down (pro rata, rounding down) so that it sums to at most `cap` rows;
    None: nothing of this kind may be paid for this request (the other tier's receipts)."""
    if cap is None:
        return {}
    total = sum(work.values())
    if total <= cap:
        return dict(work)
    return {w: rows * cap // total for w, rows in work.items() if rows * cap // total}


def settlement(
    work: Mapping[str, int], share_rows: Mapping[str, int], begun: Mapping[str, Any]
) -> tuple[dict[str, int], dict[str, int]]:
    """Rule 5: (rows, share rows) per worker to pay, from the verified receipts and what was held."""
    tokens = begun.get("expert_tokens", 0)
    tier = begun.get("tier")
    rows = capped(work, tokens if tier == "standard" else None)
    shares = capped(share_rows, SHARE_ROWS_PER_PRIVATE_TOKEN * tokens if tier == "private" else None)
    return rows, shares


def expired_action(request: str, open_requests: Collection[str]) -> str:
    """Rule 6: "end" a lapsed request still open here (settled by its receipts so far), else "close" it."""
    return "end" if request in open_requests else "close"


def orphan_hold(request: str, open_requests: Collection[str]) -> bool:
    """Rule 6: an expired ledger hold with no open request here: settle it with no work."""
    return request not in open_requests
