"""The NEURO ledger on the network: clients pay, honest providers earn, proven liars are slashed,
unstaked workers get no work, and a client without funds is refused before any work is sent."""

from __future__ import annotations

import dask
import pytest
from cluster_helpers import neuro_cluster, scheduler_status, worker_status
from polling import poll_until

import neuro_dask as nd
from neuro_dask.cli.drill import run_drill
from neuro_dask.client.dispatch.executor import PaymentRefusedError
from neuro_dask.ledger import Ledger, LedgerConfig, neuro


def test_a_drill_charges_the_client_pays_the_honest_and_slashes_the_proven_perturbers(sharded, tmp_path):
    url = f"sqlite:///{tmp_path}/ledger.db"
    report = run_drill(
        sharded("mixtral"), workers=6, adversaries=0.34, mode="perturb", seed=3, prompts=6, tokens=16, ledger=url
    )
    assert report.identical and report.wrong_accepted == 0
    effect = report.ledger
    assert effect["problems"] == []
    assert effect["charged"] > 0 and sum(effect["earned"].values()) > 0
    assert effect["adversaries_earned"] == {}  # a perturber's answers are never validated
    exercised = sorted(set(report.adversaries) - set(report.unexercised))
    assert exercised and effect["slashed"] == exercised
    books = effect["report"]
    assert books["fees"] == effect["charged"]  # a fresh database: this drill's fee is all of them
    assert books["minted"] == books["balances_total"] + books["burned"] == books["max_supply"]
    assert books["slashed"] > 0 and books["burned"] > 0
    # The honest providers' fee income is the fee less the treasury's share (which pays the burn).
    p = Ledger(url, LedgerConfig.from_dask_config()).params()
    treasury_share = effect["charged"] * p["treasury_bps"] // 10_000
    assert sum(effect["earned"].values()) <= effect["charged"] - treasury_share


@pytest.fixture
def ledger_url(tmp_path):
    url = f"sqlite:///{tmp_path}/net.db"
    ledger = Ledger.open(url, LedgerConfig.from_dask_config())
    ledger.open_user("pauper")
    ledger.open_user("alice")
    ledger.deposit("alice", neuro(100), "alice-funds")
    ledger.close()
    return url


def stake(url: str, *names: str) -> None:
    ledger = Ledger(url, LedgerConfig.from_dask_config())
    for name in names:
        ledger.stake_from_community(name, "test")
    ledger.close()


def test_only_staked_workers_are_routed_to_and_a_client_without_funds_is_refused(sharded, ledger_url, tmp_path):
    stake(ledger_url, "0", "1")  # worker "2" stakes nothing
    config = {"neuro.ledger.url": ledger_url, "neuro.client.trust": True, "neuro.scheduler.trusted": ["0"]}
    with dask.config.set(config), neuro_cluster(3, replicas=3, tmp_path=tmp_path) as (_, client):
        workers = {w["name"]: a for a, w in scheduler_status(client)["workers"].items()}
        with dask.config.set({"neuro.client.account": "alice"}), nd.load(sharded("mixtral"), client=client) as model:
            routed = {w for ws in model.executor.fetch_routes().routes.values() for w in ws}
            assert routed == {workers["0"], workers["1"]}
            model.generate([[5, 6, 7]], max_new_tokens=4)
            settled = model.executor.settlements[-1]
        assert settled["status"] == "OK" and settled["fee"] > 0
        assert worker_status(client, workers["2"])["calls_served"] == 0
        for account in ("pauper", "nobody"):
            with (
                dask.config.set({"neuro.client.account": account}),
                nd.load(sharded("mixtral"), client=client) as model,
            ):
                served = sum(worker_status(client, a)["calls_served"] for a in workers.values())
                with pytest.raises(PaymentRefusedError):
                    model.generate([[5, 6, 7]], max_new_tokens=4)
                assert sum(worker_status(client, a)["calls_served"] for a in workers.values()) == served


def test_a_passed_proposal_changes_the_clients_trust_policy(sharded, ledger_url, tmp_path):
    stake(ledger_url, "0", "1")
    ledger = Ledger(ledger_url, LedgerConfig.from_dask_config())
    proposal = ledger.propose("0", "spot_check_bps", 10_000, now=0.0, idem="check-everything")
    ledger.vote(proposal, "0", True, now=1.0)
    ledger.vote(proposal, "1", True, now=1.0)
    config = {
        "neuro.ledger.url": ledger_url,
        "neuro.client.trust": True,
        "neuro.scheduler.trusted": ["0"],
        "neuro.client.account": "alice",
    }
    with dask.config.set(config), neuro_cluster(2, replicas=2, tmp_path=tmp_path) as (_, client):
        with nd.load(sharded("mixtral"), client=client) as model:
            model.generate([[5, 6, 7]], max_new_tokens=2)
            assert model.executor.trusted.policy.replication.spot_check == 0.05
            assert ledger.tally(proposal, now=10 * 24 * 3600.0)["status"] == "passed"
            ledger.close()
            # The scheduler re-reads the live parameters every 2 s and hands them out with the routes.
            poll_until(
                lambda: model.executor.fetch_routes().params.get("spot_check_bps") == 10_000,
                60,
                "the passed proposal to reach the routes",
                interval=0.1,
            )
            model.executor.routes = model.executor.fetch_routes()
            model.generate([[5, 6, 7]], max_new_tokens=2)
            assert model.executor.trusted.policy.replication.spot_check == 1.0


def test_charging_picks_the_account_that_pays_per_thread(sharded, ledger_url, tmp_path):
    stake(ledger_url, "0", "1")
    ledger = Ledger(ledger_url, LedgerConfig.from_dask_config())
    ledger.open_user("bob")
    ledger.deposit("bob", neuro(50), "bob-funds")
    config = {
        "neuro.ledger.url": ledger_url,
        "neuro.client.trust": True,
        "neuro.scheduler.trusted": ["0"],
        "neuro.client.account": "alice",
    }
    with dask.config.set(config), neuro_cluster(2, replicas=2, tmp_path=tmp_path) as (_, client):
        with nd.load(sharded("mixtral"), client=client) as model:
            alice, bob = ledger.balance("user:alice"), ledger.balance("user:bob")
            with model.charging("bob"):
                model.generate([[5, 6, 7]], max_new_tokens=3)
            assert ledger.balance("user:bob") < bob and ledger.balance("user:alice") == alice
            with model.charging("pauper"), pytest.raises(PaymentRefusedError):
                model.generate([[5, 6, 7]], max_new_tokens=3)
            model.generate([[5, 6, 7]], max_new_tokens=3)  # the configured account again
            assert ledger.balance("user:alice") < alice
    ledger.close()


def test_the_private_tier_is_held_at_its_price_and_pays_its_share_holders(sharded, ledger_url, tmp_path):
    """Every (token, expert) the client computed on shares is paid once at the private price;
    the share holders share the fee; nothing is credited toward emissions (shares are unvalidated)."""
    stake(ledger_url, "0", "1", "2")
    with (
        dask.config.set({"neuro.ledger.url": ledger_url, "neuro.client.account": "alice"}),
        neuro_cluster(3, tmp_path=tmp_path) as (_, client),
        nd.load(sharded("mixtral"), client=client, privacy="private") as model,
    ):
        before = Ledger(ledger_url, LedgerConfig.from_dask_config()).balance("user:alice")
        model.generate([[5, 6, 7], [8, 9, 10]], max_new_tokens=4)
        settled = model.executor.settlements[-1]
        pairs = model.executor.stats["rows"]  # (token, expert) pairs the client sent as shares
    ledger = Ledger(ledger_url, LedgerConfig.from_dask_config())
    p = ledger.params()
    assert settled["status"] == "OK" and settled["tier"] == "private"
    assert settled["private_expert_tokens"] == pairs > 0 and settled["expert_tokens"] == 0
    assert settled["fee"] == p["price_per_request"] + pairs * p["price_per_private_expert_token"]
    assert before - ledger.balance("user:alice") == settled["fee"]
    holders = {k for k, v in settled["paid"].items() if k.startswith("provider:") and v > 0}
    assert len(holders) >= 2  # at least two owners held shares
    assert ledger.leaderboard(by="worker") == []
    assert ledger.check_invariants() == []
    ledger.close()


def test_a_hold_whose_client_vanished_expires_and_is_refunded(sharded, ledger_url, tmp_path):
    """A gateway that crashed mid-request never ends it: after neuro.scheduler.hold-seconds the
    scheduler settles it with the receipts presented (none here) and refunds the rest."""
    stake(ledger_url, "0", "1")
    config = {"neuro.ledger.url": ledger_url, "neuro.scheduler.hold-seconds": 1.0}
    with dask.config.set(config), neuro_cluster(2, tmp_path=tmp_path) as (_, client):
        with dask.config.set({"neuro.client.account": "alice"}), nd.load(sharded("mixtral"), client=client) as model:
            ledger = Ledger(ledger_url, LedgerConfig.from_dask_config())
            before = ledger.balance("user:alice")
            begun = client.sync(
                client.scheduler.neuro_request_begin,
                model=model.executor.model_id,
                account="alice",
                expert_tokens=10_000,
            )
            assert begun["status"] == "OK" and begun["held"] > 0
            assert ledger.balance("user:alice") == before - begun["held"]
            # never ended by its client: the hold expires
            poll_until(
                lambda: (ledger.hold_of(begun["request"]) or {}).get("state") != "open", 60, "the hold to expire"
            )
            hold = ledger.hold_of(begun["request"])
            price = ledger.params()["price_per_request"]
            ledger.close()
    assert hold["state"] == "expired" and hold["fee"] == price
    # Everything but the request price came back (docs/ledger.md: an expired hold with no work).
    assert Ledger(ledger_url, LedgerConfig.from_dask_config()).balance("user:alice") == before - price
