"""Two ways to carry one layer's expert calls to workers, behind one method.

`call_many({worker: request message}, timeout)` sends every call at once and returns, per
worker, the response message or the exception that stands for a failed call. Neither transport
ever unpickles what a worker returns: responses are plain msgpack (ints, strings, bytes).

- direct:  the worker's `neuro_expert` comm handler over Dask's comms, bypassing the scheduler
           (sub-millisecond on loopback; the interactive default).
- futures: one pinned Dask future per worker call with a distinct key (visible on Dask's
           dashboard, resilient through the scheduler; for large offline batches).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import msgpack
from distributed import Client, wait
from distributed.core import ConnectionPool

from neuro_dask.dispatch.tasks import serve_expert_call

log = logging.getLogger(__name__)

Outcome = Mapping[str, Any] | BaseException


class CallTimeoutError(TimeoutError):
    def __init__(self, worker: str, timeout: float):
        self.worker = worker
        super().__init__(f"worker {worker} gave no answer within the {timeout:.1f} s deadline")


@dataclass(frozen=True)
class HedgedCall:
    msg: dict[str, Any]
    hedge_after: float  # seconds without an answer before the duplicates go out
    alternates: tuple[tuple[str, dict[str, Any]], ...] = ()  # (worker, message) covering the same work


@dataclass(frozen=True)
class Reply:
    parts: tuple[tuple[str, Outcome], ...]  # (who answered, what): the primary, or the alternates
    seconds: float
    hedged: bool  # duplicates went out
    primary: str = ""

    @property
    def by_primary(self) -> bool:
        return len(self.parts) == 1 and self.parts[0][0] == self.primary


class Transport(Protocol):
    name: str

    def call_many(self, calls: Mapping[str, dict[str, Any]], timeout: float) -> dict[str, Outcome]: ...

    def call_hedged(self, calls: Mapping[str, HedgedCall], timeout: float,
                    may_hedge: Callable[[], bool]) -> dict[str, Reply]: ...

    def close(self) -> None: ...


class DirectTransport:
    name = "direct"

    def __init__(self, client: Client, connect_timeout: float = 3.0):
        self.client = client
        # Our own pool: it deserializes msgpack only, so a worker cannot make us unpickle.
        self.pool = ConnectionPool(limit=256, deserializers=["msgpack"], serializers=["msgpack"],
                                   connection_args=client.connection_args, timeout=connect_timeout)
        self._started = False

    async def _call(self, worker: str, msg: dict[str, Any], timeout: float) -> Outcome:
        try:
            return await asyncio.wait_for(self.pool(worker).neuro_expert(**msg), timeout)
        except TimeoutError:
            return CallTimeoutError(worker, timeout)
        except Exception as exc:  # connection refused, comm closed, remote error: all a failed call
            return exc

    async def _ensure_started(self) -> None:
        if not self._started:
            started = self.pool.start()
            if asyncio.iscoroutine(started):
                await started
            self._started = True

    async def _call_all(self, calls: Mapping[str, dict[str, Any]], timeout: float) -> dict[str, Outcome]:
        await self._ensure_started()
        results = await asyncio.gather(*(self._call(w, m, timeout) for w, m in calls.items()))
        return dict(zip(calls, results, strict=True))

    def call_many(self, calls: Mapping[str, dict[str, Any]], timeout: float) -> dict[str, Outcome]:
        return self.client.sync(self._call_all, calls, timeout)

    async def _hedged_one(self, worker: str, call: HedgedCall, timeout: float,
                          may_hedge: Callable[[], bool]) -> Reply:
        """The primary; after `hedge_after` without an answer, the same work to the alternates
        (one or several workers that together host it). The first side that answers without a
        failure wins; the other is cancelled."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        primary = asyncio.ensure_future(self._call(worker, call.msg, timeout))
        done, _ = await asyncio.wait({primary}, timeout=call.hedge_after)
        sides = {primary: "primary"}
        if not done and call.alternates and may_hedge():
            sides[asyncio.ensure_future(asyncio.gather(
                *(self._call(w, m, timeout) for w, m in call.alternates)))] = "hedge"
        pending = set(sides)
        reply = None
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if sides[task] == "primary":
                    parts = ((worker, task.result()),)
                else:
                    parts = tuple((w, o) for (w, _), o in zip(call.alternates, task.result(), strict=True))
                reply = Reply(parts, loop.time() - started, len(sides) > 1, worker)
                if not any(_failed(o) for _, o in parts):
                    for other in pending:
                        other.cancel()
                        other.add_done_callback(_retrieve)  # a cancelled gather must not warn
                    return reply
        return reply

    async def _hedged_all(self, calls: Mapping[str, HedgedCall], timeout: float,
                          may_hedge: Callable[[], bool]) -> dict[str, Reply]:
        await self._ensure_started()
        replies = await asyncio.gather(*(self._hedged_one(w, c, timeout, may_hedge) for w, c in calls.items()))
        return dict(zip(calls, replies, strict=True))

    def call_hedged(self, calls: Mapping[str, HedgedCall], timeout: float,
                    may_hedge: Callable[[], bool]) -> dict[str, Reply]:
        return self.client.sync(self._hedged_all, calls, timeout, may_hedge)

    def close(self) -> None:
        if self._started:
            try:
                self.client.sync(self.pool.close)
            except Exception:  # the client's loop may already be gone at interpreter exit
                log.debug("closing the direct transport's pool failed", exc_info=True)


class FuturesTransport:
    name = "futures"
    _counter = itertools.count()

    def __init__(self, client: Client, connect_timeout: float = 3.0):
        self.client = client
        self._session = uuid.uuid4().hex[:8]

    def call_many(self, calls: Mapping[str, dict[str, Any]], timeout: float) -> dict[str, Outcome]:
        futures = {}
        for worker, msg in calls.items():
            key = f"neuro-expert-{msg['layer']}-{self._session}-{next(self._counter)}"
            futures[worker] = self.client.submit(
                serve_expert_call, msgpack.packb(msg, use_bin_type=True), key=key,
                workers=[worker], allow_other_workers=False, pure=False,
            )
        try:
            wait(list(futures.values()), timeout=timeout, return_when="ALL_COMPLETED")
        except TimeoutError:
            pass  # whatever did not finish is reported as a timed-out call below
        out: dict[str, Outcome] = {}
        for worker, fut in futures.items():
            if fut.status == "finished":
                try:
                    out[worker] = msgpack.unpackb(fut.result(), raw=False)
                except Exception as exc:
                    out[worker] = exc
            elif fut.status == "error":
                # The remote exception is not fetched: that would unpickle what a worker sent.
                out[worker] = RuntimeError(f"expert task on {worker} failed")
            else:
                out[worker] = CallTimeoutError(worker, timeout)
            fut.cancel()  # a pinned task stranded on a dead worker must not linger
        return out

    def call_hedged(self, calls: Mapping[str, HedgedCall], timeout: float,
                    may_hedge: Callable[[], bool]) -> dict[str, Reply]:
        """No hedging on the futures transport (offline batches): every call waits for its deadline."""
        started = time.monotonic()
        outcomes = self.call_many({w: c.msg for w, c in calls.items()}, timeout)
        elapsed = time.monotonic() - started
        return {w: Reply(((w, outcome),), elapsed, False, w) for w, outcome in outcomes.items()}

    def close(self) -> None:
        pass


def _retrieve(future: asyncio.Future) -> None:
    try:
        future.exception()
    except BaseException:  # CancelledError: exactly what we asked for
        pass


def _failed(outcome: Outcome) -> bool:
    return isinstance(outcome, BaseException) or (isinstance(outcome, Mapping) and outcome.get("status") != "OK")


def make_transport(name: str, client: Client, connect_timeout: float = 3.0) -> Transport:
    return {"direct": DirectTransport, "futures": FuturesTransport}[name](client, connect_timeout)
