"""Two ways to carry one layer's expert calls to workers, behind one method.

`call_many({worker: request message}, timeout)` sends every call at once and returns, per
worker, the response message or the exception that stands for a failed call. Neither transport
ever unpickles what a worker returns: responses are plain msgpack (ints, strings, bytes).

- direct:  the worker's `neuro_expert` comm handler over Dask's comms, bypassing the scheduler
           (sub-millisecond on loopback; the interactive default).
- futures: one pinned Dask future per worker call with a distinct key (visible on Dask's
           dashboard, resilient through the scheduler; for large offline batches).

With trust on, both carry a layer's quorum replicas and hedges the same way (`call_hedged`,
one piece of code in `_Hedging` over each transport's single async `_deliver`).

Both measure every answered call's round trip into `latency` (trust/latency.py's LatencyBook),
which RouteTable.plan and the trusted runner use to prefer close replicas when
neuro.client.latency-aware is on (`route_latency` is the book then, None otherwise). With
neuro.client.simulated-latency (a harness for benchmarks and tests) each call also waits a
simulated WAN round trip: half before the message goes out, half after the answer is back.
The direct transport awaits `asyncio.sleep` on the event loop (never blocking it; a hedge to a
closer worker overtakes a far primary); the futures transport, whose calls wait on the
caller's thread, sleeps there: each worker's future is submitted after its half delay and the
layer returns when the slowest answer plus its other half is due.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
from distributed import Client, wait
from distributed.core import ConnectionPool

from neuro_dask.client.dispatch.tasks import serve_expert_call
from neuro_dask.protocol.messages import Cancel
from neuro_dask.trust.latency import LatencyBook, SimulatedLatency

log = logging.getLogger(__name__)

# What one call ended with: the worker's response message, or the exception that stands for a
# failed call (refused connection, timeout). Not to be confused with a trust Outcome (trusted.py).
WorkerAnswer = Mapping[str, Any] | BaseException


class CallTimeoutError(TimeoutError):
    def __init__(self, worker: str, timeout: float):
        self.worker, self.timeout = worker, timeout
        super().__init__(f"worker {worker} gave no answer within the {timeout:.1f} s deadline")


Alternates = tuple[tuple[str, dict[str, Any]], ...]  # (worker, message) pairs covering the same work


@dataclass(frozen=True)
class HedgeView:
    """The round as it stands when a hedge is due."""

    missing: frozenset[int]  # experts of the message without an answer yet
    avoid: frozenset[str]  # workers with a call of this round past its patience: slow right now
    occupied: frozenset[str]  # workers answering a call of this round or an abandoned one (a hedge might queue)
    answered: Mapping[int, frozenset[str]]  # expert -> workers whose answer for it is already in, this round


@dataclass(frozen=True)
class HedgedCall:
    msg: dict[str, Any]
    hedge_after: float  # seconds without an answer before the duplicates go out
    # Chosen only when a hedge is due, from what the round looks like then: (alternates to send,
    # experts settled by answers already in, which need no hedge).
    alternates: Callable[[HedgeView], tuple[Alternates, frozenset[int]]] = lambda view: ((), frozenset())
    # Once the call is late: its experts another replica's answer settles by now (quorum rule 7).
    settles: Callable[[HedgeView], frozenset[int]] = lambda view: frozenset()


@dataclass(frozen=True)
class Reply:
    """How one primary call ended: the answers that together cover its work (the primary's
    alone, or hedges' that each cover part of it), or the failures when nothing covered it."""

    parts: tuple[tuple[str, WorkerAnswer], ...]  # (who answered, what)
    seconds: float  # from the round's start until the work was covered (or given up)
    hedged: bool  # duplicates went out
    primary: str = ""
    abandoned: tuple[str, ...] = ()  # call ids still in flight when it ended, whose answers may come late
    settled: frozenset[int] = frozenset()  # experts left to another replica's answer (HedgedCall.alternates)
    calls: tuple[str | None, ...] = ()  # the call id each part answers, when the message had one
    durations: tuple[float, ...] = ()  # seconds each part took from when it was sent

    @property
    def by_primary(self) -> bool:
        """The primary answered (or failed) itself, rather than being overtaken by hedges."""
        return any(w == self.primary for w, _ in self.parts)


@dataclass(frozen=True)
class LateReply:
    """What an abandoned call (the loser of a hedge race) answered after all."""

    worker: str
    call: str  # the request's call id
    outcome: WorkerAnswer
    seconds: float


@dataclass(frozen=True)
class _Flight:
    """One message in flight for a primary's work: the primary itself or a hedge."""

    worker: str
    msg: dict[str, Any]
    task: asyncio.Future
    sent: float

    @property
    def experts(self) -> frozenset[int]:
        return frozenset(int(e) for e in self.msg.get("experts", ()))


PeerPatience = Callable[[list[float], int], "float | None"]  # (peers' seconds, round size) -> patience


class _Round:
    """The primaries of one round, sent together: who is slow right now, and how patient to be."""

    def __init__(
        self,
        started: float,
        primaries: dict[str, asyncio.Future],
        calls: Mapping[str, HedgedCall],
        peer_patience: PeerPatience | None,
        loop: asyncio.AbstractEventLoop,
    ):
        self.started = started
        self.primaries = primaries
        self.calls = calls
        self.peer_patience = peer_patience
        self.finished: list[float] = []  # seconds each answered primary took
        self.answered: dict[int, set[str]] = {}  # expert -> workers whose valid-looking answer is in
        self.progress = asyncio.Event()  # set (and replaced) whenever a primary answers
        self._loop = loop
        for task in primaries.values():
            task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Future) -> None:
        self.finished.append(self._loop.time() - self.started)
        worker = next(w for w, t in self.primaries.items() if t is task)
        if not _failed(task.result()):
            self.note_answer(worker, self.calls[worker].msg.get("experts", ()))
        event, self.progress = self.progress, asyncio.Event()
        event.set()

    def patience(self, call: HedgedCall) -> float:
        peers = self.peer_patience(self.finished, len(self.primaries)) if self.peer_patience else None
        return call.hedge_after if peers is None else min(call.hedge_after, peers)

    def note_answer(self, worker: str, experts: Iterable[int]) -> None:
        for e in experts:
            self.answered.setdefault(int(e), set()).add(worker)

    def view(self, missing: frozenset[int], lingering: Mapping[str, int]) -> HedgeView:
        """The round for choosing hedge targets now. An abandoned call does not put its worker
        in `avoid`: a straggling answer may be late on the network while the worker itself is
        idle, which the client cannot tell apart."""
        elapsed = self._loop.time() - self.started
        in_flight = {w for w, task in self.primaries.items() if not task.done()}
        overdue = {w for w in in_flight if elapsed >= self.patience(self.calls[w])}
        return HedgeView(
            missing,
            frozenset(overdue),
            frozenset(in_flight | set(lingering)),
            {e: frozenset(ws) for e, ws in self.answered.items()},
        )


class HedgeBudget(Protocol):
    """The cap on hedges (trust/hedging.py rule 3): asked before, told after each hedge sent."""

    def may_hedge(self) -> bool: ...

    def count_hedge(self, messages: int = 1) -> None: ...


class Transport(Protocol):
    name: str
    latency: LatencyBook  # every answered call's round trip, per worker
    route_latency: LatencyBook | None  # the same book when neuro.client.latency-aware, else None

    def call_many(self, calls: Mapping[str, dict[str, Any]], timeout: float) -> dict[str, WorkerAnswer]: ...

    def call_hedged(
        self,
        calls: Mapping[str, HedgedCall],
        timeout: float,
        budget: HedgeBudget,
        peer_patience: PeerPatience | None = None,
    ) -> dict[str, Reply]: ...

    def busy(self) -> set[str]: ...

    def drain_late(self) -> list[LateReply]: ...

    def close(self) -> None: ...


class _Measured:
    """What both transports share: the latency book and the simulated round trips."""

    def _setup_latency(self, settings: Any) -> None:
        seed = getattr(settings, "seed", None)
        # Seeded from neuro.client.seed (strings seed deterministically), else from the OS.
        self._sim_rng = random.Random(f"{seed}-simulated-latency") if seed is not None else random.Random()
        self.latency = LatencyBook(rng=random.Random(f"{seed}-latency") if seed is not None else random.Random())
        self.route_latency: LatencyBook | None = self.latency if getattr(settings, "latency_aware", True) else None
        self.simulated = SimulatedLatency.from_setting(getattr(settings, "simulated_latency", None))

    def _simulated(self, worker: str) -> float:
        return self.simulated.sample(worker, self._sim_rng) if self.simulated is not None else 0.0


def _rows(msg: Mapping[str, Any]) -> int:
    return int(sum(msg.get("counts") or ())) or 1


class _Hedging(_Measured):
    """What both transports share above one call: a layer's calls sent at once, each hedged to
    alternates when its patience runs out (trust/hedging.py's rules), losers abandoned and their
    late answers kept for comparison. A transport provides `_deliver` (one call there and back,
    on the event loop), `start` and `cancel` (tell a worker to drop a call it has not started;
    best effort)."""

    def _setup_hedging(self) -> None:
        self._lingering: Counter[str] = Counter()  # worker -> abandoned calls still running there
        # Answers of abandoned calls, oldest first; appended on the event loop, drained by the caller.
        self.late: deque[LateReply] = deque(maxlen=10_000)

    async def call(self, worker: str, msg: dict[str, Any], timeout: float) -> WorkerAnswer:
        """One expert call, on the event loop: its answer, or the error it ended with (a timeout:
        CallTimeoutError); an answered call's round trip goes into the latency book."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            outcome = await asyncio.wait_for(self._deliver(worker, msg, self._simulated(worker)), timeout)
        except TimeoutError:
            return CallTimeoutError(worker, timeout)
        except Exception as exc:  # connection refused, comm closed, remote error: all a failed call
            return exc
        if not _failed(outcome):
            self.latency.observe(worker, loop.time() - started, _rows(msg))
        return outcome

    async def _deliver(self, worker: str, msg: dict[str, Any], rtt: float) -> WorkerAnswer:
        """Carry one call to `worker` and its answer back, with the simulated round trip `rtt`."""
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def cancel(self, worker: str, call_id: str) -> None:
        raise NotImplementedError

    async def _hedged_one(
        self, worker: str, call: HedgedCall, timeout: float, budget: HedgeBudget, rnd: _Round
    ) -> Reply:
        """The primary; each time the newest message has waited out its patience (the call's
        `hedge_after`, or sooner by its round's peers) with part of the work still unanswered,
        that part goes to fresh alternates (workers that together host it), while hosts and the
        hedge cap allow: a hedge can straggle too. Each expert's first valid answer counts, from
        whichever message; the call ends once every expert has one. Messages still in flight
        then are abandoned, not cancelled: their workers are told to drop them, an answer that
        comes anyway lands in `late` (to be compared and credited), and their connections go
        back to the pool instead of being torn down mid-message."""
        loop = asyncio.get_running_loop()
        need = frozenset(int(e) for e in call.msg["experts"])
        flights = [_Flight(worker, call.msg, rnd.primaries[worker], rnd.started)]
        in_flight = {flights[0].task: flights[0]}
        answered: list[tuple[_Flight, WorkerAnswer, float]] = []
        failed: list[tuple[_Flight, WorkerAnswer, float]] = []
        covered: set[int] = set()
        settled: set[int] = set()
        mode = "patient"  # patient: hedge when patience runs out; stuck: no host free, retry when a peer
        while in_flight:  # answers; capped: the hedge budget is spent, wait for what is in flight
            timeout_s = max(0.0, flights[-1].sent + rnd.patience(call) - loop.time()) if mode == "patient" else None
            listen = mode != "capped" and timeout_s != 0.0
            woken = asyncio.ensure_future(rnd.progress.wait()) if listen else None  # a peer answered
            done, _ = await asyncio.wait(
                set(in_flight) | ({woken} if woken else set()), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if woken is not None:
                woken.cancel()
                done.discard(woken)
            for task in done:
                flight = in_flight.pop(task)
                outcome = task.result()
                entry = (flight, outcome, loop.time() - flight.sent)
                if _failed(outcome):
                    failed.append(entry)
                else:
                    answered.append(entry)
                    covered |= flight.experts
                    rnd.note_answer(flight.worker, flight.experts)
            if len(flights) > 1 and not covered | settled >= need:  # late, partly hedged: the rest may settle
                settled |= call.settles(rnd.view(need - covered - settled, self._lingering))
            if covered | settled >= need:
                return self._ended(
                    worker,
                    answered,
                    len(flights) > 1,
                    in_flight.values(),
                    loop.time() - rnd.started,
                    frozenset(settled - covered),
                )
            if done or mode == "capped" or (mode == "patient" and loop.time() < flights[-1].sent + rnd.patience(call)):
                continue  # a failure, or a peer's answer that moved the patience
            if not budget.may_hedge():
                mode = "capped"
                continue
            alternates, settles = call.alternates(rnd.view(need - covered - settled, self._lingering))
            settled |= settles
            if covered | settled >= need:
                continue  # ends at the top of the loop
            if not alternates:
                mode = "stuck"
                continue
            budget.count_hedge(len(alternates))
            mode = "patient"
            now = loop.time()
            for w, m in alternates:
                flight = _Flight(w, m, asyncio.ensure_future(self.call(w, m, timeout)), now)
                flights.append(flight)
                in_flight[flight.task] = flight
        return self._ended(worker, answered + failed, len(flights) > 1, (), loop.time() - rnd.started)

    def _ended(
        self,
        primary: str,
        parts: list[tuple[_Flight, WorkerAnswer, float]],
        hedged: bool,
        still_flying: Iterable[_Flight],
        seconds: float,
        settled: frozenset[int] = frozenset(),
    ) -> Reply:
        abandoned = []
        for flight in still_flying:
            self._abandon(flight.worker, flight.msg, flight.task, flight.sent)
            if "call" in flight.msg:
                abandoned.append(flight.msg["call"])
        return Reply(
            tuple((f.worker, o) for f, o, _ in parts),
            seconds,
            hedged,
            primary,
            tuple(abandoned),
            settled,
            tuple(f.msg.get("call") for f, _, _ in parts),
            tuple(d for _, _, d in parts),
        )

    def _abandon(self, worker: str, msg: dict[str, Any], task: asyncio.Future, started: float) -> None:
        """Leave a losing call to finish on its own; tell its worker to drop it if not started."""
        if task.done():
            return
        self._lingering[worker] += 1
        call_id = msg.get("call")
        loop = asyncio.get_running_loop()

        def finished(t: asyncio.Future) -> None:
            self._lingering[worker] -= 1
            if self._lingering[worker] <= 0:
                del self._lingering[worker]
            if not t.cancelled() and call_id is not None:
                self.late.append(LateReply(worker, call_id, t.result(), loop.time() - started))

        task.add_done_callback(finished)
        if call_id is not None:
            loop.create_task(self.cancel(worker, call_id))

    def busy(self) -> set[str]:
        """Workers still working on an abandoned call (they would queue a new one behind it)."""
        return set(self._lingering)

    def drain_late(self) -> list[LateReply]:
        late = []
        while self.late:
            late.append(self.late.popleft())
        return late

    async def _hedged_all(
        self, calls: Mapping[str, HedgedCall], timeout: float, budget: HedgeBudget, peer_patience: PeerPatience | None
    ) -> dict[str, Reply]:
        await self.start()
        loop = asyncio.get_running_loop()
        primaries = {w: asyncio.ensure_future(self.call(w, c.msg, timeout)) for w, c in calls.items()}
        rnd = _Round(loop.time(), primaries, calls, peer_patience, loop)
        replies = await asyncio.gather(*(self._hedged_one(w, c, timeout, budget, rnd) for w, c in calls.items()))
        return dict(zip(calls, replies, strict=True))

    def call_hedged(
        self,
        calls: Mapping[str, HedgedCall],
        timeout: float,
        budget: HedgeBudget,
        peer_patience: PeerPatience | None = None,
    ) -> dict[str, Reply]:
        return self.client.sync(self._hedged_all, calls, timeout, budget, peer_patience)


class DirectTransport(_Hedging):
    name = "direct"

    def __init__(self, client: Client, connect_timeout: float = 3.0, settings: Any = None):
        self.client = client
        self._setup_latency(settings)
        # Our own pool deserializes msgpack only. distributed still loads `__Pickled__` frames
        # whatever the deserializers say (dask/distributed#9283): hardened mode (nd.harden())
        # puts those behind the allow-list too.
        self.pool = ConnectionPool(
            limit=256,
            deserializers=["msgpack"],
            serializers=["msgpack"],
            connection_args=client.connection_args,
            timeout=connect_timeout,
        )
        self.connect_timeout = connect_timeout
        self._started = False
        self._setup_hedging()

    async def _deliver(self, worker: str, msg: dict[str, Any], rtt: float) -> WorkerAnswer:
        if rtt:
            await asyncio.sleep(rtt / 2)  # simulated: the way out
        outcome = await self.pool(worker).neuro_expert(**msg)
        if rtt:
            await asyncio.sleep(rtt / 2)  # simulated: the way back
        return outcome

    async def start(self) -> None:
        """Open the connection pool (once; every call needs it)."""
        if not self._started:
            started = self.pool.start()
            if asyncio.iscoroutine(started):
                await started
            self._started = True

    async def _call_all(self, calls: Mapping[str, dict[str, Any]], timeout: float) -> dict[str, WorkerAnswer]:
        await self.start()
        results = await asyncio.gather(*(self.call(w, m, timeout) for w, m in calls.items()))
        return dict(zip(calls, results, strict=True))

    def call_many(self, calls: Mapping[str, dict[str, Any]], timeout: float) -> dict[str, WorkerAnswer]:
        return self.client.sync(self._call_all, calls, timeout)

    async def cancel(self, worker: str, call_id: str) -> None:
        """Tell `worker` to skip call `call_id` if it has not started it (a lost hedge race); best effort."""
        rtt = self._simulated(worker)
        if rtt:
            await asyncio.sleep(rtt / 2)  # simulated: a one-way message
        try:
            await asyncio.wait_for(Cancel((call_id,)).send(self.pool(worker)), self.connect_timeout)
        except Exception:  # best effort: the call may already be done, or the worker gone
            log.debug("could not tell %s to drop call %s", worker, call_id, exc_info=True)

    def close(self) -> None:
        if self._started:
            try:
                self.client.sync(self.pool.close)
            except Exception:  # the client's loop may already be gone at interpreter exit
                log.debug("closing the direct transport's pool failed", exc_info=True)


class FuturesTransport(_Hedging):
    name = "futures"
    _counter = itertools.count()

    def __init__(
        self,
        client: Client,
        connect_timeout: float = 3.0,
        settings: Any = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.client = client
        self._session = uuid.uuid4().hex[:8]
        self.clock, self.sleep = clock, sleep  # the caller's thread, never the event loop
        self._setup_latency(settings)
        self._setup_hedging()

    def call_many(self, calls: Mapping[str, dict[str, Any]], timeout: float) -> dict[str, WorkerAnswer]:
        futures = {}
        rtt = {w: self._simulated(w) for w in calls}
        start = self.clock()
        sent: dict[str, float] = {}
        done_at: dict[str, float] = {}
        for worker, msg in sorted(calls.items(), key=lambda kv: rtt[kv[0]]):  # each after its half delay
            if (pause := start + rtt[worker] / 2 - self.clock()) > 0:
                self.sleep(pause)
            sent[worker] = self.clock()
            futures[worker] = self._submit(worker, msg)
            futures[worker].add_done_callback(lambda _f, w=worker: done_at.setdefault(w, self.clock()))
        try:
            wait(list(futures.values()), timeout=max(0.0, start + timeout - self.clock()), return_when="ALL_COMPLETED")
        except TimeoutError:
            pass  # whatever did not finish is reported as a timed-out call below
        now = self.clock()
        finished = {w: done_at.get(w, now) for w, f in futures.items() if f.status == "finished"}
        if finished and (pause := max(t + rtt[w] / 2 for w, t in finished.items()) - self.clock()) > 0:
            self.sleep(pause)  # simulated: the answers' way back
        for w, t in finished.items():
            self.latency.observe(w, t + rtt[w] / 2 - sent[w] + rtt[w] / 2, _rows(calls[w]))
        out: dict[str, WorkerAnswer] = {}
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

    async def start(self) -> None:
        """Nothing to open: futures go through the client's own connection to the scheduler."""

    async def _deliver(self, worker: str, msg: dict[str, Any], rtt: float) -> WorkerAnswer:
        """One future pinned to `worker` (the trusted runner's quorums and hedges use this)."""
        if rtt:
            await asyncio.sleep(rtt / 2)  # simulated: the way out
        future = self._submit(worker, msg)
        try:
            await future._state.wait()
            if future.status != "finished":
                # The remote exception is not fetched: that would unpickle what a worker sent.
                return RuntimeError(f"expert task on {worker} {future.status}")
            packed = (await self.client._gather([future]))[0]
        finally:
            if future.status == "pending":  # timed out: a task pinned to a dead worker must not linger
                await self.client._cancel([future])
        if rtt:
            await asyncio.sleep(rtt / 2)  # simulated: the way back
        return msgpack.unpackb(packed, raw=False)

    def _submit(self, worker: str, msg: dict[str, Any]):
        return self.client.submit(
            serve_expert_call,
            msgpack.packb(msg, use_bin_type=True),
            key=f"neuro-expert-{msg['layer']}-{self._session}-{next(self._counter)}",
            workers=[worker],
            allow_other_workers=False,
            pure=False,
        )

    async def cancel(self, worker: str, call_id: str) -> None:
        """A losing hedge's future is left to finish: its late answer is compared and credited
        like the direct transport's (cancelling it would lose that)."""

    def close(self) -> None:
        pass


def _failed(outcome: WorkerAnswer) -> bool:
    return isinstance(outcome, BaseException) or (isinstance(outcome, Mapping) and outcome.get("status") != "OK")


def make_transport(name: str, client: Client, connect_timeout: float = 3.0, settings: Any = None) -> Transport:
    """`settings` (ClientSettings): seed, latency_aware and simulated_latency."""
    return {"direct": DirectTransport, "futures": FuturesTransport}[name](client, connect_timeout, settings)
