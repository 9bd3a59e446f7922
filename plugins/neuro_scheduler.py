"""Dask preload for operators: `dask scheduler --preload neuro_scheduler`.

A thin adapter over neuro_dask.coordinator.Coordinator: Dask's add_worker/remove_worker hooks
and our comm handlers become Coordinator events; the LoadExperts/DropExperts actions it returns
become messages to workers. Handlers:
  neuro_publish(store_url, channel)     publishes a sharded model (hardened TLS: the operator only); returns its id;
                                        with a channel: its first version is current, later ones candidates
  neuro_adopt(channel, model)           the operator makes a served candidate current (version-adoption: operator)
  neuro_channels()                      every channel: current, candidate, history; retiring versions; store URLs
  neuro_request_begin(model, request, account, expert_tokens, tier)   lease the version; with a ledger, quote
                                        and hold the request's fee at the tier's price
  neuro_request_end(request)            release the lease; with a ledger, charge the work, pay providers, refund the rest
  neuro_routes(model)                   expert -> serving workers, fastest first
  neuro_experts_loaded(worker, model, loaded, failed)   a worker reports what it can serve
  neuro_unreachable(worker, model, experts)             a client could not get an answer
  neuro_report_load(model, load)        clients report how often each expert was called
  neuro_report_outcomes(model, outcomes)   clients report judged replies (trust layer)
  neuro_trust(worker, trusted)          the operator marks a worker trusted (or not)
  neuro_status()                        workers, models and placement, for tools and tests
  neuro_ledger_report()                 the transparency report
  neuro_report_calls(model, calls, transport)   clients report recent expert calls (dashboard)
Model versions (neuro_dask/versions.py): a replaced version is retired (its experts dropped)
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
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click
from distributed.diagnostics.plugin import SchedulerPlugin
from tornado.ioloop import PeriodicCallback

from neuro_dask.coordinator import Coordinator, DropExperts, LoadExperts, PublishedModel
from neuro_dask.dashboard import metrics as neuro_metrics
from neuro_dask.dashboard.feed import CallRecord, Feed
from neuro_dask.dashboard.pages import register as register_dashboard_pages
from neuro_dask.dashboard.views import NetworkView, WorkerView
from neuro_dask.errors import NeuroDaskError
from neuro_dask.ledger.service import Judged, LedgerService
from neuro_dask.placement import PlacementPolicy, WorkerCapacity
from neuro_dask.security.redact import redact_secrets, redact_url
from neuro_dask.settings import SchedulerSettings, SecuritySettings
from neuro_dask.store.remote import read_manifest
from neuro_dask.store.summary import summarize
from neuro_dask.trust.reputation import Reputation, ReputationPolicy
from neuro_dask.versions import ModelChannels, RetiredVersionError, VersionError

log = logging.getLogger("neuro_dask.scheduler")

# Dask imports a preload before it starts the dashboard server: register the pages now.
register_dashboard_pages()


class NeuroSchedulerPlugin(SchedulerPlugin):
    name = "neuro"

    def __init__(self, scheduler, settings: SchedulerSettings, ledger_url: str | None = None):
        self.scheduler = scheduler
        self.settings = settings
        # Ledger calls touch disk: one thread runs them in order, off the event loop.
        self.ledger = LedgerService.open(ledger_url, now=time.time()) if ledger_url else None
        self._ledger_thread = ThreadPoolExecutor(1, thread_name_prefix="neuro-ledger") if self.ledger else None
        self._staked: set[str] = set()  # worker names with the minimum stake (ledger on)
        self._trust_params: dict[str, int] = self.ledger.trust_params() if self.ledger else {}
        self._ledger_tick = PeriodicCallback(self._refresh_ledger, 2000) if self.ledger else None
        self.feed = Feed()  # recent calls, outcome counts, reputation and economy over time
        self.events: deque = deque(maxlen=5_000)  # our trust and ledger events, for the dashboard
        self.ledger_view: dict | None = None  # report, stakes, leaderboards, proposals (ledger on)
        self._sampler = PeriodicCallback(self._sample, 2000)
        self.coordinator = Coordinator(PlacementPolicy(settings.replicas, settings.hot_extra_replicas,
                                                       settings.hot_threshold))
        self._tasks: set[asyncio.Task] = set()
        self.reputation = self._load_reputation()
        self.identity: dict[str, str] = {}  # address -> worker name: reputation follows the name
        # address -> (the reputation record it was built from, standing): records are immutable
        # and replaced on every change, so an identical record means an identical standing.
        self._standings: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._precisions: dict[tuple[str, str], str] = {}  # (worker, model) -> its experts' precision
        self.paused: dict[str, str] = {}  # idle-only workers whose owner is busy -> why; never routed to
        self._unsubscribe_security = None  # hardened mode: stop forwarding security events
        self.channels = ModelChannels(settings.version_adoption, settings.version_lease_seconds,
                                      settings.version_drain_seconds)
        self._adoptions_seen = 0  # the last ledger adoption (proposal id) acted on
        self._versions_tick = PeriodicCallback(self._tick_versions, 1000)
        scheduler.handlers.update({
            "neuro_adopt": self.handle_adopt, "neuro_channels": self.channels_status,
            "neuro_request_begin": self.request_begin, "neuro_request_end": self.request_end,
            "neuro_report_outcomes": self.report_outcomes, "neuro_trust": self.trust,
            "neuro_publish": self.publish, "neuro_routes": self.routes,
            "neuro_experts_loaded": self.experts_loaded, "neuro_unreachable": self.unreachable,
            "neuro_report_load": self.report_load, "neuro_status": self.status,
            "neuro_ledger_report": self.handle_ledger_report, "neuro_report_calls": self.report_calls,
            "neuro_pause": self.pause,
        })
        scheduler.handlers["neuro_volunteer"] = self.volunteer  # `neuro-dask worker-status`
        scheduler.extensions["neuro"] = self
        neuro_metrics.register(self)

    async def start(self, scheduler) -> None:
        if self._unsubscribe_security is not None:
            self._drop_worker_plugins()
            from neuro_dask.security.guards import roles_required_for

            if not roles_required_for(scheduler):
                log.warning("hardened mode without TLS: pickles are allow-listed and remote code is refused, but "
                            "roles are not enforced; start with --tls DIR before opening the port (docs/security.md)")
        await self._restore_state()
        self._sampler.start()
        self._versions_tick.start()
        if self._ledger_tick is not None:
            self._ledger_tick.start()
            await self._refresh_ledger()

    async def close(self) -> None:
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
        capacity = WorkerCapacity(worker, int(info["memory_budget"]), float(info["speed"]) or 1.0,
                                  str(info.get("owner") or ""))
        name = self.identity[worker] = str(ws.name)
        trusted = name in self.settings.trusted or worker in self.settings.trusted
        change = self.reputation.join(name, capacity.owner, trusted=trusted, now=time.time())
        self._publish_change(change)
        if self.reputation.record(name).trusted:
            self.coordinator.anchors.add(worker)
        if self.ledger is not None:
            self._in_ledger(self.ledger.join, name, capacity.owner)
        self._enact(self.coordinator.worker_joined(capacity))

    def remove_worker(self, scheduler, worker: str, **kwargs) -> None:
        name = self.identity.pop(worker, None)
        self._standings.pop(worker, None)
        self.paused.pop(worker, None)
        for key in [k for k in self._precisions if k[0] == worker]:
            del self._precisions[key]
        if name is not None:
            self.reputation.leave(name, time.time())
        self._enact(self.coordinator.worker_left(worker))

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
            self._enact(self.coordinator.model_published(
                PublishedModel(model_id, store_url, experts, summarize(manifest))))
        self._save_state()
        return {"status": "OK", "model": model_id, "summary": self.coordinator.models[model_id].summary,
                **({"channel": channel, "role": role} if channel else {})}

    # ---- model versions (neuro_dask/versions.py) ---------------------------------------------

    def _served(self, model: str) -> bool:
        """Every expert of `model` has all its planned replicas serving: safe to move traffic to it."""
        if model not in self.coordinator.models:
            return False
        snap = self.coordinator.routes(model)
        return not snap.missing and not snap.pending

    def handle_adopt(self, channel: str, model: str) -> dict[str, Any]:
        """The operator's adoption (refused where votes decide: only _tick_versions adopts by vote)."""
        return self.adopt(channel, model, by_vote=False)

    def adopt(self, channel: str, model: str, by_vote: bool) -> dict[str, Any]:
        try:
            retiring = self.channels.adopt(channel, model, self._served(model), time.time(), by_vote=by_vote)
        except VersionError as exc:
            return {"status": "error", "message": str(exc)}
        self._event("neuro", {"action": "adopt", "channel": channel, "model": model, "retiring": retiring,
                              "by": "vote" if by_vote else "operator"})
        self._save_state()
        return {"status": "OK", "channel": channel, "current": model, "retiring": retiring}

    def channels_status(self) -> dict[str, Any]:
        """Channels and, for following clients, the store of every version they may load."""
        status = self.channels.status(time.time())
        stores = {m: p.store_url for m, p in self.coordinator.models.items() if m in self.channels.channel_of}
        return {"status": "OK", **status, "stores": stores}

    async def request_begin(self, model: str, request: str, account: str = "", expert_tokens: int = 0,
                            tier: str = "standard") -> dict[str, Any]:
        """Lease the version (a retiring one stays published until its requests end), then hold."""
        if model not in self.coordinator.models and model not in self.channels.retired:
            return {"status": "error", "unpublished": True,
                    "message": f"model {model!r} is not published on this scheduler"}
        try:
            version = self.channels.begin(model, request, time.time())
        except RetiredVersionError as exc:
            return {"status": "error", "retired": True, "message": str(exc), "channel": exc.channel,
                    "current": exc.current}
        held = await self._ledger_hold(account, request, expert_tokens, tier)
        if held.get("status") != "OK":
            self.channels.end(request)
        return {**held, **version}

    async def request_end(self, request: str) -> dict[str, Any]:
        self.channels.end(request)
        return await self._ledger_settle(request)

    async def _tick_versions(self) -> None:
        """Every second: enact passed votes once their version is served; retire drained versions."""
        now, passed = time.time(), []
        if self.ledger is not None and self.channels.adoption == "vote":
            try:
                passed = await self._in_ledger(self.ledger.ledger.adoptions, self._adoptions_seen)
            except Exception:
                passed = []  # logged by _in_ledger; read again next tick
            for a in passed:
                self._adoptions_seen = max(self._adoptions_seen, int(a["proposal"]))
                try:
                    self.channels.approve(a["channel"], a["model"])
                    self._event("neuro", {"action": "approved", **a})
                except VersionError as exc:
                    self._event("neuro", {"action": "approval-ignored", **a, "why": str(exc)})
        for channel, model in self.channels.due_adoptions():
            if self._served(model):
                self.adopt(channel, model, by_vote=True)
        retired = self.channels.retirable(now)
        for model in retired:
            log.info("retiring model %s: its requests have ended", model)
            self._event("neuro", {"action": "retire", "model": model, "channel": self.channels.retired[model]})
            self._enact(self.coordinator.model_retired(model))
        if retired or passed:
            self._save_state()

    def routes(self, model: str) -> dict[str, Any]:
        if model not in self.coordinator.models:
            return {"status": "error", "message": f"model {model!r} is not published on this scheduler"}
        snap = self.coordinator.routes(model)
        # Each routed worker's standing is scored once, and again only when its record changed
        # (1,000 workers: scoring every known worker, then each standing twice, took 12 ms).
        standing = {w: self._standing(w) for w in {w for ws in snap.routes.values() for w in ws}
                    if self._stake_ok(w) and w not in self.paused}
        for w, s in standing.items():  # each a fresh dict: safe to add to
            s["precision"] = self._precisions.get((w, model), "float32")
        score = {w: s["score"] if w in self.identity else 0.5 for w, s in standing.items()}
        ranked = [[l, e, sorted((w for w in ws if w in standing), key=lambda w: -score[w])]
                  for (l, e), ws in snap.routes.items()]  # sorted is stable
        return {"status": "OK", "version": snap.version, "params": self._trust_params, "routes": ranked,
                "standing": standing,
                "missing": [list(k) for k in snap.missing], "pending": [list(k) for k in snap.pending]}

    def experts_loaded(self, worker: str, model: str, loaded: list, failed: list,
                       precision: str = "float32") -> dict[str, Any]:
        # Clients compare replicas within the tolerance of their precisions (trust/validation.py).
        self._precisions[(worker, model)] = str(precision)
        self.coordinator.experts_loaded(worker, model, [tuple(p) for p in loaded])
        if failed:
            log.warning("worker %s failed to load %d experts of %s, e.g. %s", worker, len(failed), model, failed[0])
            self.scheduler.log_event("neuro", {"action": "load-failed", "worker": worker, "model": model,
                                               "failed": failed[:20]})
            self._enact(self.coordinator.load_failed(worker, model, [(l, e) for l, e, _ in failed]))
        return {"status": "OK"}

    def pause(self, worker: str, paused: bool, reason: str = "") -> dict[str, Any]:
        """An idle-only worker's owner is busy (or no longer): leave it out of routes until it resumes."""
        if worker not in self.coordinator.workers:
            return {"status": "error", "message": f"{worker} is not a neuro worker of this scheduler"}
        was = worker in self.paused
        if paused:
            self.paused[worker] = str(reason)[:200]
        else:
            self.paused.pop(worker, None)
        if was != bool(paused):
            self.coordinator.version += 1  # the routes served changed (clients pick them up on their next refresh)
            self._event("neuro", {"action": "pause" if paused else "resume", "worker": worker,
                                 "name": self.identity.get(worker, worker), "reason": str(reason)[:200]})
        return {"status": "OK"}

    def unreachable(self, worker: str, model: str, experts: list) -> dict[str, Any]:
        self.coordinator.worker_unreachable(worker, model, [tuple(p) for p in experts])
        return {"status": "OK"}

    def report_load(self, model: str, load: list) -> dict[str, Any]:
        self._enact(self.coordinator.report_load({(model, int(l), int(e)): float(n) for l, e, n in load}))
        return {"status": "OK"}

    # ---- reputation ----------------------------------------------------------------------------

    def _standing(self, address: str) -> dict[str, Any]:
        """What clients are told of a worker's reputation (a copy: in-process comms pass replies by reference)."""
        name = self.identity.get(address, address)
        r = self.reputation.record(name)
        cached = self._standings.get(address)
        if cached is not None and cached[0] is r:
            return dict(cached[1])
        score = r.score  # a computed property: once, not again through r.routable
        standing = {"trusted": r.trusted, "established": r.established, "consecutive_valid": r.consecutive_valid,
                    "owner": r.owner, "score": score, "routable": r.trusted or score >= r.policy.min_reputation}
        if address in self.identity:
            self._standings[address] = (r, dict(standing))
        return standing

    def report_outcomes(self, model: str, outcomes: list, batch: str = "") -> dict[str, Any]:
        """Clients report every judged reply: [worker, kind, cause_id, layer, expert, rows, request,
        proven]. Reputation moves, each move is a Dask event, and the ledger (when on) credits
        validated work and slashes proven fraud."""
        now = time.time()
        events = {"validated": self.reputation.validated, "invalid": self.reputation.invalid,
                  "late": self.reputation.late, "timeout": self.reputation.timeout, "error": self.reputation.crash}
        judged = []
        for worker, kind, cause_id, layer, expert, *extra in outcomes:
            if kind not in events and kind != "private" or worker not in self.identity:
                continue
            name = self.identity[worker]
            rows, request, proven = (list(extra) + [0, "", False])[:3]
            if kind == "private":  # a share holder's rows: paid by the request, no reputation move
                judged.append(Judged(name, kind, str(cause_id), int(rows), str(request)))
                continue
            change = events[kind](name, str(cause_id), now)
            if kind != "validated" or change.before < self.reputation.policy.min_reputation <= change.after:
                self._event("neuro-trust", {"action": kind, "worker": worker, "name": name, "model": model,
                                                         "layer": layer, "expert": expert, "cause_id": cause_id,
                                                         "reputation": change.after})
            self.feed.count(kind)
            judged.append(Judged(name, kind, str(cause_id), int(rows), str(request), bool(proven)))
        self._save_reputation()
        if self.ledger is not None and judged:
            self._in_ledger(self._record, judged, now, batch or f"outcomes:{now}:{id(judged)}")
        return {"status": "OK"}

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
        # Worker plugins travel as pickles of arbitrary classes, Dask's own P2P shuffle plugin
        # among them (its scheduler plugin registers it when it starts): a hardened network
        # sends none, and its workers would refuse them.
        self.scheduler.plugins.pop("shuffle", None)
        self._drop_worker_plugins()
        self._unsubscribe_security = security_log.subscribe(
            lambda event: self.scheduler.loop.add_callback(self._security_event, event))

    def _drop_worker_plugins(self) -> None:
        dropped = sorted(self.scheduler.worker_plugins) + sorted(self.scheduler.nanny_plugins)
        self.scheduler.worker_plugins.clear()
        self.scheduler.nanny_plugins.clear()
        if dropped:
            log.info("hardened mode: not sending worker plugins %s", ", ".join(dropped))

    def _security_event(self, event) -> None:
        from neuro_dask.security.events import TOPIC

        self._event(TOPIC, {**event.to_dict(), "action": f"security:{event.kind}",
                            "worker": event.identity or event.peer or "", "cause": event.detail})
        role, _, name = (event.identity or "").partition(":")
        if role == "worker" and name in self.reputation:
            change = self.reputation.invalid(name, f"security:{event.kind}:{event.time}", event.time)
            self._event("neuro-trust", {"action": "security", "name": name, "reputation": change.after,
                                        "detail": event.detail})

    # ---- dashboard -----------------------------------------------------------------------------

    def _event(self, topic: str, msg: dict) -> None:
        """A Dask event (for clients, the ledger, any subscriber) kept here too for the dashboard."""
        self.scheduler.log_event(topic, msg)
        self.events.append({"time": time.time(), "topic": topic, **msg})

    def report_calls(self, model: str, calls: list, transport: str = "") -> dict[str, Any]:
        now = time.time()
        records = []
        for raw in calls[:1_000]:
            try:
                records.append(CallRecord.from_report(raw, model, now))
            except (TypeError, ValueError):
                continue  # a malformed record is dropped, not the batch
        self.feed.add_calls(records)
        return {"status": "OK"}

    async def _sample(self) -> None:
        """Every 2 s: reputation scores over time; with a ledger, its figures for the economy page."""
        now = time.time()
        self.feed.sample_reputation({n: self.reputation.score(n) for n in self.identity.values()}, now)
        if self.ledger is None:
            return

        def read():
            books = self.ledger.ledger
            return {"report": books.report(), "stakes": books.balances("stake"),
                    "leaderboard": books.leaderboard("worker"), "owners": books.leaderboard("owner"),
                    "proposals": [p for p in books.proposals() if p["status"] == "open"][-50:]}

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
        c = self.coordinator
        model = next(reversed(c.models), "") if c.models else ""
        stakes = (self.ledger_view or {}).get("stakes", {})
        planned = c.placement.assignments() if c.placement else {}
        workers = []
        for address, capacity in list(c.workers.items()):
            ws = self.scheduler.workers.get(address)
            profile = ((ws.extra.get("neuro") or {}).get("profile") or {}) if ws is not None else {}
            name = self.identity.get(address, address)
            rec = self.reputation.record(name)
            hosted, assigned = len(c.serving.get(address, ())), len(planned.get(address, ()))
            status = "serving" if hosted else "loading" if assigned else "idle"
            if ws is not None and ws.status.name in ("paused", "closing", "closing_gracefully"):
                status = ws.status.name.replace("_gracefully", "")
            gpus = profile.get("cuda") or []
            metrics = (ws.metrics.get("neuro") or {}) if ws is not None else {}
            workers.append(WorkerView(
                address=address, name=name, owner=capacity.owner, status=status,
                cores=int(profile.get("cores", 0)), memory=int(profile.get("memory_total", 0)),
                budget=capacity.memory_budget, gpus=len(gpus), vram=sum(int(g.get("total_memory", 0)) for g in gpus),
                speed=capacity.speed, score=rec.score, correctness=rec.correctness, timeliness=rec.timeliness,
                speed_score=rec.speed, uptime=rec.uptime, trusted=rec.trusted, established=rec.established,
                routable=rec.routable, stake=int(stakes.get(f"stake:{name}", 0)), hosted=hosted, assigned=assigned,
                calls_served=int(metrics.get("calls_served", 0))))
        keys = [k for k in (c.models[model].experts if model else {})]
        serving_count: dict[tuple[int, int], int] = {}
        for keys_served in c.serving.values():
            for m, layer, expert in keys_served:
                if m == model:
                    serving_count[(layer, expert)] = serving_count.get((layer, expert), 0) + 1
        target = {k: len(c.placement.workers_for((model, *k))) if c.placement else 0 for k in keys}
        load = {(l, e): v for (m, l, e), v in c.load.items() if m == model}
        events = list(self.events)
        return NetworkView(workers=workers, layers=1 + max((l for l, _ in keys), default=-1),
                           experts=1 + max((e for _, e in keys), default=-1), replicas=serving_count, target=target,
                           load=load, events=events, ledger=self.ledger_view if self.ledger else None, model=model,
                           versions=self.channels.status(time.time()))

    # ---- ledger --------------------------------------------------------------------------------

    def _stake_ok(self, address: str) -> bool:
        return self.ledger is None or self.identity.get(address) in self._staked

    def _in_ledger(self, fn, *args) -> asyncio.Future:
        """Run a ledger call on the ledger's thread, in submission order; failures are logged."""
        future = asyncio.get_running_loop().run_in_executor(self._ledger_thread, fn, *args)
        future.add_done_callback(_log_failure)
        return future

    def _record(self, judged: list, now: float, batch: str) -> None:
        for name in self.ledger.record(judged, now, batch):
            self._event("neuro-ledger", {"action": "slash", "worker": name, "at": now})

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

    async def _ledger_hold(self, account: str, request: str, expert_tokens: int, tier: str) -> dict[str, Any]:
        if self.ledger is None:
            return {"status": "OK", "held": 0, "ledger": False}
        return await self._in_ledger(self.ledger.hold, account, request, int(expert_tokens), time.time(), str(tier))

    async def _ledger_settle(self, request: str) -> dict[str, Any]:
        if self.ledger is None:
            return {"status": "OK", "fee": 0, "ledger": False}
        result = await self._in_ledger(self.ledger.settle, request, time.time())
        self._event("neuro-ledger", {"action": "settle", "request": request, **result})
        return result

    async def handle_ledger_report(self) -> dict[str, Any]:
        if self.ledger is None:
            return {"status": "error", "message": "this scheduler runs no ledger (set neuro.ledger.url)"}
        return {"status": "OK", "report": await self._in_ledger(self.ledger.report)}

    async def volunteer(self, worker: str) -> dict[str, Any]:
        """One worker's reputation and ledger figures (neuro_dask/volunteer_status.py)."""
        from neuro_dask.volunteer_status import scheduler_report

        return await scheduler_report(self, worker)

    def trust(self, worker: str, trusted: bool = True) -> dict[str, Any]:
        address = next((a for a, n in self.identity.items() if worker in (a, n)), worker)
        name = self.identity.get(address, worker)
        self._publish_change(self.reputation.mark_trusted(name, trusted))
        self._enact(self.coordinator.set_anchor(address, trusted))
        self._save_reputation()
        return {"status": "OK", "worker": name, "trusted": trusted}

    def _publish_change(self, change) -> None:
        self._event("neuro-trust", {"action": change.cause, "worker": change.worker,
                                                 "reputation": change.after, "cause_id": change.cause_id})

    # ---- what survives a restart (neuro.scheduler.state-file) ---------------------------------

    def _save_state(self) -> None:
        """Published models (their stores) and model channels, so that a restarted scheduler
        serves them again; written atomically, readable by its owner only (store URLs)."""
        path = self.settings.state_file
        if not path:
            return
        state = {"version": 1, "models": {m: p.store_url for m, p in self.coordinator.models.items()},
                 "channels": self.channels.to_dict(), "adoptions_seen": self._adoptions_seen}
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
                log.warning("state file: could not publish %s again from %s: %s", model, redact_url(store_url),
                            reply.get("message") or f"the store now holds {reply.get('model')}")
        log.info("restored %d published models and %d channels from %s", len(self.coordinator.models),
                 len(self.channels.channels), path)

    def _load_reputation(self) -> Reputation:
        policy = ReputationPolicy(establish_after=self.settings.establish_after,
                                  min_reputation=self.settings.min_reputation)
        path = self.settings.reputation_file
        if path and os.path.exists(path):
            with open(path) as fh:
                return Reputation.from_dict(json.load(fh), policy)
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
            "workers": {a: {"speed": w.speed, "memory_budget": w.memory_budget, "owner": w.owner,
                            "serving": sorted([list(k) for k in c.serving.get(a, ())]),
                            "name": self.identity.get(a, a), **{f"trust_{k}": v for k, v in self._standing(a).items()}}
                        for a, w in c.workers.items()},
            "models": {m: {"store_url": redact_url(p.store_url), "experts": len(p.experts), "summary": p.summary}
                       for m, p in c.models.items()},
            "versions": self.channels.status(time.time()),
        }

    # ---- actions -> messages -------------------------------------------------------------------

    def _enact(self, actions) -> None:
        for action in actions:
            task = asyncio.get_running_loop().create_task(self._send(action))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, action: LoadExperts | DropExperts) -> None:
        try:
            if isinstance(action, LoadExperts):
                await self.scheduler.rpc(action.worker).neuro_assign(
                    model=action.model, store_url=action.store_url, experts=[list(p) for p in action.experts])
            else:
                await self.scheduler.rpc(action.worker).neuro_drop(
                    model=action.model, experts=[list(p) for p in action.experts])
        except Exception as exc:  # the worker is gone or going: remove_worker will re-plan
            log.info("could not send %s to %s: %s", type(action).__name__, action.worker, exc)


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("ledger call failed", exc_info=future.exception())


@click.command()
@click.option("--neuro-replicas", type=int, default=None, help="target replicas per expert")
@click.option("--neuro-ledger", default=None, help="NEURO ledger database URL (default: neuro.ledger.url)")
@click.option("--neuro-hardened/--neuro-no-hardened", default=None,
              help="hardened mode (default: neuro.security.hardened)")
def dask_setup(scheduler, neuro_replicas, neuro_ledger, neuro_hardened) -> None:
    import dask.config

    security = SecuritySettings.load(hardened=neuro_hardened)
    if security.dashboard_token:
        # First: distributed only logs a preload's exception and goes on, so anything raising
        # before this line would leave the dashboard open.
        from neuro_dask.dashboard.access import protect_dashboard

        protect_dashboard(scheduler, security.dashboard_token)
    settings = SchedulerSettings.load(replicas=neuro_replicas)
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
