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

Paced (volunteer/comeback.py): a scheduler that shuts down first tells each worker when to come
back. The closing worker leaves what it was told in a note in its cache folder; the fresh worker
its nanny starts reads it before it registers (`wait_as_told`, from the preload), waits for the
scheduler with jittered exponential backoff instead of Dask's 0.1 s polling, then waits its
delay. A scheduler that crashed told nothing: the backoff's jitter alone spreads the returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from neuro_dask.volunteer.comeback import COMEBACK_OP, ComebackNote, read_comeback, reconnect_delay

log = logging.getLogger("neuro_dask.worker")

# Why a worker closes when its scheduler went away (the nanny then restarts it).
SCHEDULER_LOST = "neuro-scheduler-lost"
SCHEDULER_CLOSED = "neuro-scheduler-closed"
BACKOFF_CAP = 8.0  # seconds between a returning worker's looks for its scheduler, at most


def restart_on_scheduler_loss(worker, note_file: Path | None = None) -> None:
    """Install on a Dask worker (before it registers): a lost or closing scheduler ends this worker
    process but not its nanny, which restarts it; `note_file` keeps what the scheduler said about
    coming back for the next worker process."""
    if not getattr(worker, "nanny", None):
        return  # no nanny to restart it: Dask's own behaviour (close) stands
    close_op = worker.stream_handlers["close"]
    told: dict[str, float | None] = {"after": None}

    def comeback(**fields) -> None:  # the scheduler's only (security/roles.py): still read as data
        told["after"] = read_comeback(fields)

    def leave_note() -> None:
        if note_file is None:
            return
        with contextlib.suppress(OSError):
            note_file.parent.mkdir(parents=True, exist_ok=True)
            note_file.write_text(ComebackNote(worker.scheduler.address, time.time(), told["after"]).to_json())

    async def handle_scheduler(comm) -> None:
        try:
            await worker.handle_stream(comm)
        finally:
            if worker.status.name in ("running", "paused"):
                log.warning(
                    "lost the scheduler %s: restarting this worker; it waits for the scheduler to come back",
                    worker.scheduler.address,
                )
                leave_note()
                await worker.close(reason=SCHEDULER_LOST, nanny=False)
            else:
                await worker.close(reason="worker-handle-scheduler-connection-broken")

    async def close(reason: str = "worker-close", **kwargs):
        if reason == "scheduler-close":  # the scheduler shuts down (a restart, most often)
            log.warning(
                "the scheduler %s is closing: restarting this worker; it waits for the scheduler to come back",
                worker.scheduler.address,
            )
            leave_note()
            return await worker.close(reason=SCHEDULER_CLOSED, nanny=False)
        return await close_op(reason=reason, **kwargs)

    worker.handle_scheduler = handle_scheduler
    worker.stream_handlers["close"] = close
    worker.stream_handlers[COMEBACK_OP] = comeback


async def wait_as_told(worker, note_file: Path | None) -> float | None:
    """In a fresh worker process, before it registers: if the one before it lost this scheduler,
    wait for the scheduler with jittered backoff, then the delay it told (if any). Returns the
    delay waited, or None where there was nothing to wait for."""
    if note_file is None:
        return None
    try:
        text = note_file.read_text()
        note_file.unlink()
    except (OSError, UnicodeDecodeError):
        return None
    note = ComebackNote.from_json(text, time.time())
    if note is None or note.scheduler != worker.scheduler.address:
        return None
    attempt = 0
    while not await _reachable(worker):
        await asyncio.sleep(reconnect_delay(attempt, cap=BACKOFF_CAP))
        attempt += 1
    after = note.after or 0.0
    if after:
        log.warning("the scheduler %s is back: joining in %.1f s, as it asked", note.scheduler, after)
        await asyncio.sleep(after)
    return after


async def _reachable(worker) -> bool:
    from distributed.comm import connect

    try:
        comm = await connect(worker.scheduler.address, timeout=2, **worker.connection_args)
    except (OSError, TimeoutError):
        return False
    await comm.close()
    return True
