"""Dask preload for volunteers: `dask worker tcp://HOST:8786 --preload neuro_worker`.

This adapter translates Dask worker hooks into neuro_dask cores. Serving experts from a worker
arrives with the distributed-experts work (issue 3); until then the preload only announces
itself, so that a worker started with it still runs ordinary Dask work.
"""

from __future__ import annotations

import logging

log = logging.getLogger("neuro_dask.plugins.worker")


def dask_setup(worker) -> None:  # called by `dask worker --preload neuro_worker`
    log.warning("neuro_worker preload loaded on %s: expert hosting is not available in this version",
                getattr(worker, "address", worker))
