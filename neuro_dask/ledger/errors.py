"""Ledger errors: each names what was refused and why; nothing is written when one is raised."""

from __future__ import annotations

from neuro_dask.errors import NeuroDaskError


class LedgerError(NeuroDaskError):
    """Root of the ledger's refusals."""


class BadAmountError(LedgerError, ValueError):
    def __init__(self, amount: object, why: str = "must be a positive integer of the smallest NEURO unit"):
        self.amount = amount
        super().__init__(f"amount {amount!r} {why}")


class UnknownAccountError(LedgerError, KeyError):
    def __init__(self, account: str):
        self.account = account
        super().__init__(
            f"no account {account!r}: open it first (`neuro-dask ledger open USER`, or "
            "`neuro-dask ledger open-provider NAME`; a scheduler with a ledger opens its workers)"
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class AccountExistsError(LedgerError):
    def __init__(self, account: str):
        self.account = account
        super().__init__(f"account {account!r} already exists")


class InsufficientFundsError(LedgerError):
    def __init__(self, account: str, needed: int, available: int):
        self.account, self.needed, self.available = account, needed, available
        super().__init__(f"{account} holds {available} units, {needed} needed: nothing was moved")


class IdempotencyConflictError(LedgerError):
    def __init__(self, idem: str):
        self.idem = idem
        super().__init__(f"entry id {idem!r} was already used for a different movement")


class ParamError(LedgerError, ValueError):
    def __init__(self, name: str, value: object, why: str):
        self.name, self.value = name, value
        super().__init__(f"parameter {name}={value!r}: {why}")


class GovernanceError(LedgerError):
    """A proposal or vote that the rules refuse (no stake, closed, unknown, twice)."""


class NotGrantedError(LedgerError):
    """A client certificate asked to charge an account that is neither its own nor granted to it."""

    def __init__(self, account: str, client: str):
        self.account, self.client = account, client
        super().__init__(
            f"client {client!r} may not charge the account user:{account}: a client certificate charges "
            f"only its own account, or one whose owner granted it (the operator runs "
            f"`neuro-dask ledger grant {account} {client}`); nothing was held"
        )


class SettledError(LedgerError):
    """A request settled before, asked to settle with other work: a request is paid once."""

    def __init__(self, request: str, state: str, fee: int):
        self.request, self.state, self.fee = request, state, fee
        how = "after its hold expired" if state == "expired" else "before"
        super().__init__(
            f"request {request!r} was already settled {how} (fee {fee} units): a request is paid once, "
            "so nothing moved now; the work passed this time is not paid"
        )


class TreasuryError(LedgerError):
    def __init__(self, why: str = "a transfer cannot draw on the treasury"):
        super().__init__(
            f"{why}: the treasury moves only through a passed spend proposal "
            "(`neuro-dask gov propose-spend PROPOSER DEST AMOUNT`, voted by stake, paid at its tally)"
        )


class VestingError(LedgerError):
    """Something tried to move tokens that have not vested."""


class LedgerConnectionError(LedgerError, ConnectionError):
    """The ledger's database cannot be reached or its URL is not one the driver understands.

    The message names the URL with its password as *** (neuro_dask/security/redact.py)."""

    def __init__(self, url: str, detail: str):
        self.url = url  # already redacted
        self.detail = detail
        super().__init__(
            f"cannot open the ledger database at {url}: {detail}. Check that the server runs "
            "and accepts this user, and the URL (--db, --neuro-ledger or neuro.ledger.url)"
        )
