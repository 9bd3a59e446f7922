"""Which worker gets which expert call, from the scheduler's routes. Pure: no Dask here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from neuro_dask.errors import NeuroDaskError
from neuro_dask.trust.latency import LatencyBook, tier_of
from neuro_dask.trust.replication import Standing


class ExpertUnavailableError(NeuroDaskError):
    def __init__(self, model: str, layer: int, experts: Iterable[int], waited: float, why: str | None = None):
        self.model, self.layer, self.experts, self.waited = model, layer, sorted(experts), waited
        advice = why or (
            "start more workers with `--preload neuro_worker`, or check the scheduler's events for "
            "workers that failed to load them"
        )
        super().__init__(
            f"no live worker serves expert(s) {self.experts} of layer {layer} of model {model!r} "
            f"(waited {waited:.1f} s): {advice}"
        )


def why_unserved(workers: Mapping[str, Mapping[str, Any]], expert_bytes: int, replicas_wanted: int = 1) -> str | None:
    """Why a network does not serve a model yet, from the scheduler's `neuro_status` workers
    (each with `name`, `memory_budget`, `paused`, `serving`); None when nothing stands out (the
    workers are still loading). Checked in the order an operator can act on."""
    if not workers:
        return "no worker has joined this scheduler: start one with `neuro-dask worker SCHEDULER_ADDRESS`"
    paused = {w.get("name", a): w.get("paused") for a, w in workers.items() if w.get("paused")}
    if len(paused) == len(workers):
        causes = "; ".join(f"{n}: {why}" for n, why in sorted(paused.items())[:5])
        return (
            f"every worker ({len(workers)}) is paused because its machine is busy ({causes}). Idle-only "
            "workers serve again once their machines are idle; start workers with --no-idle-only to serve on "
            "busy machines"
        )
    budget = sum(int(w.get("memory_budget") or 0) for w in workers.values() if not w.get("paused"))
    if expert_bytes and budget < expert_bytes * replicas_wanted:
        return (
            f"the serving workers' memory budgets total {budget / 2**20:.0f} MiB but the model's experts need "
            f"{expert_bytes / 2**20:.0f} MiB: add workers or raise --memory-budget"
        )
    if paused:
        return (
            f"{len(paused)} of {len(workers)} workers are paused (their machines are busy); the others are "
            "still loading"
        )
    return None


MAX_WAIT_FACTOR = 6  # a recovering network (or a restarting scheduler) is waited for up to 6 x missing-expert-wait


@dataclass
class RouteWait:
    """How long a layer waits for its experts to get (enough) routes again. It gives up after
    `base` seconds without progress, or `cap` seconds in all. Progress is either
    - the scheduler being away (its routes did not come, or came only after a long wait): a
      restart in progress, whose end the wait cannot judge, so only the cap bounds it; or
    - the network in motion: a different number of replicas routed than at the previous look
      (workers re-registering after a scheduler restart, replacements loading, and also workers
      leaving a scheduler that shuts down).
    Each resets the clock, so a network that is visibly changing, however slowly its busy
    machines start, is waited for; one that stands still gives up after `base`. Progress is
    counted from the previous look, not from the best before the wait: the routes a client held
    before a restart say nothing about how fast the new scheduler's fill up.
    Pure: the executor passes the time and the routed count."""

    started: float
    base: float
    cap: float
    last: int = -1
    progressed: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.progressed = self.started

    def expired(self, now: float, routed: int | None) -> bool:
        """`routed`: replicas with a live route in the latest routes (None: the scheduler is away)."""
        if routed is None or routed != self.last:
            self.progressed = now
        if routed is not None:
            self.last = routed
        return now - self.progressed >= self.base or now - self.started >= self.cap

    def grew(self, routed: int) -> bool:
        """Whether `routed` is more than at the previous look (a quorum that could not decide
        asks again only once there is someone new to ask)."""
        return routed > self.last

    def waited(self, now: float) -> float:
        return now - self.started


def routed_count(table: RouteTable) -> int:
    """How many (expert, worker) routes the model has: the replicas, not only the experts with
    one, so a returning worker that adds a second replica counts as progress."""
    return sum(len(workers) for workers in table.routes.values())


class ExpertsUnloadableError(ExpertUnavailableError):
    """Every live worker tried and failed to load these experts: waiting longer changes nothing."""

    def __init__(self, model: str, layer: int, experts: Iterable[int], waited: float, why: str):
        super().__init__(model, layer, experts, waited)
        self.why = why
        Exception.__init__(
            self,
            f"every live worker failed to load expert(s) {self.experts} of layer {layer} of model "
            f"{model!r}: {why or 'no reason given'}",
        )


@dataclass(frozen=True)
class RouteTable:
    version: int
    routes: Mapping[tuple[int, int], tuple[str, ...]]  # (layer, expert) -> workers, best first
    standing: Mapping[str, Standing] = field(default_factory=dict)  # from the scheduler's reputation
    routable: frozenset[str] | None = None  # None: every listed worker may get primary work
    params: Mapping[str, int] = field(default_factory=dict)  # governed trust parameters (ledger on)
    hardened: bool = False  # the scheduler runs hardened mode: plain data only, no Dask task graphs
    anchored: bool = False  # the scheduler knows an anchor, present or briefly away (Reputation.anchored)

    @classmethod
    def from_message(cls, msg: Mapping[str, Any]) -> RouteTable:
        routes = {(int(l), int(e)): tuple(ws) for l, e, ws in msg["routes"]}
        raw = msg.get("standing") or {}
        standing = {
            w: Standing(
                bool(s["trusted"]),
                bool(s["established"]),
                int(s["consecutive_valid"]),
                str(s.get("owner") or ""),
                str(s.get("precision") or "float32"),
            )
            for w, s in raw.items()
        }
        routable = frozenset(w for w, s in raw.items() if s.get("routable", True)) if raw else None
        return cls(
            int(msg["version"]),
            routes,
            standing,
            routable,
            dict(msg.get("params") or {}),
            bool(msg.get("hardened", False)),
            msg.get("anchored") is True,
        )

    @property
    def anchorless(self) -> bool:
        """No anchor (a trusted or established worker) is routed, nor known to the scheduler: a
        network's first start, where newcomers' agreement must decide (quorum rule 6)."""
        return not self.anchored and not any(s.trusted or s.established for s in self.standing.values())

    def standing_of(self, worker: str) -> Standing:
        return self.standing.get(worker, Standing())

    def ranked(self, layer: int, expert: int) -> list[str]:
        """Replicas of one expert, routable ones first (in the scheduler's order), then the rest,
        which may still receive spot-check replicas to earn their way back."""
        workers = list(self.routes.get((layer, expert), ()))
        if self.routable is None:
            return workers
        return [w for w in workers if w in self.routable] + [w for w in workers if w not in self.routable]

    @property
    def missing(self) -> list[tuple[int, int]]:
        return [k for k, ws in self.routes.items() if not ws]

    def tier(self, worker: str) -> int:
        """The worker's trust tier (0 best): latency reorders replicas only within one tier."""
        s = self.standing_of(worker)
        return tier_of(s.trusted, s.established, self.routable is None or worker in self.routable)

    def plan(
        self, layer: int, rows: Mapping[int, int], exclude: set[str] = frozenset(), latency: LatencyBook | None = None
    ) -> tuple[dict[str, list[int]], list[int]]:
        """Group a layer's experts by worker: one message per worker per layer.

        rows: expert -> how many rows it carries. Without `latency`, each expert goes to the
        live replica with the fewest rows planned so far in this layer (ties: the faster, listed
        first), so a layer's work spreads over workers that compute in parallel. With the
        client's LatencyBook (neuro.client.latency-aware), the rules of trust/latency.py: the
        best trust tier first, then close replicas (by measured round trip), packed onto workers
        the layer already uses. Returns (worker -> experts, experts with no live replica).
        """
        planned: dict[str, list[int]] = {}
        load: dict[str, int] = {}
        unroutable: list[int] = []
        for expert in sorted(rows):
            candidates = [w for w in self.routes.get((layer, expert), ()) if w not in exclude]
            if not candidates:
                unroutable.append(expert)
                continue
            if latency is None:
                best = min(candidates, key=lambda w: load.get(w, 0))  # min is stable: ties keep route order
            else:
                best = latency.choose(candidates, self.tier, load, planned.__contains__)
            planned.setdefault(best, []).append(expert)
            load[best] = load.get(best, 0) + rows[expert]
        return planned, unroutable
