"""Reports that a worker is unreachable, confirmed by the scheduler's own probe. Pure: time passed in.

A client that gets no answer from a worker routes around it at once, in its own process (its
suspect list). What it tells the scheduler is a claim: believed, it would take an honest
worker out of everyone's routes (one client could empty the network). So the scheduler
checks for itself: it sends the worker one small expert call for the reported experts, and
only a probe that fails (no answer, an error other than "paused") takes those experts out of
routes and counts against the worker's reputation.

Rules:
1. A report names a worker and some of its experts; reports for a worker merge until its probe runs.
2. At most one probe per worker is in flight, and a worker is probed at most once per `interval`
   seconds: a flood of reports costs the scheduler one small call per worker per interval.
3. At most `max_experts` experts are probed per worker per probe (the rest wait for the next);
   at most `max_workers` workers wait (further reports are dropped and counted).
4. A paused worker (its owner is busy) is not unreachable: the scheduler already routes around it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    worker: str
    model: str
    experts: tuple[tuple[int, int], ...]


class ProbeBook:
    def __init__(self, interval: float = 5.0, max_experts: int = 64, max_workers: int = 10_000):
        self.interval = interval
        self.max_experts = max_experts
        self.max_workers = max_workers
        self._pending: dict[tuple[str, str], set[tuple[int, int]]] = {}  # (worker, model) -> experts
        self._in_flight: set[str] = set()
        self._last: dict[str, float] = {}  # worker -> when its last probe started
        self.dropped = 0

    def report(self, worker: str, model: str, experts: Iterable[tuple[int, int]]) -> None:
        """Rule 1 and 3: remember what to probe."""
        key = (worker, model)
        if key not in self._pending and len(self._pending) >= self.max_workers:
            self.dropped += 1
            return
        self._pending.setdefault(key, set()).update((int(l), int(e)) for l, e in experts)

    def due(self, now: float) -> list[Probe]:
        """Rule 2: the probes to start now (each marked in flight until `done`)."""
        probes = []
        for (worker, model), experts in list(self._pending.items()):
            if worker in self._in_flight or now - self._last.get(worker, float("-inf")) < self.interval:
                continue
            chosen = tuple(sorted(experts)[: self.max_experts])
            experts.difference_update(chosen)
            if not experts:
                del self._pending[(worker, model)]
            self._in_flight.add(worker)
            self._last[worker] = now
            probes.append(Probe(worker, model, chosen))
        return probes

    def done(self, worker: str) -> None:
        self._in_flight.discard(worker)

    def forget(self, worker: str) -> None:
        """The worker left: nothing of it to probe."""
        self._in_flight.discard(worker)
        self._last.pop(worker, None)
        for key in [k for k in self._pending if k[0] == worker]:
            del self._pending[key]
