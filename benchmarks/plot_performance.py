"""The plot in docs/performance.md: ms/token against round-trip time, measured and projected.

    .venv/bin/python benchmarks/plot_performance.py

Reads benchmarks/results/latency.json (bench_latency.py: the small model, measured, with
latency-aware routing off and on) and benchmarks/results/projection.json (project_mixtral.py:
Mixtral-8x7B-shaped layers, projected from measured costs) and writes
docs/images/performance-rtt.svg: a plain SVG line chart (no plotting library needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "docs" / "images" / "performance-rtt.svg"
W, H, LEFT, RIGHT, TOP, BOTTOM = 760, 440, 70, 230, 30, 50
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def series() -> list[tuple[str, list[tuple[float, float]], bool]]:
    """(label, [(rtt ms, ms/token)], dashed)"""
    out = []
    latency = json.loads((HERE / "results" / "latency.json").read_text())
    rtts = sorted(latency["rtt_ms"], key=float)
    out.append(
        (
            "small model, all workers at the RTT",
            [(float(r), latency["rtt_ms"][r]["uniform"]["ms_per_token"]) for r in rtts],
            False,
        )
    )
    out.append(
        (
            "small model, half far, routing on",
            [(float(r), latency["rtt_ms"][r]["mixed-on"]["ms_per_token"]) for r in rtts],
            False,
        )
    )
    projection = json.loads((HERE / "results" / "projection.json").read_text())
    for key, label in (
        ("gpu_client_and_workers_ms_per_token", "Mixtral-8x7B, GPU client+workers (proj.)"),
        ("cpu_workers_ms_per_token", "Mixtral-8x7B, this CPU (projected)"),
    ):
        points = [(float(r["rtt_ms"]), r[key]) for r in projection["projection"] if r["wire"] == "bfloat16"]
        out.append((label, points, True))
    return out


def svg(lines: list[tuple[str, list[tuple[float, float]], bool]]) -> str:
    xs = [x for _, pts, _ in lines for x, _ in pts]
    ys = [y for _, pts, _ in lines for _, y in pts] + [167.0, 1000.0]
    x_max = max(xs) * 1.05
    y_lo, y_hi = math.log10(min(ys) * 0.8), math.log10(max(ys) * 1.25)  # log scale: 10 ms to 10 s

    def px(x: float) -> float:
        return LEFT + (W - LEFT - RIGHT) * x / x_max

    def py(y: float) -> float:
        return TOP + (H - TOP - BOTTOM) * (1 - (math.log10(y) - y_lo) / (y_hi - y_lo))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
        f'font-size="12"><rect width="100%" height="100%" fill="white"/>'
    ]
    parts.append(f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="black"/>')
    parts.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="black"/>')
    for x in (0, 10, 20, 30, 40, 50):
        if x <= x_max:
            parts.append(f'<text x="{px(x):.0f}" y="{H - BOTTOM + 16}" text-anchor="middle">{x}</text>')
    for y in (10, 30, 100, 300, 1000, 3000, 10000):
        if y_lo <= math.log10(y) <= y_hi:
            parts.append(f'<line x1="{LEFT}" y1="{py(y):.1f}" x2="{W - RIGHT}" y2="{py(y):.1f}" stroke="#eee"/>')
            parts.append(f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y}</text>')
    parts.append(
        f'<text x="{(LEFT + W - RIGHT) / 2:.0f}" y="{H - 12}" text-anchor="middle">round trip per call (ms)</text>'
    )
    parts.append(
        f'<text x="16" y="{(TOP + H - BOTTOM) / 2:.0f}" transform="rotate(-90 16 {(TOP + H - BOTTOM) / 2:.0f})" '
        'text-anchor="middle">ms per token (log)</text>'
    )
    for name, y in (("Petals BLOOM-176B", 1000.0), ("Petals Llama 2 70B", 167.0)):
        parts.append(
            f'<line x1="{LEFT}" y1="{py(y):.1f}" x2="{W - RIGHT}" y2="{py(y):.1f}" stroke="#999" '
            'stroke-dasharray="2,4"/>'
        )
        parts.append(f'<text x="{W - RIGHT + 6}" y="{py(y) + 4:.1f}" fill="#666">{name} (published)</text>')
    legend_y = H - BOTTOM - 18 * len(lines) - 60  # below the Petals labels
    for i, (label, points, dashed) in enumerate(lines):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for j, (x, y) in enumerate(points))
        dash = ' stroke-dasharray="6,4"' if dashed else ""
        parts.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in points]
        parts.append(
            f'<line x1="{W - RIGHT + 6}" y1="{legend_y + 60 + 18 * i}" x2="{W - RIGHT + 26}" '
            f'y2="{legend_y + 60 + 18 * i}" stroke="{color}" stroke-width="2"{dash}/>'
        )
        parts.append(f'<text x="{W - RIGHT + 30}" y="{legend_y + 64 + 18 * i}" font-size="10">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(svg(series()))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
