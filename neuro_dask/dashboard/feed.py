"""What the scheduler plugin remembers for the dashboard and /metrics: bounded, pure, no Dask.

- calls: the latest expert calls clients report (one record per layer call: layer, experts,
  workers, seconds, replicas, hedges, outcome, transport, rows, request), newest last.
- counts: expert-call outcomes by kind (validated, invalid, late, timeout, error) and hedges.
- latency: a cumulative histogram of reported layer-call seconds (Prometheus buckets).
- reputation: each worker's score sampled over time (for the trust page's chart).
- economy: the ledger's transparency report sampled over time (for the economy page).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class CallRecord:
    time: float
    model: str
    layer: int
    experts: int  # experts in the layer call
    workers: tuple[str, ...]  # who answered (addresses)
    seconds: float
    replicas: int  # expert evaluations sent (1 per expert without checks)
    hedges: int
    outcome: str  # ok | checked | caught | failed
    transport: str
    rows: int = -1  # expert rows sent: tokens x experts per token (-1: the client did not say)
    request: str = ""  # the request the call worked for ("" where the client did not say)

    @classmethod
    def from_report(cls, raw: Iterable, model: str, now: float) -> CallRecord:
        """From a client's [layer, experts, workers, seconds, replicas, hedges, outcome, transport]
        and, from newer clients, [..., rows, request]. A client's report is untrusted plain data:
        every field must be of its type and within its bounds, else ValueError (the record is
        dropped). It moves no reputation and no money: a client that lies skews the dashboard's
        figures (calls, tokens/s, latency), nothing more."""
        raw = list(raw) if isinstance(raw, (list, tuple)) else []
        if len(raw) not in (8, 10):
            raise ValueError(f"a call record has 8 or 10 fields, got {len(raw)}")
        layer, experts, workers, seconds, replicas, hedges, outcome, transport = raw[:8]
        rows, request = raw[8:] if len(raw) == 10 else (-1, "")
        if not isinstance(workers, (list, tuple)) or not all(isinstance(w, str) for w in workers):
            raise ValueError("a call record's workers must be a list of strings")
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < 86_400:
            raise ValueError(f"a call record's seconds must be a number of seconds, got {seconds!r}")
        return cls(now, str(model), _bounded(layer, -1, 1 << 16), _bounded(experts, 0, 1 << 20),
                   tuple(w[:200] for w in workers[:16]), float(seconds), _bounded(replicas, 0, 1 << 20),
                   _bounded(hedges, 0, 1 << 20), _short(outcome, 16), _short(transport, 16),
                   _bounded(rows, -1, 1 << 24), _request_id(request))


def _bounded(value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"expected an integer in [{low}, {high}], got {value!r}")
    return value


def _short(value: object, limit: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value[:limit]


def _request_id(value: object) -> str:
    """A request id as the dashboard shows and filters by it: up to 64 of [A-Za-z0-9._:-]."""
    if not isinstance(value, str) or len(value) > 64 or not all(c.isascii() and (c.isalnum() or c in "._:-")
                                                               for c in value):
        raise ValueError(f"a call record's request must be an id of up to 64 characters, got {str(value)[:80]!r}")
    return value


@dataclass
class Feed:
    max_calls: int = 2_000
    max_samples: int = 720  # 24 minutes of 2-second samples
    calls: deque = field(default_factory=deque)
    counts: dict[str, int] = field(default_factory=dict)
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    reputation: dict[str, deque] = field(default_factory=dict)  # worker name -> (time, score)
    economy: deque = field(default_factory=deque)  # (time, report)

    def add_calls(self, records: Iterable[CallRecord]) -> None:
        for r in records:
            self.calls.append(r)
            self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, r.seconds)] += 1
            self.latency_sum += r.seconds
            self.counts["hedges"] = self.counts.get("hedges", 0) + r.hedges
            self.count(f"quorum_{r.outcome}")  # ok, checked, caught, retried, failed (neuro_quorum_total)
        while len(self.calls) > self.max_calls:
            self.calls.popleft()

    def count(self, kind: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n

    @property
    def latency_count(self) -> int:
        return sum(self.latency_counts)

    def latency_buckets(self) -> list[tuple[float, int]]:
        """Cumulative (upper bound, count) pairs, the last one +inf."""
        out, total = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self.latency_counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    def sample_reputation(self, scores: Mapping[str, float], now: float) -> None:
        for worker, score in scores.items():
            series = self.reputation.setdefault(worker, deque(maxlen=self.max_samples))
            series.append((now, float(score)))

    def sample_economy(self, report: Mapping[str, int], now: float) -> None:
        self.economy.append((now, dict(report)))
        while len(self.economy) > self.max_samples:
            self.economy.popleft()
