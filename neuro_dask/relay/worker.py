"""A Dask worker that listens through a relay when `neuro.worker.relay` says so.

`dask worker` gives its worker and its nanny the same protocol and host, and refuses one port
for both, so a nanny cannot hand the relay's address to its worker. `neuro-dask worker
--relay HOST:PORT` instead runs this class (`--worker-class`) with `neuro.worker.relay` set: the
worker listens on `relay://HOST:PORT` (and opens no port), while its nanny listens on
127.0.0.1, where nothing outside the machine can reach it either. The nanny still restarts the
worker when its router or the scheduler drops it (neuro_dask/volunteer/reconnect.py).

A named worker keeps its relay key in its cache folder (relay-keys/, readable by its owner
only), so a worker its nanny restarts, or a machine that reboots, comes back at the same
relay:// address: clients' path measurements and pooled routes stay good, and the scheduler
sees the same worker return.
"""

from __future__ import annotations

from pathlib import Path

import dask.config
from distributed import Worker

import neuro_dask.relay.comm  # noqa: F401 - the relay:// backend, for an environment without entry points
from neuro_dask.settings import WorkerSettings, relay_listen_address
from neuro_dask.volunteer.comeback import worker_file


class RelayedWorker(Worker):
    def __init__(self, *args, **kwargs):
        relay = dask.config.get("neuro.worker.relay", default=None)
        if relay:
            host, port = relay_listen_address(relay, "neuro.worker")
            kwargs.update(protocol="relay", host=host, port=port, interface=None)
        name = kwargs.get("name")
        self._relay_key_file = relay_key_file(WorkerSettings.load().resolved_cache_dir(), name) if relay else None
        super().__init__(*args, **kwargs)

    async def listen(self, port_or_addr=None, allow_offload=False, **kwargs):
        if self._relay_key_file is not None and str(port_or_addr or "").startswith("relay://"):
            kwargs["relay_key_file"] = str(self._relay_key_file)
        return await super().listen(port_or_addr, allow_offload=allow_offload, **kwargs)


def relay_key_file(cache_dir: Path, name: object) -> Path | None:
    """Where a named worker keeps its relay key; None for an unnamed one (Dask names it by its
    address, which the key decides)."""
    return worker_file(cache_dir, "relay-keys", name, ".key")
