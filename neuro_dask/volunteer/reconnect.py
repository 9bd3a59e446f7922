"""A volunteer's worker outlives its scheduler: when the scheduler goes away, the worker process
ends and its nanny starts a fresh one that waits for the scheduler to come back.

distributed 2026.8 does not reconnect a worker: `Worker.handle_scheduler` closes the worker,
*and its nanny*, as soon as the connection to the scheduler breaks, and a scheduler that shuts
down tells every worker to close the same way; `dask worker` then exits. Here both close the
worker process only (`nanny=False`): the nanny sees its worker exit and starts a new one
(`Nanny._on_worker_exit`), which retries the scheduler every 0.1 s until it is back, then
registers under the same `--name` with the same expert cache on disk, so it re-loads its experts
without downloading them and the scheduler gives it back its reputation and stake (both keyed by
name). Without a nanny (`--no-nanny`, in-process clusters) nothing changes.
"""

from __future__ import annotations

import logging

log = logging.getLogger("neuro_dask.worker")

# Why a worker closes when its scheduler went away (the nanny then restarts it).
SCHEDULER_LOST = "neuro-scheduler-lost"
SCHEDULER_CLOSED = "neuro-scheduler-closed"


def restart_on_scheduler_loss(worker) -> None:
    """Install on a Dask worker (before it registers): a lost or closing scheduler ends this worker
    process but not its nanny, which restarts it."""
    if not getattr(worker, "nanny", None):
        return  # no nanny to restart it: Dask's own behaviour (close) stands
    close_op = worker.stream_handlers["close"]

    async def handle_scheduler(comm) -> None:
        try:
            await worker.handle_stream(comm)
        finally:
            if worker.status.name in ("running", "paused"):
                log.warning(
                    "lost the scheduler %s: restarting this worker; it waits for the scheduler to come back",
                    worker.scheduler.address,
                )
                await worker.close(reason=SCHEDULER_LOST, nanny=False)
            else:
                await worker.close(reason="worker-handle-scheduler-connection-broken")

    async def close(reason: str = "worker-close", **kwargs):
        if reason == "scheduler-close":  # the scheduler shuts down (a restart, most often)
            log.warning(
                "the scheduler %s is closing: restarting this worker; it waits for the scheduler to come back",
                worker.scheduler.address,
            )
            return await worker.close(reason=SCHEDULER_CLOSED, nanny=False)
        return await close_op(reason=reason, **kwargs)

    worker.handle_scheduler = handle_scheduler
    worker.stream_handlers["close"] = close
