"""Speculative decoding with the experts on workers: verification passes go through the same
machinery as plain steps (trust quorums, micro-batch lanes, concurrent generations sharing
expert calls, the private tier) and the output is plain decoding's, token for token."""

from __future__ import annotations

import threading

import dask
import pytest
import torch
from cluster_helpers import add_worker, neuro_cluster
from polling import poll_until

import neuro_dask as nd
from neuro_dask.demo.addition import ASSET_DIR
from neuro_dask.demo.train import DRAFT_ASSET_DIR

PROMPTS = ["123+456=", "908+97=", "55+945=", "701+299=", "3+4=", "640+360="]


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    with neuro_cluster(3, replicas=2, tmp_path=tmp_path_factory.mktemp("speculative")) as (cluster, client):
        yield cluster, client


@pytest.fixture(scope="module")
def cluster_client(network):
    return network[1]


@pytest.fixture(scope="module")
def draft():
    return nd.load(DRAFT_ASSET_DIR)


def _ids(model, prompts=PROMPTS):
    return model.tokenizer.encode_batch(list(prompts))


def test_verification_passes_run_through_the_trust_quorums(cluster_client, draft):
    with dask.config.set({"neuro.client.trust": True, "neuro.client.spot-check": 1.0, "neuro.client.seed": 0}):
        model = nd.load(ASSET_DIR, client=cluster_client)
    with model:
        for prompt in PROMPTS[:3]:
            ids = _ids(model, [prompt])
            plain = model.generate(ids, max_new_tokens=6, speculative=None)
            got = model.generate(ids, max_new_tokens=6, speculative="draft-model", draft_model=draft)
            assert torch.equal(got, plain)
        stats = model.stats()
    assert stats["speculation"]["kept"] > 0, stats["speculation"]  # drafts were verified and kept
    assert stats["units"] > 0 and stats["replicas_sent"] >= stats["units"]  # every call checked by a quorum


def test_the_dashboard_hears_of_every_pass(network, draft):
    cluster, client = network
    feed = cluster.scheduler.extensions["neuro"].feed
    before = feed.counts.get("speculative_passes", 0)
    with nd.load(ASSET_DIR, client=client) as model:
        model.generate(_ids(model, PROMPTS[:1]), max_new_tokens=6, speculative="draft-model", draft_model=draft)
        passes = model.stats()["speculation"]["passes"]
    # reported with the request's end (the reports flush before the scheduler settles it)
    poll_until(lambda: feed.counts.get("speculative_passes", 0) - before >= passes, 30, "the passes reported")
    assert feed.counts.get("speculative_kept", 0) > 0


def test_lanes_and_concurrent_generations_speculate_exactly(cluster_client, draft):
    with dask.config.set({"neuro.client.micro-batches": 2}):
        model = nd.load(ASSET_DIR, client=cluster_client)
    with model:
        ids = _ids(model)
        plain = model.generate(ids, max_new_tokens=6, speculative=None)
        assert torch.equal(model.generate(ids, max_new_tokens=6, speculative="self"), plain)  # 2 lanes
        results, errors = {}, []

        def ask(i: int) -> None:
            try:
                row = _ids(model, [PROMPTS[i]])
                results[i] = model.generate(row, max_new_tokens=6, speculative="draft-model", draft_model=draft)
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and len(results) == 4
        for i, got in results.items():
            assert torch.equal(got, model.generate(_ids(model, [PROMPTS[i]]), max_new_tokens=6, speculative=None))


def test_the_private_tier_verifies_drafts_on_shares(tmp_path, draft):
    with neuro_cluster(0, tmp_path=tmp_path) as (cluster, client):
        owners = [add_worker(client, cluster.scheduler_address, f"w-{n}", "--neuro-owner", n) for n in ("alice", "bob")]
        try:
            client.wait_for_workers(2, timeout=30)
            with nd.load(ASSET_DIR, client=client, privacy="private") as model:
                ids = _ids(model, PROMPTS[:2])
                plain = model.generate(ids, max_new_tokens=6, speculative=None)
                got = model.generate(ids, max_new_tokens=6, speculative="draft-model", draft_model=draft)
                assert torch.equal(got, plain)
                assert model.stats()["speculation"]["passes"] > 0
        finally:  # workers added beside the cluster's own are closed here: the cluster does not own them
            for worker in owners:
                client.sync(worker.close)
