"""The NEURO ledger: double-entry books of stakes, fees, rewards, burns and slashes, and the
stake-weighted governance of protocol parameters and treasury spends. No Dask here: the
scheduler plugin and the CLI call it. Rules: `policy.py`; parameters and bounds: `params.py`;
books: `books.py`; the scheduler's duties: `service.py`."""

from neuro_dask.ledger.books import (
    Ledger,
    Posting,
    Receipt,
    Settlement,
    provider,
    stake_account,
    unbonding_account,
    user,
)
from neuro_dask.ledger.errors import (
    AccountExistsError,
    BadAmountError,
    GovernanceError,
    IdempotencyConflictError,
    InsufficientFundsError,
    LedgerError,
    NotGrantedError,
    ParamError,
    SettledError,
    TreasuryError,
    UnknownAccountError,
)
from neuro_dask.ledger.params import BOUNDS, LedgerConfig
from neuro_dask.ledger.policy import UNIT, format_neuro, neuro

__all__ = [
    "BOUNDS",
    "UNIT",
    "AccountExistsError",
    "BadAmountError",
    "GovernanceError",
    "IdempotencyConflictError",
    "InsufficientFundsError",
    "Ledger",
    "LedgerConfig",
    "LedgerError",
    "NotGrantedError",
    "ParamError",
    "Posting",
    "Receipt",
    "SettledError",
    "Settlement",
    "TreasuryError",
    "UnknownAccountError",
    "format_neuro",
    "neuro",
    "provider",
    "stake_account",
    "unbonding_account",
    "user",
]
