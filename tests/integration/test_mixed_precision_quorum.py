"""An int8 volunteer next to float32 ones: the scheduler tells clients each worker's precision,
and quorums judge honest replicas of different precisions within the measured tolerance."""

from __future__ import annotations

import dask
from cluster_helpers import add_worker, neuro_cluster, trust_events, worker_status

import neuro_dask as nd
from neuro_dask.demo.addition import ASSET_DIR


def test_int8_and_float32_replicas_agree_and_nobody_is_called_a_liar(tmp_path):
    with neuro_cluster(2, tmp_path=tmp_path) as (cluster, client):
        worker = add_worker(client, cluster.scheduler_address, "int8-volunteer", "--neuro-precision", "int8")
        client.wait_for_workers(3, timeout=60)
        settings = {"neuro.client.trust": True, "neuro.client.spot-check": 1.0, "neuro.client.seed": 0}
        with dask.config.set(settings), nd.load(ASSET_DIR, client=client) as model:
            routes = model.executor.fetch_routes()
            assert routes.standing_of(worker.address).precision == "int8"
            assert {routes.standing_of(w).precision for w in cluster.scheduler.workers if w != worker.address} == {
                "float32"
            }
            answers = model.generate_text(["123+456=", "999+1=", "250+250="], max_new_tokens=5)
            model.executor.flush_reports()
        assert answers == ["579", "1000", "500"]
        assert worker_status(client, worker.address)["calls_served"] > 0  # its answers were judged
        invalid = [e for e in trust_events(client) if e.get("action") == "invalid"]
        assert invalid == [], invalid
        client.sync(worker.close)
