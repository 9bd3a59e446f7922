"""What the scheduler takes from the reports of workers and clients, bounded.

Pure: a report's plain values in, what counts out. The `neuro_scheduler` plugin hands what
counts to the coordinator and keeps the rest for its replies and the dashboard.

Rules:
1. A joining worker's capacity is its announced memory budget, speed (0 reads as 1.0: a worker
   that skipped its benchmark) and owner; it is operator-trusted when its name or its address is
   in `neuro.scheduler.trusted`.
2. Load reports count only published experts, each at most `cap` calls per report: a claim that
   only moves where replicas go, bounded so one client cannot make every expert hot at once.
3. Of a worker's load failures, at most MAX_FAILURES are read; a reason is kept only for a
   published expert, attributed to the worker and cut to MAX_REASON characters (clients see it
   only once every live worker failed that expert: coordinator.unloadable).
4. A pause reason is cut to MAX_PAUSE_REASON characters; only a change of state (paused <->
   serving) changes routes and is announced.
5. A probe needs the model's hidden size (> 0) to build its zero row; a worker that answers
   "paused..." passes (its owner is busy, it is not unreachable).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from neuro_dask.scheduler.placement import WorkerCapacity

MAX_FAILURES = 1000
MAX_REASON = 300
MAX_PAUSE_REASON = 200


def capacity_of(address: str, info: Mapping[str, Any]) -> WorkerCapacity:
    """Rule 1: what a worker's `neuro` startup information offers."""
    return WorkerCapacity(
        address, int(info["memory_budget"]), float(info["speed"]) or 1.0, str(info.get("owner") or "")
    )


def operator_trusted(name: str, address: str, trusted: Collection[str]) -> bool:
    """Rule 1: the operator named this worker (by name or address) as trusted."""
    return name in trusted or address in trusted


def counted_load(
    model: str, load: Iterable[Iterable[Any]], published: Collection[tuple[int, int]], cap: float
) -> dict[tuple[str, int, int], float]:
    """Rule 2: (model, layer, expert) -> calls, for the published experts of a [layer, expert, calls] list."""
    return {(model, int(l), int(e)): min(float(n), cap) for l, e, n in load if (int(l), int(e)) in published}


def load_failure_reasons(
    worker: str, model: str, failed: Iterable[Iterable[Any]], published: Collection[tuple[int, int]] | None
) -> dict[tuple[str, int, int], str]:
    """Rule 3: (model, layer, expert) -> the worker's reason, for a [layer, expert, why] list."""
    reasons = {}
    for l, e, why in list(failed)[:MAX_FAILURES]:
        if published is not None and (int(l), int(e)) in published:
            reasons[(model, int(l), int(e))] = f"{worker} says: {str(why)[:MAX_REASON]}"
    return reasons


def pause_reason(reason: object) -> str:
    """Rule 4: the reason kept and announced."""
    return str(reason)[:MAX_PAUSE_REASON]


def pause_changed(was_paused: bool, paused: object) -> bool:
    """Rule 4: the worker's state flips (only then do routes change)."""
    return was_paused != bool(paused)


def probe_width(summary: Mapping[str, Any]) -> int:
    """Rule 5: the hidden size of the probe's zero row; <= 0: the model cannot be probed."""
    return int(summary.get("hidden_size") or 0)


def paused_reply(reply: object) -> bool:
    """Rule 5: the worker refused because its owner paused it (the probe passes)."""
    return isinstance(reply, dict) and str(reply.get("message", "")).startswith("paused")
