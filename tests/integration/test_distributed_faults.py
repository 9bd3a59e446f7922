"""Wrong, slow or vanishing workers change no output; a missing expert is a clear error."""

from __future__ import annotations

import shutil
import time

import dask
import pytest
import torch
from cluster_helpers import neuro_cluster, scheduler_status, worker_status
from distributed import Worker
from polling import poll_until
from tiny_models import padded_batch

import neuro_dask as nd
from neuro_dask.client.dispatch.routes import ExpertsUnloadableError, ExpertUnavailableError
from neuro_dask.store.manifest import Manifest, expert_path
from neuro_dask.store.remote import ExpertFileCache


def test_worker_closed_mid_generation_changes_no_token(sharded, tmp_path):
    ids, mask = padded_batch((5, 9, 13), seed=2)
    expected = nd.load(sharded("mixtral")).generate(ids, mask, max_new_tokens=64)
    with neuro_cluster(3, tmp_path=tmp_path) as (cluster, client), nd.load(sharded("mixtral"), client=client) as model:
        steps = []
        for i, token in enumerate(model.stream(ids, mask, max_new_tokens=64)):
            steps.append(token)
            if i == 10:
                victim = next(iter(cluster.workers.values()))
                client.sync(victim.close)
        out = torch.cat([expected[:, : ids.shape[1]], torch.stack(steps, 1)], 1)
        assert torch.equal(out, expected)
        assert len(scheduler_status(client)["workers"]) == 2


def test_joining_worker_receives_experts_and_serves(sharded, tmp_path):
    ids, mask = padded_batch((4, 7), seed=3)
    expected = nd.load(sharded("qwen3_moe")).generate(ids, mask, max_new_tokens=16)
    with (
        dask.config.set({"neuro.client.routes-refresh": 0.2}),
        neuro_cluster(2, replicas=3, tmp_path=tmp_path) as (cluster, client),
        nd.load(sharded("qwen3_moe"), client=client) as model,
    ):
        before = set(cluster.scheduler.workers)
        cluster.scale(3)
        poll_until(lambda: len(cluster.scheduler.workers) == 3, 60, "the third worker")
        (new,) = set(cluster.scheduler.workers) - before
        poll_until(lambda: scheduler_status(client)["workers"][new]["serving"], 60, "the new worker to serve")

        def generates_right_and_reaches_the_new_worker():
            assert torch.equal(model.generate(ids, mask, max_new_tokens=16), expected)
            return worker_status(client, new)["calls_served"] > 0

        # No manual refresh: the client's routes age past routes-refresh and pick the worker up.
        poll_until(generates_right_and_reaches_the_new_worker, 60, "calls to reach the new worker")


def test_all_replicas_gone_raises_a_clear_error(sharded, tmp_path):
    with (
        dask.config.set({"neuro.client.missing-expert-wait": 1.0}),
        neuro_cluster(2, tmp_path=tmp_path) as (cluster, client),
        nd.load(sharded("olmoe"), client=client) as model,
    ):
        for worker in list(cluster.workers.values()):
            client.sync(worker.close)
        started = time.monotonic()
        with pytest.raises(ExpertUnavailableError, match="no live worker serves expert"):
            model.generate([[5, 6, 7]], max_new_tokens=4)
        assert time.monotonic() - started < 30


def test_worker_with_a_wrong_store_path_reports_it_and_serves_nothing(sharded, tmp_path):
    ids, mask = padded_batch((6,), seed=4)
    expected = nd.load(sharded("mixtral")).generate(ids, mask, max_new_tokens=8)
    with neuro_cluster(2, replicas=3, tmp_path=tmp_path) as (cluster, client):

        async def start_bad_worker():
            return await Worker(
                cluster.scheduler_address,
                nthreads=1,
                preload=["neuro_worker"],
                preload_argv=[
                    [
                        "--neuro-store",
                        str(tmp_path / "nowhere"),
                        "--neuro-no-benchmark",
                        "--neuro-cache-dir",
                        str(tmp_path / "bad-cache"),
                    ]
                ],
            )

        bad = client.sync(start_bad_worker)
        try:
            with nd.load(sharded("mixtral"), client=client) as model:
                poll_until(
                    lambda: any(
                        e[1].get("action") == "load-failed" and e[1].get("worker") == bad.address
                        for e in client.get_events("neuro")
                    ),
                    60,
                    "the load-failed event",
                )
                routes = model.executor.fetch_routes().routes
                assert all(bad.address not in ws for ws in routes.values())
                assert torch.equal(model.generate(ids, mask, max_new_tokens=8), expected)
                assert worker_status(client, bad.address)["calls_served"] == 0
        finally:
            client.sync(bad.close)


def test_corrupted_cached_shard_is_fetched_again_not_served(sharded, tmp_path):
    root = sharded("mixtral")
    manifest = Manifest.read(root)
    cache = ExpertFileCache(tmp_path / "cache")
    victim = cache.path_for(manifest.expert(0, 1))
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_bytes(b"\0" * manifest.expert(0, 1).bytes)  # right size, wrong bytes
    ids, mask = padded_batch((5, 8), seed=5)
    expected = nd.load(root).generate(ids, mask, max_new_tokens=8)
    with neuro_cluster(2, tmp_path=tmp_path) as (_, client), nd.load(root, client=client) as model:
        assert torch.equal(model.generate(ids, mask, max_new_tokens=8), expected)
    assert cache.cached(manifest.expert(0, 1))


def test_corrupted_store_is_refused_by_every_worker(sharded, tmp_path):
    root = shutil.copytree(sharded("mixtral"), tmp_path / "store")
    target = root / expert_path(1, 2)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    # a long timeout: once every worker has tried and failed, the client is told why at once
    with dask.config.set({"neuro.client.load-timeout": 600.0}), neuro_cluster(2, tmp_path=tmp_path) as (_, client):
        with pytest.raises(
            ExpertsUnloadableError,
            match=r"every live worker failed to load expert\(s\) \[2\] of "
            r"layer 1 .*sha256",
        ) as info:
            nd.load(root, client=client)
        assert isinstance(info.value, ExpertUnavailableError) and info.value.waited < 120
        assert " says: " in info.value.why  # a worker's words, attributed to that worker
        failures = [e for _, e in client.get_events("neuro") if e.get("action") == "load-failed"]
        assert failures and "sha256" in str(failures)
