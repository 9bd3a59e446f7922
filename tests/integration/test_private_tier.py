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
from neuro_dask.client.dispatch.private_executor import PrivateTierUnavailableError
from neuro_dask.errors import ConfigError
from neuro_dask.privacy import decode
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
    with (
        nd.load(sharded("mixtral"), client=client) as standard,
        nd.load(sharded("mixtral"), client=client, privacy="private") as private,
    ):
        logits = private.forward(ids, mask)
        torch.testing.assert_close(logits, standard.forward(ids, mask), atol=1e-3, rtol=0)
        assert torch.equal(
            private.generate(ids, mask, max_new_tokens=16), standard.generate(ids, mask, max_new_tokens=16)
        )


def test_private_tier_refuses_experts_of_a_single_owner(tmp_path):
    from neuro_dask.demo.addition import ASSET_DIR

    with (
        dask.config.set({"neuro.client.missing-expert-wait": 0.5}),
        neuro_cluster(2, tmp_path=tmp_path, worker_args=["--neuro-owner", "solo"]) as (_, client),
    ):
        with nd.load(ASSET_DIR, client=client) as standard:
            assert standard.generate_text(["1+2="], max_new_tokens=3) == ["3"]
        with nd.load(ASSET_DIR, client=client, privacy="private") as private:
            with pytest.raises(PrivateTierUnavailableError, match="2 distinct owners") as info:
                private.generate_text(["1+2="], max_new_tokens=3)
    assert all(owners == ["solo"] for owners in info.value.owners.values())


def test_private_without_a_client_is_a_config_error(sharded):
    with pytest.raises(ConfigError, match="needs a client"):
        nd.load(sharded("mixtral"), privacy="private")


def private_quorum_cluster(tmp_path, adversary: str | None = None, n: int = 5):
    """n workers of n owners, every expert on every worker; worker w-0 optionally adversarial."""
    import contextlib

    @contextlib.contextmanager
    def cluster():
        with neuro_cluster(0, replicas=n, tmp_path=tmp_path) as (c, client):
            for i in range(n):
                extra = ["--neuro-adversary", adversary] if adversary and i == 0 else []
                add_worker(client, c.scheduler_address, f"w-{i}", "--neuro-owner", f"owner-{i}", *extra)
            client.wait_for_workers(n, timeout=30)
            yield c, client

    return cluster()


def test_with_trust_a_lying_share_holder_is_outvoted_caught_and_the_answers_stay_exact(tmp_path):
    """A worker that corrupts every share it returns changes no answer: each step is computed on
    two independent splits, a disagreement goes to a third, and the liar (only the liar) is
    reported invalid and skipped."""
    from neuro_dask.demo.addition import ASSET_DIR, sample_problems

    prompts = [p.prompt for p in sample_problems(12, random.Random(3), held_out=True)]
    with private_quorum_cluster(tmp_path, adversary='{"mode": "defect", "after": 0, "scale": 0.05}') as (c, client):
        with nd.load(ASSET_DIR, client=client) as standard:
            expected = standard.generate_text(prompts, max_new_tokens=5)
        with (
            dask.config.set({"neuro.client.trust": True}),
            nd.load(ASSET_DIR, client=client, privacy="private") as private,
        ):
            got = private.generate_text(prompts, max_new_tokens=5)
            private.executor.flush_reports()
            stats = dict(private.executor.stats)
        events = [e for _, e in client.get_events("neuro-trust")]
        calls = [r for r in c.scheduler.extensions["neuro"].feed.calls if r.transport == "private"]
    assert got == expected
    assert calls and "caught" in {r.outcome for r in calls} and "checked" in {r.outcome for r in calls}
    assert stats["verified"] > 0 and stats["disputes"] > 0 and stats["caught"] > 0, stats
    caught = {e["name"] for e in events if e["action"] == "invalid"}
    assert caught == {"w-0"}, caught


def test_with_trust_honest_splits_agree_bit_for_bit(tmp_path):
    from neuro_dask.demo.addition import ASSET_DIR

    with (
        private_quorum_cluster(tmp_path, n=4) as (_, client),
        dask.config.set({"neuro.client.trust": True}),
        nd.load(ASSET_DIR, client=client, privacy="private") as private,
    ):
        assert private.generate_text(["123+456=", "7+8="], max_new_tokens=5) == ["579", "15"]
        stats = dict(private.executor.stats)
    assert stats["verified"] > 0 and stats["disputes"] == 0 and stats["unverified"] == 0, stats


def test_with_trust_but_no_disjoint_second_pair_the_call_runs_unverified_and_says_so(owners_cluster):
    from neuro_dask.demo.addition import ASSET_DIR

    _, client = owners_cluster  # three workers: a second pair would share a worker with the first
    with dask.config.set({"neuro.client.trust": True}), nd.load(ASSET_DIR, client=client, privacy="private") as m:
        assert m.generate_text(["123+456="], max_new_tokens=5) == ["579"]
        stats = dict(m.executor.stats)
    assert stats["unverified"] > 0 and stats["verified"] == 0, stats


def test_on_a_tls_network_owners_come_from_certificates_not_from_what_workers_declare(tmp_path):
    """Every worker declares the same owner ("mallory", which would make the private tier refuse
    everything, or a liar could declare three owners for one machine); the CA's word counts:
    worker-1 and worker-2 are alice's, worker-3 (no owner in its certificate) is its own owner.
    Placement keeps each expert's replicas on different owners, so every private pair includes
    worker-3, and the private tier answers."""
    from cluster_helpers import hardened_tls_cluster, publish_as_operator

    from neuro_dask.demo.addition import ASSET_DIR

    with hardened_tls_cluster(tmp_path, owners={1: "alice", 2: "alice"}, worker_args=["--neuro-owner", "mallory"]) as (
        cluster,
        client,
        certs,
    ):
        publish_as_operator(cluster.scheduler_address, certs, ASSET_DIR)
        status = cluster.scheduler.extensions["neuro"].status()  # the operator's view (clients may not read it)
        owners = {w["name"]: w["owner"] for w in status["workers"].values()}
        assert owners == {"worker-1": "alice", "worker-2": "alice", "worker-3": "worker-3"}
        by_address = {a: w["name"] for a, w in status["workers"].items()}
        with nd.load(ASSET_DIR, client=client, privacy="private") as private:
            routes = private.executor.fetch_routes().routes
            assert all("worker-3" in {by_address[w] for w in ws} for ws in routes.values()), routes
            assert private.generate_text(["123+456="], max_new_tokens=5) == ["579"]
