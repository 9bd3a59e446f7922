"""Lightweight simulated volunteers: many workers registered with a real Dask scheduler, no servers.

A real `distributed.Worker` runs a comm server, thread pools and periodic callbacks; a thousand
of them in one process measure the process, not the scheduler. A `SimulatedComm` stands in for
one worker's connection instead: `register_simulated_worker` calls Dask's own
`Scheduler.add_worker` handler with it (the message a worker sends on connect, with the
`extra["neuro"]` that the neuro_worker preload reports), so Dask creates the `WorkerState`,
runs every scheduler plugin's `add_worker` hook and writes its reply, exactly as for a real
worker. Messages the scheduler streams to the worker are counted and discarded; the worker
never heartbeats, so keep runs shorter than `distributed.scheduler.worker-ttl`.
`Scheduler.remove_worker(address, ...)` removes one the usual way; `disconnect` drops its
connection, as a crashed volunteer's would (do so for every one before closing the scheduler).

Also: `mixtral_shaped_experts` (32 layers x 8 experts, Mixtral-8x7B's expert size) and
`simulated_capacities` (varied budgets, speeds and owners) for placement at scale.
"""

from __future__ import annotations

import asyncio
import random
import time

from distributed.comm.core import Comm, CommClosedError
from distributed.versions import get_versions

from neuro_dask.scheduler.placement import WorkerCapacity

GiB = 2**30
# Mixtral-8x7B: hidden 4096, expert intermediate 14336, three matrices (w1, w2, w3) per expert.
MIXTRAL_EXPERT_PARAMS = 3 * 4096 * 14336  # 176,160,768 parameters
MIXTRAL_EXPERT_BYTES_FP16 = 2 * MIXTRAL_EXPERT_PARAMS  # 352 MB


def mixtral_shaped_experts(
    layers: int = 32, experts: int = 8, nbytes: int = MIXTRAL_EXPERT_BYTES_FP16
) -> dict[tuple[int, int], int]:
    """(layer, expert) -> bytes, as a published model's manifest gives them."""
    return {(layer, expert): nbytes for layer in range(layers) for expert in range(experts)}


def simulated_capacities(n: int, rng: random.Random, owners: int | None = None) -> list[WorkerCapacity]:
    """`n` volunteers: budgets of 1 to 12 GiB (most 2 to 8), speeds 5 to 50, about 0.6 n owners
    (some people run several machines)."""
    owners = owners or max(1, (3 * n) // 5)
    budgets = [1, 2, 2, 3, 4, 4, 6, 8, 8, 12]
    return [
        WorkerCapacity(
            simulated_address(i),
            rng.choice(budgets) * GiB + rng.randrange(GiB // 4),
            round(rng.uniform(5.0, 50.0), 3),
            f"owner{rng.randrange(owners)}",
        )
        for i in range(n)
    ]


def simulated_address(i: int) -> str:
    return f"tcp://10.{i // 62_500}.{i // 250 % 250}.{i % 250 + 1}:9000"


# The heartbeat metrics of an idle worker, as Dask's own Worker sends them on connect.
_IDLE_METRICS = {
    "bandwidth": {"total": 100_000_000, "workers": {}, "types": {}},
    "digests_total_since_heartbeat": {},
    "memory": 0,
    "spilled_bytes": {"memory": 0, "disk": 0},
    "managed_bytes": 0,
    "task_counts": {},
    "event_loop_interval": 0.02,
    "cpu": 0.0,
    "time": 0.0,
    "transfer": {},
}


_VERSIONS: dict = {}


def _versions() -> dict:
    """This process's package versions, as a worker of the same install reports them."""
    if not _VERSIONS:
        _VERSIONS.update(get_versions())
    return _VERSIONS


class SimulatedComm(Comm):
    """One simulated worker's connection: writes are counted, reads wait until it is closed."""

    def __init__(self, peer: str, local: str = "tcp://scheduler:8786"):
        super().__init__()
        self._peer, self._local = peer, local
        self._closed = asyncio.Event()
        self.writes = 0
        self.replied: asyncio.Future = asyncio.get_running_loop().create_future()

    async def read(self, deserializers=None):
        await self._closed.wait()
        raise CommClosedError(f"simulated worker {self._peer} closed")

    async def write(self, msg, serializers=None, on_error=None) -> int:
        if self._closed.is_set():
            return 0  # a late message to a worker that has gone: dropped, as a closed socket would
        self.writes += 1
        if not self.replied.done():
            self.replied.set_result((time.perf_counter(), msg))
        return 0

    async def close(self) -> None:
        self._closed.set()

    def abort(self) -> None:
        self._closed.set()

    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def local_address(self) -> str:
        return self._local

    @property
    def peer_address(self) -> str:
        return self._peer


async def register_simulated_worker(
    scheduler, capacity: WorkerCapacity, name: str, nthreads: int = 1
) -> tuple[asyncio.Task, SimulatedComm, float]:
    """Connect one simulated worker through Dask's `Scheduler.add_worker`; returns the task that
    serves its stream (it ends when the worker is removed), its comm, and the seconds from the
    call to the scheduler's reply. Raises if the scheduler refused it."""
    comm = SimulatedComm(capacity.address)
    info = {
        "memory_budget": capacity.memory_budget,
        "speed": capacity.speed,
        "owner": capacity.owner,
        "device": "cpu",
        "profile": {"cores": nthreads, "memory_total": 2 * capacity.memory_budget},
    }
    started = time.perf_counter()
    task = asyncio.get_running_loop().create_task(
        scheduler.add_worker(
            comm,
            address=capacity.address,
            status="running",
            server_id=f"sim-{name}",
            nthreads=nthreads,
            name=name,
            resolve_address=False,
            now=time.time(),
            resources={},
            memory_limit=4 * capacity.memory_budget,
            metrics=_IDLE_METRICS,
            services={},
            local_directory="/nonexistent",
            versions=_versions(),
            nanny="",
            extra={"neuro": info},
            stimulus_id=f"simulated-join-{name}",
        )
    )
    await asyncio.wait([task, comm.replied], return_when=asyncio.FIRST_COMPLETED)
    if not comm.replied.done():
        task.result()  # raises what the scheduler raised
        raise RuntimeError(f"the scheduler closed {capacity.address} without a reply")
    replied_at, reply = comm.replied.result()
    if reply.get("status") != "OK":
        raise RuntimeError(f"the scheduler refused {capacity.address}: {reply}")
    return task, comm, replied_at - started


async def disconnect(task: asyncio.Task, comm: SimulatedComm) -> None:
    """Drop a simulated worker's connection; Dask removes it as it would a crashed worker."""
    comm.abort()
    await task
