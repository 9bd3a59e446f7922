"""A Dask worker that listens through a relay when `neuro.worker.relay` says so.

`dask worker` gives its worker and its nanny the same protocol and host, and refuses one port
for both, so a nanny cannot hand the relay's address to its worker. `neuro-dask worker
--relay HOST:PORT` instead runs this class (`--worker-class`) with `neuro.worker.relay` set: the
worker listens on `relay://HOST:PORT` (and opens no port), while its nanny listens on
127.0.0.1, where nothing outside the machine can reach it either. The nanny still restarts the
worker when its router or the scheduler drops it (neuro_dask/volunteer/reconnect.py).
"""

from __future__ import annotations

import dask.config
from distributed import Worker

import neuro_dask.relay.comm  # noqa: F401 - the relay:// backend, for an environment without entry points
from neuro_dask.settings import relay_listen_address


class RelayedWorker(Worker):
    def __init__(self, *args, **kwargs):
        relay = dask.config.get("neuro.worker.relay", default=None)
        if relay:
            host, port = relay_listen_address(relay, "neuro.worker")
            kwargs.update(protocol="relay", host=host, port=port, interface=None)
        super().__init__(*args, **kwargs)
