"""DistributedExecutor: one layer's expert calls to volunteer workers, re-sent until answered.

Per layer: plan one message per worker (RouteTable.plan), send them all at once, keep every
valid answer, and re-plan what failed onto other replicas. A worker that failed a call becomes
a suspect: skipped by every layer for `suspect_cooldown` seconds (so a dead worker costs one
failed call, not one per layer) and reported to the scheduler. Experts with no live replica make it ask
the scheduler for fresh routes, for at most `missing_expert_wait` seconds, then raise
ExpertUnavailableError: never a hang.

Every call carries the request's id and the ticket the scheduler signed for it (workers of a
charging network serve only ticketed calls); every answer carries the worker's signed receipt,
and the newest receipt of each worker is presented to the scheduler with the next report: the
scheduler pays and credits by those, not by what this client says (docs/security.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import threading
import time
import uuid
from collections import deque
from typing import Callable, Iterator, Mapping

import torch
from distributed import Client

from neuro_dask.client.dispatch.routes import ExpertUnavailableError, RouteTable
from neuro_dask.client.dispatch.transports import Transport
from neuro_dask.client.dispatch.trusted import Dispute, Outcome, TrustedLayerRunner
from neuro_dask.errors import NeuroDaskError
from neuro_dask.settings import ClientSettings
from neuro_dask.trust.quorum import QuorumExhaustedError
from neuro_dask.scheduler.versions import RetiredVersionError
from neuro_dask.protocol.wire import decode_response, encode_request

log = logging.getLogger(__name__)


class PaymentRefusedError(NeuroDaskError):
    """The scheduler's ledger refused to hold this request's fee: no work was sent."""

    def __init__(self, account: str | None, request: str, why: str):
        self.account, self.request, self.why = account, request, why
        hint = "" if account else " (set neuro.client.account to the ledger user that pays)"
        super().__init__(f"request refused before any work was sent: {why}{hint}")


class RoutesUnavailableError(ExpertUnavailableError):
    """Experts lost their workers and the scheduler could not give fresh routes for the whole
    wait: it is down, or it restarted and no longer knows the model."""

    def __init__(self, model: str, layer: int, experts, waited: float, scheduler: str, why: str):
        super().__init__(model, layer, experts, waited)
        self.scheduler, self.why = scheduler, why
        self.args = (f"no live worker serves expert(s) {self.experts} of layer {layer} of model {model!r} and the "
                     f"scheduler {scheduler} gave no routes for {waited:.1f} s ({why}); if the scheduler restarted, "
                     "load the model again (nd.load(..., client=client)) so that it is published there",)


class DistributedExecutor:
    def __init__(self, client: Client, model_id: str, transport: Transport, settings: ClientSettings,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.client = client
        self.model_id = model_id
        self.transport = transport
        self.settings = settings
        self.clock = clock
        self.sleep = sleep
        self.routes = self.fetch_routes()
        self._refreshing: concurrent.futures.Future | None = None  # a background refresh in flight
        self.suspects: dict[str, float] = {}  # worker -> until when it is skipped
        self.load: dict[tuple[int, int], int] = {}  # (layer, expert) -> rows since the last report
        self.layer_seconds: deque[float] = deque(maxlen=100_000)  # per-layer latency, for drills and reports
        self.outcomes: list[tuple[Outcome, str]] = []  # (trust outcome, request id) not yet reported
        self._requests = threading.local()  # each thread's generation request (ledger on)
        self.settlements: list[dict] = []  # what the scheduler charged, per request
        self.calls: list[list] = []  # recent layer calls for the dashboard, not yet reported
        self.trusted = TrustedLayerRunner(model_id, transport, settings.trust_policy(), random.Random(settings.seed),
                                          count_wire=self._count_wire,
                                          on_receipt=self._note_receipt) if settings.trust else None
        # (request, worker) -> the newest signed receipt it returned, and which of them changed
        # since the last report (presented with it).
        self.receipts: dict[tuple[str, str], dict] = {}
        self._fresh_receipts: set[tuple[str, str]] = set()
        self.verdicts: deque[dict] = deque(maxlen=1_000)  # the scheduler's answers to this client's disputes
        self._disputing: list[concurrent.futures.Future] = []
        # Pipelined micro-batches (neuro.client.micro-batches) call run_layer from several threads
        # at once: shared state changes under this lock, per-call state is per thread, and the
        # trust runner (quorum bookkeeping, hedge budget) takes one layer at a time.
        self._lock = threading.RLock()
        self._trusted_lock = threading.Lock()
        self._layer = threading.local()
        self.wire_dtype = getattr(torch, settings.wire_dtype) if settings.wire_dtype else None
        self.wire_bytes = {"sent": 0, "received": 0}  # expert payload bytes (hidden states), both ways
        self.channel_current: str | None = None  # the current version of this model's channel, last heard

    @property
    def request(self) -> str:
        """The request this thread's generation is doing work for ("" outside one).
        Concurrent streams merge their expert calls (model/batching.py): the work of a merged
        call is credited to the request of the thread that ran it; the client pays for all."""
        return getattr(self._requests, "id", "")

    @request.setter
    def request(self, value: str) -> None:
        self._requests.id = value

    @property
    def stamp(self) -> dict:
        """What every call of this thread's request carries: its id and the scheduler's ticket.
        Lanes of one generation (pipelined micro-batches) copy it to their threads."""
        stamp = {"request": self.request} if self.request else {}
        ticket = getattr(self._requests, "ticket", None)
        if ticket is not None:
            stamp["ticket"] = ticket
        return stamp

    @stamp.setter
    def stamp(self, value: dict) -> None:
        self._requests.id = str(value.get("request", ""))
        self._requests.ticket = value.get("ticket")

    def _note_receipt(self, worker: str, response) -> None:
        """Keep a worker's newest receipt per request (they are cumulative: the newest says it all)."""
        receipt = response.get("receipt") if isinstance(response, dict) else None
        if not isinstance(receipt, dict):
            return
        request, seq = receipt.get("request"), receipt.get("seq")
        if not isinstance(request, str) or isinstance(seq, bool) or not isinstance(seq, int):
            return
        key = (request, worker)
        with self._lock:
            held = self.receipts.get(key)
            if held is None or seq > held.get("seq", 0):
                self.receipts[key] = receipt
                self._fresh_receipts.add(key)

    def _take_receipts(self) -> list[dict]:
        """The receipts not presented yet (each worker's newest per request)."""
        with self._lock:
            taken = [self.receipts[k] for k in self._fresh_receipts]
            self._fresh_receipts.clear()
        return taken

    @contextlib.contextmanager
    def charging(self, account: str | None) -> Iterator[None]:
        """Generations this thread starts inside the block are paid by `account` (a ledger user)
        instead of neuro.client.account: a gateway serving many API keys, for example."""
        before = getattr(self._requests, "account", None)
        self._requests.account = account
        try:
            yield
        finally:
            self._requests.account = before

    @property
    def account(self) -> str | None:
        return getattr(self._requests, "account", None) or self.settings.account

    def fetch_routes(self) -> RouteTable:
        msg = self.client.sync(self.client.scheduler.neuro_routes, model=self.model_id)
        if msg.get("status") != "OK":  # e.g. a restarted scheduler that does not know the model
            raise NeuroDaskError(f"the scheduler {self.client.scheduler.address} gave no routes for "
                                 f"{self.model_id!r}: {msg.get('message')}")
        self._routes_at = self.clock()
        return RouteTable.from_message(msg)

    def _refresh_in_background(self, now: float) -> None:
        """Every `routes_refresh` seconds: report load and trust outcomes and fetch fresh routes,
        on the client's event loop while tokens keep flowing; the new table is swapped in at the
        first layer after it arrives. The scheduler round trips never sit on the token path."""
        if self._refreshing is not None and self._refreshing.done():
            try:
                self.routes = self._refreshing.result()
            except Exception:  # keep the old table; the next refresh tries again
                log.warning("route refresh failed", exc_info=True)
            self._refreshing = None
        if self._refreshing is None and now - self._routes_at > self.settings.routes_refresh:
            self._routes_at = now
            load, self.load = self.load, {}
            outcomes, self.outcomes = self.outcomes, []
            calls, self.calls = self.calls, []
            self._refreshing = asyncio.run_coroutine_threadsafe(self._refresh(load, outcomes, calls),
                                                                self.client.loop.asyncio_loop)

    async def _refresh(self, load: dict[tuple[int, int], int], outcomes: list[tuple[Outcome, str]],
                       calls: list[list] = ()) -> RouteTable:
        scheduler = self.client.scheduler
        if load:  # best effort: placement works without it
            try:
                await scheduler.neuro_report_load(model=self.model_id, load=[[l, e, n] for (l, e), n in load.items()])
            except Exception:
                log.debug("could not report expert load", exc_info=True)
        receipts = self._take_receipts()
        if outcomes or receipts:
            await self._send_outcomes(outcomes, receipts)
        if calls:
            try:
                await scheduler.neuro_report_calls(model=self.model_id, calls=calls, transport=self.transport.name)
            except Exception:  # the dashboard's feed is best effort
                log.debug("could not report calls", exc_info=True)
        return RouteTable.from_message(await scheduler.neuro_routes(model=self.model_id))

    async def _send_outcomes(self, outcomes: list[tuple[Outcome, str]], receipts: list[dict] = ()) -> None:
        try:
            await self.client.scheduler.neuro_report_outcomes(
                model=self.model_id, batch=uuid.uuid4().hex, receipts=list(receipts),
                outcomes=[[o.worker, o.kind, o.cause_id, o.layer, o.expert, o.rows, request]
                          for o, request in outcomes])
        except Exception:  # best effort; the output is already decided
            log.debug("could not report trust outcomes", exc_info=True)

    def _file_disputes(self, disputes: list[Dispute]) -> None:
        """Each refuted reply, with the worker's signed answer, to the scheduler, off the token
        path: it recomputes and judges; until then only this client's routing skips the worker."""
        for dispute in disputes:
            future = asyncio.run_coroutine_threadsafe(self._dispute(dispute), self.client.loop.asyncio_loop)
            with self._lock:
                self._disputing = [f for f in self._disputing if not f.done()] + [future]

    async def _dispute(self, dispute: Dispute) -> None:
        try:
            reply = await self.client.scheduler.neuro_dispute(model=self.model_id, evidence=dispute.evidence)
        except Exception as exc:  # the scheduler is away: the worker stays skipped here
            reply = {"status": "error", "message": str(exc)}
        with self._lock:
            self.verdicts.append({"worker": dispute.worker, "layer": dispute.layer, "expert": dispute.expert, **reply})
        log.info("dispute of %s (layer %d, expert %d): %s", dispute.worker, dispute.layer, dispute.expert,
                 reply.get("verdict") or reply.get("message"))

    def wait_for_disputes(self, timeout: float) -> None:
        """Until every dispute filed has its verdict (drills, tests, close), at most `timeout` s."""
        with self._lock:
            pending = list(self._disputing)
        if pending:
            concurrent.futures.wait(pending, timeout=timeout)

    def _report_unreachable(self, worker: str, layer: int, experts: list[int]) -> None:
        try:
            self.client.sync(self.client.scheduler.neuro_unreachable, worker=worker, model=self.model_id,
                             experts=[[layer, e] for e in experts])
        except Exception:  # reporting is best effort; the call itself is already being re-sent
            log.debug("could not report %s as unreachable", worker, exc_info=True)

    def run_layer(self, layer: int, groups: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        started = self.clock()
        runner = self.trusted
        replicas, hedges = (runner.replicas_sent, runner.hedges) if runner else (0, 0)
        self._layer.workers = set()
        self._layer.outcome = "failed"
        try:
            return self._at_model_dtype(self._run_layer(layer, self._on_wire(groups)), groups)
        finally:
            seconds = self.clock() - started
            self.layer_seconds.append(seconds)
            if len(self.calls) < 500:  # for the dashboard's call stream, sent with the next refresh
                sent = runner.replicas_sent - replicas if runner else len(groups)
                # rows: tokens x experts per token (the dashboard's tokens/s); request: which
                # request the call worked for (the trust page links a verdict to its calls)
                self.calls.append([layer, len(groups), sorted(self._layer.workers), seconds, sent,
                                   runner.hedges - hedges if runner else 0, self._layer.outcome, self.transport.name,
                                   int(sum(x.shape[0] for x in groups.values())), self.request])

    def _on_wire(self, groups: Mapping[int, torch.Tensor]) -> Mapping[int, torch.Tensor]:
        """Hidden states as they travel: neuro.client.wire-dtype (bfloat16 halves the bytes), or as they are."""
        if self.wire_dtype is None:
            return groups
        return {e: x.to(self.wire_dtype) for e, x in groups.items()}

    def _at_model_dtype(self, results: dict[int, torch.Tensor], groups: Mapping[int, torch.Tensor]):
        if self.wire_dtype is None:
            return results
        return {e: y.to(groups[e].dtype) for e, y in results.items()}

    def _count_wire(self, sent: int, received: int) -> None:
        with self._lock:
            self.wire_bytes["sent"] += sent
            self.wire_bytes["received"] += received

    def _run_layer(self, layer: int, groups: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        pending = dict(groups)
        results: dict[int, torch.Tensor] = {}
        now = self.clock()
        with self._lock:
            self._refresh_in_background(now)  # new replicas, re-placed experts, reputation
            for e, rows in groups.items():
                self.load[(layer, e)] = self.load.get((layer, e), 0) + rows.shape[0]
            self.suspects = {w: until for w, until in self.suspects.items() if until > now}
        if self.trusted is not None:
            with self._trusted_lock:
                return self._run_trusted(layer, groups)
        exclude: set[str] = set(self.suspects)
        waited_since: float | None = None
        while pending:
            plan, unroutable = self.routes.plan(layer, {e: x.shape[0] for e, x in pending.items()}, exclude,
                                                latency=getattr(self.transport, "route_latency", None))
            if unroutable and not plan:
                waited_since = self._wait_for_routes(layer, unroutable, waited_since)
                exclude = set()  # fresh routes: give every worker, suspects too, another chance
                self.suspects.clear()
                continue
            stamp = self.stamp
            calls = {w: {**encode_request(self.model_id, layer, {e: pending[e] for e in experts}), **stamp}
                     for w, experts in plan.items()}
            outcomes = self.transport.call_many(calls, self.settings.deadline)
            for worker, experts in plan.items():
                sent = {e: pending[e] for e in experts}
                try:
                    outcome = outcomes[worker]
                    if isinstance(outcome, BaseException):
                        raise outcome
                    answer = decode_response(outcome, sent)
                except Exception as exc:  # refused, closed, timed out or malformed: all a failed call
                    routine = routine_refusal(exc)
                    log.log(logging.INFO if routine else logging.WARNING,
                            "layer %d: call to %s failed (%s); re-sending experts %s elsewhere", layer, worker, exc,
                            experts)
                    if routine:  # the network moved on (re-placement, a pause): fetch its routes now
                        self._routes_at = float("-inf")
                    exclude.add(worker)
                    with self._lock:
                        self.suspects[worker] = self.clock() + self.settings.suspect_cooldown
                    self._report_unreachable(worker, layer, experts)
                    continue
                self._count_wire(len(calls[worker]["data"]), len(outcome["data"]))
                self._note_receipt(worker, outcome)
                results.update(answer)
                self._layer.workers.add(worker)
                for e in experts:
                    del pending[e]
        self._layer.outcome = "ok" if len(self._layer.workers) >= len(plan) else "retried"
        return results

    def _run_trusted(self, layer: int, groups: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Quorums and adaptive replication; a worker caught returning a wrong result is skipped
        at once and reported at once, everything else is reported with the next route refresh."""
        waited_since: float | None = None
        while True:
            try:
                results, outcomes = self.trusted.run(layer, groups, self.routes, set(self.suspects), self.stamp)
                break
            except ExpertUnavailableError as exc:
                waited_since = self._wait_for_routes(layer, exc.experts, waited_since)
                self.suspects.clear()
            except QuorumExhaustedError:
                if not self.suspects:
                    raise
                self.suspects.clear()  # a skipped trusted worker may be what the quorum lacks
        kinds = {o.kind for o in outcomes}
        self._layer.workers = {o.worker for o in outcomes if o.kind == "validated"}
        self._layer.outcome = "caught" if "invalid" in kinds else "checked" if len(outcomes) > len(groups) else "ok"
        bad = {o.worker for o in outcomes if o.kind in ("invalid", "timeout", "error")}  # late only costs reputation
        with self._lock:
            self.outcomes += [(o, self.request) for o in outcomes]
            for worker in bad:
                self.suspects[worker] = self.clock() + self.settings.suspect_cooldown
            caught = None
            if "invalid" in kinds:  # a caught worker is reported at once, off the token path
                caught, self.outcomes = self.outcomes, []
        if caught:
            asyncio.run_coroutine_threadsafe(self._send_outcomes(caught, self._take_receipts()),
                                             self.client.loop.asyncio_loop)
        disputes = self.trusted.take_disputes()
        if disputes:
            self._file_disputes(disputes)
        return results

    def flush_reports(self) -> None:
        """Report pending load and outcomes now and wait for it (drills, tests, close)."""
        if self._refreshing is not None:
            try:
                self._refreshing.result(timeout=self.settings.connect_timeout)
            except Exception:
                log.debug("route refresh failed", exc_info=True)
            self._refreshing = None
        with self._lock:
            load, self.load = self.load, {}
            outcomes, self.outcomes = self.outcomes, []
            calls, self.calls = self.calls, []
        try:
            self.routes = self.client.sync(self._refresh, load, outcomes, calls)
        except Exception:
            log.debug("could not flush reports", exc_info=True)
        self._routes_at = self.clock()

    # ---- requests (the ledger's holds and settlements) ---------------------------------------

    def begin_request(self, expert_tokens: int, tier: str = "standard") -> None:
        """Before any work: the scheduler leases this model version for the request (a replaced
        version stays served until its requests end), quotes and holds the fee at the tier's
        price (when it runs a ledger), or refuses, and then nothing is sent. Its reply names the
        request and carries the ticket every call of it shows the workers."""
        reply = self.client.sync(self.client.scheduler.neuro_request_begin, model=self.model_id,
                                 account=self.account or "", expert_tokens=int(expert_tokens), tier=tier)
        if reply.get("retired"):
            raise RetiredVersionError(self.model_id, str(reply.get("channel")), reply.get("current"))
        if reply.get("unpublished"):
            raise NeuroDaskError(str(reply.get("message")))
        if reply.get("status") != "OK":
            raise PaymentRefusedError(self.account, str(reply.get("request", "")), str(reply.get("message")))
        if reply.get("current"):
            self.channel_current = reply["current"]  # a following client switches after this request
        self._requests.charged = reply.get("ledger") is not False
        self.stamp = {"request": str(reply["request"]), "ticket": reply.get("ticket")}

    def end_request(self) -> None:
        """After the work: present the workers' receipts and report every judged reply, then end
        the request: the scheduler settles it by the receipts it verified and ends the lease."""
        request = self.request
        if not request:
            return
        charged = getattr(self._requests, "charged", False)
        self.flush_reports()
        self.stamp = {}
        reply = self.client.sync(self.client.scheduler.neuro_request_end, request=request)
        with self._lock:  # presented with the flush: nothing of this request is kept
            for key in [k for k in self.receipts if k[0] == request]:
                del self.receipts[key]
                self._fresh_receipts.discard(key)
        if not charged:
            return
        self.settlements.append({"request": request, **reply})
        if reply.get("status") != "OK":
            log.warning("request %s could not be settled: %s", request, reply.get("message"))

    def _wait_for_routes(self, layer: int, unroutable: list[int], since: float | None) -> float:
        now = self.clock()
        since = now if since is None else since
        why = getattr(self._layer, "routes_failure", None)
        if now - since >= self.settings.missing_expert_wait:
            if why is not None:
                raise RoutesUnavailableError(self.model_id, layer, unroutable, now - since,
                                             self.client.scheduler.address, why)
            raise ExpertUnavailableError(self.model_id, layer, unroutable, now - since)
        self.sleep(0.05)  # poll: the scheduler re-places experts as soon as it hears of a loss
        try:
            self.routes = self.fetch_routes()
            self._layer.routes_failure = None
        except (OSError, NeuroDaskError) as exc:  # the scheduler is away or restarted: keep waiting
            self._layer.routes_failure = str(exc) or type(exc).__name__
        return since

    def close(self, settle_seconds: float = 2.0) -> None:
        """Report everything before the connections go: answers of abandoned calls still on their
        way get up to `settle_seconds` to arrive and be judged (a perturber that only ever lost
        hedge races is caught by them), then the last outcomes and load are flushed."""
        if self.trusted is not None:
            deadline = self.clock() + settle_seconds
            while self.transport.busy() and self.clock() < deadline:
                self.sleep(0.02)  # poll: abandoned calls end on their own, by their deadline at the latest
            self.outcomes += [(o, self.request) for o in self.trusted.check_late()]
            late = self.trusted.take_disputes()
            if late:
                self._file_disputes(late)
            self.wait_for_disputes(self.settings.deadline * 3)
        self.flush_reports()
        self.transport.close()


# What a worker answers when the client's routes are merely behind the network: an expert moved
# (re-placement) or its owner came back (idle-only pause). Routine, so not a warning.
ROUTINE_REFUSALS = ("is not hosted here", "worker refused the call: paused:")


def routine_refusal(exc: BaseException) -> bool:
    return any(marker in str(exc) for marker in ROUTINE_REFUSALS)
