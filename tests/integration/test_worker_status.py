"""`neuro-dask worker-status` on an in-process cluster: the status function and the CLI."""

from __future__ import annotations

import json

import pytest
from cluster_helpers import neuro_cluster, scheduler_status
from tiny_models import padded_batch

import neuro_dask as nd
from neuro_dask.cli.main import main
from neuro_dask.volunteer.status import WorkerNotFoundError, collect, format_status


def test_worker_status_reports_experts_calls_cache_reputation_and_no_ledger(sharded, tmp_path, capsys):
    ids, mask = padded_batch((5, 9), seed=1)
    with neuro_cluster(n_workers=2, tmp_path=tmp_path) as (cluster, client):
        with nd.load(sharded("qwen2_moe"), client=client) as model:
            model.generate(ids, mask, max_new_tokens=4)
            address = sorted(scheduler_status(client)["workers"])[0]
            name = scheduler_status(client)["workers"][address]["name"]

            by_address = collect(client, address)
            by_name = collect(client, str(name))
            assert by_address["address"] == by_name["address"] == address
            s = by_address
            assert s["state"] == "running"
            assert sum(len(e) for e in s["hosted"].values()) > 0
            assert s["calls_served"] > 0 and s["rows_served"] >= s["calls_served"]
            # Both in-process workers share one cache folder: between them, each file was downloaded once.
            assert s["files_fetched"] + s["files_cached"] > 0
            assert s["reputation"]["score"] > 0 and s["reputation"]["trusted"] is False
            assert s["ledger"] is None
            text = format_status(s)
            assert "running" in text and "the scheduler runs no ledger" in text and "reputation" in text

            capsys.readouterr()  # what came before (the shard fixture prints)
            assert (
                main(["worker", "status", "--scheduler", cluster.scheduler_address, "--worker", address, "--json"]) == 0
            )
            shown = json.loads(capsys.readouterr().out)
            assert shown["address"] == address and shown["calls_served"] >= s["calls_served"]
            assert main(["worker-status", "--scheduler", cluster.scheduler_address, "--worker", str(name)]) == 0
            assert f"worker {name} at {address}" in capsys.readouterr().out

            # No --worker: a volunteer running both on this machine sees both, not "pass --worker NAME".
            assert main(["worker-status", "--scheduler", cluster.scheduler_address]) == 0
            out = capsys.readouterr().out
            assert all(f" at {a} " in out for a in scheduler_status(client)["workers"]), out
            assert main(["worker-status", "--scheduler", cluster.scheduler_address, "--json"]) == 0
            assert {s["address"] for s in json.loads(capsys.readouterr().out)} == set(
                scheduler_status(client)["workers"]
            )

            with pytest.raises(WorkerNotFoundError, match="no worker 'nobody'"):
                collect(client, "nobody")
            assert main(["worker-status", "--scheduler", cluster.scheduler_address, "--worker", "nobody"]) == 2
