"""The ledger's books, by example: each operation, and each refusal (which must write nothing)."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest

from neuro_dask.ledger import (
    BOUNDS,
    UNIT,
    AccountExistsError,
    BadAmountError,
    GovernanceError,
    IdempotencyConflictError,
    InsufficientFundsError,
    Ledger,
    LedgerConfig,
    LedgerError,
    ParamError,
    UnknownAccountError,
    neuro,
    provider,
    stake_account,
    unbonding_account,
    user,
)
from neuro_dask.ledger.params import DEFAULT_PARAMS
from neuro_dask.ledger.policy import BPS, MONTH

T0 = 1_700_000_000.0
DAY = 86_400.0
TABLES = (
    "accounts",
    "entries",
    "postings",
    "vesting",
    "unbonding",
    "holds",
    "credits",
    "emissions",
    "slashes",
    "params",
    "param_changes",
    "proposals",
    "votes",
    "adoptions",
    "grants",
)
BAD_AMOUNTS = [-1, -UNIT, 0, 1.0, 0.5, float("nan"), True, False, "5", None, Decimal(5), Fraction(5, 1), [5]]


def dump(ledger: Ledger) -> dict[str, list[tuple]]:
    """Every row of every table: what "nothing was written" compares."""
    with ledger.db.read() as cur:
        return {t: sorted(cur.execute(f"SELECT * FROM {t}").all(), key=repr) for t in TABLES}


def refused(ledger: Ledger, error: type[BaseException], fn, *args, match: str | None = None, **kwargs):
    """`fn(*args, **kwargs)` raises `error` and writes nothing."""
    before, report = dump(ledger), ledger.report()
    with pytest.raises(error, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, LedgerError)
    assert dump(ledger) == before
    assert ledger.report() == report
    assert ledger.check_invariants() == []
    return info.value


@pytest.fixture
def ledger():
    led = Ledger.open("sqlite://:memory:", now=T0)
    yield led
    assert led.check_invariants() == []
    assert led.db.integrity_check() == "ok"
    led.close()


def funded_user(led: Ledger, name: str, amount: int) -> str:
    led.open_user(name)
    led.deposit(name, amount, f"fund-{name}")
    return user(name)


def staked_provider(led: Ledger, name: str, amount: int, owner: str = "") -> str:
    led.open_provider(name, owner)
    led.transfer("genesis:community", provider(name), amount, f"fund-{name}")
    led.stake(name, amount, f"stake-{name}")
    return provider(name)


# ---- genesis, accounts -------------------------------------------------------------------------


def test_genesis_mints_the_max_supply_once(tmp_path):
    url = f"sqlite:///{tmp_path}/books.db"
    led = Ledger.open(url, now=T0)
    cfg = LedgerConfig()
    r = led.report()
    assert r["minted"] == r["max_supply"] == cfg.max_supply
    assert r["burned"] == 0 and r["balances_total"] == cfg.max_supply
    b = led.balances()
    assert b["vesting:team"] == cfg.allocation("team")
    assert b["vesting:investors"] == cfg.allocation("investors")
    assert b["treasury"] == cfg.allocation("treasury")
    assert b["genesis:liquidity"] == cfg.allocation("liquidity")
    assert b["emission"] + b["genesis:community"] == cfg.allocation("community")
    assert b["emission"] == cfg.allocation("community") * cfg.emission_pool_bps // BPS
    live = led.params()
    assert set(BOUNDS) <= set(live) and live == {k: DEFAULT_PARAMS[k] for k in live}
    led.close()
    again = Ledger.open(url, now=T0 + 100)  # a second open replays genesis
    assert again.report() == r
    assert again.genesis(T0 + 200).replayed
    assert again.check_invariants() == []
    again.close()


def test_accounts(ledger):
    assert ledger.open_user("alice") == "user:alice"
    refused(ledger, AccountExistsError, ledger.open_user, "alice")
    assert ledger.open_user("alice", exist_ok=True) == "user:alice"
    assert ledger.open_provider("w1", "bob") == "provider:w1"
    refused(ledger, AccountExistsError, ledger.open_provider, "w1")
    assert ledger.open_provider("w1", exist_ok=True) == "provider:w1"
    b = ledger.balances()
    assert b[user("alice")] == b[provider("w1")] == b[stake_account("w1")] == b[unbonding_account("w1")] == 0
    assert ledger.balances("provider") == {"provider:w1": 0}
    refused(ledger, UnknownAccountError, ledger.balance, "user:nobody")
    refused(ledger, UnknownAccountError, ledger.history, "user:nobody")
    assert ledger.stake_of("nobody") == 0


# ---- transfers and deposits ---------------------------------------------------------------------


def test_transfer_and_deposit(ledger):
    a = funded_user(ledger, "a", neuro(100))
    ledger.open_user("b")
    r = ledger.transfer(a, user("b"), neuro(30), "t1", cause="gift", now=T0)
    assert not r.replayed and r.kind == "transfer" and r.total_to(user("b")) == neuro(30)
    assert ledger.balance(a) == neuro(70) and ledger.balance(user("b")) == neuro(30)
    assert [h["idem"] for h in ledger.history(a)] == ["t1", "fund-a"]
    d = ledger.deposit("b", neuro(1), "dep-liq", source="genesis:liquidity")
    assert d.kind == "deposit" and ledger.balance(user("b")) == neuro(31)
    assert ledger.check_invariants() == []


@pytest.mark.parametrize("bad", BAD_AMOUNTS, ids=repr)
def test_bad_amounts_are_refused_everywhere(ledger, bad):
    a = funded_user(ledger, "a", neuro(10))
    ledger.open_user("b")
    staked_provider(ledger, "w", neuro(10))
    ledger.transfer("genesis:community", provider("w"), neuro(5), "fund-w-more")
    refused(ledger, BadAmountError, ledger.transfer, a, user("b"), bad, "t-bad")
    refused(ledger, BadAmountError, ledger.deposit, "b", bad, "d-bad")
    refused(ledger, BadAmountError, ledger.stake, "w", bad, "s-bad")
    refused(ledger, BadAmountError, ledger.unstake, "w", bad, "u-bad", T0)
    refused(ledger, BadAmountError, ledger.hold, "a", "req-bad", bad)
    # the idem ids stay free: the same ids work with good amounts afterwards
    ledger.transfer(a, user("b"), 1, "t-bad")
    ledger.hold("a", "req-bad", 1)


@pytest.mark.parametrize("bad", [-1, 1.0, True, "5", None, Decimal(1)], ids=repr)
def test_bad_fees_and_work_units_are_refused(ledger, bad):
    funded_user(ledger, "a", neuro(10))
    ledger.open_provider("w")
    ledger.hold("a", "r1", 1_000)
    refused(ledger, BadAmountError, ledger.settle, "r1", bad, {"w": 5})
    refused(ledger, BadAmountError, ledger.credit_work, {"w": ("o", 5), "x": ("o", bad)}, 1, "cw-bad")
    assert ledger.settle("r1", 0, {"w": 5}).total_to(user("a")) == 1_000  # a zero fee refunds everything


def test_unknown_accounts_are_refused(ledger):
    a = funded_user(ledger, "a", neuro(10))
    refused(ledger, UnknownAccountError, ledger.transfer, a, "user:ghost", 1, "t")
    refused(ledger, UnknownAccountError, ledger.transfer, "user:ghost", a, 1, "t")
    refused(ledger, UnknownAccountError, ledger.transfer, "nonsense", a, 1, "t")
    refused(ledger, UnknownAccountError, ledger.deposit, "ghost", 1, "d")
    refused(ledger, UnknownAccountError, ledger.deposit, "a", 1, "d", source="genesis:ghost")
    refused(ledger, UnknownAccountError, ledger.stake, "ghost", 1, "s")
    refused(ledger, UnknownAccountError, ledger.unstake, "ghost", 1, "u", T0)
    refused(ledger, UnknownAccountError, ledger.hold, "ghost", "r", 1)
    refused(ledger, UnknownAccountError, ledger.slash, "ghost", "fraud-1", T0)
    refused(ledger, UnknownAccountError, ledger.release_vesting, "ghost", T0 + 50 * MONTH)
    err = refused(ledger, UnknownAccountError, ledger.transfer, a, "user:ghost", 1, "t")
    assert err.account == "user:ghost" and "open it first" in str(err)


def test_insufficient_funds_and_self_transfer(ledger):
    a = funded_user(ledger, "a", 100)
    ledger.open_user("b")
    err = refused(ledger, InsufficientFundsError, ledger.transfer, a, user("b"), 101, "t")
    assert (err.account, err.needed, err.available) == (a, 101, 100)
    refused(ledger, LedgerError, ledger.transfer, a, a, 1, "t", match="itself")
    ledger.transfer(a, user("b"), 100, "t")  # exactly the balance is fine
    assert ledger.balance(a) == 0


def test_double_spend_second_hold_refused(ledger):
    funded_user(ledger, "a", 1_000)
    ledger.hold("a", "r1", 600)
    err = refused(ledger, InsufficientFundsError, ledger.hold, "a", "r2", 600)
    assert err.available == 400
    assert ledger.balance("escrow") == 600
    ledger.hold("a", "r2", 400)  # the rest can still be held
    assert ledger.balance(user("a")) == 0
    refused(ledger, InsufficientFundsError, ledger.hold, "a", "r3", 1)
    ledger.open_user("b")
    refused(ledger, InsufficientFundsError, ledger.transfer, user("a"), user("b"), 1, "t")


@pytest.mark.parametrize(
    "source", ["stake:w", "unbonding:w", "vesting:team", "vesting:investors", "escrow", "burn", "issuance", "emission"]
)
def test_transfers_out_of_locked_accounts_are_refused(ledger, source):
    staked_provider(ledger, "w", neuro(10))
    ledger.unstake("w", neuro(3), "u", T0)
    funded_user(ledger, "a", neuro(10))
    ledger.hold("a", "r", neuro(1))
    ledger.settle("r", neuro(1), {})  # something in burn
    ledger.hold("a", "r2", neuro(1))  # something in escrow
    assert ledger.balance(source) != 0
    refused(ledger, LedgerError, ledger.transfer, source, user("a"), 1, "steal", match="cannot move")
    refused(ledger, LedgerError, ledger.transfer, source, provider("w"), 1, "steal", match="cannot move")
    refused(ledger, LedgerError, ledger.deposit, "a", 1, "steal", source=source, match="cannot move")


@pytest.mark.parametrize(
    "dest",
    [
        "stake:w",
        "unbonding:w",
        "vesting:team",
        "escrow",
        "burn",
        "issuance",
        "emission",
        "treasury",
        "genesis:team",
        "genesis:investors",
    ],
)
def test_transfers_into_locked_accounts_are_refused(ledger, dest):
    """Nor into the treasury (fees and slashes fill it) or a vested allocation (the operator would
    be enriching the team); a grant may only go back to the pools it is granted from."""
    staked_provider(ledger, "w", neuro(10))
    a = funded_user(ledger, "a", neuro(10))
    refused(ledger, LedgerError, ledger.transfer, a, dest, 1, "sneak", match="cannot move")


def test_vesting_cannot_be_moved_by_transfer(ledger):
    a = funded_user(ledger, "a", 1)
    for bucket in ("vesting:team", "vesting:investors"):
        refused(ledger, LedgerError, ledger.transfer, bucket, a, 1, "v", match="cannot move")
        refused(ledger, LedgerError, ledger.transfer, bucket, "genesis:team", 1, "v", match="cannot move")
        refused(ledger, LedgerError, ledger.transfer, bucket, "treasury", 1, "v", match="cannot move")


# ---- idempotency --------------------------------------------------------------------------------


def test_replay_returns_the_same_receipt_and_moves_nothing(ledger):
    a = funded_user(ledger, "a", neuro(10))
    ledger.open_user("b")
    first = ledger.transfer(a, user("b"), 5, "t1")
    before = dump(ledger)
    again = ledger.transfer(a, user("b"), 5, "t1")
    assert again.replayed and not first.replayed
    assert (again.entry, again.idem, again.kind, again.postings) == (
        first.entry,
        first.idem,
        first.kind,
        first.postings,
    )
    assert dump(ledger) == before
    # the same for every kind of movement with an id
    staked_provider(ledger, "w", neuro(5))
    ledger.transfer("genesis:community", provider("w"), neuro(5), "top-up-w")
    ledger.credit_work({"w": ("o", 3)}, 0, "cw0")
    calls = [
        lambda: ledger.deposit("b", 7, "d1"),
        lambda: ledger.stake("w", 1, "s-extra"),
        lambda: ledger.hold("a", "rq", 100),
        lambda: ledger.settle("rq", 50, {"w": 1}),
        lambda: ledger.unstake("w", 1, "u1", T0),
        lambda: ledger.slash("w", "fraud", T0),
        lambda: ledger.emit(0, T0),
        lambda: ledger.genesis(T0),
    ]
    for call in calls:
        r1 = call()
        snap = dump(ledger)
        r2 = call()
        assert r2.replayed and (r2.entry, r2.kind, r2.postings) == (r1.entry, r1.kind, r1.postings), r1.kind
        assert dump(ledger) == snap
    assert ledger.check_invariants() == []


def test_credit_work_replay_counts_once(ledger):
    ledger.credit_work({"w": ("o", 5)}, 1, "cw1")
    ledger.credit_work({"w": ("o", 5)}, 1, "cw1")
    ledger.credit_work({"w": ("o", 2)}, 1, "cw2")
    assert ledger.leaderboard() == [("o", 7)]
    assert ledger.leaderboard(by="worker") == [("w", 7)]
    refused(ledger, IdempotencyConflictError, ledger.credit_work, {"w": ("o", 6)}, 1, "cw1")


def test_idem_reused_for_a_different_request_conflicts(ledger):
    a = funded_user(ledger, "a", neuro(10))
    ledger.open_user("b")
    staked_provider(ledger, "w", neuro(5))
    ledger.transfer(a, user("b"), 5, "t1")
    err = refused(ledger, IdempotencyConflictError, ledger.transfer, a, user("b"), 6, "t1")
    assert err.idem == "t1"
    refused(ledger, IdempotencyConflictError, ledger.transfer, user("b"), a, 5, "t1")
    refused(ledger, IdempotencyConflictError, ledger.deposit, "b", 5, "t1")  # same movement, another kind
    refused(ledger, IdempotencyConflictError, ledger.stake, "w", 5, "t1")
    refused(ledger, IdempotencyConflictError, ledger.unstake, "w", 5, "t1", T0)
    refused(ledger, IdempotencyConflictError, ledger.credit_work, {"w": ("o", 1)}, 1, "t1")
    refused(ledger, IdempotencyConflictError, ledger.transfer, a, user("b"), 5, "fund-a")
    # a conflicting id is refused even when the new request is itself invalid in other ways
    refused(ledger, IdempotencyConflictError, ledger.transfer, a, user("b"), 10**30, "t1")
    ledger.hold("a", "r1", 100)
    refused(ledger, IdempotencyConflictError, ledger.hold, "a", "r1", 101)
    refused(ledger, IdempotencyConflictError, ledger.hold, "b", "r1", 100)
    ledger.settle("r1", 10, {"w": 1})
    refused(ledger, IdempotencyConflictError, ledger.settle, "r1", 11, {"w": 1})
    refused(ledger, IdempotencyConflictError, ledger.settle, "r1", 10, {"w": 2})
    w = ledger.propose("w", "slash_bps", 2_000, T0, "p1")
    assert ledger.propose("w", "slash_bps", 2_000, T0 + 5, "p1") == w
    refused(ledger, IdempotencyConflictError, ledger.propose, "w", "slash_bps", 2_001, T0, "p1")


@pytest.mark.parametrize(
    "idem",
    ["genesis", "unbonded:1", "emission:0", "slash:fraud:w", "vest:team:5", "hold:r", "settle:r", "treasury-spend:1"],
)
def test_ids_the_ledger_derives_for_itself_are_refused_to_callers(ledger, idem):
    """A caller's id must not take an id the ledger derives for its own entries: it would block that
    entry for good (no unbonded stake released, an epoch never paid, a slash dodged)."""
    a = funded_user(ledger, "a", neuro(10))
    ledger.open_user("b")
    staked_provider(ledger, "w", neuro(10))
    ledger.transfer("genesis:community", provider("w"), neuro(1), "fund-w-more")
    refused(ledger, LedgerError, ledger.transfer, a, user("b"), 1, idem, match="reserved")
    refused(ledger, LedgerError, ledger.deposit, "b", 1, idem, match="reserved")
    refused(ledger, LedgerError, ledger.stake, "w", 1, idem, match="reserved")
    refused(ledger, LedgerError, ledger.unstake, "w", 1, idem, T0, match="reserved")
    refused(ledger, LedgerError, ledger.credit_work, {"w": ("o", 1)}, 0, idem, match="reserved")
    # and the ledger's own movements under those ids still happen
    ledger.unstake("w", neuro(1), "u", T0)
    assert [r.idem for r in ledger.release_unbonded(T0 + DEFAULT_PARAMS["unbonding_seconds"])] == ["unbonded:1"]
    ledger.credit_work({"w": ("o", 1)}, 0, "cw")
    assert ledger.emit(0, T0).total_to(provider("w")) == DEFAULT_PARAMS["emission_initial"]
    assert ledger.slash("w", "fraud", T0).total_to("treasury") > 0
    assert ledger.release_vesting("team", T0 + 48 * MONTH).idem.startswith("vest:team:")
    ledger.hold("a", "r", 10)
    assert not ledger.settle("r", 5, {"w": 1}).replayed


# ---- staking ------------------------------------------------------------------------------------


def test_stake_unstake_release(ledger):
    staked_provider(ledger, "w", neuro(100))
    assert ledger.stake_of("w") == neuro(100)
    refused(ledger, InsufficientFundsError, ledger.stake, "w", 1, "s2")  # nothing spendable left
    refused(ledger, InsufficientFundsError, ledger.unstake, "w", neuro(101), "u", T0)
    ledger.unstake("w", neuro(40), "u1", T0)
    assert ledger.stake_of("w") == neuro(60)
    assert ledger.balance(unbonding_account("w")) == neuro(40)
    unbond = DEFAULT_PARAMS["unbonding_seconds"]
    assert ledger.release_unbonded(T0 + unbond - 1) == []
    assert ledger.balance(provider("w")) == 0
    refused(ledger, LedgerError, ledger.transfer, unbonding_account("w"), provider("w"), 1, "early")
    receipts = ledger.release_unbonded(T0 + unbond)
    assert [r.total_to(provider("w")) for r in receipts] == [neuro(40)]
    assert ledger.balance(provider("w")) == neuro(40) and ledger.balance(unbonding_account("w")) == 0
    assert ledger.release_unbonded(T0 + 2 * unbond) == []  # released once
    assert ledger.report()["staked_total"] == neuro(60)


def test_unbonding_stake_is_still_slashable(ledger):
    staked_provider(ledger, "w", neuro(100))
    ledger.unstake("w", neuro(100), "u1", T0)  # all of it leaving
    assert ledger.stake_of("w") == 0
    r = ledger.slash("w", "fraud-1", T0 + 10)
    slashed = neuro(100) * DEFAULT_PARAMS["slash_bps"] // BPS
    assert sum(p.amount for p in r.postings) == slashed
    assert {p.debit for p in r.postings} == {unbonding_account("w")}
    assert ledger.balance(unbonding_account("w")) == neuro(100) - slashed
    receipts = ledger.release_unbonded(T0 + DEFAULT_PARAMS["unbonding_seconds"])
    assert sum(r.total_to(provider("w")) for r in receipts) == neuro(100) - slashed
    report = ledger.report()
    assert report["slashed"] == slashed
    assert report["burned"] == slashed * DEFAULT_PARAMS["slash_burn_bps"] // BPS


def test_slash_takes_stake_first_then_unbonding(ledger):
    staked_provider(ledger, "w", neuro(100))
    ledger.unstake("w", neuro(95), "u1", T0)  # 5 staked, 95 unbonding; slash 10% of 100 = 10
    r = ledger.slash("w", "fraud", T0)
    from_stake = sum(p.amount for p in r.postings if p.debit == stake_account("w"))
    from_unbonding = sum(p.amount for p in r.postings if p.debit == unbonding_account("w"))
    assert (from_stake, from_unbonding) == (neuro(5), neuro(5))
    to_treasury = sum(p.amount for p in r.postings if p.credit == "treasury")
    assert to_treasury == neuro(10) - neuro(10) * DEFAULT_PARAMS["slash_burn_bps"] // BPS


def test_slash_grows_when_several_providers_are_slashed_within_the_window(ledger):
    names = [f"w{i}" for i in range(5)]
    for n in names:
        staked_provider(ledger, n, neuro(1_000))
    amounts = []
    for i, n in enumerate(names):
        r = ledger.slash(n, "collusion-7", T0 + i)
        amounts.append(sum(p.amount for p in r.postings))
    base, corr = DEFAULT_PARAMS["slash_bps"], DEFAULT_PARAMS["slash_correlation_bps"]
    assert amounts == [neuro(1_000) * min(BPS, base + base * corr * i // BPS) // BPS for i in range(5)]
    assert amounts == sorted(amounts) and amounts[0] < amounts[-1]
    # a replay of a slash moves nothing and re-counts nobody
    assert ledger.slash("w4", "collusion-7", T0 + 100).replayed
    # outside the window, a slash is back to the base
    staked_provider(ledger, "late", neuro(1_000))
    later = T0 + 10 + DEFAULT_PARAMS["slash_window_seconds"] + 1
    r = ledger.slash("late", "other", later)
    assert sum(p.amount for p in r.postings) == neuro(1_000) * base // BPS
    # the same provider slashed twice does not count itself as an accomplice
    r2 = ledger.slash("late", "again", later + 1)
    assert sum(p.amount for p in r2.postings) == (neuro(1_000) - neuro(100)) * base // BPS


# ---- fees ---------------------------------------------------------------------------------------


def test_quote(ledger):
    p = DEFAULT_PARAMS
    assert ledger.quote(0) == p["price_per_request"]
    assert ledger.quote(1_000) == p["price_per_request"] + 1_000 * p["price_per_expert_token"]
    assert ledger.quote(10, requests=3) == 3 * p["price_per_request"] + 10 * p["price_per_expert_token"]
    refused(ledger, BadAmountError, ledger.quote, -1)
    refused(ledger, BadAmountError, ledger.quote, 1, requests=-1)


def test_hold_and_settle_split_the_fee(ledger):
    from neuro_dask.ledger.policy import split_fee

    a = funded_user(ledger, "a", 10_000)
    ledger.open_provider("w1", "owner-1")
    ledger.open_provider("w2", "owner-2")
    h = ledger.hold("a", "req-1", 1_000, now=T0)
    assert h.total_to("escrow") == 1_000
    assert ledger.balance(a) == 9_000 and ledger.report()["escrow"] == 1_000
    work = {"w1": 1, "w2": 3, "not-a-provider": 5}
    r = ledger.settle("req-1", 500, work, now=T0 + 1)
    split = split_fee(500, {"w1": 1, "w2": 3}, DEFAULT_PARAMS["treasury_bps"], DEFAULT_PARAMS["burn_bps"])
    assert r.total_to(provider("w1")) == split.providers["w1"]
    assert r.total_to(provider("w2")) == split.providers["w2"]
    assert r.total_to("treasury") == split.treasury
    assert r.total_to("burn") == split.burn
    assert r.total_to(a) == 500  # the unused part of the hold comes back
    assert sum(p.amount for p in r.postings) == 1_000
    assert {p.debit for p in r.postings} == {"escrow"}
    rep = ledger.report()
    assert rep["escrow"] == 0 and rep["fees"] == 500 and rep["burned"] == split.burn
    assert rep["rewards"] == sum(split.providers.values())
    assert ledger.balance(a) == 9_500


def test_settle_charges_at_most_the_hold(ledger):
    a = funded_user(ledger, "a", 10_000)
    ledger.open_provider("w")
    ledger.hold("a", "r", 1_000)
    r = ledger.settle("r", 5_000, {"w": 1})
    assert r.total_to(a) == 0 and sum(p.amount for p in r.postings) == 1_000
    assert ledger.report()["fees"] == 1_000
    assert ledger.balance(a) == 9_000


def test_settle_without_hold_or_twice_is_refused(ledger):
    funded_user(ledger, "a", 10_000)
    ledger.open_provider("w")
    refused(ledger, LedgerError, ledger.settle, "never-held", 10, {"w": 1}, match="no hold")
    ledger.hold("a", "r", 1_000)
    first = ledger.settle("r", 100, {"w": 1})
    assert ledger.settle("r", 100, {"w": 1}).replayed  # the same settle again: a replay
    refused(ledger, IdempotencyConflictError, ledger.settle, "r", 200, {"w": 1})  # a different one: refused
    refused(ledger, IdempotencyConflictError, ledger.settle, "r", 100, {})
    assert ledger.balance(user("a")) == 10_000 - 100
    assert first.total_to(user("a")) == 900
    # a settled request cannot be held again with other terms
    refused(ledger, IdempotencyConflictError, ledger.hold, "a", "r", 999)


def test_settle_without_validated_work_pays_the_treasury(ledger):
    a = funded_user(ledger, "a", 10_000)
    treasury = ledger.balance("treasury")
    ledger.hold("a", "r", 1_000)
    r = ledger.settle("r", 1_000, {})
    burn = 1_000 * DEFAULT_PARAMS["treasury_bps"] // BPS * DEFAULT_PARAMS["burn_bps"] // BPS
    assert r.total_to("burn") == burn
    assert ledger.balance("treasury") == treasury + 1_000 - burn
    assert ledger.balance(a) == 9_000


# ---- credits and emissions ----------------------------------------------------------------------


def test_emission_pays_providers_by_credit(ledger):
    ledger.open_provider("w1", "o1")
    ledger.open_provider("w2", "o2")
    ledger.credit_work({"w1": ("o1", 1), "w2": ("o2", 3), "ghost": ("o3", 100)}, 0, "cw-0")
    pool = ledger.balance("emission")
    r = ledger.emit(0, T0)
    initial = DEFAULT_PARAMS["emission_initial"]
    assert r.total_to(provider("w1")) == initial // 4 and r.total_to(provider("w2")) == initial * 3 // 4
    assert ledger.balance("emission") == pool - initial
    assert ledger.report()["emitted"] == initial
    assert ledger.emit(0, T0 + 1).replayed
    r1 = ledger.emit(1, T0)  # no credits: nothing paid, the pool keeps it
    assert r1.postings == () and ledger.balance("emission") == pool - initial
    ledger.credit_work({"w1": ("o1", 1)}, 2, "cw-2")
    r2 = ledger.emit(2, T0)
    decayed = initial * DEFAULT_PARAMS["emission_decay_bps"] // BPS * DEFAULT_PARAMS["emission_decay_bps"] // BPS
    assert r2.total_to(provider("w1")) == decayed
    assert ledger.leaderboard() == [("o3", 100), ("o2", 3), ("o1", 2)]


def test_emission_is_capped_by_the_pool():
    led = Ledger.open("sqlite://:memory:", LedgerConfig(max_supply=neuro(1_000)), now=T0)
    led.open_provider("w")
    pool = led.balance("emission")
    assert 0 < pool < DEFAULT_PARAMS["emission_initial"]
    led.credit_work({"w": ("o", 1)}, 0, "cw")
    led.emit(0, T0)
    assert led.balance("emission") == 0 and led.balance(provider("w")) == pool
    led.credit_work({"w": ("o", 1)}, 1, "cw1")
    assert led.emit(1, T0).postings == ()
    assert led.report()["minted"] == neuro(1_000)
    assert led.check_invariants() == []


# ---- vesting ------------------------------------------------------------------------------------


def test_release_vesting_follows_the_schedule(ledger):
    total = LedgerConfig().allocation("team")
    assert ledger.release_vesting("team", T0) is None
    assert ledger.release_vesting("team", T0 + 12 * MONTH - 1) is None  # just before the cliff
    assert ledger.balance("genesis:team") == 0
    r = ledger.release_vesting("team", T0 + 12 * MONTH)
    assert r.total_to("genesis:team") == total * 12 // 48
    assert ledger.release_vesting("team", T0 + 12 * MONTH + 5) is None  # nothing new until next month
    assert ledger.release_vesting("team", T0 + 11 * MONTH) is None  # the clock going back frees nothing
    ledger.release_vesting("team", T0 + 30 * MONTH)
    assert ledger.balance("genesis:team") == total * 30 // 48
    assert ledger.balance("vesting:team") == total - total * 30 // 48
    ledger.release_vesting("team", T0 + 48 * MONTH)
    assert ledger.balance("vesting:team") == 0 and ledger.balance("genesis:team") == total
    assert ledger.release_vesting("team", T0 + 100 * MONTH) is None
    assert ledger.balance("vesting:investors") == LedgerConfig().allocation("investors")  # untouched
    # released tokens are spendable
    ledger.open_user("founder")
    ledger.transfer("genesis:team", user("founder"), neuro(1), "pay-founder")
    assert ledger.report()["vesting_locked"] == LedgerConfig().allocation("investors")


# ---- governance ---------------------------------------------------------------------------------


@pytest.fixture
def council(ledger):
    """Three providers with 600, 300 and 100 NEURO staked, a user, and a provider without stake."""
    for name, amount in (("big", 600), ("mid", 300), ("small", 100)):
        staked_provider(ledger, name, neuro(amount))
    ledger.open_provider("nostake")
    funded_user(ledger, "u", neuro(10))
    return ledger


def test_governance_passes_and_changes_params(council):
    led = council
    pid = led.propose("big", "slash_bps", 2_000, T0, "prop-1")
    assert led.vote(pid, "big", True, T0 + 1) == neuro(600)
    assert led.vote(pid, "mid", False, T0 + 2) == neuro(300)
    refused(led, GovernanceError, led.tally, pid, T0 + 3, match="open until")
    end = T0 + DEFAULT_PARAMS["voting_seconds"]
    result = led.tally(pid, end)
    assert result["status"] == "passed" and result["yes"] == neuro(600) and result["no"] == neuro(300)
    assert led.params()["slash_bps"] == 2_000
    assert [p["status"] for p in led.proposals()] == ["passed"]
    assert led.tally(pid, end + 1)["status"] == "passed"  # a second tally changes nothing
    # the new value is the live one: a slash now takes 20%
    r = led.slash("small", "fraud", end + 2)
    assert sum(p.amount for p in r.postings) == neuro(100) * 2_000 // BPS


def test_governance_exactly_at_threshold_is_rejected(ledger):
    staked_provider(ledger, "a", neuro(500))
    staked_provider(ledger, "b", neuro(500))
    pid = ledger.propose("a", "treasury_bps", 2_000, T0, "p")
    ledger.vote(pid, "a", True, T0)
    ledger.vote(pid, "b", False, T0)
    assert ledger.tally(pid, T0 + DEFAULT_PARAMS["voting_seconds"])["status"] == "rejected"
    assert ledger.params()["treasury_bps"] == DEFAULT_PARAMS["treasury_bps"]


def test_governance_without_quorum(council):
    pid = council.propose("small", "treasury_bps", 2_000, T0, "p")
    council.vote(pid, "small", True, T0)  # 10% of the stake voted, 33% needed
    assert council.tally(pid, T0 + DEFAULT_PARAMS["voting_seconds"])["status"] == "no-quorum"
    assert council.params()["treasury_bps"] == DEFAULT_PARAMS["treasury_bps"]


def test_votes_without_stake_twice_or_late_are_refused(council):
    led = council
    pid = led.propose("mid", "burn_bps", 3_000, T0, "p")
    refused(led, GovernanceError, led.vote, pid, "nostake", True, T0, match="no stake")
    refused(led, GovernanceError, led.vote, pid, "u", True, T0, match="no stake")  # a user, not a provider
    refused(led, GovernanceError, led.vote, pid, "ghost", True, T0, match="no stake")
    refused(led, GovernanceError, led.vote, pid + 100, "big", True, T0, match="no proposal")
    led.vote(pid, "mid", True, T0)
    refused(led, GovernanceError, led.vote, pid, "mid", True, T0 + 1, match="already voted")
    refused(led, GovernanceError, led.vote, pid, "mid", False, T0 + 1, match="already voted")
    end = T0 + DEFAULT_PARAMS["voting_seconds"]
    refused(led, GovernanceError, led.vote, pid, "big", True, end, match="closed")
    refused(led, GovernanceError, led.tally, pid + 100, end, match="no proposal")
    led.tally(pid, end)
    refused(led, GovernanceError, led.vote, pid, "small", True, T0 + 5, match="closed")  # tallied: closed
    # an unstaked provider no longer votes
    staked_provider(led, "leaver", neuro(50))
    led.unstake("leaver", neuro(50), "leave", T0)
    pid2 = led.propose("big", "burn_bps", 3_000, T0, "p2")
    refused(led, GovernanceError, led.vote, pid2, "leaver", True, T0, match="no stake")


def test_proposals_outside_bounds_or_unknown_are_refused(council):
    led = council
    refused(led, GovernanceError, led.propose, "nostake", "slash_bps", 2_000, T0, "p", match="no stake")
    refused(led, GovernanceError, led.propose, "ghost", "slash_bps", 2_000, T0, "p", match="no stake")
    refused(led, ParamError, led.propose, "big", "no_such_param", 1, T0, "p", match="unknown")
    refused(led, ParamError, led.propose, "big", "max_supply", 1, T0, "p", match="unknown")
    for name, (low, high) in BOUNDS.items():
        refused(led, ParamError, led.propose, "big", name, high + 1, T0, f"p-{name}-hi", match="outside")
        refused(led, ParamError, led.propose, "big", name, low - 1, T0, f"p-{name}-lo", match="outside")
    for bad in (1.5, 2.0, True, "3", None):
        refused(led, ParamError, led.propose, "big", "treasury_bps", bad, T0, "p-bad", match="integer")
    assert led.proposals() == []


@pytest.mark.parametrize(
    "name, value",
    [
        ("treasury_bps", BOUNDS["treasury_bps"][1]),
        ("spot_check_bps", BOUNDS["spot_check_bps"][0]),
        ("min_quorum", BOUNDS["min_quorum"][1]),
        ("voting_seconds", BOUNDS["voting_seconds"][0]),
        ("gov_threshold_bps", BOUNDS["gov_threshold_bps"][1]),
    ],
)
def test_a_value_at_a_bound_is_accepted(council, name, value):
    led = council
    pid = led.propose("big", name, value, T0, f"p-{name}")
    led.vote(pid, "big", True, T0)
    assert led.tally(pid, T0 + DEFAULT_PARAMS["voting_seconds"])["status"] == "passed"
    assert led.params()[name] == value
    with led.db.read() as cur:
        changes = cur.execute("SELECT name, old, new, proposal FROM param_changes").all()
    assert changes == [(name, DEFAULT_PARAMS[name], value, pid)]


def test_bad_config_is_refused():
    with pytest.raises(ParamError):
        LedgerConfig(params={**DEFAULT_PARAMS, "treasury_bps": 5_001})
    with pytest.raises(ParamError):
        LedgerConfig(allocation_bps={"community": 10_000})
    with pytest.raises(ParamError):
        LedgerConfig(max_supply=0)
    with pytest.raises(ParamError):
        LedgerConfig(params={k: v for k, v in DEFAULT_PARAMS.items() if k != "min_quorum"})


def test_tally_counts_stake_still_bonded(council):
    """A vote weighs the least of its stake when cast and its stake still bonded at the tally:
    unbonding stake still counts (it is still at risk), slashed stake no longer does."""
    led = council
    pid = led.propose("big", "burn_bps", 3_000, T0, "p")
    led.vote(pid, "big", True, T0)  # 600
    led.vote(pid, "mid", False, T0)  # 300
    led.unstake("big", neuro(600), "big-leaves", T0 + 1)  # unbonding: still bonded
    led.slash("mid", "fraud", T0 + 2)  # mid loses 10%: its vote weighs 270
    result = led.tally(pid, T0 + DEFAULT_PARAMS["voting_seconds"])
    assert (result["yes"], result["no"]) == (neuro(600), neuro(270))
    assert result["status"] == "passed" and led.params()["burn_bps"] == 3_000


def test_proposal_breaking_a_rule_across_parameters_is_refused(council):
    """Unbonding must last at least the voting period (or stake could vote, leave and vote again)."""
    led = council
    voting = DEFAULT_PARAMS["voting_seconds"]
    refused(led, ParamError, led.propose, "big", "unbonding_seconds", voting - 1, T0, "p1")
    refused(led, ParamError, led.propose, "big", "voting_seconds", DEFAULT_PARAMS["unbonding_seconds"] + 1, T0, "p2")
    assert led.propose("big", "unbonding_seconds", voting, T0, "p3") > 0  # equal is fine


def test_a_version_adoption_is_voted_like_a_parameter_and_recorded(council):
    from neuro_dask.ledger.params import adoption_param

    led = council
    params_before = led.params()
    param = adoption_param("adder", "v2-abc")
    pid = led.propose("big", param, 1, T0, "adopt-v2")
    led.vote(pid, "big", True, T0)
    assert led.adoptions() == []  # nothing before the tally
    result = led.tally(pid, T0 + DEFAULT_PARAMS["voting_seconds"])
    assert result["status"] == "passed"
    assert led.adoptions() == [
        {"proposal": pid, "channel": "adder", "model": "v2-abc", "at": T0 + DEFAULT_PARAMS["voting_seconds"]}
    ]
    assert led.adoptions(after=pid) == []
    assert led.params() == params_before  # an adoption changes no parameter
    rejected = led.propose("big", adoption_param("adder", "v3"), 1, T0, "adopt-v3")
    led.vote(rejected, "big", False, T0)
    assert led.tally(rejected, T0 + DEFAULT_PARAMS["voting_seconds"])["status"] == "rejected"
    assert [a["model"] for a in led.adoptions()] == ["v2-abc"]


@pytest.mark.parametrize(
    "param, value",
    [
        ("adopt:adder", 1),
        ("adopt::v2", 1),
        ("adopt:a b:v2", 1),
        ("adopt:adder:v2", 2),
        ("adopt:adder:v2", True),
        ("adopt:adder:v/2", 1),
    ],
)
def test_malformed_version_proposals_are_refused(council, param, value):
    refused(council, ParamError, council.propose, "big", param, value, T0, "bad-adopt")


def test_stake_from_community_funds_and_locks_min_stake_once_per_idem(ledger):
    minimum = ledger.params()["min_stake"]
    community = ledger.balance("genesis:community")
    for _ in range(2):  # a rerun (same idem) moves nothing more
        ledger.stake_from_community("gpu1", "drill-7", owner="alice")
    assert ledger.stake_of("gpu1") == minimum and ledger.balance(provider("gpu1")) == 0
    assert ledger.balance("genesis:community") == community - minimum
    ledger.stake_from_community("gpu1", "drill-8", amount=neuro(5))
    assert ledger.stake_of("gpu1") == minimum + neuro(5)
