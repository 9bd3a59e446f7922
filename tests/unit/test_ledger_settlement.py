"""The scheduler's ledger duties (ledger/service.py), money only from what it can check: holds
charged to an account the client certificate may charge, holds that expire, settlement by the
rows the scheduler verified from worker-signed receipts (paid once), slashes for fraud it proved.
And a ledger made before these rules opens and keeps working."""

from __future__ import annotations

import sqlite3

import pytest

from neuro_dask.ledger import Ledger, neuro, provider, user
from neuro_dask.ledger.params import DEFAULT_PARAMS
from neuro_dask.ledger.policy import BPS, split_fee
from neuro_dask.ledger.service import LEASE_SECONDS, LedgerService

T0 = 1_700_000_000.0
P = DEFAULT_PARAMS
REQUEST_PRICE = P["price_per_request"]


@pytest.fixture
def service():
    svc = LedgerService(Ledger.open("sqlite://:memory:", now=T0))
    for name in ("alice", "bob"):
        svc.ledger.open_user(name)
        svc.ledger.deposit(name, neuro(100), f"fund-{name}")
    for w in ("w1", "w2"):
        svc.join(w, f"owner-{w}")
    svc.ledger.stake_from_community("w1", "setup")
    yield svc
    assert svc.ledger.check_invariants() == []
    svc.ledger.close()


def balances(svc: LedgerService) -> dict[str, int]:
    return svc.ledger.balances()


# ---- holds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tier": "secret"}, "unknown tier 'secret'"),
        ({"lease_seconds": 0}, "lease must be a positive number"),
        ({"lease_seconds": float("inf")}, "lease must be a positive number"),
        ({"lease_seconds": True}, "lease must be a positive number"),
        ({"account": "ghost", "client": "ghost"}, "no ledger account user:ghost"),
        ({"expert_tokens": 10**12}, "insufficient funds"),
        ({"client": "gateway"}, "client 'gateway' may not charge the account user:alice"),
        ({"client": "bob"}, "`neuro-dask ledger grant alice bob`"),
        ({"account": "ghost", "client": "gateway"}, "may not charge the account user:ghost"),
    ],
)
def test_hold_refusals_hold_nothing(service, kwargs, message):
    before = balances(service)
    args = {"account": "alice", "request": "r", "expert_tokens": 100, "now": T0} | kwargs
    reply = service.hold(**args)
    assert reply["status"] == "error" and message in reply["message"], reply
    assert balances(service) == before and service.ledger.hold_of("r") is None


def test_a_hold_expires_after_its_lease_and_a_retry_keeps_the_first(service):
    held = service.hold("alice", "r", 100, T0, client="alice", lease_seconds=30)
    assert held == {
        "status": "OK",
        "held": REQUEST_PRICE + 100 * P["price_per_expert_token"],
        "tier": "standard",
        "expires": T0 + 30,
    }
    assert service.hold("alice", "r", 100, T0 + 20, client="alice") == held  # a retry: same hold, same expiry
    assert service.ledger.balance(user("alice")) == neuro(100) - held["held"]
    assert service.expire(T0 + 29) == []
    assert service.expire(T0 + 30) == ["r"]  # at its expiry
    assert service.hold("bob", "default", 1, T0)["expires"] == T0 + LEASE_SECONDS


def test_a_granted_client_charges_until_revoked(service):
    led = service.ledger
    led.grant("alice", "gateway", T0, "g1")
    assert service.hold("alice", "r1", 10, T0, client="gateway")["status"] == "OK"
    assert service.hold("bob", "r2", 10, T0, client="gateway")["status"] == "error"  # only alice granted it
    led.revoke("alice", "gateway", T0 + 1, "rv1")
    before = balances(service)
    reply = service.hold("alice", "r3", 10, T0 + 2, client="gateway")
    assert reply["status"] == "error" and "neuro-dask ledger grant alice gateway" in reply["message"]
    assert balances(service) == before
    assert service.settle("r1", T0 + 3, {"w1": 5})["status"] == "OK"  # a hold made while granted settles


# ---- settlement by verified work -----------------------------------------------------------------


def test_settle_pays_verified_work_and_credits_it_for_emissions(service):
    held = service.hold("alice", "r", 1_000, T0)["held"]
    settled = service.settle("r", T0 + 1, {"w1": 300, "w2": 100})
    fee = REQUEST_PRICE + 400 * P["price_per_expert_token"]
    split = split_fee(fee, {"w1": 300, "w2": 100}, P["treasury_bps"], P["burn_bps"])
    assert settled == {
        "status": "OK",
        "tier": "standard",
        "fee": fee,
        "charged": fee,
        "expert_tokens": 400,
        "private_expert_tokens": 0,
        "paid": {
            provider("w1"): split.providers["w1"],
            provider("w2"): split.providers["w2"],
            "treasury": split.treasury,
            "burn": split.burn,
            user("alice"): held - fee,
        },
        "state": "settled",
        "replayed": False,
    }
    assert service.ledger.leaderboard(by="worker") == [("w1", 300), ("w2", 100)]
    assert service.ledger.leaderboard(by="owner") == [("owner-w1", 300), ("owner-w2", 100)]
    emitted = service.ledger.emit(service.epoch(T0 + 1), T0 + 3_600)
    assert emitted.total_to(provider("w1")) == 3 * emitted.total_to(provider("w2")) > 0


def test_settling_twice_never_pays_twice(service):
    service.hold("alice", "r", 1_000, T0)
    first = service.settle("r", T0 + 1, {"w1": 10})
    after = balances(service)
    again = service.settle("r", T0 + 2, {"w1": 10})  # the same rows: the first result back
    assert again == first | {"replayed": True}
    other = service.settle("r", T0 + 2, {"w1": 500, "w2": 7})  # other rows: refused
    assert other["status"] == "error" and "already settled" in other["message"] and "paid once" in other["message"]
    assert balances(service) == after
    assert service.ledger.leaderboard(by="worker") == [("w1", 10)]  # credited once too
    missing = service.settle("never-held", T0, {"w1": 1})
    assert missing["status"] == "error" and "no hold" in missing["message"]


@pytest.mark.parametrize("work", [{"w1": -1}, {"w1": 1.5}, {"w1": True}, {"": 3}, {5: 3}, {"w1": 2**62}, None, [1]])
def test_malformed_work_is_refused_and_the_hold_stays_open(service, work):
    service.hold("alice", "r", 1_000, T0)
    before = balances(service)
    assert service.settle("r", T0 + 1, work)["status"] == "error"
    assert balances(service) == before and service.ledger.hold_of("r")["state"] == "open"
    assert service.settle("r", T0 + 1, {"w1": 1})["status"] == "OK"


def test_workers_without_accounts_are_neither_charged_nor_paid(service, caplog):
    """The scheduler passes only workers it verified; a name without provider accounts (a bug, or
    rows made up) changes nothing: the client is charged for the known workers' rows only."""
    service.hold("alice", "r", 1_000, T0)
    settled = service.settle("r", T0 + 1, {"w1": 4, "sybil": 900}, share_rows={"sybil": 400})
    assert settled["expert_tokens"] == 4 and settled["fee"] == REQUEST_PRICE + 4 * P["price_per_expert_token"]
    assert not any("sybil" in account for account in settled["paid"])
    assert service.ledger.leaderboard(by="worker") == [("w1", 4)]
    assert "sybil" in caplog.text


def test_no_verified_work_charges_the_request_price_only(service):
    held = service.hold("alice", "r", 1_000, T0)["held"]
    treasury = service.ledger.balance("treasury")
    settled = service.settle("r", T0 + 1, {})
    burn = REQUEST_PRICE * P["treasury_bps"] // BPS * P["burn_bps"] // BPS
    assert settled["fee"] == REQUEST_PRICE and settled["paid"][user("alice")] == held - REQUEST_PRICE
    assert service.ledger.balance("treasury") == treasury + REQUEST_PRICE - burn  # rule 1: no work, all to it


# ---- expiry --------------------------------------------------------------------------------------


def test_an_expired_hold_is_settled_by_what_was_verified_then_leaves_the_list(service):
    """A client that never ends its request (crashed, or hostile) pays the request price and the
    work verified for it; the rest of its hold comes back. Nothing else is kept."""
    a = service.hold("alice", "crashed", 1_000, T0, lease_seconds=60)["held"]
    b = service.hold("bob", "worked", 1_000, T0 + 1, lease_seconds=60)["held"]
    service.hold("bob", "alive", 1_000, T0 + 50, lease_seconds=60)
    assert service.expire(T0 + 61) == ["crashed", "worked"]  # oldest expiry first
    empty = service.settle("crashed", T0 + 61, {})
    assert empty["state"] == "expired" and empty["paid"][user("alice")] == a - REQUEST_PRICE
    worked = service.settle("worked", T0 + 61, {"w2": 20})
    assert worked["state"] == "expired" and worked["fee"] == REQUEST_PRICE + 20 * P["price_per_expert_token"]
    assert worked["paid"][user("bob")] == b - worked["fee"] and worked["paid"][provider("w2")] > 0
    assert service.expire(T0 + 61) == []
    assert service.expire(T0 + 110) == ["alive"]
    late = service.settle("crashed", T0 + 70, {"w1": 3})  # the client's own end, late: nothing more
    assert late["status"] == "error" and "after its hold expired" in late["message"]
    assert service.ledger.balance("escrow") == 1_000 * P["price_per_expert_token"] + REQUEST_PRICE


def test_a_request_that_ends_before_its_lease_is_settled_not_expired(service):
    service.hold("alice", "r", 10, T0, lease_seconds=60)
    assert service.settle("r", T0 + 59, {"w1": 1})["state"] == "settled"
    assert service.expire(T0 + 1_000) == []
    again = service.hold("alice", "r", 10, T0 + 100)  # the id again, after the end
    assert again["status"] == "error" and "new id" in again["message"]


# ---- slashing ------------------------------------------------------------------------------------


def test_slash_only_moves_a_proven_frauds_stake_once(service):
    assert service.slash("ghost", "proof-1", T0) is False  # no accounts
    staked = service.ledger.stake_of("w1")
    assert service.slash("w1", "proof-1", T0) is True
    assert service.ledger.stake_of("w1") == staked - staked * P["slash_bps"] // BPS
    assert service.slash("w1", "proof-1", T0 + 1) is False  # the same proof again: nothing moves
    assert service.slash("w2", "proof-2", T0 + 2) is False  # no stake to take
    assert service.slash("w1", "proof-3", T0 + 3) is True


# ---- a ledger from before --------------------------------------------------------------------------


OLD_HOLDS = """CREATE TABLE holds (
    request TEXT PRIMARY KEY, client TEXT NOT NULL, amount BIGINT NOT NULL, settled INTEGER NOT NULL DEFAULT 0,
    fee BIGINT NOT NULL DEFAULT 0)"""


def test_a_ledger_from_before_holds_expired_opens_and_its_open_holds_expire_at_once(tmp_path):
    path = tmp_path / "old.db"
    led = Ledger.open(f"sqlite:///{path}", now=T0)
    led.open_user("alice")
    led.deposit("alice", neuro(10), "fund")
    led.open_provider("w1")
    led.hold("alice", "open-one", neuro(1), T0)
    led.hold("alice", "done-one", neuro(1), T0)
    led.settle("done-one", 400, {"w1": 1}, now=T0 + 1)
    led.close()
    with sqlite3.connect(path) as conn:  # back to the schema before expiry and grants
        conn.execute("CREATE TABLE old AS SELECT request, client, amount, settled, fee FROM holds")
        conn.execute("DROP TABLE holds")
        conn.execute(OLD_HOLDS)
        conn.execute("INSERT INTO holds SELECT * FROM old")
        conn.execute("DROP TABLE old")
        conn.execute("DROP TABLE grants")

    svc = LedgerService(Ledger.open(f"sqlite:///{path}", now=T0 + 10))
    assert svc.ledger.check_invariants() == []
    assert svc.ledger.hold_of("done-one")["state"] == "settled"
    assert svc.ledger.hold_of("open-one") == {
        "request": "open-one",
        "client": "alice",
        "amount": neuro(1),
        "held_at": 0.0,
        "expires_at": 0.0,
        "state": "open",
        "tier": "standard",
        "charged_by": "",
        "fee": 0,
    }
    assert svc.expire(T0 + 10) == ["open-one"]  # its scheduler, and what it counted, are gone
    assert svc.settle("open-one", T0 + 10, {})["paid"][user("alice")] == neuro(1) - REQUEST_PRICE
    assert svc.ledger.grants() == [] and not svc.ledger.may_charge("alice", "gateway")
    svc.ledger.grant("alice", "gateway", T0 + 11, "g")  # the new table is there
    assert svc.ledger.check_invariants() == []
    svc.ledger.close()
    again = Ledger.open(f"sqlite:///{path}", now=T0 + 20)  # a second open adds nothing twice
    assert again.check_invariants() == [] and again.may_charge("alice", "gateway")
    again.close()
