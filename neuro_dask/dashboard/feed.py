"""What the scheduler plugin remembers for the dashboard and /metrics: bounded, pure, no Dask.

- calls: the latest expert calls clients report (one record per layer call: layer, experts,
  workers, seconds, replicas, hedges, outcome, transport, rows, request), newest last.
- counts: expert-call outcomes by kind (validated, invalid, late, timeout, error) and hedges.
- latency: a cumulative histogram of reported layer-call seconds (Prometheus buckets).
- reputation: each worker's score sampled over time (for the trust page's chart).
- economy: the ledger's transparency report sampled over time (for the economy page).
- passes: the latest speculative decoding passes clients report (time, model, drafted, kept),
  for the overview's tokens-per-pass figure.
- paths: how each client reaches each relayed worker (relayed, punched, lan) and the round trip
  it measured, as clients report it with their calls (for the network page's path column).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from neuro_dask.protocol.records import CallReport, PassReport, PathReport

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
    def of(cls, report: CallReport, model: str, now: float) -> CallRecord:
        """A client's checked report (protocol/records.py), stamped with its model and arrival time."""
        return cls(
            now,
            str(model),
            report.layer,
            report.experts,
            report.workers,
            report.seconds,
            report.replicas,
            report.hedges,
            report.outcome,
            report.transport,
            report.rows,
            report.request,
        )

    @classmethod
    def from_report(cls, raw: object, model: str, now: float) -> CallRecord:
        """From a client's call record in its wire form (CallReport.from_msg): untrusted plain data,
        every field of its type and within its bounds, else RecordError, a ValueError (the record
        is dropped). It moves no reputation and no money: a client that lies skews the
        dashboard's figures (calls, tokens/s, latency), nothing more."""
        return cls.of(CallReport.from_msg(raw), model, now)


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
    passes: deque = field(default_factory=deque)  # (time, model, drafted, kept)
    paths: dict[str, dict[str, tuple[str, float, float]]] = field(default_factory=dict)  # worker -> client -> row
    max_path_workers: int = 4_096
    max_path_clients: int = 64  # per worker

    def add_calls(self, records: Iterable[CallRecord]) -> None:
        for r in records:
            self.calls.append(r)
            self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, r.seconds)] += 1
            self.latency_sum += r.seconds
            self.counts["hedges"] = self.counts.get("hedges", 0) + r.hedges
            self.count(f"quorum_{r.outcome}")  # ok, checked, caught, retried, failed (neuro_quorum_total)
        while len(self.calls) > self.max_calls:
            self.calls.popleft()

    def add_passes(self, model: str, passes: Iterable[PassReport], now: float) -> None:
        """Speculative passes a client reports (its own word: they move nothing but this figure)."""
        for p in passes:
            self.passes.append((now, str(model), p.drafted, p.kept))
            self.count("speculative_passes")
            self.count("speculative_drafted", p.drafted)
            self.count("speculative_kept", p.kept)
        while len(self.passes) > self.max_calls:
            self.passes.popleft()

    def add_paths(self, client: str, paths: Iterable[PathReport], now: float) -> None:
        """How `client` (peer_key: its certificate, or its host) reaches workers: (path, rtt ms,
        when), the newest kept. Its own word: it moves nothing but the path column."""
        for p in paths:
            by_client = self.paths.pop(p.worker, {})  # re-inserted: the dict stays oldest-first
            by_client.pop(client, None)
            by_client[client] = (p.path, p.rtt_ms, now)
            while len(by_client) > self.max_path_clients:
                by_client.pop(next(iter(by_client)))
            self.paths[p.worker] = by_client
        while len(self.paths) > self.max_path_workers:
            self.paths.pop(next(iter(self.paths)))

    def paths_to(self, worker: str, now: float, window: float = 600.0) -> dict[str, int]:
        """{path: clients} of the clients that reported reaching `worker` within `window` s."""
        out: dict[str, int] = {}
        for path, _, when in self.paths.get(worker, {}).values():
            if now - when <= window:
                out[path] = out.get(path, 0) + 1
        return out

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
