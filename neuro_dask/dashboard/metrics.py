"""The `neuro_*` Prometheus series on the Dask scheduler's `/metrics` endpoint.

Dask's `/metrics` handler writes `prometheus_client.generate_latest()`: whatever is registered
in prometheus_client's process-wide REGISTRY. So one module-level collector is registered there,
once, and every scheduler plugin joins it through `register(plugin)` (the plugin calls it from
its `__init__`; calling it again is harmless). The collector holds the plugins weakly and
labels every sample with `scheduler` (the scheduler's address): several schedulers in one
process share the same series under different labels, and no second collector ever registers
the same names (which prometheus_client refuses with a duplicate-timeseries error).

Which schedulers a scrape shows: a scrape of one scheduler's `/metrics` shows that scheduler
only. Dask does not tell the collector who asked, so it looks a few frames up for the Tornado
handler serving the request and keeps the plugin whose scheduler is that handler's server (a
worker's `/metrics` in the same process then shows no `neuro_*` samples). Outside a request
(`generate_latest()` called directly, `prometheus_client.start_http_server`) every live
scheduler is shown, each under its own label.

Series (every one also labelled `scheduler`):

  neuro_worker_reputation{worker,address,component}   component: score, correctness, timeliness,
                                                       speed, uptime; each in [0, 1]
  neuro_worker_trusted{worker,address}                 1 if operator-trusted, else 0
  neuro_worker_established{worker,address}             1 if trusted or established, else 0
  neuro_worker_routable{worker,address}                1 if it receives routed work, else 0
  neuro_worker_hosted_experts{worker,address}          experts it reported loaded, all models
  neuro_calls_total{kind}                              judged expert calls: validated, invalid,
                                                       late, timeout, error
  neuro_hedges_total                                   hedged (duplicate) expert calls sent
  neuro_quorum_total{outcome}                          quorum decisions by outcome
  neuro_speculative_passes_total                       speculative decoding passes clients report
  neuro_speculative_tokens_total{kind}                 their draft tokens: drafted, kept (a pass
                                                       yields kept + 1 tokens per sequence)
  neuro_layer_latency_seconds (histogram)              layer-call seconds, as clients report
  neuro_ledger_enabled                                 1 if the scheduler runs a ledger
  neuro_ledger_units{quantity}                         the ledger report's totals in the smallest
                                                       unit: minted, burned, treasury,
                                                       staked_total, fees, rewards, slashed, ...
  neuro_ledger_accounts, neuro_ledger_entries          the ledger's account and entry counts
  neuro_relay_volunteers                               volunteers registered with the scheduler's relay
  neuro_relay_open_connections                         connections the relay splices now
  neuro_relay_connections_total{outcome}               spliced, refused
  neuro_relay_bytes_total                              bytes the relay copied (both directions)

What the collector reads from a plugin is all in `_samples(plugin)`; every read tolerates a
missing or failing attribute (its series is then empty). Besides the plugin's own state
(`scheduler`, `identity`, `reputation`, `coordinator`, `ledger`) it reads:

  plugin.metrics_counts: Mapping[str, int]   running totals: the call kinds above, "hedges",
                                             and "quorum_<outcome>" for each quorum outcome
  plugin.latency_buckets: Sequence[tuple[float, int]]   (upper bound in seconds, cumulative
                                             count), ascending; +inf is added when missing
  plugin.latency_sum: float, plugin.latency_count: int
  plugin.ledger_report: Mapping[str, int]    a cached copy of LedgerService.report(), refreshed
                                             in the background: a scrape never touches the
                                             database. Replace it, don't mutate it in place.
  plugin.relay.counters                      the relay's RelayCounters (relay/server.py), if the
                                             scheduler runs a relay

A scrape runs on the scheduler's event loop: it only copies small dicts and reads reputation
records, no I/O.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from neuro_dask.dashboard.views import RELAY_FIGURES

log = logging.getLogger("neuro_dask.dashboard.metrics")

COMPONENTS = ("score", "correctness", "timeliness", "speed", "uptime")
CALL_KINDS = ("validated", "invalid", "late", "timeout", "error")
HEDGES = "hedges"
QUORUM_PREFIX = "quorum_"
LEDGER_COUNTS = ("accounts", "entries")  # counts of rows, not units: their own gauges
_GONE = frozenset({"closing", "closing_gracefully", "closed", "failed", "stopping", "stopped"})
_MAX_FRAMES = 24  # how far up collect() looks for the HTTP handler serving the scrape


# ---- what is read from a plugin ----------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSample:
    address: str
    name: str
    reputation: Mapping[str, float]  # COMPONENTS -> value
    trusted: bool
    established: bool
    routable: bool
    hosted: int


@dataclass(frozen=True)
class Samples:
    """One scheduler's figures, copied out of its plugin."""

    scheduler: str  # the `scheduler` label: the scheduler's address
    workers: tuple[WorkerSample, ...] = ()
    counts: Mapping[str, float] | None = None  # None: the plugin keeps no counts
    latency: tuple[tuple[float, float], ...] = ()  # (upper bound, cumulative), ascending, +inf last
    latency_sum: float = 0.0
    ledger_enabled: bool = False
    ledger: Mapping[str, float] = field(default_factory=dict)
    relay: Mapping[str, float] | None = None  # None: the scheduler runs no relay


def _relay(plugin: Any) -> Mapping[str, float] | None:
    counters = getattr(_attr(plugin, "relay", None), "counters", None)
    if counters is None:
        return None
    return {name: _number(getattr(counters, name, 0)) for name in RELAY_FIGURES}


def _samples(plugin: Any) -> Samples:
    """Everything the collector needs from one NeuroSchedulerPlugin: the only place that knows
    the plugin's attributes."""
    identity = dict(_attr(plugin, "identity", None) or {})
    coordinator = _attr(plugin, "coordinator", None)
    serving = dict(getattr(coordinator, "serving", None) or {})
    known = getattr(coordinator, "workers", None) or {}
    reputation = _attr(plugin, "reputation", None)
    workers = []
    for address in sorted({*identity, *known, *serving}):
        name = str(identity.get(address, address))
        rec = reputation.record(name) if reputation is not None else None
        workers.append(
            WorkerSample(
                address=str(address),
                name=name,
                reputation={c: float(getattr(rec, c)) for c in COMPONENTS} if rec is not None else {},
                trusted=bool(getattr(rec, "trusted", False)),
                established=bool(getattr(rec, "established", False)),
                routable=bool(getattr(rec, "routable", False)),
                hosted=len(serving.get(address) or ()),
            )
        )
    counts = _attr(plugin, "metrics_counts", None)
    return Samples(
        scheduler=_scheduler_label(_attr(plugin, "scheduler", None)),
        workers=tuple(workers),
        counts=_numbers(counts) if isinstance(counts, Mapping) else None,
        latency=_cumulative(_attr(plugin, "latency_buckets", None), _attr(plugin, "latency_count", 0)),
        latency_sum=_number(_attr(plugin, "latency_sum", 0.0)),
        ledger_enabled=_attr(plugin, "ledger", None) is not None,
        ledger=_numbers(_attr(plugin, "ledger_report", None)),
        relay=_relay(plugin),
    )


def _attr(obj: Any, name: str, default: Any) -> Any:
    """getattr that turns a failing property into its default: one bad figure empties one series,
    never the whole scrape."""
    try:
        return getattr(obj, name, default)
    except Exception:
        log.debug("could not read %s for /metrics", name, exc_info=True)
        return default


def _scheduler_label(scheduler: Any) -> str:
    try:
        return str(scheduler.address)
    except Exception:  # not listening (yet): the address property raises
        return str(getattr(scheduler, "id", "") or "")


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _numbers(mapping: Any) -> dict[str, float]:
    """The numeric entries of a mapping (a method or None reads as empty)."""
    if not isinstance(mapping, Mapping):
        return {}
    return {
        str(k): float(v)
        for k, v in list(mapping.items())
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _cumulative(buckets: Any, count: Any) -> tuple[tuple[float, float], ...]:
    """(upper bound, cumulative count) pairs, ascending and ending at +inf; () without buckets."""
    try:
        pairs = sorted((float(bound), float(n)) for bound, n in list(buckets or ()))
    except (TypeError, ValueError):
        log.debug("latency_buckets is not a list of (bound, count) pairs: %r", buckets)
        return ()
    if not pairs:
        return ()
    if pairs[-1][0] != math.inf:
        pairs.append((math.inf, max(_number(count), pairs[-1][1])))
    return tuple(pairs)


# ---- samples -> metric families ----------------------------------------------------------------


def families(snapshots: Iterable[Samples]) -> list:
    """The `neuro_*` metric families for these schedulers (empty families for none)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    worker_labels = ["scheduler", "worker", "address"]
    reputation = GaugeMetricFamily(
        "neuro_worker_reputation",
        "Worker reputation and its components, in [0, 1]",
        labels=[*worker_labels, "component"],
    )
    trusted = GaugeMetricFamily(
        "neuro_worker_trusted", "1 if the operator marked the worker trusted", labels=worker_labels
    )
    established = GaugeMetricFamily(
        "neuro_worker_established",
        "1 if the worker is trusted or has enough consecutive validated results",
        labels=worker_labels,
    )
    routable = GaugeMetricFamily(
        "neuro_worker_routable", "1 if the worker receives routed expert calls", labels=worker_labels
    )
    hosted = GaugeMetricFamily(
        "neuro_worker_hosted_experts", "Experts the worker reported loaded (all models)", labels=worker_labels
    )
    calls = CounterMetricFamily("neuro_calls", "Judged expert calls by outcome kind", labels=["scheduler", "kind"])
    hedges = CounterMetricFamily("neuro_hedges", "Hedged (duplicate) expert calls clients sent", labels=["scheduler"])
    quorum = CounterMetricFamily("neuro_quorum", "Quorum decisions by outcome", labels=["scheduler", "outcome"])
    passes = CounterMetricFamily(
        "neuro_speculative_passes", "Speculative decoding passes that clients report", labels=["scheduler"]
    )
    drafts = CounterMetricFamily(
        "neuro_speculative_tokens", "Draft tokens of speculative passes: drafted, kept", labels=["scheduler", "kind"]
    )
    latency = HistogramMetricFamily(
        "neuro_layer_latency_seconds", "Layer-call latency that clients report", labels=["scheduler"]
    )
    ledger_on = GaugeMetricFamily(
        "neuro_ledger_enabled", "1 if the scheduler runs a NEURO ledger", labels=["scheduler"]
    )
    ledger_units = GaugeMetricFamily(
        "neuro_ledger_units", "Ledger totals in the smallest unit (cached report)", labels=["scheduler", "quantity"]
    )
    ledger_counts = {
        k: GaugeMetricFamily(f"neuro_ledger_{k}", f"Ledger {k} (cached report)", labels=["scheduler"])
        for k in LEDGER_COUNTS
    }
    relay_volunteers = GaugeMetricFamily(
        "neuro_relay_volunteers", "Volunteers registered with the scheduler's relay", labels=["scheduler"]
    )
    relay_now = GaugeMetricFamily(
        "neuro_relay_open_connections", "Connections the relay splices now", labels=["scheduler"]
    )
    relay_total = CounterMetricFamily(
        "neuro_relay_connections", "Connections the relay spliced or refused", labels=["scheduler", "outcome"]
    )
    relay_bytes = CounterMetricFamily("neuro_relay_bytes", "Bytes the relay copied", labels=["scheduler"])

    for s in snapshots:
        for w in s.workers:
            labels = [s.scheduler, w.name, w.address]
            for component, value in w.reputation.items():
                reputation.add_metric([*labels, component], value)
            trusted.add_metric(labels, float(w.trusted))
            established.add_metric(labels, float(w.established))
            routable.add_metric(labels, float(w.routable))
            hosted.add_metric(labels, w.hosted)
        if s.counts is not None:
            for kind in CALL_KINDS:
                calls.add_metric([s.scheduler, kind], s.counts.get(kind, 0.0))
            hedges.add_metric([s.scheduler], s.counts.get(HEDGES, 0.0))
            passes.add_metric([s.scheduler], s.counts.get("speculative_passes", 0.0))
            for kind in ("drafted", "kept"):
                drafts.add_metric([s.scheduler, kind], s.counts.get(f"speculative_{kind}", 0.0))
            for key, value in sorted(s.counts.items()):
                if key.startswith(QUORUM_PREFIX) and len(key) > len(QUORUM_PREFIX):
                    quorum.add_metric([s.scheduler, key[len(QUORUM_PREFIX) :]], value)
        if s.latency:
            latency.add_metric([s.scheduler], [(floatToGoString(b), n) for b, n in s.latency], s.latency_sum)
        ledger_on.add_metric([s.scheduler], float(s.ledger_enabled))
        for quantity, value in sorted(s.ledger.items()):
            if quantity in ledger_counts:
                ledger_counts[quantity].add_metric([s.scheduler], value)
            else:
                ledger_units.add_metric([s.scheduler, quantity], value)
        if s.relay is not None:
            relay_volunteers.add_metric([s.scheduler], s.relay["volunteers"])
            relay_now.add_metric([s.scheduler], s.relay["spliced_now"])
            relay_total.add_metric([s.scheduler, "spliced"], s.relay["spliced_total"])
            relay_total.add_metric([s.scheduler, "refused"], s.relay["refused_total"])
            relay_bytes.add_metric([s.scheduler], s.relay["bytes_total"])
    return [
        reputation,
        trusted,
        established,
        routable,
        hosted,
        calls,
        hedges,
        quorum,
        passes,
        drafts,
        latency,
        ledger_on,
        ledger_units,
        *ledger_counts.values(),
        relay_volunteers,
        relay_now,
        relay_total,
        relay_bytes,
    ]


# ---- the collector ------------------------------------------------------------------------------


class NeuroCollector:
    """A prometheus_client collector over the plugins `plugins()` returns."""

    def __init__(self, plugins: Callable[[], Iterable[Any]]):
        self._plugins = plugins

    def describe(self) -> list:
        """The names only (the registry checks them for clashes): reads no plugin."""
        return families(())

    def collect(self) -> list:
        server = _requesting_server()
        snapshots = []
        for plugin in self._plugins():
            scheduler = _attr(plugin, "scheduler", None)
            if server is not None and scheduler is not server:
                continue  # another scheduler's /metrics (or a worker's) asked
            if server is None and _gone(scheduler):
                continue
            try:
                snapshots.append(_samples(plugin))
            except Exception:  # e.g. a dict changed size under a scrape from another thread
                log.warning("/metrics skipped the neuro plugin of %s", _scheduler_label(scheduler), exc_info=True)
        return families(snapshots)


def _requesting_server() -> Any:
    """The Dask server whose HTTP handler is running this scrape, or None outside a request."""
    try:
        from tornado.web import RequestHandler
    except ImportError:
        return None
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, RequestHandler):
            return getattr(owner, "server", None)
        frame = frame.f_back
    return None


def _gone(scheduler: Any) -> bool:
    return getattr(getattr(scheduler, "status", None), "name", "") in _GONE


# Weak, by id: a plugin leaves when it is garbage, and need not be hashable (a WeakSet would).
_PLUGINS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_LOCK = threading.Lock()
_COLLECTOR = NeuroCollector(lambda: _live_plugins())
_registered = False


def _live_plugins() -> list:
    with _LOCK:
        return list(_PLUGINS.values())


def register(plugin: Any) -> None:
    """Show `plugin`'s scheduler on /metrics: idempotent, and never raises (metrics are optional).

    The first call registers the module's one collector in prometheus_client's REGISTRY.
    """
    global _registered
    try:
        with _LOCK:
            _PLUGINS[id(plugin)] = plugin
            if _registered:
                return
            _registered = True
        import prometheus_client

        prometheus_client.REGISTRY.register(_COLLECTOR)
    except ImportError:
        log.debug("prometheus_client is not installed: no neuro_* series on /metrics")
    except Exception:  # e.g. this module was reloaded and its first copy holds the names
        log.warning("could not register the neuro_* Prometheus series", exc_info=True)


def collect() -> list:
    """The families a scrape outside any HTTP request would see (all live schedulers)."""
    return _COLLECTOR.collect()
