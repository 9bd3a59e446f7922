"""The NEURO books: double-entry movements with idempotency ids, over `ledger/db.py`.

Every movement is one entry of postings (debit account -> credit account, a positive integer
amount), written in one serialised transaction after every check passed: nothing is written
when a check fails. An entry carries an idempotency id (`idem`) and the cause id of the trust
event or request behind it; replaying an id returns the first receipt and moves nothing (an id
reused for a different request is refused). The rules themselves are `ledger/policy.py`'s.

What may move what (docs/ledger.md, "Operator powers"): a plain transfer moves spendable funds
between users, providers and genesis pools only; the treasury moves only by a passed spend
proposal, paid in its tally's transaction; holds, settlements, emissions and slashes move the
rest by the rules. A client certificate charges only its own account unless its owner granted it
(`grants`), and every hold expires (`expired_holds`), so a request that never ends is settled too.

Accounts: `issuance` (the only one that goes negative: minus what was minted), `treasury`,
`burn` (the sink), `emission` (the providers' emission pool), `escrow` (held fees), genesis
allocations `genesis:<name>` and `vesting:<name>`, users `user:<id>`, and for each provider
`provider:<id>` (spendable), `stake:<id>` (locked) and `unbonding:<id>` (leaving, still
slashable). Time is passed in (`now`, seconds since the epoch), never read here.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from neuro_dask.ledger import policy
from neuro_dask.ledger.db import Cursor, Database
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
from neuro_dask.ledger.params import (
    BOUNDS,
    LedgerConfig,
    check_adoption,
    check_consistent,
    check_param,
    check_spend,
    is_adoption,
    is_spend,
)
from neuro_dask.ledger.policy import SHARE_ROWS_PER_PRIVATE_TOKEN, TIERS

SYSTEM = {"issuance": "issuance", "treasury": "treasury", "burn": "burn", "emission": "emission", "escrow": "escrow"}
# A plain transfer (the operator's, on the owners' instruction) draws on spendable funds only, and
# never on the treasury: that moves by vote (propose, tally).
TRANSFERABLE = ("user", "provider", "genesis")
RECEIVING = ("user", "provider")  # kinds a plain transfer pays into
# ... and the pools the operator grants from, which take a grant back from a user or a provider
# (a mistaken deposit undone). Never from another genesis pool: that would rewrite genesis's split
# (community tokens into the team's allocation, say).
GRANT_POOLS = ("genesis:community", "genesis:liquidity")
# The ids the ledger derives for its own entries: a caller's id must not take one (it would block
# that entry for good: a release, an emission, a slash, a voted spend).
RESERVED_IDEMS = ("hold:", "settle:", "emission:", "slash:", "unbonded:", "vest:", "treasury-spend:")
# Entries an operator's command makes (docs/ledger.md, "Operator powers"): what `ledger audit` lists.
OPERATOR_KINDS = ("deposit", "transfer", "stake", "unstake", "grant", "revoke", "treasury-spend")
HOLD_SECONDS = 600.0  # a hold's lifetime when the caller names none
_MAX_BIGINT = 2**63 - 1


@dataclass(frozen=True)
class Posting:
    debit: str
    credit: str
    amount: int


@dataclass(frozen=True)
class Receipt:
    entry: int
    idem: str
    kind: str
    postings: tuple[Posting, ...]
    replayed: bool = False

    def total_to(self, account: str) -> int:
        return sum(p.amount for p in self.postings if p.credit == account)


@dataclass(frozen=True)
class Settlement:
    """A request settled by verified work (Ledger.settle_verified)."""

    receipt: Receipt
    tier: str
    fee: int  # by the price list, before the cap at the hold
    charged: int  # min(fee, held)
    expert_tokens: int
    private_expert_tokens: int
    state: str  # settled, or expired (settled after its hold expired)
    ignored: tuple[str, ...] = ()  # workers without a provider account: neither charged, paid nor credited
    replayed: bool = False


def user(name: str) -> str:
    return f"user:{name}"


def provider(name: str) -> str:
    return f"provider:{name}"


def stake_account(name: str) -> str:
    return f"stake:{name}"


def unbonding_account(name: str) -> str:
    return f"unbonding:{name}"


def _amount(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadAmountError(value, "must be an integer of the smallest NEURO unit (never a float)")
    if value <= 0:
        raise BadAmountError(value)
    return value


def _caller_idem(idem: str) -> None:
    if isinstance(idem, str) and (idem == "genesis" or idem.startswith(RESERVED_IDEMS)):
        raise LedgerError(
            f"entry id {idem!r} is reserved for the ledger's own entries "
            f"(genesis, {', '.join(p + '...' for p in RESERVED_IDEMS)}): choose another"
        )


def _units(value: object, what: str = "work units") -> int:
    """A count of work (expert-tokens): an integer >= 0 that fits the books."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
        raise BadAmountError(value, f"{what} must be an integer >= 0 (and below 2**62)")
    return value


def _rows(rows: object, what: str) -> dict[str, int]:
    """worker -> rows, as the scheduler counted them: names and counts checked, totals that fit."""
    if not isinstance(rows, Mapping):
        raise LedgerError(f"{what} must map worker names to row counts, not {rows!r}")
    checked = {}
    for worker, count in rows.items():
        if not isinstance(worker, str) or not worker:
            raise LedgerError(f"{what}: {worker!r} is not a worker name")
        checked[worker] = _units(count, f"{what} rows")
    _units(sum(checked.values()), f"{what} rows in all")
    return checked


def _name(value: object, what: str) -> str:
    """A certificate or account name: printable, no spaces, not empty, at most 255 characters."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 255
        or not value.isprintable()
        or any(c.isspace() for c in value)
    ):
        raise LedgerError(f"{what} {value!r} must be a name without spaces (1 to 255 printable characters)")
    return value


def _may_transfer(src_kind: str, dest: str, dst_kind: str) -> bool:
    """The routes of a plain transfer (docs/ledger.md, "Operator powers")."""
    if src_kind not in TRANSFERABLE:
        return False
    return dst_kind in RECEIVING or (dest in GRANT_POOLS and src_kind in RECEIVING)


def _fingerprint(kind: str, request: Mapping) -> str:
    return hashlib.sha256(json.dumps([kind, request], sort_keys=True, default=str).encode()).hexdigest()


class Ledger:
    def __init__(self, url: str | Path, config: LedgerConfig | None = None):
        self.db = Database(url)
        self.config = config or LedgerConfig()

    @classmethod
    def open(cls, url: str | Path, config: LedgerConfig | None = None, now: float = 0.0) -> Ledger:
        """Open (creating the schema) and run genesis once."""
        ledger = cls(url, config)
        if ledger.genesis_time() is None:  # a read first: an open ledger needs no write lock
            ledger.genesis(now)
        else:
            ledger._add_new_params()
        return ledger

    def _add_new_params(self) -> None:
        """A ledger made before a parameter existed gets it at its configured starting value
        (an added parameter, never a changed one: live values stay what the votes made them)."""
        with self.db.read() as cur:
            missing = set(self.config.params) - set(self._params(cur))
        if missing:
            with self.db.write() as cur:
                have = self._params(cur)
                for name in sorted(missing - set(have)):
                    cur.execute("INSERT INTO params (name, value) VALUES (?, ?)", (name, self.config.params[name]))

    def genesis_time(self) -> float | None:
        with self.db.read() as cur:
            return cur.execute("SELECT at FROM entries WHERE idem = 'genesis'").scalar()

    def epoch(self, now: float) -> int:
        """Epochs count from genesis, every `epoch_seconds` (fixed at genesis)."""
        with self.db.read() as cur:
            return self._epoch(cur, now)

    def _epoch(self, cur: Cursor, now: float) -> int:
        start = cur.execute("SELECT at FROM entries WHERE idem = 'genesis'").scalar(0.0)
        return max(0, int((now - start) // self._param(cur, "epoch_seconds")))

    def close(self) -> None:
        self.db.close()

    # ---- the one way money moves ----------------------------------------------------------

    def _replay(self, cur: Cursor, idem: str, kind: str, request: Mapping) -> Receipt | None:
        row = cur.execute("SELECT id, kind, fingerprint FROM entries WHERE idem = ?", (idem,)).one()
        if row is None:
            return None
        if row[2] != _fingerprint(kind, request):
            raise IdempotencyConflictError(idem)
        postings = cur.execute("SELECT debit, credit, amount FROM postings WHERE entry_id = ?", (row[0],)).all()
        return Receipt(row[0], idem, row[1], tuple(Posting(*p) for p in postings), replayed=True)

    def _balance(self, cur: Cursor, account: str) -> int:
        row = cur.execute("SELECT balance FROM accounts WHERE name = ?", (account,)).one()
        if row is None:
            raise UnknownAccountError(account)
        return row[0]

    def _apply(
        self, cur: Cursor, idem: str, kind: str, cause: str, now: float, request: Mapping, postings: Iterable[Posting]
    ) -> Receipt:
        postings = tuple(p for p in postings if p.amount != 0)
        change: dict[str, int] = {}
        for p in postings:
            _amount(p.amount)
            if p.debit == p.credit:
                raise LedgerError(f"a posting must move between two accounts, not {p.debit!r} to itself")
            change[p.debit] = change.get(p.debit, 0) - p.amount
            change[p.credit] = change.get(p.credit, 0) + p.amount
        for account, delta in change.items():
            balance = self._balance(cur, account)
            if delta < 0 and account != SYSTEM["issuance"] and balance + delta < 0:
                raise InsufficientFundsError(account, -delta, balance)
        entry = cur.execute(
            "INSERT INTO entries (idem, kind, cause, at, fingerprint) VALUES (?, ?, ?, ?, ?) RETURNING id",
            (idem, kind, cause, now, _fingerprint(kind, request)),
        ).scalar()
        for p in postings:
            cur.execute(
                "INSERT INTO postings (entry_id, debit, credit, amount) VALUES (?, ?, ?, ?)",
                (entry, p.debit, p.credit, p.amount),
            )
        for account, delta in change.items():
            cur.execute("UPDATE accounts SET balance = balance + ? WHERE name = ?", (delta, account))
        return Receipt(entry, idem, kind, postings)

    def _open(self, cur: Cursor, name: str, kind: str, owner: str = "", exist_ok: bool = False) -> bool:
        if cur.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).one() is not None:
            if exist_ok:
                return False
            raise AccountExistsError(name)
        cur.execute("INSERT INTO accounts (name, kind, owner) VALUES (?, ?, ?)", (name, kind, owner))
        return True

    # ---- genesis, accounts, transfers -------------------------------------------------------

    def genesis(self, now: float) -> Receipt:
        """Mint the max supply into the allocations, once (replays return the first receipt)."""
        cfg = self.config
        request = {
            "max_supply": cfg.max_supply,
            "allocations": dict(cfg.allocation_bps),
            "emission_pool_bps": cfg.emission_pool_bps,
        }
        with self.db.write() as cur:
            if (done := self._replay(cur, "genesis", "genesis", request)) is not None:
                return done
            for name, kind in SYSTEM.items():
                self._open(cur, name, kind)
            community = cfg.allocation("community")
            emission = community * cfg.emission_pool_bps // policy.BPS
            targets = {
                "emission": emission,
                "genesis:community": community - emission,
                "treasury": cfg.allocation("treasury"),
                "genesis:liquidity": cfg.allocation("liquidity"),
            }
            for bucket in ("team", "investors"):
                self._open(cur, f"genesis:{bucket}", "genesis")
                self._open(cur, f"vesting:{bucket}", "vesting")
                targets[f"vesting:{bucket}"] = cfg.allocation(bucket)
                vest = cfg.vesting.get(bucket)
                cur.execute(
                    "INSERT INTO vesting (bucket, total, start, months, cliff_months) VALUES (?, ?, ?, ?, ?)",
                    (bucket, cfg.allocation(bucket), now, vest.months if vest else 0, vest.cliff_months if vest else 0),
                )
            for name in ("genesis:community", "genesis:liquidity"):
                self._open(cur, name, "genesis")
            for name, value in {**cfg.params, "max_supply": cfg.max_supply}.items():
                cur.execute("INSERT INTO params (name, value) VALUES (?, ?)", (name, value))
            return self._apply(
                cur,
                "genesis",
                "genesis",
                "genesis",
                now,
                request,
                [Posting("issuance", account, amount) for account, amount in targets.items()],
            )

    def open_user(self, name: str, exist_ok: bool = False) -> str:
        with self.db.write() as cur:
            self._open(cur, user(name), "user", name, exist_ok)
        return user(name)

    def open_provider(self, name: str, owner: str = "", exist_ok: bool = False) -> str:
        """A provider's spendable, stake and unbonding accounts; `owner` groups a person's workers."""
        with self.db.write() as cur:
            opened = self._open(cur, provider(name), "provider", owner or name, exist_ok)
            if opened:
                self._open(cur, stake_account(name), "stake", owner or name)
                self._open(cur, unbonding_account(name), "unbonding", owner or name)
        return provider(name)

    def transfer(
        self, source: str, dest: str, amount: int, idem: str, cause: str = "", now: float = 0.0, kind: str = "transfer"
    ) -> Receipt:
        """Spendable to spendable, on the owners' instruction: from users, providers and genesis
        pools to users and providers, or a grant back to the pool it came from (GRANT_POOLS). Never
        from the treasury (TreasuryError: it moves only by a passed spend proposal), nor from or into
        locked, unvested, escrowed or burned funds."""
        request = {"source": source, "dest": dest, "amount": amount}
        _caller_idem(idem)
        if kind not in ("transfer", "deposit"):
            raise LedgerError(f"a transfer is recorded as 'transfer' or 'deposit', not {kind!r}")
        if source == SYSTEM["treasury"]:  # before anything is read: no id, amount or replay opens it
            raise TreasuryError()
        with self.db.write() as cur:
            if (done := self._replay(cur, idem, kind, request)) is not None:
                return done
            _amount(amount)
            for account in (source, dest):
                self._balance(cur, account)  # both must exist
            src_kind = cur.execute("SELECT kind FROM accounts WHERE name = ?", (source,)).scalar()
            dst_kind = cur.execute("SELECT kind FROM accounts WHERE name = ?", (dest,)).scalar()
            if src_kind == "treasury":
                raise TreasuryError()
            if not _may_transfer(src_kind, dest, dst_kind):
                raise LedgerError(
                    f"a transfer cannot move {src_kind} funds ({source}) to {dst_kind} ({dest}): it "
                    "moves spendable funds from users, providers and genesis pools to users and "
                    f"providers (or a grant back to {' or '.join(GRANT_POOLS)}); stake, unstake, "
                    "release, hold and settle move the others"
                )
            return self._apply(cur, idem, kind, cause, now, request, [Posting(source, dest, amount)])

    def deposit(
        self, name: str, amount: int, idem: str, source: str = "genesis:community", cause: str = "", now: float = 0.0
    ) -> Receipt:
        """Fund user `name` from a genesis pool (the community grants, or liquidity)."""
        return self.transfer(source, user(name), amount, idem, cause, now, kind="deposit")

    # ---- accounts bound to identities -------------------------------------------------------

    def grant(self, account: str, client: str, now: float, idem: str) -> Receipt:
        """The owner of user:`account` (through the operator) lets the client certificate named
        `client` charge it: a gateway serving the account's API keys, say. Recorded as an entry
        that moves nothing (kind `grant`, for the audit) and a row in `grants`."""
        spec = {"account": account, "client": client}
        _caller_idem(idem)
        with self.db.write() as cur:
            if (done := self._replay(cur, idem, "grant", spec)) is not None:
                return done
            _name(client, "a client certificate name")
            self._balance(cur, user(account))  # the account must exist
            if client == account:
                raise LedgerError(f"client {client!r} charges its own account user:{account} without a grant")
            since = self._granted_at(cur, account, client)
            if since is not None:
                raise LedgerError(
                    f"{client!r} may already charge user:{account} (granted at {since}): "
                    f"`neuro-dask ledger grants {account}` lists the grants"
                )
            receipt = self._apply(cur, idem, "grant", "", now, spec, [])
            cur.execute(
                "INSERT INTO grants (account, client, granted_at, grant_idem) VALUES (?, ?, ?, ?)",
                (account, client, now, idem),
            )
            return receipt

    def revoke(self, account: str, client: str, now: float, idem: str) -> Receipt:
        """Undo a grant: from now on `client` may not charge user:`account` (holds it made stand and
        are settled as usual). An entry of kind `revoke` that moves nothing, for the audit."""
        spec = {"account": account, "client": client}
        _caller_idem(idem)
        with self.db.write() as cur:
            if (done := self._replay(cur, idem, "revoke", spec)) is not None:
                return done
            if self._granted_at(cur, account, client) is None:
                raise LedgerError(
                    f"{client!r} holds no grant on user:{account} to revoke: "
                    f"`neuro-dask ledger grants {account}` lists the grants"
                )
            receipt = self._apply(cur, idem, "revoke", "", now, spec, [])
            cur.execute(
                "UPDATE grants SET revoked_at = ?, revoke_idem = ? "
                "WHERE account = ? AND client = ? AND revoked_at IS NULL",
                (now, idem, account, client),
            )
            return receipt

    def grants(self, account: str | None = None) -> list[dict]:
        """The grants in force (of one account's user name, or all), by account and client."""
        where, args = (
            ("WHERE revoked_at IS NULL AND account = ?", (account,))
            if account is not None
            else ("WHERE revoked_at IS NULL", ())
        )
        with self.db.read() as cur:
            rows = cur.execute(
                f"SELECT account, client, granted_at, grant_idem FROM grants {where} ORDER BY account, client", args
            ).all()
        return [dict(zip(("account", "client", "granted_at", "idem"), r, strict=True)) for r in rows]

    def may_charge(self, account: str, client: str) -> bool:
        """Whether the client certificate `client` may charge user:`account` (both user names)."""
        with self.db.read() as cur:
            return self._may_charge(cur, account, client)

    def _may_charge(self, cur: Cursor, account: str, client: str) -> bool:
        return account == client or self._granted_at(cur, account, client) is not None

    def _granted_at(self, cur: Cursor, account: str, client: str) -> float | None:
        return cur.execute(
            "SELECT granted_at FROM grants WHERE account = ? AND client = ? AND revoked_at IS NULL", (account, client)
        ).scalar()

    # ---- staking --------------------------------------------------------------------------

    def stake_from_community(
        self, name: str, idem: str, amount: int | None = None, owner: str = "", now: float = 0.0
    ) -> None:
        """Drills, benchmarks and test networks: open `name`'s provider accounts (if needed), fund
        them from the community allocation and lock `amount` (default: min_stake) as stake.
        Idempotent per `idem` (entries "{idem}-fund-{name}" and "{idem}-stake-{name}")."""
        self.open_provider(name, owner, exist_ok=True)
        amount = self.params()["min_stake"] if amount is None else amount
        self.transfer("genesis:community", provider(name), amount, f"{idem}-fund-{name}", now=now)
        self.stake(name, amount, f"{idem}-stake-{name}", now=now)

    def stake(self, name: str, amount: int, idem: str, now: float = 0.0) -> Receipt:
        request = {"provider": name, "amount": amount}
        _caller_idem(idem)
        with self.db.write() as cur:
            if (done := self._replay(cur, idem, "stake", request)) is not None:
                return done
            _amount(amount)
            return self._apply(
                cur, idem, "stake", "", now, request, [Posting(provider(name), stake_account(name), amount)]
            )

    def unstake(self, name: str, amount: int, idem: str, now: float) -> Receipt:
        """Locked stake starts unbonding: spendable after `unbonding_seconds`, slashable until then."""
        request = {"provider": name, "amount": amount}
        _caller_idem(idem)
        with self.db.write() as cur:
            if (done := self._replay(cur, idem, "unstake", request)) is not None:
                return done
            _amount(amount)
            receipt = self._apply(
                cur, idem, "unstake", "", now, request, [Posting(stake_account(name), unbonding_account(name), amount)]
            )
            cur.execute(
                "INSERT INTO unbonding (provider, amount, release_at) VALUES (?, ?, ?)",
                (name, amount, now + self._param(cur, "unbonding_seconds")),
            )
            return receipt

    def release_unbonded(self, now: float) -> list[Receipt]:
        """Every unbonding that has matured by `now` becomes spendable (one entry per unbonding)."""
        receipts = []
        with self.db.write() as cur:
            rows = cur.execute(
                "SELECT id, provider, amount FROM unbonding WHERE release_at <= ? ORDER BY id", (now,)
            ).all()
            for row_id, name, amount in rows:
                cur.execute("DELETE FROM unbonding WHERE id = ?", (row_id,))
                if amount > 0:
                    receipts.append(
                        self._apply(
                            cur,
                            f"unbonded:{row_id}",
                            "unbonded",
                            "",
                            now,
                            {"row": row_id},
                            [Posting(unbonding_account(name), provider(name), amount)],
                        )
                    )
        return receipts

    # ---- fees -----------------------------------------------------------------------------

    def quote(self, expert_tokens: int, requests: int = 1, private_tokens: int = 0) -> int:
        """The price list: per request, plus per expert-token computed (on the standard tier),
        plus per expert-token computed on secret shares (the private tier)."""
        if min(expert_tokens, requests, private_tokens) < 0:
            raise BadAmountError(min(expert_tokens, requests, private_tokens), "counts must be >= 0")
        p = self.params()
        return (
            requests * p["price_per_request"]
            + expert_tokens * p["price_per_expert_token"]
            + private_tokens * p["price_per_private_expert_token"]
        )

    def hold(
        self,
        client: str,
        request: str,
        amount: int,
        now: float = 0.0,
        cause: str = "",
        expires_at: float | None = None,
        tier: str = "standard",
        by: str | None = None,
    ) -> Receipt:
        """Before any work: the quoted maximum moves from user:`client` to escrow, or nothing does
        (InsufficientFundsError: the client is refused). `by`, when given, is the client certificate
        asking: it must be `client` itself or granted by the account's owner (NotGrantedError,
        checked first, so that it learns nothing about the account). The hold lasts until
        `expires_at` (default HOLD_SECONDS after `now`): after that `expired_holds` names it, so a
        request that never ends (a crashed client, a scheduler restart) is settled all the same.
        `tier` is kept with it for the settlement's price list."""
        if tier not in TIERS:
            raise LedgerError(f"unknown tier {tier!r}: one of {', '.join(TIERS)}")
        expires = now + HOLD_SECONDS if expires_at is None else expires_at
        if (
            isinstance(expires, bool)
            or not isinstance(expires, (int, float))
            or not math.isfinite(expires)
            or expires <= now
        ):
            raise LedgerError(f"a hold must expire after it is made (at {now}), not at {expires_at!r}")
        spec = {"client": client, "request": request, "amount": amount}
        if tier != "standard":  # a standard hold keeps the fingerprint it had before tiers were kept here
            spec["tier"] = tier
        idem = f"hold:{request}"
        with self.db.write() as cur:
            if by is not None and not self._may_charge(cur, client, by):
                raise NotGrantedError(client, by)
            if (done := self._replay(cur, idem, "hold", spec)) is not None:
                return done  # a retry: the first hold and its expiry stand
            _amount(amount)
            receipt = self._apply(
                cur, idem, "hold", cause or request, now, spec, [Posting(user(client), "escrow", amount)]
            )
            cur.execute(
                "INSERT INTO holds (request, client, amount, held_at, expires_at, state, tier, charged_by) "
                "VALUES (?, ?, ?, ?, ?, 'open', ?, ?)",
                (request, client, amount, now, float(expires), tier, by or ""),
            )
            return receipt

    def settle(self, request: str, fee: int, work: Mapping[str, int], now: float = 0.0) -> Receipt:
        """After the job: the fee (at most what was held) splits by policy rule 1 among the
        providers with validated work, the treasury and the burn; the rest goes back to the client.
        The caller names the fee: the network settles through `settle_verified`, which prices the
        work the scheduler verified itself."""
        spec = {"request": request, "fee": fee, "work": dict(sorted(work.items()))}
        idem = f"settle:{request}"
        with self.db.write() as cur:
            if (done := self._replay(cur, idem, "settle", spec)) is not None:
                return done
            if isinstance(fee, bool) or not isinstance(fee, int) or fee < 0:
                raise BadAmountError(fee, "a fee must be an integer >= 0")
            hold = self._open_hold(cur, request)
            known = {w: _units(u) for w, u in work.items() if self._exists(cur, provider(w))}
            return self._settle(cur, request, hold, fee, known, now, spec)

    def settle_verified(
        self, request: str, work: Mapping[str, int], share_rows: Mapping[str, int] | None = None, now: float = 0.0
    ) -> Settlement:
        """Settle a request by the rows the scheduler verified from worker-signed receipts, never by
        what a client reports. `work`: worker -> standard expert-token rows; `share_rows`: worker ->
        private-tier share rows, every SHARE_ROWS_PER_PRIVATE_TOKEN of them one private expert-token,
        counted only for a request held at the private tier. In one transaction: the fee by the
        price list (the request price, plus the tokens at their tier's price) capped at the hold and
        split by policy rule 1 among the workers by their rows; the rest back to the client; the
        standard work credited for emissions in the epoch of `now` (shares cannot be validated, so
        private work earns no emission). Workers without a provider account are left out of all of
        it: not charged for, not paid, not credited (`Settlement.ignored` names them).

        Settling again with the same rows returns the first settlement (`replayed`); with other rows
        it is refused (SettledError): a request is paid once, expired or not."""
        work, shares = _rows(work, "work"), _rows(share_rows or {}, "share rows")
        spec = {"request": request, "work": dict(sorted(work.items())), "share_rows": dict(sorted(shares.items()))}
        idem = f"settle:{request}"
        with self.db.write() as cur:
            row = cur.execute(
                "SELECT state, tier, fee, quoted, expert_tokens, private_tokens FROM holds WHERE request = ?",
                (request,),
            ).one()
            if row is None:
                raise LedgerError(f"request {request!r} has no hold to settle")
            state, tier, charged, quoted, tokens, private = row
            known = {w for w in {*work, *shares} if self._exists(cur, provider(w))}
            ignored = tuple(sorted({*work, *shares} - known))
            if state != "open":
                try:
                    done = self._replay(cur, idem, "settle", spec)
                except IdempotencyConflictError:
                    done = None
                if done is None:
                    raise SettledError(request, state, charged)
                return Settlement(done, tier, quoted, charged, tokens, private, state, ignored, replayed=True)
            hold = self._open_hold(cur, request)
            standard = {w: n for w, n in work.items() if w in known and n > 0}
            private_rows = {w: n for w, n in shares.items() if w in known and n > 0} if tier == "private" else {}
            tokens = sum(standard.values())
            private = -(-sum(private_rows.values()) // SHARE_ROWS_PER_PRIVATE_TOKEN)
            p = self._params(cur)
            fee = (
                p["price_per_request"]
                + tokens * p["price_per_expert_token"]
                + private * p["price_per_private_expert_token"]
            )
            paid_rows = dict(standard)
            for worker, rows in private_rows.items():
                paid_rows[worker] = paid_rows.get(worker, 0) + rows
            receipt = self._settle(cur, request, hold, fee, paid_rows, now, spec)
            epoch = self._epoch(cur, now)
            for worker, units in standard.items():
                owner = cur.execute("SELECT owner FROM accounts WHERE name = ?", (provider(worker),)).scalar("")
                self._credit(cur, worker, owner, epoch, units)
            cur.execute(
                "UPDATE holds SET expert_tokens = ?, private_tokens = ? WHERE request = ?", (tokens, private, request)
            )
            state, charged = cur.execute("SELECT state, fee FROM holds WHERE request = ?", (request,)).one()
            return Settlement(receipt, tier, fee, charged, tokens, private, state, ignored)

    def _open_hold(self, cur: Cursor, request: str) -> tuple[str, int, float]:
        """(client, amount held, expires_at) of the request's hold, which must still be open."""
        row = cur.execute("SELECT client, amount, state, expires_at FROM holds WHERE request = ?", (request,)).one()
        if row is None:
            raise LedgerError(f"request {request!r} has no hold to settle")
        client, held, state, expires = row
        if state != "open":
            raise LedgerError(f"request {request!r} is already settled")
        return client, held, expires

    def _settle(
        self,
        cur: Cursor,
        request: str,
        hold: tuple[str, int, float],
        fee: int,
        work: Mapping[str, int],
        now: float,
        spec: Mapping,
    ) -> Receipt:
        """Rule 1 on min(fee, held) among `work` (known providers), the rest back to the client; the
        hold ends `settled`, or `expired` when settled at or after its expiry."""
        client, held, expires = hold
        charged = min(fee, held)
        p = self._params(cur)
        split = policy.split_fee(charged, work, p["treasury_bps"], p["burn_bps"])
        postings = [Posting("escrow", provider(w), a) for w, a in split.providers.items()]
        postings += [
            Posting("escrow", "treasury", split.treasury),
            Posting("escrow", "burn", split.burn),
            Posting("escrow", user(client), held - charged),
        ]
        receipt = self._apply(cur, f"settle:{request}", "settle", request, now, spec, postings)
        cur.execute(
            "UPDATE holds SET settled = 1, fee = ?, quoted = ?, state = ? WHERE request = ?",
            (charged, min(fee, _MAX_BIGINT), "expired" if now >= expires else "settled", request),
        )
        return receipt

    def expired_holds(self, now: float) -> list[str]:
        """The requests whose holds are still open at or after their expiry, oldest expiry first:
        the scheduler settles each with the work it verified (possibly none)."""
        with self.db.read() as cur:
            return [
                r[0]
                for r in cur.execute(
                    "SELECT request FROM holds WHERE state = 'open' AND expires_at <= ? ORDER BY expires_at, request",
                    (now,),
                ).all()
            ]

    def hold_of(self, request: str) -> dict | None:
        """A request's hold: who, how much, when, until when, its state and, once settled, its fee."""
        keys = ("request", "client", "amount", "held_at", "expires_at", "state", "tier", "charged_by", "fee")
        with self.db.read() as cur:
            row = cur.execute(f"SELECT {', '.join(keys)} FROM holds WHERE request = ?", (request,)).one()
        return None if row is None else dict(zip(keys, row, strict=True))

    # ---- work, emissions, slashing ----------------------------------------------------------

    def credit_work(self, work: Mapping[str, tuple[str, int]], epoch: int, idem: str, now: float = 0.0) -> None:
        """Validated work (expert-tokens) per worker: worker -> (owner, units), for emissions and
        the leaderboard. Credits are not money; the entry only makes the report idempotent."""
        spec = {"epoch": epoch, "work": {w: list(v) for w, v in sorted(work.items())}}
        _caller_idem(idem)
        with self.db.write() as cur:
            if self._replay(cur, idem, "credit", spec) is not None:
                return
            for worker, (owner, units) in work.items():
                self._credit(cur, worker, owner, epoch, _units(units))
            self._apply(cur, idem, "credit", "", now, spec, [])

    def _credit(self, cur: Cursor, worker: str, owner: str, epoch: int, units: int) -> None:
        row = cur.execute("SELECT units FROM credits WHERE worker = ? AND epoch = ?", (worker, epoch)).one()
        if row is None:
            cur.execute(
                "INSERT INTO credits (worker, owner, epoch, units) VALUES (?, ?, ?, ?)",
                (worker, owner or worker, epoch, units),
            )
        else:
            cur.execute("UPDATE credits SET units = units + ? WHERE worker = ? AND epoch = ?", (units, worker, epoch))

    def emit(self, epoch: int, now: float = 0.0) -> Receipt:
        """Policy rule 2 for one epoch, once: the emission pool pays providers by their credits."""
        _units(epoch, "an epoch")
        idem = f"emission:{epoch}"
        with self.db.write() as cur:
            if (done := self._replay(cur, idem, "emission", {"epoch": epoch})) is not None:
                return done
            p = self._params(cur)
            amount = policy.emission_for_epoch(
                epoch, p["emission_initial"], p["emission_decay_bps"], self._balance(cur, "emission")
            )
            credits = {
                w: u
                for w, u in cur.execute("SELECT worker, units FROM credits WHERE epoch = ?", (epoch,)).all()
                if self._exists(cur, provider(w))
            }
            paid = policy.split_emission(amount, credits)
            receipt = self._apply(
                cur,
                idem,
                "emission",
                f"epoch:{epoch}",
                now,
                {"epoch": epoch},
                [Posting("emission", provider(w), a) for w, a in paid.items()],
            )
            cur.execute("INSERT INTO emissions (epoch, amount) VALUES (?, ?)", (epoch, sum(paid.values())))
            return receipt

    def slash(self, name: str, cause: str, now: float) -> Receipt:
        """Proven fraud only (the caller's duty: a wrong result the quorum and a trusted
        recomputation both refuted). Policy rule 4 on stake plus unbonding stake."""
        idem = f"slash:{cause}:{name}"
        spec = {"provider": name, "cause": cause}
        with self.db.write() as cur:
            if (done := self._replay(cur, idem, "slash", spec)) is not None:
                return done
            p = self._params(cur)
            since = now - p["slash_window_seconds"]
            others = cur.execute(
                "SELECT COUNT(DISTINCT provider) FROM slashes WHERE at >= ? AND provider <> ?", (since, name)
            ).scalar(0)
            bps = policy.slash_bps(p["slash_bps"], others, p["slash_correlation_bps"], p["slash_max_bps"])
            staked = self._balance(cur, stake_account(name))
            unbonding = self._balance(cur, unbonding_account(name))
            amount = (staked + unbonding) * bps // policy.BPS
            from_stake = min(amount, staked)
            from_unbonding = amount - from_stake
            self._take_unbonding(cur, name, from_unbonding)
            to_treasury, _ = policy.split_slash(amount, p["slash_burn_bps"])
            postings = []
            for source, part in ((stake_account(name), from_stake), (unbonding_account(name), from_unbonding)):
                t = min(part, to_treasury)  # the treasury's share is taken first, the burn after
                to_treasury -= t
                postings += [Posting(source, "treasury", t), Posting(source, "burn", part - t)]
            receipt = self._apply(cur, idem, "slash", cause, now, spec, postings)
            cur.execute(
                "INSERT INTO slashes (provider, amount, bps, cause, at) VALUES (?, ?, ?, ?, ?)",
                (name, amount, bps, cause, now),
            )
            return receipt

    def _take_unbonding(self, cur: Cursor, name: str, amount: int) -> None:
        """Slash unbonding rows, the latest to mature first."""
        for row_id, row_amount in cur.execute(
            "SELECT id, amount FROM unbonding WHERE provider = ? ORDER BY release_at DESC, id DESC", (name,)
        ).all():
            if amount <= 0:
                return
            take = min(amount, row_amount)
            cur.execute("UPDATE unbonding SET amount = amount - ? WHERE id = ?", (take, row_id))
            amount -= take

    def release_vesting(self, bucket: str, now: float) -> Receipt | None:
        """Policy rule 3: whatever has vested since the last release moves to `genesis:<bucket>`."""
        with self.db.write() as cur:
            row = cur.execute(
                "SELECT total, start, months, cliff_months, released FROM vesting WHERE bucket = ?", (bucket,)
            ).one()
            if row is None:
                raise UnknownAccountError(f"vesting:{bucket}")
            total, start, months, cliff, released = row
            due = policy.vested(total, start, now, months, cliff) - released
            if due <= 0:
                return None
            receipt = self._apply(
                cur,
                f"vest:{bucket}:{released + due}",
                "vest",
                bucket,
                now,
                {"bucket": bucket},
                [Posting(f"vesting:{bucket}", f"genesis:{bucket}", due)],
            )
            cur.execute("UPDATE vesting SET released = released + ? WHERE bucket = ?", (due, bucket))
            return receipt

    # ---- governance -----------------------------------------------------------------------

    def propose(self, proposer: str, param: str, value: int, now: float, idem: str) -> int:
        """A change of one protocol parameter, by a provider with stake; inside the bounds. Or the
        adoption of a model version: param "adopt:CHANNEL:MODEL_ID", value 1 (params.check_adoption).
        Or a treasury spend: param "spend:ACCOUNT", value the amount in units, ACCOUNT an open
        user or provider account (params.check_spend); paid at a passing tally."""
        with self.db.write() as cur:
            row = cur.execute("SELECT id, proposer, param, value FROM proposals WHERE idem = ?", (idem,)).one()
            if row is not None:
                if row[1:] != (proposer, param, value):
                    raise IdempotencyConflictError(idem)
                return row[0]
            if is_adoption(param):
                check_adoption(param, value)
            elif is_spend(param):
                self._spend_dest(cur, param, value)
            else:
                check_param(param, value)
                check_consistent({**self._params(cur), param: value})
            if not self._exists(cur, stake_account(proposer)) or self._balance(cur, stake_account(proposer)) <= 0:
                raise GovernanceError(f"{proposer} has no stake: only staked providers propose")
            ends = now + self._param(cur, "voting_seconds")
            return cur.execute(
                "INSERT INTO proposals (proposer, param, value, created_at, ends_at, status, idem) "
                "VALUES (?, ?, ?, ?, ?, 'open', ?) RETURNING id",
                (proposer, param, value, now, ends, idem),
            ).scalar()

    def vote(self, proposal: int, voter: str, yes: bool, now: float) -> int:
        """One staked token, one vote: the voter's locked stake now is its weight."""
        with self.db.write() as cur:
            row = cur.execute("SELECT status, ends_at FROM proposals WHERE id = ?", (proposal,)).one()
            if row is None:
                raise GovernanceError(f"no proposal {proposal}")
            if row[0] != "open" or now >= row[1]:
                raise GovernanceError(f"proposal {proposal} is closed to votes")
            if not self._exists(cur, stake_account(voter)):
                raise GovernanceError(f"{voter} has no stake account: only staked providers vote")
            weight = self._balance(cur, stake_account(voter))
            if weight <= 0:
                raise GovernanceError(f"{voter} has no stake: a vote without stake weighs nothing and is refused")
            if cur.execute("SELECT 1 FROM votes WHERE proposal = ? AND voter = ?", (proposal, voter)).one():
                raise GovernanceError(f"{voter} already voted on proposal {proposal}")
            cur.execute(
                "INSERT INTO votes (proposal, voter, yes, weight, at) VALUES (?, ?, ?, ?, ?)",
                (proposal, voter, int(bool(yes)), weight, now),
            )
            column = "yes" if yes else "no"
            cur.execute(f"UPDATE proposals SET {column} = {column} + ? WHERE id = ?", (weight, proposal))
            return weight

    def tally(self, proposal: int, now: float) -> dict:
        """After the voting period: policy rule 5; a passed change becomes the live value.

        Weights are counted now: each vote weighs the least of its stake when cast and its stake
        still bonded (locked or unbonding) now, against all bonded stake now. Stake that voted
        and left counts no more, and cannot vote again elsewhere within the period (unbonding
        lasts at least as long: params.check_consistent)."""
        with self.db.write() as cur:
            row = cur.execute(
                "SELECT param, value, ends_at, status, yes, no FROM proposals WHERE id = ?", (proposal,)
            ).one()
            if row is None:
                raise GovernanceError(f"no proposal {proposal}")
            param, value, ends, status, yes, no = row
            if status != "open":  # tallied before: nothing moves again
                return {
                    "proposal": proposal,
                    "status": status,
                    "param": param,
                    "value": value,
                    "yes": yes,
                    "no": no,
                    **self._spent(cur, proposal),
                }
            if now < ends:
                raise GovernanceError(f"proposal {proposal} is open until {ends}; tally it after")
            total = cur.execute(
                "SELECT COALESCE(SUM(balance), 0) FROM accounts WHERE kind IN ('stake', 'unbonding')"
            ).scalar(0)
            yes = no = 0
            for voter, voted_yes, weight in cur.execute(
                "SELECT voter, yes, weight FROM votes WHERE proposal = ?", (proposal,)
            ).all():
                bonded = self._balance(cur, stake_account(voter)) + self._balance(cur, unbonding_account(voter))
                if voted_yes:
                    yes += min(weight, bonded)
                else:
                    no += min(weight, bonded)
            p = self._params(cur)
            result = policy.tally(yes, no, total, p["gov_quorum_bps"], p["gov_threshold_bps"])
            passed = result.passed
            if passed and not is_adoption(param) and not is_spend(param):
                try:
                    check_param(param, value)
                    check_consistent({**p, param: value})
                except ParamError:
                    passed = False  # another change since the proposal made this one inconsistent
            status = "passed" if passed else ("rejected" if result.quorum_met else "no-quorum")
            if passed and is_adoption(param):
                channel, model = check_adoption(param, value)
                cur.execute(
                    "INSERT INTO adoptions (proposal, channel, model, at) VALUES (?, ?, ?, ?)",
                    (proposal, channel, model, now),
                )
            elif passed and is_spend(param):
                status = self._pay_spend(cur, proposal, param, value, now)
            elif passed:
                cur.execute(
                    "INSERT INTO param_changes (name, old, new, proposal, at) VALUES (?, ?, ?, ?, ?)",
                    (param, p[param], value, proposal, now),
                )
                cur.execute("UPDATE params SET value = ? WHERE name = ?", (value, param))
            cur.execute("UPDATE proposals SET status = ?, yes = ?, no = ? WHERE id = ?", (status, yes, no, proposal))
            return {
                "proposal": proposal,
                "status": status,
                "param": param,
                "value": value,
                "yes": yes,
                "no": no,
                "total_stake": total,
                **self._spent(cur, proposal),
            }

    def _spend_dest(self, cur: Cursor, param: str, value: object) -> str:
        """A treasury spend's destination: an open user or provider account."""
        dest = check_spend(param, value)
        kind = cur.execute("SELECT kind FROM accounts WHERE name = ?", (dest,)).scalar()
        if kind is None:
            raise UnknownAccountError(dest)
        if kind not in RECEIVING:  # the name's form makes this unreachable; the books say it anyway
            raise GovernanceError(f"a treasury spend pays a user's or a provider's spendable account, not {dest}")
        return dest

    def _pay_spend(self, cur: Cursor, proposal: int, param: str, amount: int, now: float) -> str:
        """A passed spend, in its tally's transaction: the one entry `treasury-spend:<proposal>`, or
        the status `failed` and nothing moved when the treasury cannot pay it now."""
        dest = self._spend_dest(cur, param, amount)
        if self._balance(cur, SYSTEM["treasury"]) < amount:
            return "failed"
        self._apply(
            cur,
            f"treasury-spend:{proposal}",
            "treasury-spend",
            f"proposal:{proposal}",
            now,
            {"proposal": proposal, "dest": dest, "amount": amount},
            [Posting(SYSTEM["treasury"], dest, amount)],
        )
        return "passed"

    def _spent(self, cur: Cursor, proposal: int) -> dict:
        """{"spent": {entry, debit, credit, amount}} for a paid treasury spend, else {}."""
        row = cur.execute(
            "SELECT e.id, p.debit, p.credit, p.amount FROM entries e "
            "JOIN postings p ON p.entry_id = e.id WHERE e.idem = ?",
            (f"treasury-spend:{proposal}",),
        ).one()
        return {} if row is None else {"spent": dict(zip(("entry", "debit", "credit", "amount"), row, strict=True))}

    def adoptions(self, after: int = 0) -> list[dict]:
        """Model versions adopted by a passed vote, in proposal order (after proposal id `after`)."""
        with self.db.read() as cur:
            rows = cur.execute(
                "SELECT proposal, channel, model, at FROM adoptions WHERE proposal > ? ORDER BY proposal", (after,)
            ).all()
        return [dict(zip(("proposal", "channel", "model", "at"), r, strict=True)) for r in rows]

    def proposals(self) -> list[dict]:
        with self.db.read() as cur:
            rows = cur.execute(
                "SELECT id, proposer, param, value, created_at, ends_at, status, yes, no FROM proposals ORDER BY id"
            ).all()
        keys = ("id", "proposer", "param", "value", "created_at", "ends_at", "status", "yes", "no")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # ---- reads ----------------------------------------------------------------------------

    def _exists(self, cur: Cursor, account: str) -> bool:
        return cur.execute("SELECT 1 FROM accounts WHERE name = ?", (account,)).one() is not None

    def _param(self, cur: Cursor, name: str) -> int:
        return cur.execute("SELECT value FROM params WHERE name = ?", (name,)).scalar()

    def _params(self, cur: Cursor) -> dict[str, int]:
        return dict(cur.execute("SELECT name, value FROM params").all())

    def params(self) -> dict[str, int]:
        with self.db.read() as cur:
            return {k: v for k, v in self._params(cur).items() if k in BOUNDS}

    def balance(self, account: str) -> int:
        with self.db.read() as cur:
            return self._balance(cur, account)

    def balances(self, kind: str | None = None) -> dict[str, int]:
        with self.db.read() as cur:
            if kind is None:
                return dict(cur.execute("SELECT name, balance FROM accounts ORDER BY name").all())
            return dict(cur.execute("SELECT name, balance FROM accounts WHERE kind = ? ORDER BY name", (kind,)).all())

    def stake_of(self, name: str) -> int:
        with self.db.read() as cur:
            return self._balance(cur, stake_account(name)) if self._exists(cur, stake_account(name)) else 0

    def history(self, account: str, limit: int = 50) -> list[dict]:
        with self.db.read() as cur:
            self._balance(cur, account)
            rows = cur.execute(
                "SELECT e.id, e.idem, e.kind, e.cause, e.at, p.debit, p.credit, p.amount FROM postings p "
                "JOIN entries e ON e.id = p.entry_id WHERE p.debit = ? OR p.credit = ? ORDER BY e.id DESC LIMIT ?",
                (account, account, limit),
            ).all()
        keys = ("entry", "idem", "kind", "cause", "at", "debit", "credit", "amount")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def audit(self, limit: int = 50) -> list[dict]:
        """Every entry an operator's command made (OPERATOR_KINDS), newest first: when, what kind,
        the accounts (debit then credit; for a grant or revoke the account, with the client
        certificate in `client`), the amount (0 for grants), its id and its cause (a treasury
        spend's is `proposal:<id>`)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise LedgerError(f"an audit lists at least one entry: --limit {limit!r}")
        marks = ", ".join("?" * len(OPERATOR_KINDS))
        with self.db.read() as cur:
            entries = cur.execute(
                f"SELECT id, at, kind, idem, cause FROM entries WHERE kind IN ({marks}) ORDER BY id DESC LIMIT ?",
                (*OPERATOR_KINDS, limit),
            ).all()
            ids = [e[0] for e in entries]
            postings: dict[int, list[tuple[str, str, int]]] = {}
            grants: dict[str, tuple[str, str]] = {}
            if ids:
                for entry, debit, credit, amount in cur.execute(
                    f"SELECT entry_id, debit, credit, amount FROM postings WHERE entry_id IN "
                    f"({', '.join('?' * len(ids))}) ORDER BY entry_id",
                    ids,
                ).all():
                    postings.setdefault(entry, []).append((debit, credit, amount))
                idems = [e[3] for e in entries if e[2] in ("grant", "revoke")]
                if idems:
                    named = ", ".join("?" * len(idems))
                    for account, client, granted, revoked in cur.execute(
                        "SELECT account, client, grant_idem, revoke_idem FROM grants "
                        f"WHERE grant_idem IN ({named}) OR revoke_idem IN ({named})",
                        (*idems, *idems),
                    ).all():
                        grants[granted] = (account, client)
                        if revoked is not None:
                            grants[revoked] = (account, client)
        rows = []
        for entry, at, kind, idem, cause in entries:
            moved = postings.get(entry, [])
            account, client = grants.get(idem, (None, None))
            accounts = (
                [user(account)] if account is not None else list(dict.fromkeys(a for d, c, _ in moved for a in (d, c)))
            )
            rows.append(
                {
                    "entry": entry,
                    "at": at,
                    "kind": kind,
                    "accounts": accounts,
                    "amount": sum(a for _, _, a in moved),
                    "client": client,
                    "idem": idem,
                    "cause": cause,
                }
            )
        return rows

    def leaderboard(self, by: str = "owner", limit: int = 20) -> list[tuple[str, int]]:
        column = {"owner": "owner", "worker": "worker"}[by]
        with self.db.read() as cur:
            return [
                tuple(r)
                for r in cur.execute(
                    f"SELECT {column}, SUM(units) AS u FROM credits GROUP BY {column} ORDER BY u DESC, 1 LIMIT ?",
                    (limit,),
                ).all()
            ]

    def report(self) -> dict:
        """The public transparency report (integers of the smallest unit)."""
        with self.db.read() as cur:
            bal = dict(cur.execute("SELECT name, balance FROM accounts").all())
            kinds = dict(cur.execute("SELECT name, kind FROM accounts").all())

            def sum_kind(*ks: str) -> int:
                return sum(b for n, b in bal.items() if kinds[n] in ks)

            def credited(kind: str, to_kinds: tuple[str, ...]) -> int:
                rows = cur.execute(
                    "SELECT p.credit, p.amount FROM postings p JOIN entries e ON e.id = p.entry_id WHERE e.kind = ?",
                    (kind,),
                ).all()
                return sum(a for c, a in rows if kinds.get(c) in to_kinds)

            max_supply = self._param(cur, "max_supply")
            return {
                "max_supply": max_supply,
                "minted": -bal["issuance"],
                "burned": bal["burn"],
                "treasury": bal["treasury"],
                "emission_pool": bal["emission"],
                "escrow": bal["escrow"],
                "balances_total": sum(b for n, b in bal.items() if n not in ("issuance", "burn")),
                "staked_total": sum_kind("stake"),
                "unbonding_total": sum_kind("unbonding"),
                "vesting_locked": sum_kind("vesting"),
                "fees": cur.execute("SELECT COALESCE(SUM(fee), 0) FROM holds WHERE settled = 1").scalar(0),
                "rewards": credited("settle", ("provider",)) + credited("emission", ("provider",)),
                "emitted": credited("emission", ("provider",)),
                "slashed": cur.execute("SELECT COALESCE(SUM(amount), 0) FROM slashes").scalar(0),
                "treasury_spent": cur.execute(
                    "SELECT COALESCE(SUM(p.amount), 0) FROM postings p JOIN entries e "
                    "ON e.id = p.entry_id WHERE e.kind = 'treasury-spend'"
                ).scalar(0),
                "accounts": len(bal),
                "entries": cur.execute("SELECT COUNT(*) FROM entries").scalar(0),
            }

    def _spend_problems(self, cur: Cursor) -> list[str]:
        """Each passed treasury spend paid exactly once, as voted; no treasury spend without one."""
        voted = {
            f"treasury-spend:{i}": (param.removeprefix("spend:"), value)
            for i, param, value in cur.execute(
                "SELECT id, param, value FROM proposals WHERE status = 'passed' AND param LIKE ?", ("spend:%",)
            ).all()
        }
        paid: dict[str, list[tuple[str, str, int]]] = {}
        for idem, debit, credit, amount in cur.execute(
            "SELECT e.idem, p.debit, p.credit, p.amount FROM entries e JOIN postings p ON p.entry_id = e.id "
            "WHERE e.kind = 'treasury-spend'"
        ).all():
            paid.setdefault(idem, []).append((debit, credit, amount))
        problems = [f"{idem}: a treasury spend without a passed proposal" for idem in sorted(set(paid) - set(voted))]
        for idem, (dest, amount) in sorted(voted.items()):
            if paid.get(idem) != [("treasury", dest, amount)]:
                problems.append(f"{idem}: voted {amount} to {dest}, paid {paid.get(idem, 'nothing')}")
        return problems

    def check_invariants(self) -> list[str]:
        """What an auditor checks; an empty list means the books balance."""
        problems = []
        with self.db.read() as cur:
            bal = dict(cur.execute("SELECT name, balance FROM accounts").all())
            kinds = dict(cur.execute("SELECT name, kind FROM accounts").all())
            flows: dict[str, int] = {}
            for debit, credit, amount in cur.execute("SELECT debit, credit, amount FROM postings").all():
                flows[debit] = flows.get(debit, 0) - amount
                flows[credit] = flows.get(credit, 0) + amount
            if sum(bal.values()) != 0:
                problems.append(f"balances sum to {sum(bal.values())}, not 0: debits and credits differ")
            for name, b in bal.items():
                if flows.get(name, 0) != b:
                    problems.append(f"{name}: balance {b} but its postings sum to {flows.get(name, 0)}")
                if b < 0 and kinds[name] != "issuance":
                    problems.append(f"{name} is below zero: {b}")
            if bal:
                minted, burned = -bal.get("issuance", 0), bal.get("burn", 0)
                held = sum(b for n, b in bal.items() if n not in ("issuance", "burn"))
                if minted != held + burned:
                    problems.append(f"minted {minted} != balances {held} + burned {burned}")
                if minted > self._param(cur, "max_supply"):
                    problems.append(f"minted {minted} exceeds the max supply")
                escrowed = cur.execute("SELECT COALESCE(SUM(amount), 0) FROM holds WHERE state = 'open'").scalar(0)
                if bal.get("escrow", 0) != escrowed:
                    problems.append(f"escrow holds {bal.get('escrow', 0)} but open holds sum to {escrowed}")
                for request, state, settled in cur.execute(
                    "SELECT request, state, settled FROM holds WHERE NOT ((state = 'open' AND settled = 0) "
                    "OR (state IN ('settled', 'expired') AND settled = 1)) ORDER BY request LIMIT 10"
                ).all():
                    problems.append(f"hold {request}: state {state!r} with settled={settled}")
                problems += self._spend_problems(cur)
                for name in (n for n, k in kinds.items() if k == "unbonding"):
                    rows = cur.execute(
                        "SELECT COALESCE(SUM(amount), 0) FROM unbonding WHERE provider = ?", (name.split(":", 1)[1],)
                    ).scalar(0)
                    if rows != bal[name]:
                        problems.append(f"{name} holds {bal[name]} but its unbonding rows sum to {rows}")
                for bucket, total, released in cur.execute("SELECT bucket, total, released FROM vesting").all():
                    if bal.get(f"vesting:{bucket}") != total - released:
                        problems.append(
                            f"vesting:{bucket} holds {bal.get(f'vesting:{bucket}')}, not {total} - {released} released"
                        )
        return problems
