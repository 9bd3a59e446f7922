"""Hedged duplicates and deadlines, from each worker's measured latency.

Rules:
  1. Latency is tracked per worker over its last `window` calls, with each call's rows. The
     estimate for a call of r rows is the quantile of recent call times, scaled by r / (median
     rows of those calls) only when r is larger: a call's fixed cost (the hop, the dispatch)
     dominates small calls, so time per row would overstate them.
  2. Hedge: a call not answered after the worker's `hedge_quantile` (default p95) latency for
     its size, times `hedge_slack`, goes to a second replica; the first valid answer wins.
     A worker with fewer than `min_samples` calls uses the cluster-wide estimate, or
     `default_latency` when nothing is known yet.
  2b. Peers: the calls of one round (one layer's messages, sent together, of similar size) are
     the freshest estimate there is. Once `peer_quorum` (default half) of a round has answered,
     a call still unanswered after `peer_factor` (default 2) x the slowest answer so far is
     hedged too, if that comes before rule 2. The same patience applies to each further hedge,
     measured from when it went out: a hedge can straggle as well.
  3. Hedges are capped: the extra calls hedges send may reach at most `hedge_cap` (default 10%)
     of calls (checked before each hedge; a hedge of k messages counts k); past the cap a slow
     call waits for its answer or its deadline instead.
  4. Deadline: `deadline_factor` x the same estimate, within [`min_deadline`, `max_deadline`]
     (neuro.client.deadline, 10 s); a call past it
     is re-sent (and counted late if it answers after all). Each timeout in a row doubles the
     worker's deadline (up to `max_deadline`) until it answers again: a machine that became
     busy is waited for instead of timed out call after call at 10 x what it used to take.
     Timeouts stay out of the estimate itself, so they never delay the hedges of rule 2.
Time is passed in, never read here.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from neuro_dask.errors import ConfigError


@dataclass(frozen=True)
class HedgePolicy:
    hedge_quantile: float = 0.95
    hedge_slack: float = 1.5
    peer_factor: float = 2.0
    peer_quorum: float = 0.5
    hedge_cap: float = 0.10
    deadline_factor: float = 10.0
    min_deadline: float = 0.5
    max_deadline: float = 10.0  # neuro.client.deadline: a hung worker is not waited for longer
    default_latency: float = 0.05  # seconds for a call of one row, before anything is measured
    window: int = 200
    min_samples: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.hedge_quantile < 1 or not 0 <= self.hedge_cap <= 1:
            raise ConfigError("hedge_quantile must be in (0, 1) and hedge_cap in [0, 1]")
        if self.peer_factor < 1 or not 0 < self.peer_quorum <= 1:
            raise ConfigError("peer_factor must be >= 1 and peer_quorum in (0, 1]")
        if self.hedge_slack < 1 or self.deadline_factor < 1 or not 0 < self.min_deadline <= self.max_deadline:
            raise ConfigError("hedge_slack and deadline_factor must be >= 1, 0 < min_deadline <= max_deadline")


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class LatencyTracker:
    policy: HedgePolicy = field(default_factory=HedgePolicy)
    per_worker: dict[str, deque] = field(default_factory=dict)
    everyone: deque = field(default_factory=lambda: deque(maxlen=1000))
    calls: int = 0
    hedges: int = 0
    timeouts: dict[str, int] = field(default_factory=dict)  # worker -> timeouts since its last answer

    def observe(self, worker: str, seconds: float, rows: int) -> None:
        sample = (seconds, max(rows, 1))
        self.per_worker.setdefault(worker, deque(maxlen=self.policy.window)).append(sample)
        self.everyone.append(sample)
        self.timeouts.pop(worker, None)

    def timed_out(self, worker: str) -> None:
        """Rule 4's backoff: `worker` gave no answer by its deadline."""
        self.timeouts[worker] = self.timeouts.get(worker, 0) + 1

    def _estimate(self, worker: str, rows: int) -> float:
        mine = self.per_worker.get(worker)
        if mine is not None and len(mine) >= self.policy.min_samples:
            samples = list(mine)
        elif len(self.everyone) >= self.policy.min_samples:
            samples = list(self.everyone)
        else:
            return self.policy.default_latency * max(rows, 1)
        seconds = _quantile([t for t, _ in samples], self.policy.hedge_quantile)
        typical = sorted(r for _, r in samples)[len(samples) // 2]
        return seconds * max(1.0, rows / typical)

    def hedge_after(self, worker: str, rows: int) -> float:
        """Rule 2: seconds after which a call to `worker` with `rows` rows is hedged."""
        return self._estimate(worker, rows) * self.policy.hedge_slack

    def peer_patience(self, finished: list[float], total: int) -> float | None:
        """Rule 2b: seconds without an answer after which a call of a round of `total` calls is
        hedged, given the seconds its `finished` peers took; None while too few have answered."""
        needed = max(1, math.ceil(self.policy.peer_quorum * total))
        if total < 2 or len(finished) < needed:
            return None
        return self.policy.peer_factor * max(finished)

    def deadline(self, worker: str, rows: int) -> float:
        """Rule 4."""
        estimate = self._estimate(worker, rows) * self.policy.deadline_factor
        backoff = 2 ** min(self.timeouts.get(worker, 0), 10)
        return min(self.policy.max_deadline, max(self.policy.min_deadline, estimate) * backoff)

    def count_call(self) -> None:
        self.calls += 1

    def may_hedge(self) -> bool:
        """Rule 3: within the cap of hedged calls."""
        return self.hedges + 1 <= self.policy.hedge_cap * max(self.calls, 1)

    def count_hedge(self, messages: int = 1) -> None:
        """A hedge went out as `messages` extra calls (alternates that together host the work)."""
        self.hedges += messages
