"""The client's round trip to each worker, the latency-aware choice of replica, and the harness
that simulates WAN round trips on loopback. Pure: no Dask here; time and randomness come in.

Measuring (LatencyBook):
  1. Every answered call (direct or futures transport, primaries, hedges and abandoned calls
     alike) is one sample: the seconds from handing the message to the transport until its
     answer is back, simulated delay included. Only calls of at most `small_rows` rows count,
     so the estimate is the round trip plus a decode-sized compute, not a prefill's compute.
  2. The estimate is an EWMA of those samples per worker (weight `alpha` on the newest).

Preferring (LatencyBook.choose, used by RouteTable.plan and the trusted runner's primary):
  1. Trust first. Only replicas in the best trust tier present among an expert's candidates
     are eligible: trusted, then established, then routable newcomers, then the rest (the
     scheduler's standing). With trust off every worker is a routable newcomer: one tier.
  2. Within the tier a replica is "close" when its estimate is within `margin` (relative) or
     `slack` seconds (absolute) of the tier's fastest estimate. A replica never measured is
     close, and counts as 0 s for the fastest (optimism: each new worker is tried at once, by
     the next choice that can use it, and measured).
  3. Exploration: with probability `explore` per choice the pick is instead a random eligible
     replica that is not close, so a far worker that got faster is found again (its estimate
     only moves when it is called). `explore = 0` turns this off (tests).
  4. Among the close replicas: the fewest rows planned in the layer, so work spreads (the old
     rule); with `pack` (off by default) one already carrying work of this layer instead (fewer
     messages per layer; measured in docs/performance.md). Ties keep the scheduler's order
     (reputation).
Without a book (latency_aware off) the plan is the old one: fewest rows, scheduler's order.

Simulating (SimulatedLatency, harness only, neuro.client.simulated-latency): each call to a
worker draws an RTT = delay + U(-jitter, +jitter), at least 0 (per-worker overrides by
address), from a seeded rng; the transport sleeps half before sending and half after the
answer arrives, without blocking the event loop.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from neuro_dask.errors import ConfigError

TIERS = ("trusted", "established", "newcomer", "unroutable")


@dataclass(frozen=True)
class LatencyPolicy:
    alpha: float = 0.3  # EWMA weight of the newest sample
    margin: float = 0.25  # within 25% of the fastest estimate counts as equally close...
    slack: float = 0.001  # ...or within 1 ms of it
    explore: float = 0.02  # probability that a choice tries a replica that is not close
    pack: bool = False  # among close replicas, prefer one this layer already sends to (see docs/performance.md)
    small_rows: int = 64  # bigger calls are not round-trip samples

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1 or not 0 <= self.explore <= 1:
            raise ConfigError("latency alpha must be in (0, 1] and explore in [0, 1]")
        if self.margin < 0 or self.slack < 0 or self.small_rows < 1:
            raise ConfigError("latency margin and slack must be >= 0 and small_rows >= 1")


@dataclass
class LatencyBook:
    """Per-worker EWMA of call round trips, and the choice of replica from it (rules above)."""

    policy: LatencyPolicy = field(default_factory=LatencyPolicy)
    rng: random.Random = field(default_factory=random.Random)
    ewma: dict[str, float] = field(default_factory=dict)  # worker -> seconds per small call
    samples: dict[str, int] = field(default_factory=dict)
    explored: int = 0  # choices made by rule 3

    def observe(self, worker: str, seconds: float, rows: int = 1) -> None:
        if rows > self.policy.small_rows or seconds < 0:
            return
        before = self.ewma.get(worker)
        a = self.policy.alpha
        self.ewma[worker] = seconds if before is None else (1 - a) * before + a * seconds
        self.samples[worker] = self.samples.get(worker, 0) + 1

    def estimate(self, worker: str) -> float | None:
        return self.ewma.get(worker)

    def close(self, workers: Sequence[str]) -> list[str]:
        """Rule 2: the workers (in their order) whose estimate is near the fastest, or unknown."""
        known = [self.ewma[w] for w in workers if w in self.ewma]
        if not known:
            return list(workers)
        best = 0.0 if len(known) < len(workers) else min(known)  # an unmeasured worker might be the fastest
        bound = max(best * (1 + self.policy.margin), best + self.policy.slack)
        return [w for w in workers if w not in self.ewma or self.ewma[w] <= bound]

    def choose(
        self,
        candidates: Sequence[str],
        tier: Callable[[str], int],
        load: Mapping[str, int],
        used: Callable[[str], bool] = lambda w: False,
    ) -> str:
        """One replica of `candidates` (the scheduler's order, non-empty): rules 1-4.
        `load`: rows planned per worker in this layer; `used`: the layer already sends to it."""
        best_tier = min(tier(w) for w in candidates)
        eligible = [w for w in candidates if tier(w) == best_tier]
        near = self.close(eligible)
        far = [w for w in eligible if w not in near]
        if far and self.policy.explore and self.rng.random() < self.policy.explore:
            self.explored += 1
            return self.rng.choice(far)
        if self.policy.pack:
            return min(near, key=lambda w: (not used(w), load.get(w, 0)))  # min is stable: scheduler's order
        return min(near, key=lambda w: load.get(w, 0))

    def snapshot(self, paths: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The estimates, and `paths`: how each measured worker is reached (direct, relayed,
        punched, lan: relay/comm.py's choice), given by the shell that knows."""
        out = {
            "ewma_ms": {w: 1000 * s for w, s in sorted(self.ewma.items())},
            "samples": dict(self.samples),
            "explored": self.explored,
        }
        if paths is not None:
            listens = {w: "relayed" if w.startswith("relay://") else "direct" for w in self.ewma}
            out["paths"] = {w: paths.get(w, listens[w]) for w in sorted(self.ewma)}
        return out


def tier_of(trusted: bool, established: bool, routable: bool) -> int:
    """Rule 1's trust tier: 0 best. Replicas are reordered by latency only within one tier."""
    if trusted:
        return 0
    if not routable:
        return 3
    return 1 if established else 2


@dataclass(frozen=True)
class SimulatedLatency:
    """Harness only: a WAN round trip added to every call on loopback (seconds)."""

    delay: float = 0.0
    jitter: float = 0.0
    workers: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # address -> (delay, jitter)

    @classmethod
    def from_setting(cls, value: Any) -> SimulatedLatency | None:
        """neuro.client.simulated-latency: None, a number (delay), or
        {delay: 0.02, jitter: 0.005, workers: {ADDR: {delay, jitter} or a number}}."""
        if value is None or value is False:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = {"delay": value}
        if not isinstance(value, Mapping):
            raise ConfigError(f"neuro.client.simulated-latency must be null, seconds or a mapping, got {value!r}")
        unknown = set(value) - {"delay", "jitter", "workers"}
        if unknown:
            raise ConfigError(
                f"neuro.client.simulated-latency: unknown keys {sorted(unknown)} (use delay, jitter, workers)"
            )
        delay, jitter = _seconds(value.get("delay", 0.0), "delay"), _seconds(value.get("jitter", 0.0), "jitter")
        workers = {}
        for addr, spec in (value.get("workers") or {}).items():
            if not isinstance(spec, Mapping):
                spec = {"delay": spec}
            workers[str(addr)] = (
                _seconds(spec.get("delay", delay), "delay"),
                _seconds(spec.get("jitter", jitter), "jitter"),
            )
        return cls(delay, jitter, workers)

    def sample(self, worker: str, rng: random.Random) -> float:
        """Seconds of simulated round trip for one call to `worker`."""
        delay, jitter = self.workers.get(worker, (self.delay, self.jitter))
        if jitter:
            delay += rng.uniform(-jitter, jitter)
        return max(0.0, delay)


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 60:
        raise ConfigError(f"neuro.client.simulated-latency: {name} must be seconds in [0, 60), got {value!r}")
    return float(value)
