"""The same ledger code on PostgreSQL: the books, refusals, idempotency and concurrent writers."""

from __future__ import annotations

import random
import threading

import pytest
from postgres_server import postgres_server, unavailable

from neuro_dask.ledger import (
    InsufficientFundsError,
    Ledger,
    LedgerConfig,
    LedgerError,
    UnknownAccountError,
    neuro,
    provider,
    user,
)

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no PostgreSQL: {unavailable()}")


@pytest.fixture(scope="module")
def pg_url():
    with postgres_server() as url:
        yield url


def fresh(pg_url: str) -> Ledger:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:  # an empty schema per test
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return Ledger.open(pg_url, LedgerConfig(), now=0.0)


def test_the_books_on_postgres_balance_and_refusals_write_nothing(pg_url):
    ledger = fresh(pg_url)
    ledger.open_user("alice")
    ledger.open_provider("w1", "bob")
    ledger.deposit("alice", neuro(10), "d1")
    assert ledger.deposit("alice", neuro(10), "d1").replayed  # replayed once, moved once
    ledger.transfer("genesis:community", provider("w1"), neuro(2_000), "f1")
    ledger.stake("w1", neuro(1_000), "s1")
    ledger.hold("alice", "r1", neuro(1))
    ledger.settle("r1", neuro("0.5"), {"w1": 7})
    ledger.credit_work({"w1": ("bob", 7)}, 0, "c1")
    ledger.emit(0)
    ledger.slash("w1", "fraud-1", now=10.0)
    before = ledger.report()
    for refused in (
        lambda: ledger.hold("alice", "r2", neuro(1_000)),
        lambda: ledger.deposit("nobody", neuro(1), "d2"),
        lambda: ledger.transfer(user("alice"), user("alice"), -5, "t1"),
    ):
        with pytest.raises(LedgerError):
            refused()
    assert ledger.report() == before
    assert ledger.balance(user("alice")) == neuro(10) - neuro("0.5")
    assert ledger.check_invariants() == []
    ledger.close()


def test_concurrent_writers_on_postgres_keep_every_invariant(pg_url):
    ledger = fresh(pg_url)
    names = [f"u{i}" for i in range(6)]
    for n in names:
        ledger.open_user(n)
        ledger.deposit(n, neuro(5), f"seed-{n}")
    done = []

    def writer(k: int) -> None:
        rng, mine = random.Random(k), Ledger(pg_url, LedgerConfig())
        ok = 0
        for i in range(80):
            a, b = rng.sample(names, 2)
            try:
                mine.transfer(user(a), user(b), rng.randint(1, neuro(2)), f"w{k}-{i}")
                ok += 1
            except (InsufficientFundsError, UnknownAccountError):
                pass
        done.append(ok)
        mine.close()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.check_invariants() == []
    assert sum(ledger.balance(user(n)) for n in names) == 6 * neuro(5)
    assert ledger.report()["entries"] == 1 + 6 + sum(done)  # genesis, the seeds, each transfer once
    ledger.close()


def test_grants_expiry_verified_settlement_spends_and_the_audit_on_postgres(pg_url):
    from neuro_dask.ledger import NotGrantedError, SettledError, TreasuryError
    from neuro_dask.ledger.params import spend_param

    ledger = fresh(pg_url)
    ledger.open_user("alice")
    ledger.open_user("bob")
    ledger.deposit("alice", neuro(10), "d1")
    ledger.stake_from_community("w1", "setup", owner="bob")
    with pytest.raises(TreasuryError):
        ledger.transfer("treasury", user("bob"), 1, "steal")
    with pytest.raises(NotGrantedError):
        ledger.hold("alice", "r1", neuro(1), now=1.0, by="gateway")
    ledger.grant("alice", "gateway", 1.0, "g1")
    ledger.hold("alice", "r1", neuro(1), now=1.0, expires_at=61.0, tier="private", by="gateway")
    ledger.hold("alice", "r2", neuro(1), now=2.0, expires_at=600.0)
    assert ledger.expired_holds(61.0) == ["r1"]
    s = ledger.settle_verified("r1", {}, {"w1": 8, "ghost": 4}, now=61.0)
    assert (s.state, s.private_expert_tokens, s.ignored) == ("expired", 2, ("ghost",))
    assert ledger.settle_verified("r1", {}, {"w1": 8, "ghost": 4}, now=70.0).replayed
    with pytest.raises(SettledError):
        ledger.settle_verified("r1", {"w1": 1}, now=70.0)
    assert ledger.settle_verified("r2", {"w1": 5}, now=70.0).state == "settled"
    assert ledger.leaderboard(by="owner") == [("bob", 5)]
    ledger.revoke("alice", "gateway", 80.0, "rv1")
    assert ledger.grants() == [] and not ledger.may_charge("alice", "gateway")
    pid = ledger.propose("w1", spend_param("user:bob"), neuro(3), 90.0, "spend-1")
    ledger.vote(pid, "w1", True, 90.0)
    end = 90.0 + ledger.params()["voting_seconds"]
    assert ledger.tally(pid, end)["spent"]["amount"] == neuro(3)
    assert ledger.tally(pid, end + 1)["spent"]["amount"] == neuro(3)
    assert ledger.balance(user("bob")) == neuro(3)
    assert [r["kind"] for r in ledger.audit()] == ["treasury-spend", "revoke", "grant", "stake", "transfer", "deposit"]
    assert ledger.check_invariants() == []
    ledger.close()


def test_an_old_postgres_ledger_gets_the_new_columns_and_tables(pg_url):
    import psycopg

    ledger = fresh(pg_url)
    ledger.open_user("alice")
    ledger.deposit("alice", neuro(10), "d1")
    ledger.hold("alice", "old-open", neuro(1), now=5.0)
    ledger.hold("alice", "old-done", neuro(1), now=5.0)
    ledger.settle("old-done", 10, {}, now=6.0)
    ledger.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # the schema before expiry and grants
        for column in (
            "held_at",
            "expires_at",
            "state",
            "tier",
            "charged_by",
            "quoted",
            "expert_tokens",
            "private_tokens",
        ):
            conn.execute(f"ALTER TABLE holds DROP COLUMN {column}")
        conn.execute("DROP TABLE grants")
    ledger = Ledger.open(pg_url, LedgerConfig(), now=0.0)
    assert ledger.check_invariants() == []
    assert ledger.hold_of("old-done")["state"] == "settled"
    assert ledger.expired_holds(7.0) == ["old-open"]
    ledger.grant("alice", "gateway", 8.0, "g1")
    assert ledger.may_charge("alice", "gateway")
    ledger.close()
