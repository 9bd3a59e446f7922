"""Hedging's wiring on real workers: a call the client abandoned is dropped by its worker."""

from __future__ import annotations

import torch
from cluster_helpers import neuro_cluster

import neuro_dask as nd
from neuro_dask.client.dispatch.transports import DirectTransport
from neuro_dask.protocol.wire import encode_request


def test_a_worker_skips_a_call_it_was_told_to_drop(sharded, tmp_path):
    with neuro_cluster(1, tmp_path=tmp_path) as (_, client):
        with nd.load(sharded("mixtral"), client=client) as model:
            worker = next(iter(client.scheduler_info()["workers"]))
            transport = DirectTransport(client)
            rows = {0: torch.randn(2, model.config.hidden_size)}

            async def calls():
                await transport.start()
                # The drop may reach a worker before the call it names (they travel on different
                # connections); either way the call is skipped when its turn comes.
                await transport.cancel(worker, "abandoned")
                dropped = await transport.call(
                    worker, encode_request(model.executor.model_id, 0, rows, call="abandoned"), 10
                )
                kept = await transport.call(worker, encode_request(model.executor.model_id, 0, rows, call="kept"), 10)
                again = await transport.call(
                    worker, encode_request(model.executor.model_id, 0, rows, call="abandoned"), 10
                )
                return dropped, kept, again

            dropped, kept, again = client.sync(calls)
            transport.close()
    assert dropped["status"] == "error" and "dropped" in dropped["message"]
    assert kept["status"] == "OK"
    assert again["status"] == "OK"  # a drop is used up by the call it names
