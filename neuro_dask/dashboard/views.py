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
    hosted: int  # experts it serves: the coordinator's serving set, what clients are routed by
    assigned: int  # experts placed on it
    calls_served: int
    reported: int | None = None  # experts the worker itself says it holds (its heartbeat); None: not heard yet


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
    experts_per_token: Mapping[str, int] = field(default_factory=dict)  # model -> k, from its published config
    relay: Mapping[str, float] | None = None  # the scheduler's relay's counters (RELAY_FIGURES); None: no relay


NONE = "-"  # what a cell shows where there is no figure (never NaN: an idle worker has no latency)
RELAY_FIGURES = ("volunteers", "spliced_now", "spliced_total", "refused_total", "bytes_total")


def worker_path(address: str) -> str:
    """How callers reach a worker: through the relay it dialled (relay://), or straight to it."""
    return "relayed" if str(address).startswith("relay://") else "direct"


def path_cell(address: str, clients: Mapping[str, int]) -> str:
    """The path column: how the worker listens, and for a relayed one, how the clients that
    called it lately reach it ("relayed: punched 2, relayed 1")."""
    listens = worker_path(address)
    if listens == "direct" or not clients:
        return listens
    order = ("punched", "lan", "relayed")
    return f"{listens}: " + ", ".join(f"{p} {clients[p]}" for p in order if clients.get(p))


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(seconds: Sequence[float], q: float) -> str:
    return f"{1000 * _quantile(seconds, q):.2f}" if seconds else NONE


def worker_state(dask_status: str, paused: bool, routable: bool, hosted: int, assigned: int) -> str:
    """What a worker is doing for the network, in one word an operator can act on. "serving"
    only where clients are routed to it: a worker below the minimum reputation holds its experts
    but gets no calls ("out of routing"), as a worker paused by its owner or by Dask gets none."""
    if dask_status in ("closing", "closing_gracefully"):
        return "closing"
    if paused or dask_status == "paused":
        return "paused"
    if not routable:
        return "out of routing"
    return "serving" if hosted else "loading" if assigned else "idle"


def experts_cell(hosted: int, reported: int | None) -> str:
    """The experts a worker serves (the coordinator's serving set), and what the worker itself
    reports where the two differ (a load or a drop under way, or a worker that lost its experts:
    `neuro-dask worker-status` shows the worker's own figure)."""
    return str(hosted) if reported is None or reported == hosted else f"{hosted} (worker: {reported})"


def latency_by_worker(calls: Iterable[CallRecord]) -> dict[str, list[float]]:
    """One pass over the recent calls: each worker's call seconds."""
    out: dict[str, list[float]] = {}
    for r in calls:
        for w in r.workers:
            out.setdefault(w, []).append(r.seconds)
    return out


NETWORK_COLUMNS = (
    "name",
    "address",
    "path",
    "owner",
    "status",
    "trust",
    "score",
    "correctness",
    "timeliness",
    "speed_score",
    "uptime",
    "hardware",
    "memory_gib",
    "vram_gib",
    "speed",
    "stake",
    "hosted",
    "calls",
    "p50_ms",
    "p95_ms",
)
# Short headers an operator reads at a glance, so that the network table fits a 1,400 px window;
# each abbreviated one explains itself in a tooltip (HINTS), and docs/dashboard.md says more.
TITLES = {
    "correctness": "correct",
    "timeliness": "on time",
    "speed_score": "speed",
    "uptime": "up",
    "memory_gib": "RAM",
    "vram_gib": "VRAM",
    "speed": "GFLOP/s",
    "hosted": "experts",
    "p50_ms": "p50",
    "p95_ms": "p95",
    "action": "event",
    "calls_link": "calls",
}
HINTS = {
    "path": "how callers reach it: direct (it listens where they can dial), or relayed (behind a NAT: "
    "through the relay it dialled); for a relayed one, how many clients lately reached it punched (a "
    "hole punched through both NATs), lan (the same router) or relayed (docs/distributed.md)",
    "score": "reputation score in [0, 1]: min(correct, weighted geometric mean of the four components)",
    "correctness": "reputation component: correct results, slow to earn and quick to lose",
    "timeliness": "reputation component: answers within their deadline",
    "speed_score": "reputation component: its speed against the median worker's",
    "uptime": "reputation component: uptime (a weighted fraction of time present)",
    "trust": "trust tier: trusted (by the operator), established (enough validated results in a row), newcomer",
    "memory_gib": "RAM of its machine, GiB",
    "vram_gib": "GPU memory of its machine, GiB",
    "speed": "expert-FFN GFLOP/s from its start-up benchmark",
    "stake": "NEURO it has staked",
    "hosted": "experts it serves (where its own heartbeat says otherwise, that figure too)",
    "calls": "expert calls it served",
    "p50_ms": "median latency of its recent layer calls, ms",
    "p95_ms": "95th percentile latency of its recent layer calls, ms",
    "rows": "expert rows sent: tokens x experts per token",
    "request": "the request the call worked for",
}


def title(column: str) -> str:
    return TITLES.get(column, column.replace("_", " "))


def header(column: str) -> str:
    """A table header as HTML: its title, with a tooltip where HINTS explains it."""
    import html

    text = html.escape(title(column))
    return f'<span title="{html.escape(HINTS[column])}">{text}</span>' if column in HINTS else text


def fit_widths(
    cols: Mapping[str, Sequence],
    names: Iterable[str],
    char_px: int = 7,
    pad: int = 14,
    min_px: int = 40,
    max_px: int = 900,
) -> dict[str, int]:
    """Pixels per column so that its header and its longest value fit (a fixed-width table
    then never cuts "correctness" to "correctnes")."""
    out = {}
    for c in names:
        longest = max([_chars(title(c))] + [_chars(str(v)) for v in cols.get(c, ())])
        out[c] = max(min_px, min(max_px, round(longest * char_px) + pad))
    return out


def _chars(text: str) -> float:
    """A text's width in average characters: capitals, "m", "w" and "%" are wider ("VRAM" needs
    more room than "vram")."""
    return sum(1.4 if ch.isupper() or ch in "mw%" else 1.0 for ch in text)


def network_columns(view: NetworkView, feed: Feed, now: float | None = None) -> dict[str, list]:
    now = time.time() if now is None else now
    latency = latency_by_worker(list(feed.calls)[-5_000:])
    cols: dict[str, list] = {c: [] for c in NETWORK_COLUMNS}
    for w in sorted(view.workers, key=lambda w: (-w.score, w.name)):
        mine = latency.get(w.address, [])
        cols["name"].append(w.name)
        cols["address"].append(w.address)
        cols["path"].append(path_cell(w.address, feed.paths_to(w.address, now)))
        cols["owner"].append(w.owner or w.name)
        cols["status"].append(w.status)
        cols["trust"].append(
            "trusted"
            if w.trusted
            else "established"
            if w.established
            else "newcomer"
            if w.routable
            else "out of routing"
        )
        cols["score"].append(round(w.score, 3))
        cols["correctness"].append(round(w.correctness, 3))
        cols["timeliness"].append(round(w.timeliness, 3))
        cols["speed_score"].append(round(w.speed_score, 3))
        cols["uptime"].append(round(w.uptime, 3))
        cols["hardware"].append(f"{w.cores} CPU" + (f", {w.gpus} GPU" if w.gpus else ""))
        cols["memory_gib"].append(round(w.memory / GiB, 1))
        cols["vram_gib"].append(round(w.vram / GiB, 1))
        cols["speed"].append(round(w.speed, 1))
        cols["stake"].append(w.stake / 1e9)
        cols["hosted"].append(experts_cell(w.hosted, w.reported))
        cols["calls"].append(w.calls_served)
        cols["p50_ms"].append(_ms(mine, 0.5))
        cols["p95_ms"].append(_ms(mine, 0.95))
    return cols


def network_totals(view: NetworkView) -> dict[str, float]:
    ws = view.workers
    return {
        "workers": len(ws),
        "serving": sum(w.status == "serving" for w in ws),
        "paused": sum(w.status == "paused" for w in ws),
        "out_of_routing": sum(w.status == "out of routing" for w in ws),
        "gpus": sum(w.gpus for w in ws),
        "memory_gib": round(sum(w.memory for w in ws) / GiB, 1),
        "vram_gib": round(sum(w.vram for w in ws) / GiB, 1),
        "expert_memory_gib": round(sum(w.budget for w in ws) / GiB, 1),
        "owners": len({w.owner or w.name for w in ws}),
        "trusted": sum(w.trusted for w in ws),
        "relayed": sum(worker_path(w.address) == "relayed" for w in ws),
    }


def relay_summary(view: NetworkView) -> str:
    """One line on the scheduler's relay ('' without one)."""
    if view.relay is None:
        return ""
    r = view.relay
    mib = r.get("bytes_total", 0) / 2**20
    return (
        f"relay: {int(r.get('volunteers', 0))} volunteers registered, {int(r.get('spliced_now', 0))} connections "
        f"open, {int(r.get('spliced_total', 0))} spliced and {int(r.get('refused_total', 0))} refused so far, "
        f"{mib:.1f} MiB copied"
    )


HEATMAP_COLUMNS = ("layer", "expert", "x", "y", "replicas", "target", "load", "heat", "short", "ink_heat", "ink_target")
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
    high_heat, high_target = heat_scales(cols)
    cols["ink_heat"] = [ink(h, high_heat) for h in cols["heat"]]
    cols["ink_target"] = [ink(t, high_target) for t in cols["target"]]
    return cols


def heat_scales(cols: Mapping[str, Sequence[float]]) -> tuple[float, float]:
    """The top of each colour scale: load (x the mean) from 0 to at least 2, the target from 0
    to at least 1. Both maps run the same way: more is darker."""
    return max([2.0, *cols["heat"]]), float(max([1, *cols["target"]]))


def ink(value: float, high: float) -> str:
    """A cell's label colour: white on the darker half of the scale, black on the lighter."""
    return "white" if high > 0 and value / high > 0.5 else "black"


CALL_COLUMNS = (
    "time",
    "model",
    "request",
    "layer",
    "experts",
    "rows",
    "workers",
    "ms",
    "replicas",
    "hedges",
    "outcome",
    "transport",
)
CALL_FILTERS = ("worker", "outcome", "request", "layer")  # the /neuro/calls query arguments


def calls_columns(
    feed: Feed,
    limit: int = 200,
    worker: str = "",
    outcome: str = "",
    names: Mapping[str, str] | None = None,
    request: str = "",
    layer: str = "",
) -> dict[str, list]:
    """The latest calls, newest first; `worker` (an address or a name), `outcome`, `request` (an
    id, or its first characters) and `layer` keep only the matching ones (the trust page links
    here so); workers are named where `names` knows them."""
    names = names or {}
    cols: dict[str, list] = {c: [] for c in CALL_COLUMNS}
    picked = [
        r
        for r in feed.calls
        if (not outcome or r.outcome == outcome)
        and (not request or (r.request and r.request.startswith(request)))
        and (not layer or str(r.layer) == layer)
        and (not worker or any(worker in (w, names.get(w)) for w in r.workers))
    ]
    for r in reversed(picked[-limit:]):  # newest first
        cols["time"].append(time.strftime("%H:%M:%S", time.localtime(r.time)))
        cols["model"].append(r.model)
        cols["request"].append(_short(r.request) if r.request else NONE)
        cols["layer"].append(r.layer)
        cols["experts"].append(r.experts)
        cols["rows"].append(r.rows if r.rows >= 0 else NONE)
        cols["workers"].append(", ".join(names.get(w, w) for w in r.workers))
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


EVENT_COLUMNS = ("time", "action", "worker", "layer", "expert", "reputation", "cause", "calls_link")
TRUST_ACTIONS = (
    "invalid",
    "late",
    "timeout",
    "error",
    "hedged",
    "slash",
    "crash",
    "joined",
    "trusted",
    "untrusted",
    "left",
    "crashed",
    "pause",
    "resume",
    "dispute-refuted",
)
JUDGED = frozenset({"invalid", "late", "timeout", "error", "hedged"})  # about calls: linked to /neuro/calls


def _short(ident: object) -> str:
    return str(ident)[:8]


def describe(event: Mapping, why: Mapping[str, str] = {}) -> str:  # noqa: B006 - read only
    """An event's cause in words an operator reads (never an opaque hash on its own): which
    request, layer and expert a verdict judged and why, how a worker went, who paused it.
    `why`: request id -> the dispute's verdict in words, for the verdict's own events."""
    action = str(event.get("action", ""))
    cause_id = str(event.get("cause_id") or "")
    where = ", ".join(f"{k} {event[k]}" for k in ("layer", "expert") if _known(event.get(k)))
    if action in ("left", "crashed"):
        how = "closed on purpose" if action == "left" else "gone without a goodbye (killed, or its connection broke)"
        experts = event.get("experts")
        return how + (f"; its {experts} experts are placed elsewhere" if experts else "")
    if action in ("pause", "resume"):
        return str(event.get("reason") or ("its owner is busy" if action == "pause" else "its owner is away again"))
    if action in ("trusted", "untrusted"):
        return "set by the operator"
    if action == "joined":
        return "registered with the scheduler"
    ref = cause_id or str(event.get("cause") or "")
    if ref.startswith("dispute:") or action in ("slash", "dispute-refuted"):
        request = ref.split(":")[1] if ref.startswith("dispute:") else str(event.get("request") or "")
        head = f"request {_short(request)}" + (f", {where}" if where else "")
        if action == "slash":
            return f"{head}: stake slashed for a result proven wrong"
        if action == "dispute-refuted":
            return f"{head}: complaint refuted ({event.get('why', '')})"
        referees = [str(r) for r in event.get("referees") or ()]
        if not referees:
            return f"{head}: {why[request]}" if why.get(request) else f"{head}: result proven wrong by recomputation"
        # Who recomputed it, by name, as "worker 0" (a bare "(0)" reads as a count). Operator-
        # trusted referees are the ones whose verdict slashes (trust/disputes.py rule 1).
        slashable = event.get("slashable", "trusted referee" in why.get(request, ""))
        who = ("operator-trusted " if slashable else "") + ("worker " if len(referees) == 1 else "workers ")
        differs = "whose answer differs" if len(referees) == 1 else "whose answers agree, and differ from it"
        return f"{head}: result proven wrong: recomputed by {who}{', '.join(referees)}, {differs}"
    if event.get("cause") == "probe":
        return f"the scheduler's probe got no answer: {event.get('why') or 'timed out'}"
    if action in JUDGED:
        what = {
            "invalid": "result differed from quorum",
            "late": "answered after its deadline",
            "timeout": "no answer by its deadline",
            "error": "answered with an error",
            "hedged": "slow: a second replica was asked",
        }[action]
        head = f"call {_short(cause_id)}" if cause_id else "call"
        request = event.get("request")
        return (
            (f"request {_short(request)}, " if request else "") + head + (f", {where}" if where else "") + f": {what}"
        )
    if action.startswith("security"):
        return str(event.get("cause") or event.get("detail") or "refused by hardened mode")
    return str(event.get("cause") or event.get("why") or cause_id or NONE)


def _known(value: object) -> bool:
    """A layer or expert the event names (clients report -1 where a call had none)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def calls_link(event: Mapping) -> str:
    """The /neuro/calls filter (relative to the dashboard's root) showing the calls an event
    is about: for a proven wrong result (and its slash), the calls of the disputed request in
    the disputed layer (the call records carry their request: the caught call is among them,
    whichever worker answered it); for another judged call, the worker's caught calls; for a
    departure, the worker's calls."""
    from urllib.parse import urlencode

    action = str(event.get("action", ""))
    worker = str(event.get("worker") or "")
    who = worker if "://" in worker else str(event.get("name") or worker)
    ref = str(event.get("cause_id") or event.get("cause") or "")
    if ref.startswith("dispute:") and action in ("invalid", "slash"):
        request = ref.split(":")[1]
        layer = {"layer": event["layer"]} if _known(event.get("layer")) else {}
        return "neuro/calls?" + urlencode({"request": request, **layer}) if request else ""
    if not who or not (action in JUDGED or action in ("left", "crashed", "slash")):
        return ""
    return "neuro/calls?" + urlencode({"worker": who, **({"outcome": "caught"} if action == "invalid" else {})})


def trust_event_columns(view: NetworkView, limit: int = 300, actions: Iterable[str] = TRUST_ACTIONS) -> dict[str, list]:
    """The latest trust, lifecycle and ledger events worth an operator's eye (validated results
    are not), and every refusal of hardened mode (actions "security" and "security:<kind>")."""
    from neuro_dask.trust.lifecycle import lifecycle_action

    keep = set(actions)
    why = {
        str(e.get("request")): str(e.get("why", ""))
        for e in view.events
        if e.get("action") == "dispute-proven" and e.get("request")
    }
    cols: dict[str, list] = {c: [] for c in EVENT_COLUMNS}
    picked = [e for e in view.events if e.get("action") in keep or str(e.get("action", "")).startswith("security")][
        -limit:
    ]
    for e in reversed(picked):
        cols["time"].append(time.strftime("%H:%M:%S", time.localtime(float(e.get("time", 0.0)))))
        cols["action"].append(lifecycle_action(e) or str(e.get("action")))
        cols["worker"].append(str(e.get("name") or e.get("worker", "")))  # names where the event has one
        cols["layer"].append(str(e["layer"]) if _known(e.get("layer")) else NONE)
        cols["expert"].append(str(e["expert"]) if _known(e.get("expert")) else NONE)
        rep = e.get("reputation")
        cols["reputation"].append(f"{float(rep):.3f}" if isinstance(rep, (int, float)) else NONE)
        cols["cause"].append(describe(e, why))
        cols["calls_link"].append(calls_link(e))
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


# ---- the overview page: the network's health in a few figures ------------------------------


@dataclass(frozen=True)
class Overview:
    experts_total: int  # experts of the latest published model
    experts_at_target: int  # of those, served by at least their planned replicas
    workers: int
    serving: int
    paused: int
    out_of_routing: int
    calls_per_s: float  # layer calls clients reported, over the window
    passes_per_s: float  # forward passes: calls to each model's first MoE layer, over the window
    tokens_per_s: float | None  # tokens processed (prompt and generated), over the window; None: unknown
    caught: int  # layer calls where a wrong result was caught (quorum) since the scheduler started
    proven: int  # wrong results proven by recomputation (disputes)
    layer_calls: int  # layer calls reported since the scheduler started
    failed: int  # of those, failed (no valid answer within the budget)
    tokens_per_pass: float | None = None  # speculative passes over the window: tokens each yielded; None: none
    speculative_passes: int = 0  # speculative passes over the window

    @property
    def error_rate(self) -> float:
        return self.failed / self.layer_calls if self.layer_calls else 0.0


def overview(view: NetworkView, feed: Feed, now: float, window: float = 60.0) -> Overview:
    """The overview's figures, from the same state the other pages read."""
    keys = set(view.target) | set(view.replicas)
    at_target = sum(1 for k in keys if view.target.get(k, 0) > 0 and view.replicas.get(k, 0) >= view.target[k])
    recent = [r for r in feed.calls if now - window <= r.time <= now]
    first = {}
    for r in recent:
        first[r.model] = min(first.get(r.model, r.layer), r.layer)
    passes = [r for r in recent if r.layer == first[r.model]]
    counts = feed.counts
    layer_calls = sum(v for k, v in counts.items() if k.startswith("quorum_"))
    totals = network_totals(view)
    return Overview(
        experts_total=len(keys),
        experts_at_target=at_target,
        workers=totals["workers"],
        serving=totals["serving"],
        paused=totals["paused"],
        out_of_routing=totals["out_of_routing"],
        calls_per_s=round(len(recent) / window, 2),
        passes_per_s=round(len(passes) / window, 2),
        tokens_per_s=tokens_per_s(passes, view.experts_per_token, window),
        caught=int(counts.get("quorum_caught", 0)),
        proven=int(counts.get("invalid", 0)),
        layer_calls=int(layer_calls),
        failed=int(counts.get("quorum_failed", 0)),
        tokens_per_pass=tokens_per_pass([p for p in feed.passes if now - window <= p[0] <= now]),
        speculative_passes=sum(1 for p in feed.passes if now - window <= p[0] <= now),
    )


def tokens_per_pass(passes: Sequence[tuple[float, str, int, int]]) -> float | None:
    """Tokens a speculative pass yielded per row, on average: the drafts it kept, plus the one the
    model adds each pass (plain decoding: 1). None without speculative passes."""
    if not passes:
        return None
    return round(sum(kept + 1 for _, _, _, kept in passes) / len(passes), 2)


def tokens_per_pass_over_time(feed: Feed, bin_seconds: float = 5.0) -> dict[str, list]:
    """Tokens per speculative pass, and drafts kept per drafted, per time bin (ms since epoch)."""
    bins: dict[int, list[tuple[int, int]]] = {}
    for t, _, drafted, kept in feed.passes:
        bins.setdefault(int(t // bin_seconds), []).append((drafted, kept))
    cols: dict[str, list] = {"time": [], "tokens_per_pass": [], "kept_share": []}
    for b in sorted(bins):
        rows = bins[b]
        drafted = sum(d for d, _ in rows)
        cols["time"].append(1000 * b * bin_seconds)
        cols["tokens_per_pass"].append(round(sum(k + 1 for _, k in rows) / len(rows), 3))
        cols["kept_share"].append(round(sum(k for _, k in rows) / drafted, 3) if drafted else 0.0)
    return cols


def tokens_per_s(passes: Sequence[CallRecord], experts_per_token: Mapping[str, int], window: float) -> float | None:
    """Tokens processed per second: every token goes through each MoE layer once, with rows for
    its k experts, so the rows of a model's first MoE layer divided by k count its tokens (prompt
    and generated alike). None where no such call carries its rows (older clients) or a model's k
    is unknown. The rows are the clients' own word: a client can only inflate this figure."""
    rows = 0
    for r in passes:
        k = experts_per_token.get(r.model, 0)
        if r.rows < 0 or k <= 0:
            return None
        rows += r.rows / k
    if not passes:
        return 0.0 if experts_per_token else None
    return round(rows / window, 2)


def latency_over_time(feed: Feed, bin_seconds: float = 5.0) -> dict[str, list]:
    """p50 and p95 of layer-call milliseconds per time bin (ms since epoch at the bin's start),
    over the calls the feed still holds."""
    bins: dict[int, list[float]] = {}
    for r in feed.calls:
        bins.setdefault(int(r.time // bin_seconds), []).append(r.seconds)
    cols: dict[str, list] = {"time": [], "p50": [], "p95": []}
    for b in sorted(bins):
        cols["time"].append(1000 * b * bin_seconds)
        cols["p50"].append(round(1000 * _quantile(bins[b], 0.5), 3))
        cols["p95"].append(round(1000 * _quantile(bins[b], 0.95), 3))
    return cols


RECENT_ACTIONS = (
    "invalid",
    "slash",
    "crash",
    "joined",
    "left",
    "crashed",
    "pause",
    "resume",
    "trusted",
    "untrusted",
    "dispute-refuted",
)
