"""Dask preload for operators: `dask scheduler --preload neuro_scheduler`.

This adapter translates Dask scheduler hooks into neuro_dask cores. Placement, routing and
reputation arrive with the distributed-experts work (issue 3); until then the preload only
announces itself.
"""

from __future__ import annotations

import logging

log = logging.getLogger("neuro_dask.plugins.scheduler")


def dask_setup(scheduler) -> None:  # called by `dask scheduler --preload neuro_scheduler`
    log.warning("neuro_scheduler preload loaded on %s: expert placement is not available in this version",
                getattr(scheduler, "address", scheduler))
