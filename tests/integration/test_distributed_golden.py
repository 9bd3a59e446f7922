"""Distributed generation over 3 workers equals local nd.load and transformers, either transport,
on an ordinary cluster and on a hardened one over mutual TLS (docs/security.md)."""

from __future__ import annotations

import pytest
import torch
from cluster_helpers import hardened_tls_cluster, neuro_cluster, worker_status
from polling import poll_until
from tiny_models import ARCHITECTURES, build_hf_model, padded_batch

import neuro_dask as nd


@pytest.fixture(scope="module", params=["tcp", "hardened-tls"])
def shared_cluster(request, tmp_path_factory):
    """The same tests on both networks. The hardened one's client holds the operator's
    certificate, because these tests publish models (test_hardened_cluster.py covers clients)."""
    tmp = tmp_path_factory.mktemp("cluster")
    if request.param == "tcp":
        with neuro_cluster(3, tmp_path=tmp) as (cluster, client):
            yield cluster, client
    else:
        with hardened_tls_cluster(tmp, client_role="operator") as (cluster, client, _certs):
            cluster.hardened = True
            yield cluster, client


@pytest.fixture(scope="module")
def models(shared_cluster, sharded):
    _, client = shared_cluster
    cache = {}

    def get(variant, transport):
        if (variant, transport) not in cache:
            cache[(variant, transport)] = nd.load(sharded(variant), client=client, transport=transport)
        return cache[(variant, transport)]

    yield get
    for model in cache.values():
        model.close()


@pytest.mark.parametrize("transport", ["direct", "futures"])
@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_distributed_matches_local_and_transformers(shared_cluster, models, sharded, variant, transport):
    if transport == "futures" and getattr(shared_cluster[0], "hardened", False):
        # Task graphs are pickles: a hardened network takes plain data only, and says so.
        from neuro_dask.client.dispatch.session import TransportUnavailableError

        with pytest.raises(TransportUnavailableError, match="transport='direct'"):
            models(variant, transport)
        return
    remote = models(variant, transport)
    local = nd.load(sharded(variant))
    hf = build_hf_model(variant)
    ids, mask = padded_batch((5, 9, 13), seed=1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    real = mask.bool()
    with torch.no_grad():
        expected_logits = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    logits = remote.forward(ids, mask)
    torch.testing.assert_close(logits[real], expected_logits[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[real], local.forward(ids, mask)[real], atol=1e-5, rtol=0)
    out = remote.generate(ids, mask, max_new_tokens=24)
    assert torch.equal(out, local.generate(ids, mask, max_new_tokens=24))
    assert torch.equal(out[:, ids.shape[1] :], expected[:, ids.shape[1] :])


def test_every_worker_serves_and_every_expert_has_at_least_two_replicas(models, shared_cluster):
    """Two replicas is the policy's floor; an expert the earlier tests made hot gets a third
    (scheduler/placement.py rule 1), so the count is checked as a floor."""
    cluster, client = shared_cluster
    model = models("mixtral", "direct")
    # the second replicas may still be loading on a busy machine
    poll_until(
        lambda: all(len(set(ws)) >= 2 for ws in model.executor.fetch_routes().routes.values()),
        60,
        "every expert's second replica",
    )
    model.executor.routes = model.executor.fetch_routes()
    model.generate([[5, 6, 7, 8]], max_new_tokens=8)
    served = [worker_status(client, a)["calls_served"] for a in cluster.scheduler.workers]
    assert all(n > 0 for n in served), served


def test_bundled_adder_answers_over_the_cluster(shared_cluster):
    from neuro_dask.demo.addition import ASSET_DIR

    _, client = shared_cluster
    with nd.load(ASSET_DIR, client=client) as model:
        assert model.generate_text(["123+456=", "999+1="], max_new_tokens=5) == ["579", "1000"]


def test_clients_report_expert_load_to_the_scheduler(shared_cluster, sharded):
    import dask

    cluster, client = shared_cluster
    with dask.config.set({"neuro.client.routes-refresh": 0.001}), nd.load(sharded("olmoe"), client=client) as model:
        model.generate([[5, 6, 7, 8, 9]], max_new_tokens=6)
        model_id = model.executor.model_id
    load = cluster.scheduler.extensions["neuro"].coordinator.load
    reported = {k: v for k, v in load.items() if k[0] == model_id}
    assert reported and all(v > 0 for v in reported.values())
