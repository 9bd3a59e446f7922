"""Dask preload for operators: `dask scheduler --preload neuro_scheduler`.

A thin adapter over neuro_dask.scheduler.coordinator.Coordinator: Dask's add_worker/remove_worker hooks
and our comm handlers become Coordinator events; the LoadExperts/DropExperts actions it returns
become messages to workers. Handlers:
  neuro_publish(store_url, channel)     publishes a sharded model (hardened TLS: the operator only); returns its id;
                                        with a channel: its first version is current, later ones candidates
  neuro_adopt(channel, model)           the operator makes a served candidate current (version-adoption: operator)
  neuro_channels()                      every channel: current, candidate, history; retiring versions; store URLs
  neuro_request_begin(model, account, expert_tokens, tier)   lease the version; with a ledger, quote and hold
                                        the request's fee (the account must be the client certificate's own or
                                        granted to it); returns the request id and its signed ticket
  neuro_request_end(request)            release the lease; with a ledger, charge the rows of the worker-signed
                                        receipts presented, pay providers, refund the rest
  neuro_routes(model)                   expert -> serving workers, fastest first, with their receipt keys
  neuro_experts_loaded(worker, model, loaded, failed)   a worker reports what it can serve (assigned experts only)
  neuro_unreachable(worker, model, experts)             a client could not get an answer: the scheduler probes
  neuro_report_load(model, load)        clients report how often each expert was called
  neuro_report_outcomes(model, outcomes, receipts)   clients present signed receipts and report validated
                                        replies (credited up to what the receipts show)
  neuro_dispute(model, evidence)        a client's complaint with the worker's signed answer: the scheduler
                                        recomputes on referees it picks and judges (docs/security.md)
  neuro_trust(worker, trusted)          the operator marks a worker trusted (or not)
  neuro_status()                        workers, models and placement, for tools and tests
  neuro_ledger_report()                 the transparency report
  neuro_report_calls(model, calls, transport)   clients report recent expert calls (dashboard)
  neuro_report_passes(model, passes)    clients report speculative passes: drafted, kept (dashboard)
Model versions (neuro_dask/scheduler/versions.py): a replaced version is retired (its experts dropped)
once its requests have ended; with version-adoption: vote, passed `adopt:CHANNEL:MODEL`
proposals in the ledger adopt versions.

The operator's dashboard pages (`/neuro/network`, ...) and the `neuro_*` Prometheus series read
`dashboard_view()` and `feed` (neuro_dask/dashboard/).

Options (preload arguments, or Dask config under `neuro.scheduler`):
  --neuro-replicas N   target replicas per expert (default 2)
  --neuro-ledger URL   the NEURO ledger's database (default `neuro.ledger.url`; none = no ledger)
With a ledger, only workers with the minimum stake are routed to, clients are charged per
request, validated work is paid, and proven fraud is slashed (neuro_dask/ledger/service.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click
import torch
from distributed.comm.addressing import get_address_host
from distributed.diagnostics.plugin import SchedulerPlugin
from tornado.ioloop import PeriodicCallback

from neuro_dask import console
from neuro_dask.console import scheduler_banner
from neuro_dask.dashboard import metrics as neuro_metrics
from neuro_dask.dashboard.feed import CallRecord, Feed
from neuro_dask.dashboard.pages import register as register_dashboard_pages
from neuro_dask.dashboard.views import RELAY_FIGURES, NetworkView, WorkerView
from neuro_dask.errors import NeuroDaskError
from neuro_dask.ledger.service import LedgerService
from neuro_dask.protocol.messages import (
    Dispute,
    ExpertsLoaded,
    Pause,
    ReportCalls,
    ReportLoad,
    ReportOutcomes,
    ReportPasses,
    RequestBegin,
    RequestEnd,
    Routes,
    Unreachable,
    VolunteerStatus,
    receiver,
)
from neuro_dask.scheduler import reports, routing
from neuro_dask.scheduler import requests as request_rules
from neuro_dask.scheduler.coordinator import Coordinator, DropExperts, LoadExperts, PublishedModel
from neuro_dask.scheduler.evidence_desk import EvidenceDesk, reporter_key
from neuro_dask.scheduler.placement import PlacementPolicy
from neuro_dask.scheduler.reputation_events import (
    dispute_cause,
    entered_routing,
    outcome_event,
    probe_cause,
    receipts_refused,
    security_penalty,
    slashes,
)
from neuro_dask.scheduler.versions import (
    ModelChannels,
    RetiredVersionError,
    VersionError,
    last_proposal_seen,
    reads_votes,
    ready_adoptions,
)
from neuro_dask.security.hardening import comm_identity, report
from neuro_dask.security.identity import describe, peer_key
from neuro_dask.security.redact import redact_secrets, redact_url
from neuro_dask.security.signing import Signer
from neuro_dask.settings import SchedulerSettings, SecuritySettings, relay_listen_address
from neuro_dask.store.remote import read_manifest
from neuro_dask.store.summary import summarize
from neuro_dask.trust.disputes import Referee
from neuro_dask.trust.probes import ProbeBook
from neuro_dask.trust.receipts import BookError
from neuro_dask.trust.reputation import Reputation, ReputationPolicy
from neuro_dask.volunteer.comeback import COMEBACK_OP, comeback_delays, comeback_spread

log = logging.getLogger("neuro_dask.scheduler")

# Dask imports a preload before it starts the dashboard server: register the pages now.
register_dashboard_pages()


class NeuroSchedulerPlugin(SchedulerPlugin):
    name = "neuro"

    def __init__(self, scheduler, settings: SchedulerSettings, ledger_url: str | None = None):
        self.scheduler = scheduler
        self.settings = settings
        self.relay = None  # a relay for volunteers behind a NAT, started with the plugin (neuro.scheduler.relay)
        # Ledger calls touch disk: one thread runs them in order, off the event loop.
        self.ledger = LedgerService.open(ledger_url, now=time.time()) if ledger_url else None
        self.ledger_url = ledger_url
        self._ledger_thread = ThreadPoolExecutor(1, thread_name_prefix="neuro-ledger") if self.ledger else None
        self._staked: set[str] = set()  # worker names with the minimum stake (ledger on)
        self._trust_params: dict[str, int] = self.ledger.trust_params() if self.ledger else {}
        self._ledger_tick = PeriodicCallback(self._refresh_ledger, 2000) if self.ledger else None
        self.feed = Feed()  # recent calls, outcome counts, reputation and economy over time
        self.events: deque = deque(maxlen=5_000)  # our trust and ledger events, for the dashboard
        self.ledger_view: dict | None = None  # report, stakes, leaderboards, proposals (ledger on)
        self._sampler = PeriodicCallback(self._sample, 2000)
        self.coordinator = Coordinator(
            PlacementPolicy(settings.replicas, settings.hot_extra_replicas, settings.hot_threshold)
        )
        self._tasks: set[asyncio.Task] = set()
        self.reputation = self._load_reputation()
        self.identity: dict[str, str] = {}  # address -> worker name: reputation follows the name
        # address -> (the reputation record it was built from, standing): records are immutable
        # and replaced on every change, so an identical record means an identical standing.
        self._standings: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._precisions: dict[tuple[str, str], str] = {}  # (worker, model) -> its experts' precision
        self._load_errors: dict[tuple[str, int, int], str] = {}  # (model, layer, expert) -> a worker's last why
        self.paused: dict[str, str] = {}  # idle-only workers whose owner is busy -> why; never routed to
        self._unsubscribe_security = None  # hardened mode: stop forwarding security events
        self.channels = ModelChannels(
            settings.version_adoption, settings.version_lease_seconds, settings.version_drain_seconds
        )
        self._adoptions_seen = 0  # the last ledger adoption (proposal id) acted on
        self._versions_tick = PeriodicCallback(self._tick_versions, 1000)
        # Tickets out, receipts and disputes in (neuro_dask/scheduler/evidence_desk.py); signed with the
        # scheduler certificate's key on a TLS network.
        security = getattr(scheduler, "security", None)
        self.desk = EvidenceDesk(
            ticket_signer(security, settings.state_file),
            tickets_required=self.ledger is not None and not settings.free_tier,
            max_unproven=settings.max_unproven_reports,
            unproven_window=settings.unproven_window,
            max_rows=SecuritySettings.load().max_rows,
        )
        self.probes = ProbeBook(settings.probe_interval)
        self._requests: dict[str, dict[str, Any]] = {}  # open request -> who began it, its hold's expert-tokens
        self.hardened = False
        scheduler.handlers.update(
            {
                "neuro_adopt": self.handle_adopt,
                "neuro_channels": self.channels_status,
                "neuro_trust": self.trust,
                "neuro_publish": self.publish,
                "neuro_status": self.status,
                "neuro_ledger_report": self.handle_ledger_report,
            }
        )
        # Peers' operations: each reads its typed message (protocol/messages.py) before the method runs.
        scheduler.handlers.update(
            {
                m.OP: receiver(m, method)
                for m, method in (
                    (RequestBegin, self.request_begin),
                    (RequestEnd, self.request_end),
                    (ReportOutcomes, self.report_outcomes),
                    (Routes, self.routes),
                    (ExpertsLoaded, self.experts_loaded),
                    (Unreachable, self.unreachable),
                    (ReportLoad, self.report_load),
                    (ReportCalls, self.report_calls),
                    (ReportPasses, self.report_passes),
                    (Pause, self.pause),
                    (Dispute, self.dispute),
                    (VolunteerStatus, self.volunteer),  # `neuro-dask worker-status`
                )
            }
        )
        scheduler.extensions["neuro"] = self
        neuro_metrics.register(self)

    async def start(self, scheduler) -> None:
        if self._unsubscribe_security is not None:
            self._drop_worker_plugins()
            from neuro_dask.security.guards import roles_required_for

            if not roles_required_for(scheduler):
                log.warning(
                    "hardened mode without TLS: pickles are allow-listed and remote code is refused, but "
                    "roles are not enforced; start with --tls DIR before opening the port (docs/security.md)"
                )
        await self._restore_state()
        if self.settings.relay is not None:
            from neuro_dask.relay.server import Relay

            host, port = relay_listen_address(self.settings.relay)
            self.relay = await Relay(host, port, comeback_spread=self.settings.comeback_spread).start()
        for line in scheduler_banner(
            scheduler.address,
            _dashboard_link(scheduler),
            self.hardened,
            redact_url(self.ledger_url) if self.ledger_url else None,
            self.settings.replicas,
            relay=self.relay.address if self.relay is not None else None,
        ):
            console.say(line)
        self._sampler.start()
        self._versions_tick.start()
        if self._ledger_tick is not None:
            self._ledger_tick.start()
            await self._refresh_ledger()

    async def before_close(self) -> None:
        """Tell each volunteer when to come back, spread out (BOINC's next_rpc_delay): Dask then
        tells every worker to close, and their nannies start fresh ones that wait for this
        scheduler to return and then for their delay (volunteer/reconnect.py)."""
        streams = [c for a, c in self.scheduler.stream_comms.items() if a in self.identity and not c.closed()]
        spread = comeback_spread(len(streams), self.settings.comeback_rate, self.settings.comeback_spread)
        for comm, delay in zip(streams, comeback_delays(len(streams), spread), strict=True):
            with contextlib.suppress(Exception):  # a worker gone meanwhile
                comm.send({"op": COMEBACK_OP, "after": round(delay, 3)})
        if streams:
            back = f"within {spread:.1f} s of this scheduler's return"
            console.say(f"told {len(streams)} volunteer(s) to come back {back}")

    async def close(self) -> None:
        if self.relay is not None:  # each volunteer is told when to come back, spread out
            await self.relay.stop()
        if self._unsubscribe_security is not None:
            self._unsubscribe_security()
        self._sampler.stop()
        self._versions_tick.stop()
        if self._ledger_tick is not None:
            self._ledger_tick.stop()
            self._ledger_thread.shutdown(wait=True)
            self.ledger.ledger.close()

    # ---- Dask hooks -> events ----------------------------------------------------------------

    def add_worker(self, scheduler, worker: str) -> None:
        ws = scheduler.workers[worker]
        info = ws.extra.get("neuro")
        if not info:
            return  # a plain Dask worker: it runs ordinary tasks, hosts no experts
        capacity = reports.capacity_of(worker, info)
        name = self.identity[worker] = str(ws.name)
        # Receipts verify with this key: on TLS the certificate's (bound by the guard at
        # registration), else the one the worker announced.
        key = info.get("signing_key")
        self.desk.set_key(name, bytes(key) if isinstance(key, (bytes, bytearray, memoryview)) else None)
        trusted = reports.operator_trusted(name, worker, self.settings.trusted)
        change = self.reputation.join(name, capacity.owner, trusted=trusted, now=time.time())
        self._publish_change(change)
        if self.reputation.record(name).trusted:
            self.enact(self.coordinator.set_anchor(worker))  # not a member yet: no re-plan before the join's
        if self.ledger is not None:
            self._in_ledger(self.ledger.join, name, capacity.owner)
        self.enact(self.coordinator.worker_joined(capacity))

    def remove_worker(self, scheduler, worker: str, **kwargs) -> None:
        name = self.identity.pop(worker, None)
        if worker in self.coordinator.workers:  # a neuro worker: its departure is an event (left or crashed)
            from neuro_dask.trust.lifecycle import departure

            dask_events = [msg for _, msg in scheduler.get_events(worker) if isinstance(msg, dict)]
            self._event(
                "neuro-trust",
                {
                    "action": departure(dask_events),
                    "worker": worker,
                    "name": name or worker,
                    "experts": len(self.coordinator.serving.get(worker, ())),
                    "stimulus_id": str(kwargs.get("stimulus_id", "")),
                },
            )
        self._standings.pop(worker, None)
        self.paused.pop(worker, None)
        self.probes.forget(worker)
        for key in [k for k in self._precisions if k[0] == worker]:
            del self._precisions[key]
        if name is not None:
            self.reputation.leave(name, time.time())
        self.enact(self.coordinator.worker_left(worker))

    # ---- handlers ------------------------------------------------------------------------------

    async def publish(self, store_url: str, channel: str = "") -> dict[str, Any]:
        try:
            manifest = await asyncio.to_thread(read_manifest, store_url)
        except NeuroDaskError as exc:
            return {"status": "error", "message": redact_secrets(str(exc), store_url)}
        model_id = manifest.model_id
        experts = {(a.layer, a.expert): a.bytes for a in manifest.experts}
        role = ""
        if channel:
            try:
                role, replaced = self.channels.publish(channel, model_id, time.time())
            except VersionError as exc:
                return {"status": "error", "message": str(exc)}
            self._event("neuro", {"action": "channel-publish", "channel": channel, "model": model_id, "role": role})
            for old in replaced:
                self._event("neuro", {"action": "retiring", "channel": channel, "model": old, "by": model_id})
        if model_id not in self.coordinator.models:
            log.info("publishing %s from %s: %d experts", model_id, redact_url(store_url), len(experts))
            self.scheduler.log_event("neuro", {"action": "publish", "model": model_id, "store": redact_url(store_url)})
            self.enact(
                self.coordinator.model_published(PublishedModel(model_id, store_url, experts, summarize(manifest)))
            )
        self._save_state()
        return {
            "status": "OK",
            "model": model_id,
            "summary": self.coordinator.models[model_id].summary,
            **({"channel": channel, "role": role} if channel else {}),
        }

    # ---- model versions (neuro_dask/scheduler/versions.py) ---------------------------------------------

    def handle_adopt(self, channel: str, model: str) -> dict[str, Any]:
        """The operator's adoption (refused where votes decide: only _tick_versions adopts by vote)."""
        return self.adopt(channel, model, by_vote=False)

    def adopt(self, channel: str, model: str, by_vote: bool) -> dict[str, Any]:
        try:
            retiring = self.channels.adopt(
                channel, model, self.coordinator.fully_served(model), time.time(), by_vote=by_vote
            )
        except VersionError as exc:
            return {"status": "error", "message": str(exc)}
        self._event(
            "neuro",
            {
                "action": "adopt",
                "channel": channel,
                "model": model,
                "retiring": retiring,
                "by": "vote" if by_vote else "operator",
            },
        )
        self._save_state()
        return {"status": "OK", "channel": channel, "current": model, "retiring": retiring}

    def channels_status(self) -> dict[str, Any]:
        """Channels and, for following clients, the store of every version they may load."""
        status = self.channels.status(time.time())
        stores = {m: p.store_url for m, p in self.coordinator.models.items() if m in self.channels.channel_of}
        return {"status": "OK", **status, "stores": stores}

    async def request_begin(self, comm, msg: RequestBegin) -> dict[str, Any]:
        """Lease the version (a retiring one stays published until its requests end), hold the
        fee (with a ledger: from an account the calling certificate may charge), and sign the
        request's ticket. The request id is the scheduler's, whatever the client proposed: ids
        and their receipts are never reused."""
        model, account, expert_tokens, tier = msg.model, msg.account, msg.expert_tokens, msg.tier
        if not request_rules.may_begin(model, self.coordinator.models, self.channels.retired):
            return {
                "status": "error",
                "unpublished": True,
                "message": f"model {model!r} is not published on this scheduler",
            }
        identity = comm_identity(comm)
        client = identity.name if identity is not None else ""
        who = reporter_key(identity, getattr(comm, "peer_address", ""))
        if request_rules.at_open_limit(self._requests, who, self.settings.open_requests_per_client):
            return {
                "status": "error",
                "message": f"{who} already has {self.settings.open_requests_per_client} "
                "requests open: end one (or wait for neuro.scheduler.hold-seconds) before beginning another",
            }
        request = uuid.uuid4().hex
        try:
            version = self.channels.begin(model, request, time.time())
        except RetiredVersionError as exc:
            return {
                "status": "error",
                "retired": True,
                "message": str(exc),
                "channel": exc.channel,
                "current": exc.current,
            }
        try:  # the receipt book first: a request it cannot take is refused before anything is held
            ticket = self.desk.begin(request, model, client, account, tier, self.settings.hold_seconds)
        except BookError as exc:
            self.channels.end(request)
            return {"status": "error", "message": str(exc)}
        held = await self._ledger_hold(account, request, expert_tokens, tier, identity)
        if held.get("status") != "OK":
            self.channels.end(request)
            self.desk.close(request)
            if request_rules.charge_attempt(held):  # an attempt on someone else's account
                report(
                    "charge",
                    getattr(comm, "peer_address", None),
                    f"account {account!r}: {held['message']}",
                    describe(identity),
                )
            return {**held, **version}
        self._requests[request] = {"who": who, "client": client, "expert_tokens": int(expert_tokens), "tier": tier}
        return {**held, **version, "request": request, "ticket": ticket}

    async def request_end(self, comm, msg: RequestEnd) -> dict[str, Any]:
        """Only the client that began a request ends it: the verified receipts settle it."""
        request = msg.request
        identity = comm_identity(comm)
        begun = self._requests.get(request)
        if begun is None:
            return {"status": "error", "message": f"request {request!r} is not open on this scheduler"}
        if not request_rules.may_end(begun, reporter_key(identity, getattr(comm, "peer_address", ""))):
            return {"status": "error", "message": "only the client that began a request may end it"}
        return await self._end_request(request)

    async def _end_request(self, request: str) -> dict[str, Any]:
        begun = self._requests.pop(request, {})
        self.channels.end(request)
        work = self.desk.close(request)
        # A colluding client and worker could present inflated receipts: pay and credit at most
        # what was held for (the fee is capped by the hold as well).
        rows, shares = request_rules.settlement(work.work, work.share_rows, begun)
        return await self._ledger_settle(request, rows, shares)

    async def _tick_versions(self) -> None:
        """Every second: enact passed votes once their version is served; retire drained versions;
        settle expired requests; probe reported workers."""
        await self._expire_requests()
        self._start_probes()
        now, passed = time.time(), []
        if reads_votes(self.channels.adoption, self.ledger is not None):
            try:
                passed = await self._in_ledger(self.ledger.ledger.adoptions, self._adoptions_seen)
            except Exception:
                passed = []  # logged by _in_ledger; read again next tick
            self._adoptions_seen = last_proposal_seen(self._adoptions_seen, passed)
            for a in passed:
                try:
                    self.channels.approve(a["channel"], a["model"])
                    self._event("neuro", {"action": "approved", **a})
                except VersionError as exc:
                    self._event("neuro", {"action": "approval-ignored", **a, "why": str(exc)})
        for channel, model in ready_adoptions(self.channels.due_adoptions(), self.coordinator.fully_served):
            self.adopt(channel, model, by_vote=True)
        retired = self.channels.retirable(now)
        for model in retired:
            log.info("retiring model %s: its requests have ended", model)
            self._event("neuro", {"action": "retire", "model": model, "channel": self.channels.retired[model]})
            self.enact(self.coordinator.model_retired(model))
        if retired or passed:
            self._save_state()

    def routes(self, msg: Routes) -> dict[str, Any]:
        model = msg.model
        if model not in self.coordinator.models:
            return {"status": "error", "message": f"model {model!r} is not published on this scheduler"}
        snap = self.coordinator.routes(model)
        # Each routed worker's standing is scored again only when its record changed (1,000
        # workers: scoring every known worker on every call, each standing twice, took 12 ms).
        standing = {w: self._standing(w) for w in routing.routed_workers(snap.routes, self._stake_ok, self.paused)}
        for w, s in standing.items():  # each a fresh dict: safe to add to
            s["precision"] = self._precisions.get((w, model), routing.DEFAULT_PRECISION)
        ranked = routing.rank_routes(snap.routes, routing.rank_scores(standing, self.identity))
        unloadable = self.coordinator.unloadable(model, snap.missing)[:20]
        return {
            "status": "OK",
            "version": snap.version,
            "params": self._trust_params,
            "routes": ranked,
            "standing": standing,
            "anchored": self.reputation.anchored(time.time()),  # quorum rule 6 only where False
            "hardened": self.hardened,
            "missing": [list(k) for k in snap.missing],
            "pending": [list(k) for k in snap.pending],
            "unloadable": routing.unloadable_reasons(model, unloadable, self._load_errors),
        }

    def experts_loaded(self, comm, msg: ExpertsLoaded) -> dict[str, Any]:
        worker, model, failed = msg.worker, msg.model, msg.failed
        # Clients compare replicas within the tolerance of their precisions (trust/validation.py).
        self._precisions[(worker, model)] = msg.precision
        ignored = self.coordinator.experts_loaded(worker, model, list(msg.loaded))
        if ignored:  # only assigned experts count: the rest is a claim without an assignment behind it
            report(
                "claims",
                getattr(comm, "peer_address", None),
                f"{worker} reported {ignored} experts of {model} it was not assigned; ignored",
                describe(comm_identity(comm)),
            )
        if failed:
            log.warning("worker %s failed to load %d experts of %s, e.g. %s", worker, len(failed), model, failed[0])
            published = self.coordinator.models.get(model)
            # the reason a client is told when no worker can load it: a worker's own words reach
            # clients only attributed to it, and only once every live worker failed the expert
            # (coordinator.unloadable): one cannot fake that
            self._load_errors.update(
                reports.load_failure_reasons(
                    worker, model, failed, published.experts if published is not None else None
                )
            )
            self.scheduler.log_event(
                "neuro", {"action": "load-failed", "worker": worker, "model": model, "failed": failed[:20]}
            )
            self.enact(self.coordinator.load_failed(worker, model, [(l, e) for l, e, _ in failed]))
        return {"status": "OK", "ignored": ignored}

    def pause(self, msg: Pause) -> dict[str, Any]:
        """An idle-only worker's owner is busy (or no longer): leave it out of routes until it resumes."""
        worker, paused, reason = msg.worker, msg.paused, msg.reason
        if worker not in self.coordinator.workers:
            return {"status": "error", "message": f"{worker} is not a neuro worker of this scheduler"}
        was = worker in self.paused
        if paused:
            self.paused[worker] = reports.pause_reason(reason)
        else:
            self.paused.pop(worker, None)
        if reports.pause_changed(was, paused):
            self.coordinator.routes_changed()
            self._event(
                "neuro",
                {
                    "action": "pause" if paused else "resume",
                    "worker": worker,
                    "name": self.identity.get(worker, worker),
                    "reason": reports.pause_reason(reason),
                },
            )
        return {"status": "OK"}

    def unreachable(self, msg: Unreachable) -> dict[str, Any]:
        """A client got no answer: its own routing already skips the worker. Routes for everyone
        change only if the scheduler's own probe fails too (neuro_dask/trust/probes.py)."""
        if msg.worker in self.coordinator.workers and msg.model in self.coordinator.models:
            self.probes.report(msg.worker, msg.model, list(msg.experts))
        return {"status": "OK", "probe": "scheduled"}

    def _start_probes(self) -> None:
        for probe in self.probes.due(time.monotonic()):
            self._spawn(self._probe(probe))

    async def _probe(self, probe) -> None:
        """One zero row per reported expert, from the scheduler itself: a worker that answers
        (or is paused by its owner) keeps its routes; one that fails loses those experts' routes
        and the failure counts against its reputation (the scheduler's own observation)."""
        from neuro_dask.protocol.wire import decode_response, encode_request

        try:
            model = self.coordinator.models.get(probe.model)
            if model is None or probe.worker not in self.coordinator.workers:
                return
            hidden = reports.probe_width(model.summary)
            if hidden <= 0:  # nothing to probe with: the report stays the client's own business
                return
            failed: list[tuple[int, int]] = []
            why = ""
            # one message per expert: a worker refuses a whole message for one expert it does not
            # host, which must not cost it the others' routes
            for layer, expert in sorted(set(probe.experts)):
                experts = [expert]
                rows = {e: torch.zeros(1, hidden) for e in experts}
                msg = encode_request(probe.model, layer, rows, call=uuid.uuid4().hex)
                msg["ticket"] = self.desk.own_ticket(probe.model)
                try:
                    reply = await self._call_worker(probe.worker, "neuro_expert", msg)
                    if reports.paused_reply(reply):
                        continue
                    decode_response(reply, rows)
                except Exception as exc:  # no answer, an error, a malformed answer: the probe failed
                    failed += [(layer, e) for e in experts]
                    why = str(exc)[:200]
            self._event(
                "neuro",
                {
                    "action": "probe",
                    "worker": probe.worker,
                    "model": probe.model,
                    "ok": not failed,
                    "experts": len(probe.experts),
                },
            )
            if failed and probe.worker in self.coordinator.workers:
                self.enact(self.coordinator.worker_unreachable(probe.worker, probe.model, failed))
                name = self.identity.get(probe.worker)
                if name is not None:
                    change = self.reputation.timeout(name, probe_cause(uuid.uuid4().hex), time.time())
                    self._event(
                        "neuro-trust",
                        {
                            "action": "timeout",
                            "worker": probe.worker,
                            "name": name,
                            "model": probe.model,
                            "cause": "probe",
                            "why": why,
                            "reputation": change.after,
                        },
                    )
                self._event(
                    "neuro",
                    {
                        "action": "unreachable",
                        "worker": probe.worker,
                        "model": probe.model,
                        "experts": [list(p) for p in failed[:20]],
                        "why": why,
                    },
                )
        finally:
            self.probes.done(probe.worker)

    async def _call_worker(self, address: str, op: str, msg: dict) -> Any:
        """The scheduler's own expert call to a worker (a probe, a dispute's recomputation), bounded in time."""
        if op not in ("neuro_expert", "neuro_expert_share"):
            raise ValueError(f"the scheduler makes expert calls only, not {op!r}")
        return await asyncio.wait_for(getattr(self.scheduler.rpc(address), op)(**msg), self.settings.probe_timeout)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def report_load(self, msg: ReportLoad) -> dict[str, Any]:
        """How often clients called each expert (placement gives hot ones an extra replica): only
        published experts count, each report at most max-rows per expert (a claim that only moves
        where replicas go, bounded so one client cannot make every expert hot at once)."""
        published = self.coordinator.models.get(msg.model)
        if published is None:
            return {"status": "error", "message": f"model {msg.model!r} is not published on this scheduler"}
        cap = float(SecuritySettings.load().max_rows)
        counted = reports.counted_load(msg.model, msg.load, published.experts, cap)
        self.enact(self.coordinator.report_load(counted))
        return {"status": "OK"}

    # ---- reputation ----------------------------------------------------------------------------

    def _standing(self, address: str) -> dict[str, Any]:
        """What clients are told of a worker's reputation (a copy: in-process comms pass replies by reference)."""
        name = self.identity.get(address, address)
        r = self.reputation.record(name)
        cached = self._standings.get(address)
        if cached is not None and cached[0] is r:
            return dict(cached[1])
        standing = routing.standing_of(r)
        if address in self.identity:
            self._standings[address] = (r, dict(standing))
        return standing

    def report_outcomes(self, comm, msg: ReportOutcomes) -> dict[str, Any]:
        """Clients present the workers' signed receipts (each verified, for the presenting client's
        own request, once: trust/receipts.py) and report judged replies [worker, kind, cause_id,
        layer, expert, rows, request]. Only `validated` moves reputation, and only as far as that
        worker's verified receipts for the request go; `invalid` moves nothing here (a client
        proves a wrong answer with neuro_dispute); late, timeout and error are the client's own
        observations: counted for the dashboard, never against the worker."""
        identity = comm_identity(comm)
        model = msg.model
        offered = self.desk.offer(list(msg.receipts), identity.name if identity is not None else None)
        if receipts_refused(offered):
            self._event(
                "neuro-security",
                {
                    "action": "security:receipts",
                    "peer": getattr(comm, "peer_address", ""),
                    "worker": reporter_key(identity, getattr(comm, "peer_address", "")),
                    "cause": dict(offered),
                    "time": time.time(),
                },
            )
        now = time.time()
        credited = 0
        for row in msg.outcomes:  # rows that were not OutcomeReports are already left out
            worker, kind, cause_id, layer, expert, request = (
                row.worker,
                row.kind,
                row.cause_id,
                row.layer,
                row.expert,
                row.request,
            )
            self.feed.count(kind)  # the dashboard's tally of what clients observed (moves nothing)
            name = self.identity.get(worker)
            if outcome_event(kind, name) != "validated" or not self.desk.credit(request, name, 1):
                continue
            credited += 1
            change = self.reputation.validated(name, str(cause_id), now)
            if entered_routing(change.before, change.after, self.reputation.policy.min_reputation):
                self._event(
                    "neuro-trust",
                    {
                        "action": kind,
                        "worker": worker,
                        "name": name,
                        "model": model,
                        "layer": layer,
                        "expert": expert,
                        "cause_id": cause_id,
                        "reputation": change.after,
                    },
                )
        if credited:
            self._save_reputation()
        return {"status": "OK", "receipts": dict(offered), "credited": credited}

    async def dispute(self, comm, msg: Dispute) -> dict[str, Any]:
        """A client's complaint that a worker answered wrongly, with that worker's signed answer:
        the scheduler checks it and recomputes the rows on referees it picks before anything
        moves. Proven: the worker's reputation (and, if an operator-trusted referee recomputed
        it, its stake) pays, and it is not paid for the request. Refuted: the complainant gets a
        strike; too many and its complaints are refused (neuro.scheduler.max-unproven-reports)."""
        identity = comm_identity(comm)
        peer = getattr(comm, "peer_address", "")
        model, evidence = msg.model, msg.evidence
        result = await self.desk.settle_dispute(
            evidence,
            identity.name if identity is not None else None,
            reporter_key(identity, peer),
            self._referees,
            self._precision_of,
            self._call_worker,
        )
        verdict = result.verdict
        self._event(
            "neuro-trust",
            {
                "action": f"dispute-{verdict.kind if verdict else 'refused'}",
                "name": result.accused,
                "request": result.request,
                "reporter": reporter_key(identity, peer),
                "why": verdict.why if verdict else result.why,
            },
        )
        if verdict is not None and verdict.kind == "proven":
            # The disputed call's layer and expert, for the dashboard's cause: from its receipt,
            # which the desk has verified by now (the accused signed them).
            where = {}
            try:
                from neuro_dask.trust.receipts import Receipt

                where = {"layer": Receipt.from_wire(evidence["receipt"])[0].layer, "expert": int(evidence["expert"])}
            except Exception:  # noqa: BLE001 - names for the dashboard, never a reason to fail a verdict
                log.debug("no layer and expert for the dispute's event", exc_info=True)
            self._proven_wrong(result.accused, model, result.request, verdict, where)
        return result.to_reply()

    def _referees(self, model: str, layer: int, expert: int) -> list[tuple[str, Referee]]:
        snap = self.coordinator.routes(model) if model in self.coordinator.models else None
        hosts = snap.routes.get((layer, expert), ()) if snap is not None else ()
        return routing.referee_candidates(hosts, self.identity, self.paused, self.reputation.record)

    def _precision_of(self, name: str, model: str) -> str:
        return routing.precision_of(self._precisions, self.identity, name, model)

    def _proven_wrong(self, name: str, model: str, request: str, verdict, where: dict | None = None) -> None:
        """`where`: the disputed call's layer and expert (the dashboard names them in the cause)."""
        cause = dispute_cause(request, name)
        now = time.time()
        where = where or {}
        if name in self.reputation:
            change = self.reputation.invalid(name, cause, now)
            address = routing.address_of(self.identity, name) or name
            self._event(
                "neuro-trust",
                {
                    "action": "invalid",
                    "worker": address,
                    "name": name,
                    "model": model,
                    "cause_id": cause,
                    "reputation": change.after,
                    "request": request,
                    "referees": list(verdict.referees),
                    "slashable": verdict.slashable,
                    **where,
                },
            )
            self.feed.count("invalid")
            self._save_reputation()
        if slashes(verdict.slashable, self.ledger is not None):
            self._in_ledger(self._slash, name, cause, now, where)

    def _slash(self, name: str, cause: str, now: float, where: dict | None = None) -> None:
        if self.ledger.slash(name, cause, now):
            self._event("neuro-ledger", {"action": "slash", "worker": name, "at": now, "cause": cause, **(where or {})})

    # ---- hardened mode -------------------------------------------------------------------------

    def harden(self, security: SecuritySettings) -> None:
        """Restricted unpickling in this process and role checks on every handler (docs/security.md).
        Each refusal becomes a Dask event and, when the peer's certificate names a worker we
        know, a trust event against it."""
        from neuro_dask.security.events import security_log
        from neuro_dask.security.guards import guard_scheduler
        from neuro_dask.security.hardening import install

        install(max_message_bytes=security.max_message_bytes)
        guard_scheduler(self.scheduler, security.requests_per_minute)
        self.hardened = True
        # Worker plugins travel as pickles of arbitrary classes, Dask's own P2P shuffle plugin
        # among them (its scheduler plugin registers it when it starts): a hardened network
        # sends none, and its workers would refuse them.
        self.scheduler.plugins.pop("shuffle", None)
        self._drop_worker_plugins()
        self._unsubscribe_security = security_log.subscribe(
            lambda event: self.scheduler.loop.add_callback(self._security_event, event)
        )

    def _drop_worker_plugins(self) -> None:
        dropped = sorted(self.scheduler.worker_plugins) + sorted(self.scheduler.nanny_plugins)
        self.scheduler.worker_plugins.clear()
        self.scheduler.nanny_plugins.clear()
        if dropped:
            log.info("hardened mode: not sending worker plugins %s", ", ".join(dropped))

    def _security_event(self, event) -> None:
        from neuro_dask.security.events import TOPIC

        self._event(
            TOPIC,
            {
                **event.to_dict(),
                "action": f"security:{event.kind}",
                "worker": event.identity or event.peer or "",
                "cause": event.detail,
            },
        )
        penalty = security_penalty(event.identity, event.kind, event.time, self.reputation)
        if penalty is not None:  # a refused worker's request counts as a wrong result
            name, cause = penalty
            change = self.reputation.invalid(name, cause, event.time)
            self._event(
                "neuro-trust", {"action": "security", "name": name, "reputation": change.after, "detail": event.detail}
            )

    # ---- dashboard -----------------------------------------------------------------------------

    def _event(self, topic: str, msg: dict) -> None:
        """A Dask event (for clients, the ledger, any subscriber) kept here too for the dashboard."""
        self.scheduler.log_event(topic, msg)
        self.events.append({"time": time.time(), "topic": topic, **msg})

    def report_calls(self, comm, msg: ReportCalls) -> dict[str, Any]:
        """Layer-call records, and how the client reaches the workers it called, for the
        dashboard: untrusted plain data, each field checked (a malformed record is already
        dropped, not the batch). They move no reputation and no money: a client that lies skews
        only what the dashboard shows (calls, tokens/s, latency, paths)."""
        now = time.time()
        self.feed.add_calls([CallRecord.of(call, msg.model, now) for call in msg.calls])
        if msg.paths:
            self.feed.add_paths(peer_key(comm_identity(comm), getattr(comm, "peer_address", "")), msg.paths, now)
        return {"status": "OK"}

    def report_passes(self, msg: ReportPasses) -> dict[str, Any]:
        """Speculative decoding passes, for the overview's tokens-per-pass figure (each row checked,
        a malformed one dropped). A client that lies skews that figure and nothing else."""
        self.feed.add_passes(msg.model, msg.passes, time.time())
        return {"status": "OK"}

    async def _sample(self) -> None:
        """Every 2 s: reputation scores over time; with a ledger, its figures for the economy page."""
        now = time.time()
        self.feed.sample_reputation({n: self.reputation.score(n) for n in self.identity.values()}, now)
        if self.ledger is None:
            return

        def read():
            books = self.ledger.ledger
            return {
                "report": books.report(),
                "stakes": books.balances("stake"),
                "leaderboard": books.leaderboard("worker"),
                "owners": books.leaderboard("owner"),
                "proposals": [p for p in books.proposals() if p["status"] == "open"][-50:],
            }

        try:
            self.ledger_view = await self._in_ledger(read)
        except Exception:
            return  # logged; the last view stands
        self.feed.sample_economy(self.ledger_view["report"], now)

    @property
    def ledger_report(self) -> dict:
        """The last ledger report read (for /metrics), without touching the database."""
        return (self.ledger_view or {}).get("report", {})

    # What /metrics reads (neuro_dask/dashboard/metrics.py).
    @property
    def metrics_counts(self) -> dict[str, int]:
        return dict(self.feed.counts)

    @property
    def latency_buckets(self) -> list[tuple[float, int]]:
        return self.feed.latency_buckets()

    @property
    def latency_sum(self) -> float:
        return self.feed.latency_sum

    @property
    def latency_count(self) -> int:
        return self.feed.latency_count

    def dashboard_view(self) -> NetworkView:
        """Everything the dashboard shows, copied out of this plugin's and the scheduler's state."""
        from neuro_dask.dashboard.views import worker_state

        c = self.coordinator
        model = c.latest_model()
        stakes = (self.ledger_view or {}).get("stakes", {})
        planned = c.placement.assignments() if c.placement else {}
        workers = []
        for address, capacity in list(c.workers.items()):
            ws = self.scheduler.workers.get(address)
            profile = ((ws.extra.get("neuro") or {}).get("profile") or {}) if ws is not None else {}
            name = self.identity.get(address, address)
            rec = self.reputation.record(name)
            hosted, assigned = len(c.serving.get(address, ())), len(planned.get(address, ()))
            status = worker_state(
                ws.status.name if ws is not None else "",
                address in self.paused,
                rec.routable and self._stake_ok(address),
                hosted,
                assigned,
            )
            gpus = profile.get("cuda") or []
            metrics = (ws.metrics.get("neuro") or {}) if ws is not None else {}
            own = metrics.get("models")  # what the worker itself holds, from its last heartbeat
            workers.append(
                WorkerView(
                    address=address,
                    name=name,
                    owner=capacity.owner,
                    status=status,
                    cores=int(profile.get("cores", 0)),
                    memory=int(profile.get("memory_total", 0)),
                    budget=capacity.memory_budget,
                    gpus=len(gpus),
                    vram=sum(int(g.get("total_memory", 0)) for g in gpus),
                    speed=capacity.speed,
                    score=rec.score,
                    correctness=rec.correctness,
                    timeliness=rec.timeliness,
                    speed_score=rec.speed,
                    uptime=rec.uptime,
                    trusted=rec.trusted,
                    established=rec.established,
                    routable=rec.routable,
                    stake=int(stakes.get(f"stake:{name}", 0)),
                    hosted=hosted,
                    assigned=assigned,
                    calls_served=int(metrics.get("calls_served", 0)),
                    reported=sum(int(n) for n in own.values()) if isinstance(own, dict) else None,
                )
            )
        target = c.planned_counts(model)  # every expert of the model, placed or not
        events = list(self.events)
        k = {m: int(p.summary.get("experts_per_token") or 0) for m, p in c.models.items()}
        return NetworkView(
            workers=workers,
            layers=1 + max((l for l, _ in target), default=-1),
            experts=1 + max((e for _, e in target), default=-1),
            replicas=c.replica_counts(model),
            target=target,
            load=c.model_load(model),
            events=events,
            ledger=self.ledger_view if self.ledger else None,
            model=model,
            versions=self.channels.status(time.time()),
            experts_per_token=k,
            relay=self._relay_figures(),
        )

    def _relay_figures(self) -> dict[str, float] | None:
        if self.relay is None:
            return None
        counters = self.relay.counters
        return {name: float(getattr(counters, name)) for name in RELAY_FIGURES}

    # ---- ledger --------------------------------------------------------------------------------

    def _stake_ok(self, address: str) -> bool:
        return routing.stake_ok(self.ledger is not None, self.identity.get(address), self._staked)

    def _in_ledger(self, fn, *args) -> asyncio.Future:
        """Run a ledger call on the ledger's thread, in submission order; failures are logged."""
        future = asyncio.get_running_loop().run_in_executor(self._ledger_thread, fn, *args)
        future.add_done_callback(_log_failure)
        return future

    async def _refresh_ledger(self) -> None:
        """Who has the stake to be routed to, the governed trust parameters, epoch emissions."""
        names = set(self.identity.values())

        def refresh():
            self.ledger.tick(time.time())
            return self.ledger.staked(names), self.ledger.trust_params()

        try:
            self._staked, self._trust_params = await self._in_ledger(refresh)
        except Exception:
            pass  # logged by _in_ledger; the previous view stands

    async def _ledger_hold(
        self, account: str, request: str, expert_tokens: int, tier: str, identity=None
    ) -> dict[str, Any]:
        if self.ledger is None:
            return {"status": "OK", "held": 0, "ledger": False}
        if not account:
            return {"status": "error", "message": request_rules.NO_ACCOUNT}
        # A client certificate charges only its own account or one granted to it (docs/ledger.md).
        client = request_rules.charging_client(identity)
        return await self._in_ledger(
            self.ledger.hold,
            account,
            request,
            int(expert_tokens),
            time.time(),
            str(tier),
            client,
            self.settings.hold_seconds,
        )

    async def _ledger_settle(self, request: str, work: dict[str, int], shares: dict[str, int]) -> dict[str, Any]:
        if self.ledger is None:
            return {"status": "OK", "fee": 0, "ledger": False}
        result = await self._in_ledger(self.ledger.settle, request, time.time(), work, shares)
        self._event("neuro-ledger", {"action": "settle", "request": request, **result})
        return result

    async def _expire_requests(self) -> None:
        """Requests whose lease ran out (a client that crashed or never ended them): settled by
        the receipts presented so far, the rest of the hold refunded. Holds the ledger still
        has open from before a restart are settled with no work (refunded but for the request
        price, as any request that did no work: docs/ledger.md)."""
        for request in self.desk.expired():
            if request_rules.expired_action(request, self._requests) == "end":
                await self._end_request(request)
            else:
                self.desk.close(request)
        if self.ledger is not None:
            try:
                stale = await self._in_ledger(self.ledger.expire, time.time())
            except Exception:
                return  # logged; tried again next tick
            for request in stale:
                if request_rules.orphan_hold(request, self._requests):
                    await self._ledger_settle(request, {}, {})

    async def handle_ledger_report(self) -> dict[str, Any]:
        if self.ledger is None:
            return {"status": "error", "message": "this scheduler runs no ledger (set neuro.ledger.url)"}
        return {"status": "OK", "report": await self._in_ledger(self.ledger.report)}

    async def volunteer(self, msg: VolunteerStatus) -> dict[str, Any]:
        """One worker's reputation and ledger figures (neuro_dask/volunteer/status.py)."""
        from neuro_dask.volunteer.status import scheduler_report

        return await scheduler_report(self, msg.worker)

    def trust(self, worker: str, trusted: bool = True) -> dict[str, Any]:
        address, name = routing.resolve_worker(self.identity, worker)
        self._publish_change(self.reputation.mark_trusted(name, trusted))
        self.enact(self.coordinator.set_anchor(address, trusted))
        self._save_reputation()
        return {"status": "OK", "worker": name, "trusted": trusted}

    def _publish_change(self, change) -> None:
        self._event(
            "neuro-trust",
            {"action": change.cause, "worker": change.worker, "reputation": change.after, "cause_id": change.cause_id},
        )

    # ---- what survives a restart (neuro.scheduler.state-file) ---------------------------------

    def _save_state(self) -> None:
        """Published models (their stores) and model channels, so that a restarted scheduler
        serves them again; written atomically, readable by its owner only (store URLs)."""
        path = self.settings.state_file
        if not path:
            return
        state = {
            "version": 1,
            "models": {m: p.store_url for m, p in self.coordinator.models.items()},
            "channels": self.channels.to_dict(),
            "adoptions_seen": self._adoptions_seen,
        }
        tmp = f"{path}.partial"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, path)  # atomic: a crash mid-write keeps the previous file

    async def _restore_state(self) -> None:
        path = self.settings.state_file
        if not path or not os.path.exists(path):
            return
        with open(path) as fh:
            state = json.load(fh)
        self.channels.restore(state.get("channels", {}), time.time())
        self._adoptions_seen = int(state.get("adoptions_seen", 0))
        for model, store_url in state.get("models", {}).items():
            reply = await self.publish(store_url)
            if reply.get("status") != "OK" or reply.get("model") != model:
                log.warning(
                    "state file: could not publish %s again from %s: %s",
                    model,
                    redact_url(store_url),
                    reply.get("message") or f"the store now holds {reply.get('model')}",
                )
        log.info(
            "restored %d published models and %d channels from %s",
            len(self.coordinator.models),
            len(self.channels.channels),
            path,
        )

    def _load_reputation(self) -> Reputation:
        policy = ReputationPolicy(
            establish_after=self.settings.establish_after, min_reputation=self.settings.min_reputation
        )
        path = self.settings.reputation_file
        if path and os.path.exists(path):
            with open(path) as fh:
                reputation = Reputation.from_dict(json.load(fh), policy)
            reputation.all_absent(time.time())  # present again only once they join this scheduler
            return reputation
        return Reputation(policy)

    def _save_reputation(self) -> None:
        path = self.settings.reputation_file
        if not path:
            return
        tmp = f"{path}.partial"
        with open(tmp, "w") as fh:
            json.dump(self.reputation.to_dict(), fh)
        os.replace(tmp, path)  # atomic: a crash mid-write keeps the previous file

    def status(self) -> dict[str, Any]:
        c = self.coordinator
        return {
            "workers": {
                a: {
                    "speed": w.speed,
                    "memory_budget": w.memory_budget,
                    "owner": w.owner,
                    "serving": sorted([list(k) for k in c.serving.get(a, ())]),
                    "name": self.identity.get(a, a),
                    "paused": self.paused.get(a, ""),
                    **{f"trust_{k}": v for k, v in self._standing(a).items()},
                }
                for a, w in c.workers.items()
            },
            "models": {
                m: {"store_url": redact_url(p.store_url), "experts": len(p.experts), "summary": p.summary}
                for m, p in c.models.items()
            },
            "versions": self.channels.status(time.time()),
        }

    # ---- actions -> messages -------------------------------------------------------------------

    @property
    def tasks_in_flight(self) -> int:
        """Sends and probes still running on the event loop (0: every decision so far is carried out)."""
        return len(self._tasks)

    def enact(self, actions) -> None:
        """Carry out the coordinator's decisions: each LoadExperts or DropExperts goes to its worker (send_action)."""
        for action in actions:
            task = asyncio.get_running_loop().create_task(self.send_action(action))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def send_action(self, action: LoadExperts | DropExperts) -> None:
        """One decision to its worker (a simulation replaces this with workers of its own)."""
        try:
            if isinstance(action, LoadExperts):
                await self.scheduler.rpc(action.worker).neuro_assign(
                    model=action.model,
                    store_url=action.store_url,
                    experts=[list(p) for p in action.experts],
                    tickets=self.desk.policy(),
                )
            else:
                await self.scheduler.rpc(action.worker).neuro_drop(
                    model=action.model, experts=[list(p) for p in action.experts]
                )
        except Exception as exc:  # the worker is gone or going: remove_worker will re-plan
            log.info("could not send %s to %s: %s", type(action).__name__, action.worker, exc)


def ticket_signer(security, state_file: str | None) -> Signer:
    """The key the scheduler signs tickets with: its TLS certificate's on a TLS network; else the
    one kept next to its state file (`<state-file>.ticket-key`), so that the tickets of requests
    in flight stay valid across a restart; else one made for this process."""
    from neuro_dask.runtime.receipting import load_signer

    tls_key = getattr(security, "tls_scheduler_key", None) or getattr(security, "tls_scheduler_cert", None)
    if tls_key or not state_file:
        return load_signer(tls_key)
    return Signer.kept_in(f"{state_file}.ticket-key")


def _dashboard_link(scheduler) -> str | None:
    """http://HOST:PORT of the scheduler's dashboard: the host it is bound to (127.0.0.1 under
    `neuro-dask scheduler`), else the scheduler's own contact host."""
    server = scheduler.services.get("dashboard")
    if server is None:
        return None
    host = None
    for sock in getattr(server, "_sockets", {}).values():
        host = sock.getsockname()[0]
        break
    if host in (None, "0.0.0.0", "::", ""):
        host = get_address_host(scheduler.address)
    return f"http://{'[' + host + ']' if ':' in host else host}:{server.port}"


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("ledger call failed", exc_info=future.exception())


@click.command()
@click.option("--neuro-replicas", type=int, default=None, help="target replicas per expert")
@click.option("--neuro-ledger", default=None, help="NEURO ledger database URL (default: neuro.ledger.url)")
@click.option(
    "--neuro-hardened/--neuro-no-hardened", default=None, help="hardened mode (default: neuro.security.hardened)"
)
@click.option(
    "--neuro-relay",
    default=None,
    metavar="HOST:PORT",
    help="run a relay for volunteers behind a NAT on HOST:PORT (default: neuro.scheduler.relay, none)",
)
def dask_setup(scheduler, neuro_replicas, neuro_ledger, neuro_hardened, neuro_relay) -> None:
    import dask.config

    console.enable(bool(dask.config.get("neuro.console", default=True)))
    security = SecuritySettings.load(hardened=neuro_hardened)
    if security.dashboard_token:
        # First: distributed only logs a preload's exception and goes on, so anything raising
        # before this line would leave the dashboard open.
        from neuro_dask.dashboard.access import protect_dashboard

        protect_dashboard(scheduler, security.dashboard_token)
    settings = SchedulerSettings.load(replicas=neuro_replicas, **({"relay": neuro_relay} if neuro_relay else {}))
    ledger_url = neuro_ledger or dask.config.get("neuro.ledger.url", default=None)
    plugin = NeuroSchedulerPlugin(scheduler, settings, ledger_url)
    if security.hardened:
        try:
            plugin.harden(security)
        except Exception:
            # distributed only logs a preload's failure and starts anyway: an operator who asked
            # for hardened mode must not get an open scheduler instead.
            log.critical("hardened mode could not start: closing this scheduler", exc_info=True)
            scheduler.loop.add_callback(scheduler.close, reason="neuro-hardening-failed")
            raise
    scheduler.add_plugin(plugin)
