"""The dashboard's tables and series as plain columns: pure functions, no Bokeh, no Dask.

The scheduler plugin hands over a `NetworkView` (workers, placement, load, events, ledger
figures, all copied out of its state); each function here turns part of it into the column
dict one chart shows. Charts (charts.py) only put these columns into Bokeh data sources.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from neuro_dask.dashboard.feed import CallRecord, Feed

GiB = 2**30


@dataclass(frozen=True)
class WorkerView:
    address: str
    name: str
    owner: str
    status: str  # serving | loading | idle | paused | closing
    cores: int
    memory: int  # bytes of RAM on the machine
    budget: int  # bytes the worker gives to experts
    gpus: int
    vram: int  # bytes, all GPUs
    speed: float  # expert-FFN GFLOP/s from its start-up benchmark
    score: float
    correctness: float
    timeliness: float
    speed_score: float
    uptime: float
    trusted: bool
    established: bool
    routable: bool
    stake: int  # units locked (0 without a ledger)
    hosted: int  # experts it serves
    assigned: int  # experts placed on it
    calls_served: int


@dataclass(frozen=True)
class NetworkView:
    workers: Sequence[WorkerView] = ()
    layers: int = 0
    experts: int = 0
    replicas: Mapping[tuple[int, int], int] = field(default_factory=dict)  # serving replicas per expert
    target: Mapping[tuple[int, int], int] = field(default_factory=dict)  # planned replicas per expert
    load: Mapping[tuple[int, int], float] = field(default_factory=dict)
    events: Sequence[Mapping] = ()  # neuro-trust and neuro-ledger events, oldest first
    ledger: Mapping | None = None  # {"report", "stakes", "leaderboard", "owners", "proposals"}; None: no ledger
    model: str = ""
    versions: Mapping = field(default_factory=dict)  # ModelChannels.status(): channels, retiring, retired


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_by_worker(calls: Iterable[CallRecord]) -> dict[str, list[float]]:
    """One pass over the recent calls: each worker's call seconds."""
    out: dict[str, list[float]] = {}
    for r in calls:
        for w in r.workers:
            out.setdefault(w, []).append(r.seconds)
    return out


NETWORK_COLUMNS = ("name", "address", "owner", "status", "hardware", "memory_gib", "vram_gib", "speed", "score",
                   "correctness", "timeliness", "speed_score", "uptime", "trust", "stake", "hosted", "calls",
                   "p50_ms", "p95_ms")


def network_columns(view: NetworkView, feed: Feed) -> dict[str, list]:
    latency = latency_by_worker(list(feed.calls)[-5_000:])
    cols: dict[str, list] = {c: [] for c in NETWORK_COLUMNS}
    for w in sorted(view.workers, key=lambda w: (-w.score, w.name)):
        mine = latency.get(w.address, [])
        cols["name"].append(w.name)
        cols["address"].append(w.address)
        cols["owner"].append(w.owner or w.name)
        cols["status"].append(w.status)
        cols["hardware"].append(f"{w.cores} CPU" + (f", {w.gpus} GPU" if w.gpus else ""))
        cols["memory_gib"].append(round(w.memory / GiB, 1))
        cols["vram_gib"].append(round(w.vram / GiB, 1))
        cols["speed"].append(round(w.speed, 1))
        cols["score"].append(round(w.score, 3))
        cols["correctness"].append(round(w.correctness, 3))
        cols["timeliness"].append(round(w.timeliness, 3))
        cols["speed_score"].append(round(w.speed_score, 3))
        cols["uptime"].append(round(w.uptime, 3))
        cols["trust"].append("trusted" if w.trusted else "established" if w.established else
                             "newcomer" if w.routable else "out of routing")
        cols["stake"].append(w.stake / 1e9)
        cols["hosted"].append(w.hosted)
        cols["calls"].append(w.calls_served)
        cols["p50_ms"].append(round(1000 * _quantile(mine, 0.5), 2) if mine else math.nan)
        cols["p95_ms"].append(round(1000 * _quantile(mine, 0.95), 2) if mine else math.nan)
    return cols


def network_totals(view: NetworkView) -> dict[str, float]:
    ws = view.workers
    return {"workers": len(ws), "serving": sum(w.status == "serving" for w in ws), "gpus": sum(w.gpus for w in ws),
            "memory_gib": round(sum(w.memory for w in ws) / GiB, 1), "vram_gib": round(sum(w.vram for w in ws) / GiB, 1),
            "expert_memory_gib": round(sum(w.budget for w in ws) / GiB, 1),
            "owners": len({w.owner or w.name for w in ws}), "trusted": sum(w.trusted for w in ws)}


HEATMAP_COLUMNS = ("layer", "expert", "x", "y", "replicas", "target", "load", "heat", "short")
LABELLED_EXPERTS = 32  # above this many experts per layer a cell is too small for its number


def heatmap_size(experts: int, layers: int) -> tuple[int, int]:
    """(width, height) in pixels: a few pixels per cell at least, within a screen."""
    width = min(1600, max(620, 5 * experts + 120))
    height = min(1200, max(520, 12 * layers + 120))
    return width, height


def heatmap_columns(view: NetworkView) -> dict[str, list]:
    """One cell per (layer, expert): serving replicas, the placement target, and recent load
    relative to the mean (hot experts stand out)."""
    cells = sorted(set(view.target) | set(view.replicas))
    loads = [view.load.get(c, 0.0) for c in cells]
    mean = (sum(loads) / len(loads)) if loads and sum(loads) > 0 else 1.0
    cols: dict[str, list] = {k: [] for k in HEATMAP_COLUMNS}
    for (layer, expert), load in zip(cells, loads, strict=True):
        replicas, target = view.replicas.get((layer, expert), 0), view.target.get((layer, expert), 0)
        cols["layer"].append(str(layer))
        cols["expert"].append(str(expert))
        cols["x"].append(expert)  # numeric axes: a DeepSeek layer has 256 experts, Kimi K2's 384
        cols["y"].append(layer)
        cols["replicas"].append(replicas)
        cols["target"].append(target)
        cols["load"].append(round(load / mean, 2))
        cols["heat"].append(load / mean)
        cols["short"].append(max(0, target - replicas))
    return cols


CALL_COLUMNS = ("time", "model", "layer", "experts", "workers", "ms", "replicas", "hedges", "outcome", "transport")


def calls_columns(feed: Feed, limit: int = 200) -> dict[str, list]:
    cols: dict[str, list] = {c: [] for c in CALL_COLUMNS}
    for r in reversed(list(feed.calls)[-limit:]):  # newest first
        cols["time"].append(time.strftime("%H:%M:%S", time.localtime(r.time)))
        cols["model"].append(r.model)
        cols["layer"].append(r.layer)
        cols["experts"].append(r.experts)
        cols["workers"].append(", ".join(r.workers))
        cols["ms"].append(round(1000 * r.seconds, 2))
        cols["replicas"].append(r.replicas)
        cols["hedges"].append(r.hedges)
        cols["outcome"].append(r.outcome)
        cols["transport"].append(r.transport)
    return cols


def latency_histogram(feed: Feed, transport: str, bins: int = 30) -> dict[str, list]:
    """Log-spaced histogram of one transport's recent layer-call milliseconds."""
    ms = [1000 * r.seconds for r in feed.calls if r.transport == transport and r.seconds > 0]
    if not ms:
        return {"left": [], "right": [], "count": []}
    lo, hi = math.log10(min(ms)), math.log10(max(ms)) + 1e-9
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for x in ms:
        counts[min(bins - 1, int((math.log10(x) - lo) / width))] += 1
    edges = [10 ** (lo + i * width) for i in range(bins + 1)]
    return {"left": edges[:-1], "right": edges[1:], "count": counts}


EVENT_COLUMNS = ("time", "action", "worker", "layer", "expert", "reputation", "cause")


def trust_event_columns(view: NetworkView, limit: int = 300,
                        actions: Iterable[str] = ("invalid", "late", "timeout", "error", "hedged", "slash",
                                                  "crash", "joined", "trusted", "untrusted")) -> dict[str, list]:
    """The latest trust and ledger events worth an operator's eye (validated results are not),
    and every refusal of hardened mode (actions "security" and "security:<kind>")."""
    keep = set(actions)
    cols: dict[str, list] = {c: [] for c in EVENT_COLUMNS}
    picked = [e for e in view.events
              if e.get("action") in keep or str(e.get("action", "")).startswith("security")][-limit:]
    for e in reversed(picked):
        cols["time"].append(time.strftime("%H:%M:%S", time.localtime(float(e.get("time", 0.0)))))
        cols["action"].append(str(e.get("action")))
        cols["worker"].append(str(e.get("name") or e.get("worker", "")))  # names where the event has one
        cols["layer"].append(e.get("layer", ""))
        cols["expert"].append(e.get("expert", ""))
        rep = e.get("reputation")
        cols["reputation"].append(round(float(rep), 3) if isinstance(rep, (int, float)) else math.nan)
        cols["cause"].append(str(e.get("cause_id", e.get("cause", ""))))
    return cols


def reputation_series(feed: Feed, workers: Iterable[str]) -> dict[str, dict[str, list]]:
    """Each picked worker's score over time: worker -> {"time": [ms since epoch], "score": [...]}."""
    out = {}
    for w in workers:
        series = list(feed.reputation.get(w, ()))
        out[w] = {"time": [1000 * t for t, _ in series], "score": [s for _, s in series]}
    return out


ECONOMY_SERIES = ("treasury", "burned", "fees", "staked_total", "rewards", "slashed")


def economy_series(feed: Feed) -> dict[str, list]:
    """Ledger figures over time, in NEURO (not units) for readable axes."""
    cols: dict[str, list] = {"time": []} | {k: [] for k in ECONOMY_SERIES}
    for t, report in feed.economy:
        cols["time"].append(1000 * t)
        for k in ECONOMY_SERIES:
            cols[k].append(report.get(k, 0) / 1e9)
    return cols


def ledger_summary(view: NetworkView) -> dict[str, str]:
    if view.ledger is None:
        return {}
    from neuro_dask.ledger.policy import format_neuro

    r = view.ledger.get("report", {})
    keys = ("max_supply", "minted", "burned", "treasury", "emission_pool", "staked_total", "fees", "rewards", "slashed")
    return {k: format_neuro(int(r.get(k, 0))) for k in keys}


def ranked_columns(rows: Iterable[tuple[str, int]], key: str) -> dict[str, list]:
    rows = list(rows)
    return {"rank": list(range(1, len(rows) + 1)), key: [r[0] for r in rows], "units": [int(r[1]) for r in rows]}


def stake_columns(view: NetworkView) -> dict[str, list]:
    stakes = sorted((view.ledger or {}).get("stakes", {}).items(), key=lambda kv: -kv[1])
    return {"provider": [k.split(":", 1)[-1] for k, _ in stakes], "neuro": [v / 1e9 for _, v in stakes]}


PROPOSAL_COLUMNS = ("id", "proposer", "param", "value", "status", "yes", "no", "ends")


def proposal_columns(view: NetworkView) -> dict[str, list]:
    cols: dict[str, list] = {c: [] for c in PROPOSAL_COLUMNS}
    for p in (view.ledger or {}).get("proposals", []):
        for c in ("id", "proposer", "param", "value", "status"):
            cols[c].append(p[c])
        cols["yes"].append(p["yes"] / 1e9)
        cols["no"].append(p["no"] / 1e9)
        cols["ends"].append(time.strftime("%Y-%m-%d %H:%M", time.localtime(p["ends_at"])))
    return cols


VERSION_COLUMNS = ("channel", "model", "role", "requests")


def version_columns(view: NetworkView) -> dict[str, list]:
    """One row per model version on a channel: current, candidate (approved by vote), retiring
    (with its requests still running) or retired, newest first within a channel."""
    cols: dict[str, list] = {c: [] for c in VERSION_COLUMNS}
    status = view.versions or {}
    retiring, retired = status.get("retiring", {}), status.get("retired", {})

    def add(channel: str, model: str, role: str, requests: int | str = "") -> None:
        for c, v in zip(VERSION_COLUMNS, (channel, model, role, requests), strict=True):
            cols[c].append(v)

    for name, ch in sorted(status.get("channels", {}).items()):
        if ch.get("candidate"):
            add(name, ch["candidate"], "candidate (approved by vote)" if ch.get("approved") else "candidate")
        if ch.get("current"):
            add(name, ch["current"], "current")
        for model in reversed(ch.get("history", [])[:-1]):
            if model in retiring:
                add(name, model, "retiring", int(retiring[model]["leases"]))
            elif model in retired:
                add(name, model, "retired")
    return cols
