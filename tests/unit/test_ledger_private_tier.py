"""The private tier's price list (docs/privacy.md, docs/ledger.md): quoted and held at
`price_per_private_expert_token`, settled by the share holders' rows the scheduler verified from
worker-signed receipts, paid from the request's fee only (no emission credit, no reputation),
never cheaper than the standard tier."""

from __future__ import annotations

import pytest

from neuro_dask.ledger import Ledger, LedgerConfig, ParamError, neuro, provider, user
from neuro_dask.ledger.params import DEFAULT_PARAMS, check_consistent
from neuro_dask.ledger.policy import SHARE_ROWS_PER_PRIVATE_TOKEN, split_fee
from neuro_dask.ledger.service import LEASE_SECONDS, LedgerService

T0 = 1_700_000_000.0
P = DEFAULT_PARAMS


@pytest.fixture
def service():
    svc = LedgerService(Ledger.open("sqlite://:memory:", now=T0))
    svc.ledger.open_user("alice")
    svc.ledger.deposit("alice", neuro(100), "fund-alice")
    for w in ("w1", "w2", "w3"):
        svc.join(w, f"owner-{w}")
    yield svc
    assert svc.ledger.check_invariants() == []
    svc.ledger.close()


def test_the_default_private_price_is_twice_the_standard_one():
    assert P["price_per_private_expert_token"] == 2 * P["price_per_expert_token"]
    assert (
        LedgerConfig.from_dask_config().params["price_per_private_expert_token"] == P["price_per_private_expert_token"]
    )


def test_an_older_config_without_the_private_price_gets_twice_the_standard_one():
    import dask.config

    import neuro_dask.settings  # noqa: F401

    raw = {k: v for k, v in dask.config.get("neuro.ledger").items() if k != "price-per-private-expert-token"}
    raw["price-per-expert-token"] = 0.003
    assert LedgerConfig.from_dask_config(raw).params["price_per_private_expert_token"] == 6 * 10**6


def test_quote_prices_private_tokens_at_the_private_rate(service):
    q = service.ledger.quote
    assert q(0, private_tokens=10) == P["price_per_request"] + 10 * P["price_per_private_expert_token"]
    assert q(10) < q(0, private_tokens=10)


def test_private_hold_is_quoted_at_the_private_price(service):
    held = service.hold("alice", "r-private", 1_000, T0, tier="private")
    assert held == {
        "status": "OK",
        "held": P["price_per_request"] + 1_000 * P["price_per_private_expert_token"],
        "tier": "private",
        "expires": T0 + LEASE_SECONDS,
    }
    assert service.ledger.hold_of("r-private")["tier"] == "private"  # kept with the hold, for its settlement
    standard = service.hold("alice", "r-standard", 1_000, T0)
    assert standard["held"] == P["price_per_request"] + 1_000 * P["price_per_expert_token"]


def test_an_unknown_tier_is_refused_before_any_hold(service):
    before = service.ledger.balance(user("alice"))
    reply = service.hold("alice", "r", 10, T0, tier="secret")
    assert reply["status"] == "error" and "unknown tier 'secret'" in reply["message"]
    assert service.ledger.balance(user("alice")) == before


def test_private_settlement_pays_the_share_holders_and_credits_no_emission(service):
    service.hold("alice", "r", 100, T0, tier="private")
    # 3 (token, expert) pairs: w1 and w2 held the gate/up shares, w2 and w3 the down shares.
    settled = service.settle("r", T0 + 1, work={}, share_rows={"w1": 3, "w2": 6, "w3": 3})
    assert settled["status"] == "OK" and settled["tier"] == "private"
    assert settled["private_expert_tokens"] == 12 // SHARE_ROWS_PER_PRIVATE_TOKEN == 3
    assert settled["expert_tokens"] == 0
    fee = P["price_per_request"] + 3 * P["price_per_private_expert_token"]
    assert settled["fee"] == fee
    split = split_fee(fee, {"w1": 3, "w2": 6, "w3": 3}, P["treasury_bps"], P["burn_bps"])
    assert {w: settled["paid"][provider(w)] for w in ("w1", "w2", "w3")} == split.providers
    assert service.ledger.leaderboard(by="worker") == []  # paid by the client, not by the emission pool


def test_private_rows_for_a_standard_request_pay_nothing(service):
    """Share rows never make the standard tier pay private rates: the tier is the hold's."""
    service.hold("alice", "r", 100, T0)
    settled = service.settle("r", T0 + 1, work={"w1": 2}, share_rows={"w1": 50})
    assert settled["fee"] == P["price_per_request"] + 2 * P["price_per_expert_token"]
    assert settled["private_expert_tokens"] == 0 and settled["tier"] == "standard"


def test_a_private_fee_never_exceeds_the_hold(service):
    held = service.hold("alice", "r", 1, T0, tier="private")["held"]
    settled = service.settle("r", T0 + 1, work={}, share_rows={"w1": 400, "w2": 400})
    charged = held - settled["paid"].get(user("alice"), 0)  # nothing comes back
    assert charged == held == settled["charged"] < settled["fee"]


def test_no_vote_can_make_the_private_tier_cheaper_than_the_standard_one():
    with pytest.raises(ParamError, match="at least price_per_expert_token"):
        check_consistent({**P, "price_per_private_expert_token": P["price_per_expert_token"] - 1})
    with pytest.raises(ParamError, match="at least price_per_expert_token"):
        check_consistent({**P, "price_per_expert_token": P["price_per_private_expert_token"] + 1})
    check_consistent({**P, "price_per_private_expert_token": P["price_per_expert_token"]})


def test_a_ledger_made_before_the_private_tier_gets_its_price_on_open(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    Ledger.open(url, now=T0).close()
    ledger = Ledger(url)
    with ledger.db.write() as cur:  # as a ledger from before the parameter existed
        cur.execute("DELETE FROM params WHERE name = ?", ("price_per_private_expert_token",))
    with pytest.raises(KeyError):
        ledger.quote(0, private_tokens=1)
    ledger.close()
    reopened = Ledger.open(url, now=T0 + 10)
    assert reopened.params()["price_per_private_expert_token"] == P["price_per_private_expert_token"]
    assert reopened.check_invariants() == []
    reopened.close()
