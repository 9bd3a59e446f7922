"""DistributedExecutor: one layer's expert calls to volunteer workers, re-sent until answered.

Per layer: plan one message per worker (RouteTable.plan), send them all at once, keep every
valid answer, and re-plan what failed onto other replicas. A worker that failed a call becomes
a suspect: skipped by every layer for `suspect_cooldown` seconds (so a dead worker costs one
failed call, not one per layer) and reported to the scheduler. Experts with no live replica make it ask
the scheduler for fresh routes until `missing_expert_wait` seconds pass without progress, then raise
ExpertUnavailableError: never a hang.

Every call carries the request's id and the ticket the scheduler signed for it (workers of a
charging network serve only ticketed calls); every answer carries the worker's signed receipt,
and the newest receipt of each worker is presented to the scheduler with the next report: the
scheduler pays and credits by those, not by what this client says (docs/security.md).

The executor runs layers; what it tells the scheduler between them (load, judged replies, call
records, receipts, disputes) and the route refresh that carries it are its `reports`
(reports.py); where requests begin and end, and who pays, is its request scope, `requests`
(requests.py), which the model drives.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from distributed import Client

from neuro_dask.client.dispatch.reports import Reports, known_paths
from neuro_dask.client.dispatch.requests import PaidRequests, PaymentRefusedError
from neuro_dask.client.dispatch.routes import (
    MAX_WAIT_FACTOR,
    ExpertUnavailableError,
    RouteTable,
    RouteWait,
    routed_count,
)
from neuro_dask.client.dispatch.transports import Transport
from neuro_dask.client.dispatch.trusted import Outcome, TrustedLayerRunner
from neuro_dask.errors import NeuroDaskError
from neuro_dask.protocol.records import CallReport, OutcomeReport, Refusal
from neuro_dask.protocol.wire import decode_response, encode_request
from neuro_dask.settings import ClientSettings
from neuro_dask.trust.quorum import QuorumExhaustedError

__all__ = ["DistributedExecutor", "PaymentRefusedError", "RoutesUnavailableError", "routine_refusal"]

log = logging.getLogger(__name__)


class RoutesUnavailableError(ExpertUnavailableError):
    """Experts lost their workers and the scheduler could not give fresh routes for the whole
    wait: it is down, or it restarted and no longer knows the model."""

    def __init__(self, model: str, layer: int, experts, waited: float, scheduler: str, why: str):
        super().__init__(model, layer, experts, waited)
        self.scheduler, self.why = scheduler, why
        self.args = (
            f"no live worker serves expert(s) {self.experts} of layer {layer} of model {model!r} and the "
            f"scheduler {scheduler} gave no routes for {waited:.1f} s ({why}); if the scheduler restarted, "
            "load the model again (nd.load(..., client=client)) so that it is published there",
        )


TRUST_COUNTERS = ("units", "replicas_sent", "unchecked", "hedges")
SLOW_FETCH = 1.0  # seconds: a route fetch this slow waited for a scheduler that was away


def standard_counters(layer_seconds: Iterable[float], wire_bytes: Mapping[str, int], trusted: Any) -> dict[str, Any]:
    """`MoEModel.stats()` of the standard tier: layer calls and their median time, the hidden
    states' bytes both ways, and with trust on the trust runner's counts."""
    timed = sorted(layer_seconds)
    out: dict[str, Any] = {
        "layers": len(timed),
        "layer_ms_p50": 1000 * timed[len(timed) // 2] if timed else None,
        "bytes_sent": int(wire_bytes.get("sent", 0)),
        "bytes_received": int(wire_bytes.get("received", 0)),
    }
    if trusted is not None:
        out.update({name: int(getattr(trusted, name)) for name in TRUST_COUNTERS})
    return out


class DistributedExecutor:
    """ExpertExecutor over the network (model/moe.py). Pipelined micro-batches
    (neuro.client.micro-batches) call run_layer from several threads at once: shared state
    changes under a lock, per-call state is per thread, and the trust runner (quorum
    bookkeeping, hedge budget) takes one layer at a time."""

    tier = "standard"

    def __init__(
        self,
        client: Client,
        model_id: str,
        transport: Transport,
        settings: ClientSettings,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.client = client
        self.model_id = model_id
        self.transport = transport
        self.settings = settings
        self.clock = clock
        self.sleep = sleep
        self.reports = Reports(client, model_id, transport.name, settings, clock)
        self.requests = PaidRequests(
            client,
            model_id,
            settings,
            flush=self.flush_reports,
            forget=self.reports.forget_request,
            passes=self.reports.add_pass,
        )
        self.routes = self.fetch_routes()
        self.suspects: dict[str, float] = {}  # worker -> until when it is skipped
        self.layer_seconds: deque[float] = deque(maxlen=100_000)  # per-layer latency, for drills and reports
        self.trusted = (
            TrustedLayerRunner(
                model_id,
                transport,
                settings.trust_policy(),
                random.Random(settings.seed),
                count_wire=self._count_wire,
                on_receipt=self.reports.note_receipt,
            )
            if settings.trust
            else None
        )
        self.wire_dtype = getattr(torch, settings.wire_dtype) if settings.wire_dtype else None
        self.wire_bytes = {"sent": 0, "received": 0}  # expert payload bytes (hidden states), both ways
        self._lock = threading.RLock()
        self._trusted_lock = threading.Lock()
        self._layer = threading.local()  # this thread's layer call: workers that answered, its outcome

    def counters(self) -> dict[str, Any]:
        out = standard_counters(list(self.layer_seconds), self.wire_bytes, self.trusted)
        book = getattr(self.transport, "latency", None)
        if book is not None:
            out["latency"] = book.snapshot(paths={w: path for w, (path, _) in known_paths().items()})
        return out

    @property
    def settlements(self) -> list[dict]:
        """What the scheduler charged, per request (the request scope's record)."""
        return self.requests.settlements

    # ---- what the private tier (and any shell over this executor) shares -------------------------

    def fetch_routes(self) -> RouteTable:
        return self.reports.fetch_routes()

    def start_layer(self, layer: int, groups: Mapping[int, torch.Tensor]) -> None:
        """Before a layer's calls: swap in routes that arrived (new replicas, re-placed experts,
        reputation), start the next background report when it is due, and count the rows."""
        with self._lock:
            table = self.reports.poll(self.clock())
            if table is not None:
                self.routes = table
        self.reports.count_load(layer, {e: rows.shape[0] for e, rows in groups.items()})

    def record_call(self, call: CallReport) -> None:
        """A layer call done: its time for drills and stats, its record for the dashboard."""
        self.layer_seconds.append(call.seconds)
        self.reports.add_call(call)

    def note_outcomes(self, outcomes: Iterable[Outcome]) -> None:
        """Judged replies of this thread's request, reported with the next refresh."""
        request = self.requests.request
        self.reports.add_outcomes(OutcomeReport.of(o, request) for o in outcomes)

    def suspect(self, worker: str) -> None:
        """Skip `worker` for neuro.client.suspect-cooldown seconds."""
        with self._lock:
            self.suspects[worker] = self.clock() + self.settings.suspect_cooldown

    def suspected(self) -> set[str]:
        with self._lock:
            return set(self.suspects)

    def forgive_suspects(self) -> None:
        """Fresh routes: every worker, suspects too, gets another chance."""
        with self._lock:
            self.suspects.clear()

    # ---- one layer ------------------------------------------------------------------------------

    def run_layer(self, layer: int, groups: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        started = self.clock()
        runner = self.trusted
        replicas, hedges = (runner.replicas_sent, runner.hedges) if runner else (0, 0)
        self._layer.workers = set()
        self._layer.outcome = "failed"
        try:
            return self._at_model_dtype(self._run_layer(layer, self._on_wire(groups)), groups)
        finally:
            # rows: tokens x experts per token (the dashboard's tokens/s); request: which
            # request the call worked for (the trust page links a verdict to its calls)
            self.record_call(
                CallReport(
                    layer,
                    len(groups),
                    tuple(sorted(self._layer.workers)),
                    self.clock() - started,
                    runner.replicas_sent - replicas if runner else len(groups),
                    runner.hedges - hedges if runner else 0,
                    self._layer.outcome,
                    self.transport.name,
                    int(sum(x.shape[0] for x in groups.values())),
                    self.requests.request,
                )
            )

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
        self.start_layer(layer, groups)
        now = self.clock()
        with self._lock:
            self.suspects = {w: until for w, until in self.suspects.items() if until > now}
        if self.trusted is not None:
            with self._trusted_lock:
                return self._run_trusted(layer, groups)
        return self._run_plain(layer, groups)

    def _run_plain(self, layer: int, groups: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        pending = dict(groups)
        results: dict[int, torch.Tensor] = {}
        exclude: set[str] = self.suspected()
        waited: RouteWait | None = None
        while pending:
            plan, unroutable = self.routes.plan(
                layer, {e: x.shape[0] for e, x in pending.items()}, exclude, latency=self.transport.route_latency
            )
            if unroutable and not plan:
                waited = self._wait_for_routes(layer, unroutable, waited)
                exclude = set()  # fresh routes: give every worker, suspects too, another chance
                self.forgive_suspects()
                continue
            stamp = self.requests.stamp()
            calls = {
                w: {**encode_request(self.model_id, layer, {e: pending[e] for e in experts}), **stamp}
                for w, experts in plan.items()
            }
            answers = self.transport.call_many(calls, self.settings.deadline)
            for worker, experts in plan.items():
                sent = {e: pending[e] for e in experts}
                answer = answers.get(worker)
                try:
                    if answer is None:
                        raise KeyError(worker)
                    if isinstance(answer, BaseException):
                        raise answer
                    outputs = decode_response(answer, sent)
                except Exception as exc:  # refused, closed, timed out or malformed: all a failed call
                    self._call_failed(worker, layer, experts, exc, Refusal.from_msg(answer))
                    exclude.add(worker)
                    continue
                self._count_wire(len(calls[worker]["data"]), len(answer["data"]))
                self.reports.note_receipt(worker, answer)
                results.update(outputs)
                self._layer.workers.add(worker)
                for e in experts:
                    del pending[e]
        self._layer.outcome = "ok" if len(self._layer.workers) >= len(plan) else "retried"
        return results

    def _call_failed(
        self, worker: str, layer: int, experts: list[int], exc: BaseException, refusal: Refusal | None
    ) -> None:
        """A routine refusal (the network moved on: a re-placement, a pause) is not a warning,
        and it means this client's routes are behind: they are fetched at the next layer."""
        routine = refusal is not None and refusal.routine
        log.log(
            logging.INFO if routine else logging.WARNING,
            "layer %d: call to %s failed (%s); re-sending experts %s elsewhere",
            layer,
            worker,
            exc,
            experts,
        )
        if routine:
            self.reports.refresh_soon()
        self.suspect(worker)
        self.reports.report_unreachable(worker, layer, experts)

    def _run_trusted(self, layer: int, groups: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Quorums and adaptive replication; a worker caught returning a wrong result is skipped
        at once and reported at once, everything else is reported with the next route refresh."""
        waited: RouteWait | None = None
        while True:
            try:
                results, outcomes = self.trusted.run(
                    layer, groups, self.routes, self.suspected(), self.requests.stamp()
                )
                break
            except ExpertUnavailableError as exc:
                waited = self._wait_for_routes(layer, exc.experts, waited)
                self.forgive_suspects()
            except QuorumExhaustedError as exc:
                if self.suspected():
                    self.forgive_suspects()  # a skipped trusted worker may be what the quorum lacks
                    continue
                waited = self._wait_for_more_replicas(exc, waited)
        kinds = {o.kind for o in outcomes}
        self._layer.workers = {o.worker for o in outcomes if o.kind == "validated"}
        self._layer.outcome = "caught" if "invalid" in kinds else "checked" if len(outcomes) > len(groups) else "ok"
        self.note_outcomes(outcomes)
        for worker in {o.worker for o in outcomes if o.kind in ("invalid", "timeout", "error")}:
            self.suspect(worker)  # late only costs reputation
        if "invalid" in kinds:  # a caught worker is reported at once, off the token path
            self.reports.send_outcomes_now()
        disputes = self.trusted.take_disputes()
        if disputes:
            self.reports.file_disputes(disputes)
        return results

    def _wait_for_routes(self, layer: int, unroutable: list[int], wait: RouteWait | None) -> RouteWait:
        """Poll the scheduler's routes until the experts are served again; raise once the network
        stops recovering (RouteWait: `missing-expert-wait` without progress, 6x that in all; a
        scheduler that cannot be reached counts as a restart in progress)."""
        now = self.clock()
        if wait is None:
            wait = self._new_wait(now)
            self._layer.routes_failure, self._layer.routed = None, routed_count(self.routes)
        if wait.expired(now, getattr(self._layer, "routed", routed_count(self.routes))):
            why = self._layer.routes_failure
            if why is not None:
                raise RoutesUnavailableError(
                    self.model_id, layer, unroutable, wait.waited(now), self.client.scheduler.address, why
                )
            raise ExpertUnavailableError(self.model_id, layer, unroutable, wait.waited(now))
        self.sleep(0.05)  # poll: the scheduler re-places experts as soon as it hears of a loss
        self._look()
        return wait

    def _wait_for_more_replicas(self, exhausted: QuorumExhaustedError, wait: RouteWait | None) -> RouteWait:
        """A quorum that could not decide (its replicas disagree, none of them trusted) is asked
        again once the network routes more replicas than now: after a scheduler restart the
        trusted worker that anchors it may not be back yet. Raises `exhausted` once the network
        stops changing (RouteWait: `missing-expert-wait` without progress)."""
        now = self.clock()
        wait = wait or self._new_wait(now)
        wait.expired(now, routed_count(self.routes))  # the count the quorum failed with
        while True:
            self.sleep(0.05)  # poll: returning workers register within seconds
            routed = self._look()
            now = self.clock()
            if routed is not None and wait.grew(routed):
                wait.expired(now, routed)
                return wait
            if wait.expired(now, routed):
                raise exhausted

    def _new_wait(self, now: float) -> RouteWait:
        base = self.settings.missing_expert_wait
        return RouteWait(now, base, MAX_WAIT_FACTOR * base)

    def _look(self) -> int | None:
        """Fetch the scheduler's routes; the routed count RouteWait judges progress by: None while
        the scheduler is away (unreachable, or answering only after SLOW_FETCH: Dask's connect
        retries a closed port until its timeout, so slow routes come from a scheduler that was
        restarting meanwhile), 0 while it answers without routes for the model (it restarted and
        does not know it). The count, and why a fetch failed (for the error a wait ends with),
        are kept for this thread's next look at them."""
        asked = self.clock()
        try:
            self.routes = self.fetch_routes()
            why, routed = None, None if self.clock() - asked >= SLOW_FETCH else routed_count(self.routes)
        except OSError as exc:
            why, routed = str(exc) or type(exc).__name__, None
        except NeuroDaskError as exc:
            why, routed = str(exc) or type(exc).__name__, 0
        self._layer.routes_failure, self._layer.routed = why, routed
        return routed

    # ---- reports and the end ------------------------------------------------------------------

    def flush_reports(self) -> None:
        """Report pending load, outcomes, calls and receipts now and wait for it, with fresh
        routes back (request ends, drills, tests, close)."""
        table = self.reports.flush()
        if table is not None:
            self.routes = table

    def close(self, settle_seconds: float = 2.0) -> None:
        """Report everything before the connections go: answers of abandoned calls still on their
        way get up to `settle_seconds` to arrive and be judged (a perturber that only ever lost
        hedge races is caught by them), then the last outcomes and load are flushed."""
        if self.trusted is not None:
            deadline = self.clock() + settle_seconds
            while self.transport.busy() and self.clock() < deadline:
                self.sleep(0.02)  # poll: abandoned calls end on their own, by their deadline at the latest
            self.note_outcomes(self.trusted.check_late())
            late = self.trusted.take_disputes()
            if late:
                self.reports.file_disputes(late)
            self.reports.wait_for_disputes(self.settings.deadline * 3)
        self.flush_reports()
        self.transport.close()


def routine_refusal(exc: BaseException) -> bool:
    """Whether a failed call's error is a worker's routine refusal (protocol/records.py's Refusal):
    the client's routes are merely behind the network (an expert moved, or its owner came back)."""
    refusal = Refusal.from_error(exc)
    return refusal is not None and refusal.routine
