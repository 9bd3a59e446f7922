"""The private tier on an in-process cluster (docs/privacy.md): the bundled adder and a tiny
golden model answer exactly as on the standard tier, workers only ever see random-looking
shares, and an expert without two distinct owners is refused."""

from __future__ import annotations

import random

import dask
import pytest
import torch
from cluster_helpers import add_worker, neuro_cluster

import neuro_dask as nd
from neuro_dask.errors import ConfigError
from neuro_dask.privacy import decode
from neuro_dask.privacy.private_executor import PrivateTierUnavailableError
from neuro_dask.runtime import private_runner


@pytest.fixture(scope="module")
def owners_cluster(tmp_path_factory):
    """Three workers of three declared owners."""
    with neuro_cluster(0, tmp_path=tmp_path_factory.mktemp("private")) as (cluster, client):
        for name in ("alice", "bob", "carol"):
            add_worker(client, cluster.scheduler_address, f"w-{name}", "--neuro-owner", name)
        client.wait_for_workers(3, timeout=30)
        yield cluster, client


@pytest.fixture
def worker_views(monkeypatch):
    """Every share a worker of this process receives: (step, expert, rows)."""
    seen: list[tuple[str, int, torch.Tensor]] = []
    run = private_runner.PrivateExpertHost.run

    def spy(self, request):
        for e, rows in request.inputs.items():
            seen.append((request.step, e, rows.clone()))
        return run(self, request)

    monkeypatch.setattr(private_runner.PrivateExpertHost, "run", spy)
    return seen


def test_adder_answers_the_same_on_the_private_tier(owners_cluster, worker_views):
    from neuro_dask.demo.addition import ASSET_DIR, exact_match, sample_problems

    _, client = owners_cluster
    problems = sample_problems(36, random.Random(7), held_out=True)
    prompts = [p.prompt for p in problems]
    with nd.load(ASSET_DIR, client=client) as standard:
        expected = standard.generate_text(prompts, max_new_tokens=5)
    with nd.load(ASSET_DIR, client=client, privacy="private") as private:
        got = private.generate_text(prompts, max_new_tokens=5)
        stats = dict(private.executor.stats)
    assert got == expected
    assert exact_match(got, problems) == exact_match(expected, problems)
    assert stats["round_trips"] >= 2 * stats["layers"] > 0
    assert worker_views
    for _step, _e, rows in worker_views:  # a real hidden state decodes to small numbers; a share does not
        assert decode(rows).abs().median() > 1e6


def test_tiny_golden_model_generates_the_same_on_the_private_tier(owners_cluster, sharded):
    _, client = owners_cluster
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 3, 2, 40, 41, 42]])
    mask = torch.ones_like(ids)
    with nd.load(sharded("mixtral"), client=client) as standard, \
            nd.load(sharded("mixtral"), client=client, privacy="private") as private:
        logits = private.forward(ids, mask)
        torch.testing.assert_close(logits, standard.forward(ids, mask), atol=1e-3, rtol=0)
        assert torch.equal(private.generate(ids, mask, max_new_tokens=16),
                           standard.generate(ids, mask, max_new_tokens=16))


def test_private_tier_refuses_experts_of_a_single_owner(tmp_path):
    from neuro_dask.demo.addition import ASSET_DIR

    with dask.config.set({"neuro.client.missing-expert-wait": 0.5}), \
            neuro_cluster(2, tmp_path=tmp_path, worker_args=["--neuro-owner", "solo"]) as (_, client):
        with nd.load(ASSET_DIR, client=client) as standard:
            assert standard.generate_text(["1+2="], max_new_tokens=3) == ["3"]
        with nd.load(ASSET_DIR, client=client, privacy="private") as private:
            with pytest.raises(PrivateTierUnavailableError, match="2 distinct owners") as info:
                private.generate_text(["1+2="], max_new_tokens=3)
    assert all(owners == ["solo"] for owners in info.value.owners.values())


def test_private_without_a_client_is_a_config_error(sharded):
    with pytest.raises(ConfigError, match="needs a client"):
        nd.load(sharded("mixtral"), privacy="private")
