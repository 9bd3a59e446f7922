"""What a distributed model's client tells the scheduler, off the token path, and the routes it
gets back.

Expert calls leave traces the scheduler needs: rows per (layer, expert) (its placement follows
load), judged replies (protocol/records.py's OutcomeReport), layer-call records for the
dashboard (CallReport), the workers' signed receipts (the scheduler pays by those, not by what a
client says: docs/security.md), disputes of refuted replies, and workers that did not answer.
Reports buffers them and sends them in one batch every `routes_refresh` seconds, just before it
asks for fresh routes: both round trips run on the client's event loop while tokens keep flowing,
and the new RouteTable is handed to the executor at its first layer after it arrives (`poll`).
A caught worker is reported at once (`send_outcomes_now`), a dispute as soon as it is filed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from distributed import Client

from neuro_dask.client.dispatch.routes import RouteTable
from neuro_dask.client.dispatch.trusted import Dispute
from neuro_dask.errors import NeuroDaskError
from neuro_dask.protocol import messages
from neuro_dask.protocol.messages import ReportCalls, ReportLoad, ReportOutcomes, ReportPasses, Routes, Unreachable
from neuro_dask.protocol.records import MAX_PATHS, CallReport, OutcomeReport, PassReport, PathReport
from neuro_dask.settings import ClientSettings

log = logging.getLogger(__name__)

MAX_PENDING_CALLS = 500  # call records kept between two reports: the dashboard's stream is a sample


@dataclass
class ReportBatch:
    """Everything buffered since the last report, taken at once."""

    load: dict[tuple[int, int], int] = field(default_factory=dict)  # (layer, expert) -> rows
    outcomes: list[OutcomeReport] = field(default_factory=list)
    calls: list[CallReport] = field(default_factory=list)
    passes: list[PassReport] = field(default_factory=list)


class Reports:
    """The report buffers of one distributed model and the route refresh that carries them."""

    def __init__(
        self, client: Client, model_id: str, transport_name: str, settings: ClientSettings, clock: Callable[[], float]
    ):
        self.client = client
        self.model_id = model_id
        self.transport_name = transport_name
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._pending = ReportBatch()
        # (request, worker) -> the newest signed receipt it returned, and which of them changed
        # since the last report (presented with it).
        self._receipts: dict[tuple[str, str], dict] = {}
        self._fresh_receipts: set[tuple[str, str]] = set()
        self._routes_at = float("-inf")  # when routes were last asked for
        self._refreshing: concurrent.futures.Future | None = None  # a background refresh in flight
        self._disputing: list[concurrent.futures.Future] = []
        self.verdicts: deque[dict] = deque(maxlen=1_000)  # the scheduler's answers to this client's disputes

    # ---- buffers --------------------------------------------------------------------------------

    def count_load(self, layer: int, rows: Mapping[int, int]) -> None:
        """rows: expert -> rows sent to it in this layer call."""
        with self._lock:
            load = self._pending.load
            for e, n in rows.items():
                load[(layer, e)] = load.get((layer, e), 0) + n

    def add_outcomes(self, outcomes: Iterable[OutcomeReport]) -> None:
        with self._lock:
            self._pending.outcomes.extend(outcomes)

    def add_call(self, call: CallReport) -> None:
        with self._lock:
            if len(self._pending.calls) < MAX_PENDING_CALLS:
                self._pending.calls.append(call)

    def add_pass(self, report: PassReport) -> None:
        with self._lock:
            if len(self._pending.passes) < MAX_PENDING_CALLS:
                self._pending.passes.append(report)

    def note_receipt(self, worker: str, response: Any) -> None:
        """Keep a worker's newest receipt per request (they are cumulative: the newest says it all)."""
        receipt = response.get("receipt") if isinstance(response, dict) else None
        if not isinstance(receipt, dict):
            return
        request, seq = receipt.get("request"), receipt.get("seq")
        if not isinstance(request, str) or isinstance(seq, bool) or not isinstance(seq, int):
            return
        key = (request, worker)
        with self._lock:
            held = self._receipts.get(key)
            if held is None or seq > held.get("seq", 0):
                self._receipts[key] = receipt
                self._fresh_receipts.add(key)

    def forget_request(self, request: str) -> None:
        """After a request's end: its receipts were presented with the flush before it."""
        with self._lock:
            for key in [k for k in self._receipts if k[0] == request]:
                del self._receipts[key]
                self._fresh_receipts.discard(key)

    def _take(self) -> ReportBatch:
        with self._lock:
            batch, self._pending = self._pending, ReportBatch()
        return batch

    def _take_receipts(self) -> list[dict]:
        """The receipts not presented yet (each worker's newest per request)."""
        with self._lock:
            taken = [self._receipts[k] for k in self._fresh_receipts]
            self._fresh_receipts.clear()
        return taken

    # ---- routes ---------------------------------------------------------------------------------

    def fetch_routes(self) -> RouteTable:
        """The scheduler's routes now, on the caller's thread."""
        msg = self.client.sync(self.client.scheduler.neuro_routes, model=self.model_id)
        if msg.get("status") != "OK":  # e.g. a restarted scheduler that does not know the model
            raise NeuroDaskError(
                f"the scheduler {self.client.scheduler.address} gave no routes for "
                f"{self.model_id!r}: {msg.get('message')}"
            )
        self._routes_at = self.clock()
        return RouteTable.from_message(msg)

    def refresh_soon(self) -> None:
        """The network moved on (a worker refused routinely): refresh at the next layer."""
        self._routes_at = float("-inf")

    def poll(self, now: float) -> RouteTable | None:
        """Every `routes_refresh` seconds, start a background report and refresh; the new table,
        once one has arrived (None until then, and when it failed: the old table stands)."""
        table = None
        if self._refreshing is not None and self._refreshing.done():
            try:
                table = self._refreshing.result()
            except Exception:  # keep the old table; the next refresh tries again
                log.warning("route refresh failed", exc_info=True)
            self._refreshing = None
        if self._refreshing is None and now - self._routes_at > self.settings.routes_refresh:
            self._routes_at = now
            self._refreshing = self._on_loop(self._refresh(self._take()))
        return table

    def flush(self) -> RouteTable | None:
        """Report everything pending now and wait for it (request ends, drills, tests, close); the
        fresh routes, or None when the scheduler could not be reached."""
        if self._refreshing is not None:
            try:
                self._refreshing.result(timeout=self.settings.connect_timeout)
            except Exception:
                log.debug("route refresh failed", exc_info=True)
            self._refreshing = None
        batch = self._take()
        try:
            table = self.client.sync(self._refresh, batch)
        except Exception:
            log.debug("could not flush reports", exc_info=True)
            table = None
        self._routes_at = self.clock()
        return table

    def send_outcomes_now(self) -> None:
        """A caught worker is reported at once, with every outcome pending, off the token path."""
        with self._lock:
            outcomes, self._pending.outcomes = self._pending.outcomes, []
        if outcomes:
            self._on_loop(self._send_outcomes(outcomes, self._take_receipts()))

    # ---- disputes and unreachable workers -------------------------------------------------------

    def file_disputes(self, disputes: Iterable[Dispute]) -> None:
        """Each refuted reply, with the worker's signed answer, to the scheduler, off the token
        path: it recomputes and judges; until then only this client's routing skips the worker."""
        for dispute in disputes:
            future = self._on_loop(self._dispute(dispute))
            with self._lock:
                self._disputing = [f for f in self._disputing if not f.done()] + [future]

    def wait_for_disputes(self, timeout: float) -> None:
        """Until every dispute filed has its verdict (drills, tests, close), at most `timeout` s."""
        with self._lock:
            pending = list(self._disputing)
        if pending:
            concurrent.futures.wait(pending, timeout=timeout)

    def report_unreachable(self, worker: str, layer: int, experts: list[int]) -> None:
        try:
            message = Unreachable(worker, self.model_id, tuple((layer, e) for e in experts))
            self.client.sync(message.send, self.client.scheduler)
        except Exception:  # reporting is best effort; the call itself is already being re-sent
            log.debug("could not report %s as unreachable", worker, exc_info=True)

    # ---- on the event loop ----------------------------------------------------------------------

    def _on_loop(self, coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.client.loop.asyncio_loop)

    async def _refresh(self, batch: ReportBatch) -> RouteTable:
        """The batch first (so the routes already reflect it), then the routes."""
        await self._upload(batch)
        return RouteTable.from_message(await Routes(self.model_id).send(self.client.scheduler))

    async def _upload(self, batch: ReportBatch) -> None:
        scheduler = self.client.scheduler
        if batch.load:
            try:
                await ReportLoad(self.model_id, tuple((l, e, n) for (l, e), n in batch.load.items())).send(scheduler)
            except Exception:
                log.debug("could not report expert load", exc_info=True)
        receipts = self._take_receipts()
        if batch.outcomes or receipts:
            await self._send_outcomes(batch.outcomes, receipts)
        if batch.calls:
            try:
                paths = relay_paths(batch.calls)
                await ReportCalls(self.model_id, tuple(batch.calls), self.transport_name, paths).send(scheduler)
            except Exception:  # the dashboard's feed is best effort
                log.debug("could not report calls", exc_info=True)
        if batch.passes:
            try:
                await ReportPasses(self.model_id, tuple(batch.passes)).send(scheduler)
            except Exception:  # the dashboard's feed is best effort
                log.debug("could not report speculative passes", exc_info=True)

    async def _send_outcomes(self, outcomes: list[OutcomeReport], receipts: list[dict]) -> None:
        try:
            report = ReportOutcomes(self.model_id, tuple(outcomes), tuple(receipts), uuid.uuid4().hex)
            await report.send(self.client.scheduler)
        except Exception:  # best effort; the output is already decided
            log.debug("could not report trust outcomes", exc_info=True)

    async def _dispute(self, dispute: Dispute) -> None:
        try:
            reply = await messages.Dispute(self.model_id, dispute.evidence).send(self.client.scheduler)
        except Exception as exc:  # the scheduler is away: the worker stays skipped here
            reply = {"status": "error", "message": str(exc)}
        with self._lock:
            self.verdicts.append({"worker": dispute.worker, "layer": dispute.layer, "expert": dispute.expert, **reply})
        log.info(
            "dispute of %s (layer %d, expert %d): %s",
            dispute.worker,
            dispute.layer,
            dispute.expert,
            reply.get("verdict") or reply.get("message"),
        )


def known_paths() -> dict[str, tuple[str, float]]:
    """{relay:// address: (path, its measured round trip in ms or -1)} for every relayed worker
    this process reached (relay/comm.py measures it on the first connection); nothing where it
    reached none (Dask loads the relay backend only when a relay:// address is dialled)."""
    relay = sys.modules.get("neuro_dask.relay.comm")
    if relay is None:
        return {}
    return {w: (p["path"], p["rtt_ms"].get(p["path"], -1.0)) for w, p in relay.paths().items()}


def relay_paths(calls) -> tuple[PathReport, ...]:
    """How this process reaches the relayed workers these calls went to, for the dashboard."""
    known = known_paths()
    seen = sorted({w for call in calls for w in call.workers if w in known})[:MAX_PATHS]
    return tuple(PathReport(w, *known[w]) for w in seen)
