"""What the operator's commands may move, and what only a vote or the rules move (docs/ledger.md,
"Operator powers"): the treasury only by a passed spend proposal, paid once at its tally; a client
certificate charges only its own account or one granted to it; the audit lists every operator
entry. Each refusal writes nothing."""

from __future__ import annotations

import pytest

from neuro_dask.ledger import (
    GovernanceError,
    IdempotencyConflictError,
    Ledger,
    LedgerConfig,
    LedgerError,
    NotGrantedError,
    ParamError,
    TreasuryError,
    UnknownAccountError,
    neuro,
    provider,
    user,
)
from neuro_dask.ledger.params import DEFAULT_PARAMS, spend_param

T0 = 1_700_000_000.0
END = T0 + DEFAULT_PARAMS["voting_seconds"]
TABLES = ("accounts", "entries", "postings", "holds", "credits", "proposals", "votes", "grants", "param_changes")


def dump(ledger: Ledger) -> dict[str, list[tuple]]:
    with ledger.db.read() as cur:
        return {t: sorted(cur.execute(f"SELECT * FROM {t}").all(), key=repr) for t in TABLES}


def refused(ledger: Ledger, error: type[BaseException], fn, *args, match: str | None = None, **kwargs):
    """`fn(*args, **kwargs)` raises `error` (a LedgerError) and writes nothing."""
    before = dump(ledger)
    with pytest.raises(error, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, LedgerError)
    assert dump(ledger) == before and ledger.check_invariants() == []
    return info.value


def funded_user(led: Ledger, name: str, amount: int) -> str:
    led.open_user(name)
    led.deposit(name, amount, f"fund-{name}")
    return user(name)


def staked_provider(led: Ledger, name: str, amount: int) -> str:
    led.open_provider(name)
    led.transfer("genesis:community", provider(name), amount, f"fund-{name}")
    led.stake(name, amount, f"stake-{name}")
    return provider(name)


@pytest.fixture
def ledger():
    led = Ledger.open("sqlite://:memory:", now=T0)
    yield led
    assert led.check_invariants() == []
    led.close()


@pytest.fixture
def council(ledger):
    """Providers with 600 and 400 NEURO staked; users alice (funded) and bob."""
    staked_provider(ledger, "big", neuro(600))
    staked_provider(ledger, "small", neuro(400))
    funded_user(ledger, "alice", neuro(100))
    ledger.open_user("bob")
    return ledger


def vote_through(led: Ledger, param: str, value: int, idem: str, yes: bool = True, now: float = T0) -> int:
    pid = led.propose("big", param, value, now, idem)
    led.vote(pid, "big", yes, now)
    return pid


# ---- the treasury moves only by vote ------------------------------------------------------------


def test_a_transfer_from_the_treasury_is_refused_and_moves_nothing(council):
    led = council
    treasury = led.balance("treasury")
    for call in (
        lambda: led.transfer("treasury", user("bob"), neuro(1), "steal"),
        lambda: led.transfer("treasury", provider("big"), 1, "steal-2", cause="looks legit"),
        lambda: led.deposit("bob", neuro(1), "steal-3", source="treasury"),
        lambda: led.transfer("treasury", user("bob"), -1, "steal-4"),  # refused before the amount
        lambda: led.transfer("treasury", "user:ghost", 1, "fund-alice"),
    ):  # ... and before the id
        err = refused(led, TreasuryError, call, match="only through a passed spend proposal")
        assert "neuro-dask gov propose-spend PROPOSER DEST AMOUNT" in str(err)
    assert led.balance("treasury") == treasury
    led.transfer(user("alice"), user("bob"), 1, "steal")  # the ids stayed free


@pytest.mark.parametrize(
    "source, dest, allowed",
    [
        ("user:alice", "user:bob", True),
        ("user:alice", "provider:big", True),
        ("provider:big", "user:bob", True),
        ("genesis:community", "user:bob", True),
        ("genesis:liquidity", "provider:big", True),
        ("genesis:team", "user:bob", True),  # the team's vested tokens, paid out on its instruction
        ("user:alice", "genesis:community", True),  # a grant given back
        ("provider:big", "genesis:liquidity", True),
        ("user:alice", "genesis:team", False),  # not into an allocation
        ("genesis:community", "genesis:liquidity", False),  # genesis's split stays as minted
        ("genesis:team", "genesis:community", False),
        ("user:alice", "treasury", False),  # fees and slashes fill it, nothing else
        ("genesis:community", "treasury", False),
        ("genesis:community", "emission", False),
    ],
)
def test_transfer_routes(council, source, dest, allowed):
    led = council
    led.release_vesting("team", T0 + 48 * 30 * 86_400)  # something in genesis:team
    led.transfer("genesis:community", provider("big"), 10, "spendable")
    if allowed:
        r = led.transfer(source, dest, 5, "t")
        assert r.kind == "transfer" and led.audit()[0]["accounts"] == [source, dest]
    else:
        refused(led, LedgerError, led.transfer, source, dest, 5, "t", match="cannot move")


@pytest.mark.parametrize(
    "param, value, error",
    [
        ("spend:treasury", 5, ParamError),
        ("spend:escrow", 5, ParamError),
        ("spend:burn", 5, ParamError),
        ("spend:emission", 5, ParamError),
        ("spend:stake:big", 5, ParamError),
        ("spend:unbonding:big", 5, ParamError),
        ("spend:vesting:team", 5, ParamError),
        ("spend:genesis:community", 5, ParamError),
        ("spend:issuance", 5, ParamError),
        ("spend:user:", 5, ParamError),
        ("spend:user:bob x", 5, ParamError),
        ("spend:user:bob", 0, ParamError),
        ("spend:user:bob", -5, ParamError),
        ("spend:user:bob", 1.5, ParamError),
        ("spend:user:bob", True, ParamError),
        ("spend:user:bob", 2**62, ParamError),
        ("spend:user:ghost", 5, UnknownAccountError),
        ("spend:provider:ghost", 5, UnknownAccountError),
    ],
)
def test_malformed_spend_proposals_are_refused(council, param, value, error):
    refused(council, error, council.propose, "big", param, value, T0, "bad-spend")
    assert council.proposals() == []


def test_only_staked_providers_propose_spends(council):
    refused(council, GovernanceError, council.propose, "alice", "spend:user:alice", 5, T0, "p", match="no stake")


def test_a_passed_spend_moves_exactly_once_even_if_tallied_twice(council):
    led = council
    treasury = led.balance("treasury")
    pid = vote_through(led, spend_param("user:bob"), neuro(25), "grant-bob")
    assert led.balance(user("bob")) == 0  # nothing before the tally
    first = led.tally(pid, END)
    assert first["status"] == "passed"
    assert {k: v for k, v in first["spent"].items() if k != "entry"} == {
        "debit": "treasury",
        "credit": "user:bob",
        "amount": neuro(25),
    }
    snapshot = dump(led)
    again = led.tally(pid, END + 1)
    assert again["status"] == "passed" and again["spent"] == first["spent"]
    assert dump(led) == snapshot  # the second tally wrote nothing
    assert led.balance(user("bob")) == neuro(25) and led.balance("treasury") == treasury - neuro(25)
    entry = led.history(user("bob"))[0]
    assert (entry["kind"], entry["idem"], entry["cause"]) == (
        "treasury-spend",
        f"treasury-spend:{pid}",
        f"proposal:{pid}",
    )
    assert led.report()["treasury_spent"] == neuro(25)
    assert all(v == DEFAULT_PARAMS[k] for k, v in led.params().items())  # a spend changes no parameter


@pytest.mark.parametrize(
    "votes, status",
    [
        ([("big", False)], "rejected"),
        ([("small", True), ("big", False)], "rejected"),  # 40% for, 60% against
        ([], "no-quorum"),
    ],
)
def test_a_spend_that_does_not_pass_moves_nothing(council, votes, status):
    led = council
    pid = led.propose("big", spend_param("provider:small"), neuro(10), T0, "p")
    for voter, yes in votes:
        led.vote(pid, voter, yes, T0)
    balances = led.balances()
    result = led.tally(pid, END)
    assert result["status"] == status and "spent" not in result
    assert led.balances() == balances
    assert led.report()["treasury_spent"] == 0


def test_a_spend_the_treasury_cannot_pay_fails_and_moves_nothing(council):
    led = council
    treasury = led.balance("treasury")
    first = vote_through(led, spend_param("user:bob"), treasury - 1, "most")
    second = vote_through(led, spend_param("user:alice"), 2, "more")  # voted for while it could be paid
    assert led.tally(first, END)["status"] == "passed"
    balances = led.balances()
    result = led.tally(second, END)
    assert result["status"] == "failed" and "spent" not in result
    assert led.balances() == balances and led.balance("treasury") == 1
    assert led.tally(second, END + 10)["status"] == "failed"  # and stays failed: a new vote pays it, if any
    assert [p["status"] for p in led.proposals()] == ["passed", "failed"]


def test_an_auditor_finds_a_spend_paid_without_a_vote(council):
    led = council
    pid = vote_through(led, spend_param("user:bob"), 7, "p")
    led.tally(pid, END)
    with led.db.write() as cur:  # as if someone with the database rewrote the vote's outcome
        cur.execute("UPDATE proposals SET status = 'rejected' WHERE id = ?", (pid,))
    assert led.check_invariants() == [f"treasury-spend:{pid}: a treasury spend without a passed proposal"]
    with led.db.write() as cur:
        cur.execute("UPDATE proposals SET status = 'passed', value = 8 WHERE id = ?", (pid,))
    assert led.check_invariants() == [f"treasury-spend:{pid}: voted 8 to user:bob, paid [('treasury', 'user:bob', 7)]"]
    with led.db.write() as cur:
        cur.execute("UPDATE proposals SET value = 7 WHERE id = ?", (pid,))


# ---- accounts bound to identities ---------------------------------------------------------------


def test_a_client_charging_another_users_account_needs_a_grant(council):
    led = council
    assert led.may_charge("alice", "alice") and not led.may_charge("alice", "gateway")
    err = refused(led, NotGrantedError, led.hold, "alice", "r1", 100, T0, by="gateway")
    assert "gateway" in str(err) and "user:alice" in str(err) and "neuro-dask ledger grant alice gateway" in str(err)
    refused(led, NotGrantedError, led.hold, "alice", "r1", 100, T0, by="bob")  # another user's certificate
    refused(led, NotGrantedError, led.hold, "ghost", "r1", 100, T0, by="gateway")  # says nothing of the account
    led.hold("alice", "own", 100, T0, by="alice")  # its own account needs no grant

    led.grant("alice", "gateway", T0, "g1")
    assert led.may_charge("alice", "gateway") and not led.may_charge("bob", "gateway")
    assert led.grants() == [{"account": "alice", "client": "gateway", "granted_at": T0, "idem": "g1"}]
    led.hold("alice", "r1", 100, T0, by="gateway")
    assert led.hold_of("r1")["charged_by"] == "gateway"

    led.revoke("alice", "gateway", T0 + 5, "rv1")
    assert not led.may_charge("alice", "gateway") and led.grants("alice") == []
    refused(led, NotGrantedError, led.hold, "alice", "r2", 100, T0 + 6, by="gateway")
    refused(led, NotGrantedError, led.hold, "alice", "r1", 100, T0 + 6, by="gateway")  # not even a replay
    led.grant("alice", "gateway", T0 + 7, "g2")  # granted again: a new grant
    assert [g["idem"] for g in led.grants("alice")] == ["g2"]


def test_grant_and_revoke_refusals_write_nothing(council):
    led = council
    refused(led, UnknownAccountError, led.grant, "ghost", "gateway", T0, "g")
    refused(led, LedgerError, led.grant, "alice", "alice", T0, "g", match="without a grant")
    for bad in ("", " gateway", "gate way", "gate\nway", "x" * 256, None, 5):
        refused(led, LedgerError, led.grant, "alice", bad, T0, "g", match="without spaces")
    refused(led, LedgerError, led.grant, "alice", "gateway", T0, "hold:x", match="reserved")
    refused(led, LedgerError, led.revoke, "alice", "gateway", T0, "rv", match="no grant")
    led.grant("alice", "gateway", T0, "g")
    assert led.grant("alice", "gateway", T0 + 1, "g").replayed  # a retry
    refused(led, LedgerError, led.grant, "alice", "gateway", T0, "g-again", match="may already charge")
    refused(led, IdempotencyConflictError, led.grant, "bob", "gateway", T0, "g")
    led.revoke("alice", "gateway", T0, "rv")
    assert led.revoke("alice", "gateway", T0, "rv").replayed
    refused(led, LedgerError, led.revoke, "alice", "gateway", T0, "rv-again", match="no grant")


# ---- the audit ----------------------------------------------------------------------------------


def test_the_audit_lists_every_operator_entry_newest_first(council):
    led = council
    led.grant("alice", "gateway", T0 + 1, "g1")
    led.hold("alice", "r", 1_000, T0 + 2, by="gateway")  # the network's, not the operator's
    led.settle_verified("r", {"big": 3}, now=T0 + 3)
    led.slash("small", "fraud", T0 + 4)
    led.revoke("alice", "gateway", T0 + 5, "rv1")
    pid = vote_through(led, spend_param("user:bob"), 9, "spend-bob")
    led.tally(pid, END)
    rows = led.audit()
    assert [r["kind"] for r in rows] == [
        "treasury-spend",
        "revoke",
        "grant",
        "deposit",
        "stake",
        "transfer",
        "stake",
        "transfer",
    ]
    spend, revoke, grant, deposit = rows[:4]
    assert spend | {"entry": 0} == {
        "entry": 0,
        "at": END,
        "kind": "treasury-spend",
        "amount": 9,
        "client": None,
        "accounts": ["treasury", "user:bob"],
        "idem": f"treasury-spend:{pid}",
        "cause": f"proposal:{pid}",
    }
    assert (revoke["accounts"], revoke["client"], revoke["amount"], revoke["at"]) == (
        ["user:alice"],
        "gateway",
        0,
        T0 + 5,
    )
    assert (grant["accounts"], grant["client"], grant["idem"]) == (["user:alice"], "gateway", "g1")
    assert (deposit["accounts"], deposit["amount"], deposit["idem"]) == (
        ["genesis:community", "user:alice"],
        neuro(100),
        "fund-alice",
    )
    assert [r["entry"] for r in rows] == sorted((r["entry"] for r in rows), reverse=True)
    assert led.audit(limit=2) == rows[:2]
    for bad in (0, -1, 1.5, True):
        refused(led, LedgerError, led.audit, limit=bad)


def test_a_small_treasury_config_still_pays_by_vote():
    led = Ledger.open("sqlite://:memory:", LedgerConfig(max_supply=neuro(10_000)), now=T0)
    staked_provider(led, "big", neuro(1))
    led.open_user("u")
    pid = vote_through(led, spend_param("user:u"), led.balance("treasury"), "all")
    assert led.tally(pid, END)["status"] == "passed"
    assert led.balance("treasury") == 0 and led.balance(user("u")) == neuro(2_000)
    assert led.check_invariants() == []
    led.close()
