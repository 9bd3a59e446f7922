"""What a soak measured: one record per request, and the summary and plot made from them. Pure.

A request is complete when it returned an answer, correct when that answer equals the local
reference run's, wrong when it returned a different one (the worst outcome: trust failed),
failed when it raised or timed out (the network lost it). Every failure is kept with its kind
(the exception's class) and first line, so a run says what went wrong, not only how often.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RequestRecord:
    via: str  # gateway | generate | map
    started: float  # seconds after the run started
    seconds: float
    outcome: str  # correct | wrong | failed
    error: str = ""  # failed: "ExceptionClass: first line"
    prompts: int = 1


def quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(records: Iterable[RequestRecord], network: Mapping | None = None) -> dict:
    """Completion and correctness rates, latency quantiles per request (all, and per way in),
    failures by kind, and whatever `network` figures the shell collected (hedges, catches...)."""
    records = list(records)
    n = len(records)
    outcomes = Counter(r.outcome for r in records)
    ok = [r.seconds for r in records if r.outcome == "correct"]
    by_via = {}
    for via in sorted({r.via for r in records}):
        mine = [r for r in records if r.via == via]
        done = [r.seconds for r in mine if r.outcome == "correct"]
        by_via[via] = {
            "requests": len(mine),
            "correct": sum(r.outcome == "correct" for r in mine),
            "p50_s": quantile(done, 0.5),
            "p99_s": quantile(done, 0.99),
        }
    failures = Counter(r.error.split(":", 1)[0] for r in records if r.outcome == "failed")
    return {
        "requests": n,
        "correct": outcomes["correct"],
        "wrong": outcomes["wrong"],
        "failed": outcomes["failed"],
        "completion_rate": outcomes["correct"] / n if n else math.nan,
        "p50_s": quantile(ok, 0.5),
        "p99_s": quantile(ok, 0.99),
        "by_via": by_via,
        "failures": dict(failures.most_common()),
        "first_failures": [r.error for r in records if r.outcome == "failed"][:10],
        **({"network": dict(network)} if network else {}),
    }


def records_json(records: Iterable[RequestRecord]) -> list[dict]:
    return [asdict(r) for r in records]


def svg_timeline(records: Sequence[RequestRecord], faults: Iterable, seconds: float, title: str) -> str:
    """A plain SVG: each request's latency at its start time (green correct, red wrong, black x
    failed), and a grey line at each fault (kills; the scheduler restart dashed)."""
    width, height, left, bottom, top, right = 900, 380, 60, 60, 30, 20
    worst = max([r.seconds for r in records] + [1.0])
    ceiling = 10 ** math.ceil(math.log10(worst)) if worst > 0 else 1.0
    ceiling = ceiling / 2 if worst <= ceiling / 2 else ceiling

    def x(t: float) -> float:
        return left + (width - left - right) * min(max(t, 0.0), seconds) / seconds

    def y(s: float) -> float:
        return height - bottom - (height - top - bottom) * min(s, ceiling) / ceiling

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
        f'<text x="{left}" y="18" font-size="14">{_escape(title)}</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
    ]
    for i in range(5):
        s = ceiling * i / 4
        parts.append(f'<text x="{left - 6}" y="{y(s) + 4:.1f}" text-anchor="end">{s:g} s</text>')
    for i in range(6):
        t = seconds * i / 5
        parts.append(f'<text x="{x(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{t:.0f} s</text>')
    for f in faults:
        dash = ' stroke-dasharray="6,3" stroke-width="2"' if f.kind != "kill" else ""
        at = f"{x(f.at):.1f}"
        parts.append(f'<line x1="{at}" y1="{top}" x2="{at}" y2="{height - bottom}" stroke="#bbb"{dash}/>')
    colors = {"correct": "#2ca02c", "wrong": "#d62728"}
    for r in records:
        cx, cy = x(r.started), y(r.seconds)
        if r.outcome == "failed":
            parts.append(f'<text x="{cx:.1f}" y="{cy + 4:.1f}" text-anchor="middle" fill="black">x</text>')
        else:
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2.5" fill="{colors[r.outcome]}"/>')
    parts.append(
        f'<text x="{left}" y="{height - 12}">seconds per request (green: correct, red: wrong, x: failed) at its '
        "start; grey lines: a worker killed; dashed: the scheduler restarted</text></svg>"
    )
    return "\n".join(parts)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
