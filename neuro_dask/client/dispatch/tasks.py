"""The task function of the futures transport: it runs on a worker, inside Dask's task thread.

Arguments and result are msgpack bytes, so neither side unpickles the other's data.
"""

from __future__ import annotations

import time

import msgpack


def serve_expert_call(request: bytes) -> bytes:
    from distributed import get_worker

    worker = get_worker()
    adapter = worker.extensions.get("neuro")
    if adapter is None:
        from neuro_dask.protocol.wire import encode_error

        return msgpack.packb(
            encode_error(f"{worker.address} was not started with --preload neuro_worker"), use_bin_type=True
        )
    response, delay = adapter.serve(msgpack.unpackb(request, raw=False))
    if delay:  # a straggle drill: the task thread is what a futures call waits on
        time.sleep(delay)
    return msgpack.packb(response, use_bin_type=True)
