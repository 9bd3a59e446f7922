"""Adversary drills on an in-process cluster: wrong or colluding volunteers change no output."""

from __future__ import annotations

import json
import threading

import dask
import pytest
import torch
from cluster_helpers import add_worker, neuro_cluster, scheduler_status, trust_events
from polling import poll_until
from tiny_models import padded_batch

import neuro_dask as nd

TRUST = {"neuro.scheduler.trusted": ["0"], "neuro.client.trust": True, "neuro.client.seed": 0}
# The design card's path (per-layer expert futures) carries the same quorums and hedges as the
# direct one: every drill runs over both.
TRANSPORTS = pytest.mark.parametrize("transport", ["direct", "futures"])


def _drill(
    sharded,
    tmp_path,
    adversary: dict,
    honest: int = 7,
    bad: int = 3,
    prompts: int = 10,
    tokens: int = 32,
    transport: str = "direct",
):
    rows = [padded_batch((3 + i % 7,), seed=100 + i)[0][0].tolist() for i in range(prompts)]
    reference = nd.load(sharded("mixtral")).generate(rows, max_new_tokens=tokens)
    settings = {**TRUST, "neuro.client.transport": transport}
    with dask.config.set(settings), neuro_cluster(honest, tmp_path=tmp_path) as (cluster, client):
        adversaries = [
            add_worker(
                client,
                cluster.scheduler_address,
                f"bad{i}",
                "--neuro-adversary",
                json.dumps({**adversary, "seed": i}),
                "--neuro-owner",
                f"mallory{i}",
            )
            for i in range(bad)
        ]
        try:
            client.wait_for_workers(honest + bad)
            with nd.load(sharded("mixtral"), client=client) as model:
                out = model.generate(rows, max_new_tokens=tokens)
                runner = model.executor.trusted
                model.executor.routes = model.executor.fetch_routes()
            bad_addresses = {w.address for w in adversaries}
            status = scheduler_status(client)["workers"]
            return out, reference, runner, bad_addresses, status
        finally:
            for w in adversaries:
                client.sync(w.close)


def _wrong_accepted(runner, bad_addresses):
    return sum(n for group, n in runner.accepted_from.items() if set(group) <= bad_addresses)


@TRANSPORTS
def test_thirty_percent_perturbing_changes_nothing(sharded, tmp_path, transport):
    out, reference, runner, bad, status = _drill(
        sharded, tmp_path, {"mode": "perturb", "scale": 0.05}, transport=transport
    )
    assert model_transport(runner) == transport
    assert torch.equal(out, reference)
    assert _wrong_accepted(runner, bad) == 0
    assert runner.replicas_sent / runner.units <= 3
    assert all(not status[a]["trust_routable"] for a in bad)


@TRANSPORTS
def test_colluders_with_identical_wrong_results_never_win(sharded, tmp_path, transport):
    out, reference, runner, bad, status = _drill(
        sharded, tmp_path, {"mode": "collude", "scale": 0.05}, transport=transport
    )
    assert model_transport(runner) == transport
    assert torch.equal(out, reference)
    assert _wrong_accepted(runner, bad) == 0
    assert all(not status[a]["trust_established"] for a in bad)
    assert all(not status[a]["trust_routable"] for a in bad)


def test_a_defector_with_a_record_is_caught_at_its_first_check(sharded, tmp_path):
    rows = [padded_batch((4 + i % 5,), seed=200 + i)[0][0].tolist() for i in range(8)]
    with dask.config.set(TRUST), neuro_cluster(3, tmp_path=tmp_path) as (cluster, client):
        defector = add_worker(
            client,
            cluster.scheduler_address,
            "defector",
            "--neuro-adversary",
            json.dumps({"mode": "defect", "after": 40, "seed": 7}),
            "--neuro-owner",
            "eve",
        )
        try:
            client.wait_for_workers(4)
            with nd.load(sharded("mixtral"), client=client) as model:
                for _ in range(12):
                    model.generate(rows, max_new_tokens=24)
                runner = model.executor.trusted
            status = scheduler_status(client)["workers"][defector.address]
            caught = [
                e for e in trust_events(client) if e.get("worker") == defector.address and e["action"] == "invalid"
            ]
            served = client.sync(client.rpc(defector.address).neuro_status)["calls_served"]
        finally:
            client.sync(defector.close)
    assert served > 40, "the drill must run past the defection point"
    assert not status["trust_routable"] and caught
    print(f"defector: {served} calls served, {runner.accepted_from.get((defector.address,), 0)} accepted alone")
    # Wrong answers it got accepted alone, unchecked, before its first spot check: bounded by the
    # replication probability max(5%, 20 / record) once it defected (a seeded, repeatable drill).
    alone = runner.accepted_from.get((defector.address,), 0)
    assert alone <= 40


def test_reputation_survives_a_scheduler_restart(sharded, tmp_path):
    settings = {**TRUST, "neuro.scheduler.reputation-file": str(tmp_path / "reputation.json")}
    rows = [padded_batch((6,), seed=300)[0][0].tolist()]
    with dask.config.set(settings):
        with neuro_cluster(2, tmp_path=tmp_path) as (_, client), nd.load(sharded("mixtral"), client=client) as model:
            model.generate(rows, max_new_tokens=12)
        with neuro_cluster(2, tmp_path=tmp_path) as (_, client):
            status = scheduler_status(client)["workers"]
    records = {w["name"]: w for w in status.values()}
    assert records["1"]["trust_consecutive_valid"] > 0  # worker "1" came back under its name with its record
    assert records["0"]["trust_trusted"]


@TRANSPORTS
def test_stragglers_are_hedged_within_the_cap_and_change_nothing(sharded, tmp_path, transport):
    rows = [padded_batch((3 + i % 7,), seed=400 + i)[0][0].tolist() for i in range(6)]
    reference = nd.load(sharded("mixtral")).generate(rows, max_new_tokens=16)
    straggle = json.dumps({"mode": "straggle", "probability": 0.2, "delay": 0.05})
    with (
        dask.config.set({**TRUST, "neuro.client.transport": transport}),
        neuro_cluster(4, replicas=3, tmp_path=tmp_path, worker_args=["--neuro-adversary", straggle]) as (_, client),
    ):
        with nd.load(sharded("mixtral"), client=client) as model:
            model.generate(rows, max_new_tokens=8)  # latency samples for the estimates
            out = model.generate(rows, max_new_tokens=16)
            runner = model.executor.trusted
            latency = runner.latency
    assert model_transport(runner) == transport
    assert torch.equal(out, reference)
    # The cap is checked before each hedge, and one hedge may need up to 3 messages (one per host).
    assert 0 < latency.hedges <= 0.1 * latency.calls + 3
    assert runner.late_checked > 0  # abandoned stragglers answered after all, and were compared


@TRANSPORTS
def test_crashing_workers_change_nothing(sharded, tmp_path, transport):
    """Adversaries that serve honestly for a while and then exit mid-generation: their calls
    are re-sent to live replicas, the output is the local one."""
    out, reference, runner, bad, status = _drill(
        sharded, tmp_path, {"mode": "crash", "after": 20}, honest=4, bad=2, transport=transport
    )
    assert model_transport(runner) == transport
    # A crasher answers honestly until it exits, so answers accepted from it alone are right;
    # what counts is that the calls it took down with it were re-sent and nothing changed.
    assert torch.equal(out, reference)
    assert not bad & set(status)  # both crashed and left


def model_transport(runner) -> str:
    return runner.transport.name


@pytest.mark.parametrize("colluders", [1, 2])
def test_colluders_back_first_after_a_scheduler_restart_wait_for_the_anchor(sharded, tmp_path, colluders):
    """A 3-minute soak found this: after a scheduler restart the colluder came back first and
    hosted every expert alone. One colluder: its word alone was accepted (an anchorless network's
    only owner) and credited until it was established. Two of different owners: they agree, and
    an anchorless network takes that agreement. The scheduler's reputation file knows the trusted
    worker, which is only on its way back: the network is not anchorless, the layer waits for it,
    and the answer is the honest one."""
    settings = {**TRUST, "neuro.scheduler.reputation-file": str(tmp_path / "reputation.json")}
    rows = [padded_batch((5,), seed=400)[0][0].tolist()]
    reference = nd.load(sharded("mixtral")).generate(rows, max_new_tokens=6)
    collude = json.dumps({"mode": "collude", "scale": 1.0, "group": "cabal"})
    with dask.config.set(settings):
        with neuro_cluster(2, tmp_path=tmp_path) as (_, client), nd.load(sharded("mixtral"), client=client) as model:
            model.generate(rows, max_new_tokens=6)  # worker "0" (trusted) and "1" earn records
        with neuro_cluster(0, tmp_path=tmp_path) as (cluster, client):
            bad = [
                add_worker(client, cluster.scheduler_address, f"bad{i}", "--neuro-adversary", collude,
                           "--neuro-owner", f"mallory{i}")
                for i in range(colluders)
            ]  # fmt: skip
            client.wait_for_workers(colluders)
            try:
                with nd.load(sharded("mixtral"), client=client) as model:
                    done: list = []
                    generation = threading.Thread(target=lambda: done.append(model.generate(rows, max_new_tokens=6)))
                    generation.start()
                    poll_until(lambda: model.executor.trusted.units > 0, 60, "the generation's first layer call")
                    anchor = add_worker(client, cluster.scheduler_address, "0")
                    generation.join(timeout=120)
                    assert done, "the generation did not finish once the trusted worker was back"
                    assert torch.equal(done[0], reference)
                    assert _wrong_accepted(model.executor.trusted, {w.address for w in bad}) == 0
                records = {w["name"]: w for w in scheduler_status(client)["workers"].values()}
                assert all(records[f"bad{i}"]["trust_consecutive_valid"] == 0 for i in range(colluders))
                client.sync(anchor.close)
            finally:
                for w in bad:
                    client.sync(w.close)
