"""The NEURO books: double-entry movements with idempotency ids, over `ledger/db.py`.

Every movement is one entry of postings (debit account -> credit account, a positive integer
amount), written in one serialised transaction after every check passed: nothing is written
when a check fails. An entry carries an idempotency id (`idem`) and the cause id of the trust
event or request behind it; replaying an id returns the first receipt and moves nothing (an id
reused for a different request is refused). The rules themselves are `ledger/policy.py`'s.

Accounts: `issuance` (the only one that goes negative: minus what was minted), `treasury`,
`burn` (the sink), `emission` (the providers' emission pool), `escrow` (held fees), genesis
allocations `genesis:<name>` and `vesting:<name>`, users `user:<id>`, and for each provider
`provider:<id>` (spendable), `stake:<id>` (locked) and `unbonding:<id>` (leaving, still
slashable). Time is passed in (`now`, seconds since the epoch), never read here.
"""

from __future__ import annotations

import hashlib
import json
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
    ParamError,
    UnknownAccountError,
)
from neuro_dask.ledger.params import BOUNDS, LedgerConfig, check_adoption, check_consistent, check_param, is_adoption

SYSTEM = {"issuance": "issuance", "treasury": "treasury", "burn": "burn", "emission": "emission", "escrow": "escrow"}
TRANSFERABLE = ("user", "provider", "genesis", "treasury")  # kinds a plain transfer may draw from
# The ids the ledger derives for its own entries: a caller's id must not take one (it would block
# that entry for good: a release, an emission, a slash).
RESERVED_IDEMS = ("hold:", "settle:", "emission:", "slash:", "unbonded:", "vest:")


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
        raise LedgerError(f"entry id {idem!r} is reserved for the ledger's own entries "
                          f"(genesis, {', '.join(p + '...' for p in RESERVED_IDEMS)}): choose another")


def _units(value: object, what: str = "work units") -> int:
    """A count of work (expert-tokens): an integer >= 0 that fits the books."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
        raise BadAmountError(value, f"{what} must be an integer >= 0 (and below 2**62)")
    return value


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

    def _apply(self, cur: Cursor, idem: str, kind: str, cause: str, now: float, request: Mapping,
               postings: Iterable[Posting]) -> Receipt:
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
        entry = cur.execute("INSERT INTO entries (idem, kind, cause, at, fingerprint) VALUES (?, ?, ?, ?, ?) "
                            "RETURNING id", (idem, kind, cause, now, _fingerprint(kind, request))).scalar()
        for p in postings:
            cur.execute("INSERT INTO postings (entry_id, debit, credit, amount) VALUES (?, ?, ?, ?)",
                        (entry, p.debit, p.credit, p.amount))
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
        request = {"max_supply": cfg.max_supply, "allocations": dict(cfg.allocation_bps),
                   "emission_pool_bps": cfg.emission_pool_bps}
        with self.db.write() as cur:
            if (done := self._replay(cur, "genesis", "genesis", request)) is not None:
                return done
            for name, kind in SYSTEM.items():
                self._open(cur, name, kind)
            community = cfg.allocation("community")
            emission = community * cfg.emission_pool_bps // policy.BPS
            targets = {"emission": emission, "genesis:community": community - emission,
                       "treasury": cfg.allocation("treasury"), "genesis:liquidity": cfg.allocation("liquidity")}
            for bucket in ("team", "investors"):
                self._open(cur, f"genesis:{bucket}", "genesis")
                self._open(cur, f"vesting:{bucket}", "vesting")
                targets[f"vesting:{bucket}"] = cfg.allocation(bucket)
                vest = cfg.vesting.get(bucket)
                cur.execute("INSERT INTO vesting (bucket, total, start, months, cliff_months) VALUES (?, ?, ?, ?, ?)",
                            (bucket, cfg.allocation(bucket), now, vest.months if vest else 0,
                             vest.cliff_months if vest else 0))
            for name in ("genesis:community", "genesis:liquidity"):
                self._open(cur, name, "genesis")
            for name, value in {**cfg.params, "max_supply": cfg.max_supply}.items():
                cur.execute("INSERT INTO params (name, value) VALUES (?, ?)", (name, value))
            return self._apply(cur, "genesis", "genesis", "genesis", now, request,
                               [Posting("issuance", account, amount) for account, amount in targets.items()])

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

    def transfer(self, source: str, dest: str, amount: int, idem: str, cause: str = "", now: float = 0.0,
                 kind: str = "transfer") -> Receipt:
        """Spendable to spendable (users, providers, genesis pools, treasury); never from locked,
        unvested, escrowed or burned funds."""
        request = {"source": source, "dest": dest, "amount": amount}
        _caller_idem(idem)
        if kind not in ("transfer", "deposit"):
            raise LedgerError(f"a transfer is recorded as 'transfer' or 'deposit', not {kind!r}")
        with self.db.write() as cur:
            if (done := self._replay(cur, idem, kind, request)) is not None:
                return done
            _amount(amount)
            for account in (source, dest):
                self._balance(cur, account)  # both must exist
            src_kind = cur.execute("SELECT kind FROM accounts WHERE name = ?", (source,)).scalar()
            dst_kind = cur.execute("SELECT kind FROM accounts WHERE name = ?", (dest,)).scalar()
            if src_kind not in TRANSFERABLE or dst_kind not in ("user", "provider", "treasury", "genesis"):
                raise LedgerError(f"a transfer cannot move {src_kind} funds ({source}) to {dst_kind} ({dest}); "
                                  "stake, unstake, release, hold and settle move the others")
            return self._apply(cur, idem, kind, cause, now, request, [Posting(source, dest, amount)])

    def deposit(self, name: str, amount: int, idem: str, source: str = "genesis:community", cause: str = "",
                now: float = 0.0) -> Receipt:
        """Fund user `name` from a genesis pool (the community grants, or liquidity)."""
        return self.transfer(source, user(name), amount, idem, cause, now, kind="deposit")

    # ---- staking --------------------------------------------------------------------------

    def stake_from_community(self, name: str, idem: str, amount: int | None = None, owner: str = "",
                             now: float = 0.0) -> None:
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
            return self._apply(cur, idem, "stake", "", now, request,
                               [Posting(provider(name), stake_account(name), amount)])

    def unstake(self, name: str, amount: int, idem: str, now: float) -> Receipt:
        """Locked stake starts unbonding: spendable after `unbonding_seconds`, slashable until then."""
        request = {"provider": name, "amount": amount}
        _caller_idem(idem)
        with self.db.write() as cur:
            if (done := self._replay(cur, idem, "unstake", request)) is not None:
                return done
            _amount(amount)
            receipt = self._apply(cur, idem, "unstake", "", now, request,
                                  [Posting(stake_account(name), unbonding_account(name), amount)])
            cur.execute("INSERT INTO unbonding (provider, amount, release_at) VALUES (?, ?, ?)",
                        (name, amount, now + self._param(cur, "unbonding_seconds")))
            return receipt

    def release_unbonded(self, now: float) -> list[Receipt]:
        """Every unbonding that has matured by `now` becomes spendable (one entry per unbonding)."""
        receipts = []
        with self.db.write() as cur:
            rows = cur.execute("SELECT id, provider, amount FROM unbonding WHERE release_at <= ? ORDER BY id",
                               (now,)).all()
            for row_id, name, amount in rows:
                cur.execute("DELETE FROM unbonding WHERE id = ?", (row_id,))
                if amount > 0:
                    receipts.append(self._apply(cur, f"unbonded:{row_id}", "unbonded", "", now, {"row": row_id},
                                                [Posting(unbonding_account(name), provider(name), amount)]))
        return receipts

    # ---- fees -----------------------------------------------------------------------------

    def quote(self, expert_tokens: int, requests: int = 1, private_tokens: int = 0) -> int:
        """The price list: per request, plus per expert-token computed (on the standard tier),
        plus per expert-token computed on secret shares (the private tier)."""
        if min(expert_tokens, requests, private_tokens) < 0:
            raise BadAmountError(min(expert_tokens, requests, private_tokens), "counts must be >= 0")
        p = self.params()
        return (requests * p["price_per_request"] + expert_tokens * p["price_per_expert_token"]
                + private_tokens * p["price_per_private_expert_token"])

    def hold(self, client: str, request: str, amount: int, now: float = 0.0, cause: str = "") -> Receipt:
        """Before any work: the quoted maximum moves from the client to escrow, or nothing does
        (InsufficientFundsError: the client is refused)."""
        spec = {"client": client, "request": request, "amount": amount}
        idem = f"hold:{request}"
        with self.db.write() as cur:
            if (done := self._replay(cur, idem, "hold", spec)) is not None:
                return done
            _amount(amount)
            receipt = self._apply(cur, idem, "hold", cause or request, now, spec,
                                  [Posting(user(client), "escrow", amount)])
            cur.execute("INSERT INTO holds (request, client, amount) VALUES (?, ?, ?)", (request, client, amount))
            return receipt

    def settle(self, request: str, fee: int, work: Mapping[str, int], now: float = 0.0) -> Receipt:
        """After the job: the fee (at most what was held) splits by policy rule 1 among the
        providers with validated work, the treasury and the burn; the rest goes back to the client."""
        spec = {"request": request, "fee": fee, "work": dict(sorted(work.items()))}
        idem = f"settle:{request}"
        with self.db.write() as cur:
            if (done := self._replay(cur, idem, "settle", spec)) is not None:
                return done
            if isinstance(fee, bool) or not isinstance(fee, int) or fee < 0:
                raise BadAmountError(fee, "a fee must be an integer >= 0")
            row = cur.execute("SELECT client, amount, settled FROM holds WHERE request = ?", (request,)).one()
            if row is None:
                raise LedgerError(f"request {request!r} has no hold to settle")
            client, held, settled = row
            if settled:
                raise LedgerError(f"request {request!r} is already settled")
            charged = min(fee, held)
            p = self._params(cur)
            known = {w: _units(u) for w, u in work.items() if self._exists(cur, provider(w))}
            split = policy.split_fee(charged, known, p["treasury_bps"], p["burn_bps"])
            postings = [Posting("escrow", provider(w), a) for w, a in split.providers.items()]
            postings += [Posting("escrow", "treasury", split.treasury), Posting("escrow", "burn", split.burn),
                         Posting("escrow", user(client), held - charged)]
            receipt = self._apply(cur, idem, "settle", request, now, spec, postings)
            cur.execute("UPDATE holds SET settled = 1, fee = ? WHERE request = ?", (charged, request))
            return receipt

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
                _units(units)
                row = cur.execute("SELECT units FROM credits WHERE worker = ? AND epoch = ?", (worker, epoch)).one()
                if row is None:
                    cur.execute("INSERT INTO credits (worker, owner, epoch, units) VALUES (?, ?, ?, ?)",
                                (worker, owner or worker, epoch, units))
                else:
                    cur.execute("UPDATE credits SET units = units + ? WHERE worker = ? AND epoch = ?",
                                (units, worker, epoch))
            self._apply(cur, idem, "credit", "", now, spec, [])

    def emit(self, epoch: int, now: float = 0.0) -> Receipt:
        """Policy rule 2 for one epoch, once: the emission pool pays providers by their credits."""
        _units(epoch, "an epoch")
        idem = f"emission:{epoch}"
        with self.db.write() as cur:
            if (done := self._replay(cur, idem, "emission", {"epoch": epoch})) is not None:
                return done
            p = self._params(cur)
            amount = policy.emission_for_epoch(epoch, p["emission_initial"], p["emission_decay_bps"],
                                               self._balance(cur, "emission"))
            credits = {w: u for w, u in cur.execute("SELECT worker, units FROM credits WHERE epoch = ?",
                                                    (epoch,)).all() if self._exists(cur, provider(w))}
            paid = policy.split_emission(amount, credits)
            receipt = self._apply(cur, idem, "emission", f"epoch:{epoch}", now, {"epoch": epoch},
                                  [Posting("emission", provider(w), a) for w, a in paid.items()])
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
            others = cur.execute("SELECT COUNT(DISTINCT provider) FROM slashes WHERE at >= ? AND provider <> ?",
                                 (since, name)).scalar(0)
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
            cur.execute("INSERT INTO slashes (provider, amount, bps, cause, at) VALUES (?, ?, ?, ?, ?)",
                        (name, amount, bps, cause, now))
            return receipt

    def _take_unbonding(self, cur: Cursor, name: str, amount: int) -> None:
        """Slash unbonding rows, the latest to mature first."""
        for row_id, row_amount in cur.execute("SELECT id, amount FROM unbonding WHERE provider = ? "
                                              "ORDER BY release_at DESC, id DESC", (name,)).all():
            if amount <= 0:
                return
            take = min(amount, row_amount)
            cur.execute("UPDATE unbonding SET amount = amount - ? WHERE id = ?", (take, row_id))
            amount -= take

    def release_vesting(self, bucket: str, now: float) -> Receipt | None:
        """Policy rule 3: whatever has vested since the last release moves to `genesis:<bucket>`."""
        with self.db.write() as cur:
            row = cur.execute("SELECT total, start, months, cliff_months, released FROM vesting WHERE bucket = ?",
                              (bucket,)).one()
            if row is None:
                raise UnknownAccountError(f"vesting:{bucket}")
            total, start, months, cliff, released = row
            due = policy.vested(total, start, now, months, cliff) - released
            if due <= 0:
                return None
            receipt = self._apply(cur, f"vest:{bucket}:{released + due}", "vest", bucket, now, {"bucket": bucket},
                                  [Posting(f"vesting:{bucket}", f"genesis:{bucket}", due)])
            cur.execute("UPDATE vesting SET released = released + ? WHERE bucket = ?", (due, bucket))
            return receipt

    # ---- governance -----------------------------------------------------------------------

    def propose(self, proposer: str, param: str, value: int, now: float, idem: str) -> int:
        """A change of one protocol parameter, by a provider with stake; inside the bounds. Or the
        adoption of a model version: param "adopt:CHANNEL:MODEL_ID", value 1 (params.check_adoption)."""
        with self.db.write() as cur:
            row = cur.execute("SELECT id, proposer, param, value FROM proposals WHERE idem = ?", (idem,)).one()
            if row is not None:
                if row[1:] != (proposer, param, value):
                    raise IdempotencyConflictError(idem)
                return row[0]
            if is_adoption(param):
                check_adoption(param, value)
            else:
                check_param(param, value)
                check_consistent({**self._params(cur), param: value})
            if not self._exists(cur, stake_account(proposer)) or self._balance(cur, stake_account(proposer)) <= 0:
                raise GovernanceError(f"{proposer} has no stake: only staked providers propose")
            ends = now + self._param(cur, "voting_seconds")
            return cur.execute("INSERT INTO proposals (proposer, param, value, created_at, ends_at, status, idem) "
                               "VALUES (?, ?, ?, ?, ?, 'open', ?) RETURNING id",
                               (proposer, param, value, now, ends, idem)).scalar()

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
            cur.execute("INSERT INTO votes (proposal, voter, yes, weight, at) VALUES (?, ?, ?, ?, ?)",
                        (proposal, voter, int(bool(yes)), weight, now))
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
            row = cur.execute("SELECT param, value, ends_at, status, yes, no FROM proposals WHERE id = ?",
                              (proposal,)).one()
            if row is None:
                raise GovernanceError(f"no proposal {proposal}")
            param, value, ends, status, yes, no = row
            if status != "open":
                return {"proposal": proposal, "status": status, "param": param, "value": value, "yes": yes, "no": no}
            if now < ends:
                raise GovernanceError(f"proposal {proposal} is open until {ends}; tally it after")
            total = cur.execute("SELECT COALESCE(SUM(balance), 0) FROM accounts "
                                "WHERE kind IN ('stake', 'unbonding')").scalar(0)
            yes = no = 0
            for voter, voted_yes, weight in cur.execute("SELECT voter, yes, weight FROM votes WHERE proposal = ?",
                                                        (proposal,)).all():
                bonded = self._balance(cur, stake_account(voter)) + self._balance(cur, unbonding_account(voter))
                if voted_yes:
                    yes += min(weight, bonded)
                else:
                    no += min(weight, bonded)
            p = self._params(cur)
            result = policy.tally(yes, no, total, p["gov_quorum_bps"], p["gov_threshold_bps"])
            passed = result.passed
            if passed and not is_adoption(param):
                try:
                    check_param(param, value)
                    check_consistent({**p, param: value})
                except ParamError:
                    passed = False  # another change since the proposal made this one inconsistent
            status = "passed" if passed else ("rejected" if result.quorum_met else "no-quorum")
            if passed and is_adoption(param):
                channel, model = check_adoption(param, value)
                cur.execute("INSERT INTO adoptions (proposal, channel, model, at) VALUES (?, ?, ?, ?)",
                            (proposal, channel, model, now))
            elif passed:
                cur.execute("INSERT INTO param_changes (name, old, new, proposal, at) VALUES (?, ?, ?, ?, ?)",
                            (param, p[param], value, proposal, now))
                cur.execute("UPDATE params SET value = ? WHERE name = ?", (value, param))
            cur.execute("UPDATE proposals SET status = ?, yes = ?, no = ? WHERE id = ?", (status, yes, no, proposal))
            return {"proposal": proposal, "status": status, "param": param, "value": value, "yes": yes, "no": no,
                    "total_stake": total}

    def adoptions(self, after: int = 0) -> list[dict]:
        """Model versions adopted by a passed vote, in proposal order (after proposal id `after`)."""
        with self.db.read() as cur:
            rows = cur.execute("SELECT proposal, channel, model, at FROM adoptions WHERE proposal > ? "
                               "ORDER BY proposal", (after,)).all()
        return [dict(zip(("proposal", "channel", "model", "at"), r, strict=True)) for r in rows]

    def proposals(self) -> list[dict]:
        with self.db.read() as cur:
            rows = cur.execute("SELECT id, proposer, param, value, created_at, ends_at, status, yes, no "
                               "FROM proposals ORDER BY id").all()
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
                (account, account, limit)).all()
        keys = ("entry", "idem", "kind", "cause", "at", "debit", "credit", "amount")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def leaderboard(self, by: str = "owner", limit: int = 20) -> list[tuple[str, int]]:
        column = {"owner": "owner", "worker": "worker"}[by]
        with self.db.read() as cur:
            return [tuple(r) for r in cur.execute(f"SELECT {column}, SUM(units) AS u FROM credits GROUP BY {column} "
                                                  "ORDER BY u DESC, 1 LIMIT ?", (limit,)).all()]

    def report(self) -> dict:
        """The public transparency report (integers of the smallest unit)."""
        with self.db.read() as cur:
            bal = dict(cur.execute("SELECT name, balance FROM accounts").all())
            kinds = dict(cur.execute("SELECT name, kind FROM accounts").all())

            def sum_kind(*ks: str) -> int:
                return sum(b for n, b in bal.items() if kinds[n] in ks)

            def credited(kind: str, to_kinds: tuple[str, ...]) -> int:
                rows = cur.execute("SELECT p.credit, p.amount FROM postings p JOIN entries e ON e.id = p.entry_id "
                                   "WHERE e.kind = ?", (kind,)).all()
                return sum(a for c, a in rows if kinds.get(c) in to_kinds)

            max_supply = self._param(cur, "max_supply")
            return {
                "max_supply": max_supply, "minted": -bal["issuance"], "burned": bal["burn"],
                "treasury": bal["treasury"], "emission_pool": bal["emission"], "escrow": bal["escrow"],
                "balances_total": sum(b for n, b in bal.items() if n not in ("issuance", "burn")),
                "staked_total": sum_kind("stake"), "unbonding_total": sum_kind("unbonding"),
                "vesting_locked": sum_kind("vesting"),
                "fees": cur.execute("SELECT COALESCE(SUM(fee), 0) FROM holds WHERE settled = 1").scalar(0),
                "rewards": credited("settle", ("provider",)) + credited("emission", ("provider",)),
                "emitted": credited("emission", ("provider",)),
                "slashed": cur.execute("SELECT COALESCE(SUM(amount), 0) FROM slashes").scalar(0),
                "accounts": len(bal), "entries": cur.execute("SELECT COUNT(*) FROM entries").scalar(0),
            }

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
                escrowed = cur.execute("SELECT COALESCE(SUM(amount), 0) FROM holds WHERE settled = 0").scalar(0)
                if bal.get("escrow", 0) != escrowed:
                    problems.append(f"escrow holds {bal.get('escrow', 0)} but open holds sum to {escrowed}")
                for name in (n for n, k in kinds.items() if k == "unbonding"):
                    rows = cur.execute("SELECT COALESCE(SUM(amount), 0) FROM unbonding WHERE provider = ?",
                                       (name.split(":", 1)[1],)).scalar(0)
                    if rows != bal[name]:
                        problems.append(f"{name} holds {bal[name]} but its unbonding rows sum to {rows}")
                for bucket, total, released in cur.execute("SELECT bucket, total, released FROM vesting").all():
                    if bal.get(f"vesting:{bucket}") != total - released:
                        problems.append(f"vesting:{bucket} holds {bal.get(f'vesting:{bucket}')}, "
                                        f"not {total} - {released} released")
        return problems
