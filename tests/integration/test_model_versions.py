"""Model versions on a channel, on an in-process cluster (neuro_dask/scheduler/versions.py, docs/privacy.md):
a new version (a federated round's output) loads beside the current one; a client following the
channel keeps generating through the switch without one request failing; the old version's
experts are dropped from the workers once its requests have ended; a client pinned to it gets a
clear error naming the new one; and with version-adoption: vote only a passed proposal adopts."""

from __future__ import annotations

import threading
import time

import dask
import numpy as np
import pytest
from cluster_helpers import neuro_cluster, scheduler_status, worker_status
from polling import poll_until

import neuro_dask as nd
from neuro_dask.dashboard.charts import VersionTable
from neuro_dask.demo.addition import ASSET_DIR
from neuro_dask.federated.training import get_flat, set_flat, write_version
from neuro_dask.ledger import Ledger, LedgerConfig
from neuro_dask.ledger.params import adoption_param
from neuro_dask.scheduler.versions import RetiredVersionError

PROMPTS = ["123+456=", "999+1=", "50+50="]
ANSWERS = ["579", "1000", "100"]


@pytest.fixture(scope="module")
def v2_store(tmp_path_factory):
    """The bundled adder with every trained weight nudged: new expert files, a new model id,
    the same answers."""
    model = nd.load(ASSET_DIR)
    flat = get_flat(model)
    set_flat(model, flat + np.random.default_rng(0).normal(0, 1e-5, flat.shape).astype(flat.dtype))
    out = tmp_path_factory.mktemp("versions") / "v2"
    manifest = write_version(model, ASSET_DIR, out, {"rounds": 0, "note": "test version"})
    return str(out), manifest.model_id


def publish(client, store, channel="adder"):
    reply = client.sync(client.scheduler.neuro_publish, store_url=str(store), channel=channel)
    assert reply["status"] == "OK", reply
    return reply


def hosted_models(client):
    return {
        m
        for a in scheduler_status(client)["workers"]
        for m, experts in worker_status(client, a)["hosted"].items()
        if experts
    }


def test_a_following_client_switches_versions_without_a_failed_request(tmp_path, v2_store):
    v2_path, v2 = v2_store
    with (
        dask.config.set({"neuro.scheduler.version-drain-seconds": 0.5}),
        neuro_cluster(3, tmp_path=tmp_path) as (cluster, client),
    ):
        v1 = publish(client, ASSET_DIR)["model"]
        assert publish(client, ASSET_DIR)["role"] == "current"
        pinned = nd.load(ASSET_DIR, client=client)
        follower = nd.follow("adder", client)
        assert follower.model_id == v1
        answers, errors, used = [], [], []
        stop = threading.Event()

        def keep_generating():
            while not stop.is_set():
                try:
                    answers.append(follower.generate_text(PROMPTS, max_new_tokens=5))
                    used.append(follower.model_id)
                except Exception as exc:  # every failure is a defect: collected and asserted empty
                    errors.append(exc)

        thread = threading.Thread(target=keep_generating)
        thread.start()
        try:
            assert publish(client, v2_path) == {**publish(client, v2_path), "role": "candidate"}
            assert pinned.generate_text(PROMPTS[:1], max_new_tokens=5) == ANSWERS[:1]  # v1 still current
            adopted = poll_until(
                lambda: (
                    (r := client.sync(client.scheduler.neuro_adopt, channel="adder", model=v2))["status"] == "OK" and r
                ),
                60,
                "v2 to be served and adopted",
            )
            assert list(adopted["retiring"]) == [v1]
            poll_until(lambda: follower.switches == [(v1, v2)], 60, "the follower to switch")
            poll_until(lambda: v1 in scheduler_status(client)["versions"]["retired"], 60, "v1 to retire")
            poll_until(lambda: hosted_models(client) == {v2}, 60, "the workers to drop v1's experts")
            n = len(answers)
            poll_until(lambda: len(answers) >= n + 3, 60, "generations on v2")
        finally:
            stop.set()
            thread.join(timeout=60)
        assert errors == []
        assert answers and all(a == ANSWERS for a in answers)
        assert used[0] == v1 and used[-1] == v2 and used.count(v1) >= 1
        assert sorted(set(used), key=used.index) == [v1, v2]  # never back to the old version
        with pytest.raises(RetiredVersionError, match=f"current version is {v2}") as info:
            pinned.generate_text(PROMPTS[:1], max_new_tokens=5)
        assert info.value.current == v2
        channel = client.sync(client.scheduler.neuro_channels)["channels"]["adder"]
        assert channel["current"] == v2 and list(channel["history"]) == [v1, v2] and channel["candidate"] is None
        table = VersionTable(cluster.scheduler.extensions["neuro"])  # the dashboard's experts page
        table.update()
        assert list(zip(table.source.data["model"], table.source.data["role"], strict=True)) == [
            (v2, "current"),
            (v1, "retired"),
        ]
        follower.close()
        pinned.close()


def test_an_unserved_candidate_cannot_be_adopted_and_bad_requests_are_refused(tmp_path, v2_store):
    v2_path, v2 = v2_store
    with neuro_cluster(0, tmp_path=tmp_path) as (cluster, client):  # no workers: nothing is ever served
        v1 = publish(client, ASSET_DIR)["model"]
        publish(client, v2_path)
        reply = client.sync(client.scheduler.neuro_adopt, channel="adder", model=v2)
        assert reply["status"] == "error" and "not served yet" in reply["message"]
        reply = client.sync(client.scheduler.neuro_adopt, channel="adder", model=v1 + "x")
        assert "not the candidate" in reply["message"]
        reply = client.sync(client.scheduler.neuro_publish, store_url=str(ASSET_DIR), channel="bad name")
        assert reply["status"] == "error" and "channel name" in reply["message"]
        with pytest.raises(nd.NeuroDaskError, match="no channel 'other'"):
            nd.follow("other", client)


def test_with_votes_only_a_passed_proposal_adopts_a_version(tmp_path, v2_store):
    v2_path, v2 = v2_store
    url = f"sqlite:///{tmp_path}/ledger.db"
    ledger = Ledger.open(url, LedgerConfig.from_dask_config(), now=time.time())
    ledger.open_user("alice")
    ledger.deposit("alice", 10**12, "alice-funds")
    for name in ("0", "1", "2"):
        ledger.stake_from_community(name, "test")
    config = {
        "neuro.ledger.url": url,
        "neuro.client.account": "alice",
        "neuro.scheduler.version-adoption": "vote",
        "neuro.scheduler.version-drain-seconds": 0.0,
    }
    with dask.config.set(config), neuro_cluster(3, tmp_path=tmp_path) as (cluster, client):
        v1 = publish(client, ASSET_DIR)["model"]
        publish(client, v2_path)
        refused = client.sync(client.scheduler.neuro_adopt, channel="adder", model=v2)
        assert refused["status"] == "error" and "governance vote" in refused["message"]
        now = time.time()
        pid = ledger.propose("0", adoption_param("adder", v2), 1, now, "adopt-v2")
        for voter in ("0", "1"):
            ledger.vote(pid, voter, True, now)
        assert ledger.tally(pid, now + ledger.params()["voting_seconds"])["status"] == "passed"
        poll_until(
            lambda: client.sync(client.scheduler.neuro_channels)["channels"]["adder"]["current"] == v2,
            60,
            "the scheduler to adopt the voted version",
        )
        poll_until(lambda: v1 in scheduler_status(client)["versions"]["retired"], 60, "v1 to retire")
        with nd.follow("adder", client) as model:
            assert model.model_id == v2
            assert model.generate_text(PROMPTS, max_new_tokens=5) == ANSWERS
        adopted = [e for _, e in client.get_events("neuro") if e.get("action") == "adopt"]
        assert adopted and adopted[-1]["by"] == "vote" and adopted[-1]["model"] == v2
    ledger.close()


def test_the_gateway_serves_a_channel_across_a_version_switch(tmp_path, v2_store):
    """`neuro-dask serve --channel`: OpenAI clients keep getting answers while the channel moves."""
    import openai

    from neuro_dask.gateway import Gateway, GatewayServer

    v2_path, v2 = v2_store
    with (
        dask.config.set({"neuro.scheduler.version-drain-seconds": 0.0}),
        neuro_cluster(3, tmp_path=tmp_path) as (cluster, client),
    ):
        v1 = publish(client, ASSET_DIR)["model"]
        gateway = Gateway(nd.follow("adder", client), model_id="adder")
        server = GatewayServer(gateway, "127.0.0.1", 0).start()
        try:
            api = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)

            def ask() -> str:
                return (
                    api.completions.create(model="adder", prompt="123+456=", max_tokens=5, temperature=0)
                    .choices[0]
                    .text
                )

            assert ask() == "579" and gateway.model.model_id == v1
            publish(client, v2_path)
            poll_until(
                lambda: client.sync(client.scheduler.neuro_adopt, channel="adder", model=v2)["status"] == "OK",
                60,
                "v2 to be served and adopted",
            )
            assert ask() == "579"  # told of v2 at its start, still run on v1
            assert ask() == "579" and gateway.model.model_id == v2
        finally:
            server.stop()
            gateway.close()
            gateway.model.close()


def ticket_key(dask_scheduler) -> bytes:
    return dask_scheduler.plugins["neuro"].desk.signer.public_der


def test_a_restarted_scheduler_serves_its_models_and_channels_again(tmp_path, v2_store):
    """neuro.scheduler.state-file: published models and channels survive a scheduler restart."""
    import os
    import stat

    v2_path, v2 = v2_store
    state = tmp_path / "scheduler-state.json"
    with dask.config.set({"neuro.scheduler.state-file": str(state)}):
        with neuro_cluster(3, tmp_path=tmp_path) as (_, client):
            v1 = publish(client, ASSET_DIR)["model"]
            publish(client, v2_path)
            poll_until(
                lambda: client.sync(client.scheduler.neuro_adopt, channel="adder", model=v2)["status"] == "OK",
                60,
                "v2 to be served and adopted",
            )
            first_key = client.run_on_scheduler(ticket_key)
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o600  # it holds store URLs
        key_file = tmp_path / "scheduler-state.json.ticket-key"
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600 and b"PRIVATE KEY" in key_file.read_bytes()
        with neuro_cluster(3, tmp_path=tmp_path) as (_, client):  # a new scheduler, same state file
            assert client.run_on_scheduler(ticket_key) == first_key  # tickets in flight stay valid
            versions = client.sync(client.scheduler.neuro_channels)
            assert versions["channels"]["adder"]["current"] == v2 and v1 in versions["retiring"]
            with nd.follow("adder", client) as model:  # v2's experts placed again on the new workers
                assert model.model_id == v2
                assert model.generate_text(PROMPTS, max_new_tokens=5) == ANSWERS
