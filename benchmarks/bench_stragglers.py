"""Per-layer latency with stragglers, trust and hedging on: fault-free vs 5% of calls 10x slow.

    .venv/bin/python benchmarks/bench_stragglers.py [--replicas N] [--transport futures] [--blocking]

In-process cluster of 4 workers (worker 0 trusted; the default replica count, 2, unless
--replicas), a random tiny Mixtral (hidden 64, 3 layers, 8 experts), 5 x 10 prompts x 32 greedy
tokens (480 layer calls per run; two runs per side, interleaved, 960 layers pooled per side, so
p99 is not just the maximum), measured in the steady state:
warm-up generations run until every worker's calls are replicated only at the spot-check
rate (a streak of 400 validated results; at most 60 warm-ups).
The fault-free run is measured first; its median call time sets the straggle: every worker then
answers 10 x that median late on 5% of its calls (each call independently; with --blocking the
worker is held meanwhile, so calls queued behind a straggle are late too). Target (issue 22,
docs/trust.md): p99 per layer with stragglers <= 2 x the fault-free p50 (at most 1% of layers
over it), with at most 10% extra calls; the fault-free run's own share over it is printed too,
as this machine's noise floor. Writes the figures to benchmarks/results/stragglers.json too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dask
import torch
from distributed import Client

import neuro_dask as nd
from neuro_dask.client.cluster import local_cluster
from neuro_dask.store.synthetic import mixtral_config, write_random_mixtral

GENERATIONS = 5
ROUNDS = 2  # fault-free and straggling clusters alternate this many times
STRAGGLE_SHARE = 0.05
SLOWDOWN = 10
TRUST = {"neuro.scheduler.trusted": ["0"], "neuro.client.trust": True, "neuro.client.seed": 0}
STEADY_STREAK = 400  # establish_after / spot_check = 20 / 0.05: replication at its floor


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def steady(client) -> bool:
    """Steady state: every worker's record long enough that its calls are replicated only at the
    spot-check rate (a trusted worker always is)."""
    workers = client.sync(client.scheduler.neuro_status)["workers"].values()
    return all(w["trust_trusted"] or w["trust_consecutive_valid"] >= STEADY_STREAK for w in workers)


def run(path, prompts, adversary, replicas: int | None, transport: str) -> dict:
    args = ["--neuro-no-benchmark"] + (["--neuro-adversary", json.dumps(adversary)] if adversary else [])
    settings = {**TRUST, "neuro.client.transport": transport}
    with (
        dask.config.set(settings),
        local_cluster(4, processes=False, replicas=replicas, worker_args=args, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(4)
        with nd.load(path, client=client) as model:
            warmups = 0
            while warmups < 60 and not steady(client):
                model.generate(prompts, max_new_tokens=16)
                model.executor.flush_reports()
                warmups += 1
            runner, executor = model.executor.trusted, model.executor
            executor.layer_seconds.clear()
            runner.latency.everyone.clear()
            hedges, calls = runner.hedges, runner.latency.calls
            for _ in range(GENERATIONS):
                model.generate(prompts, max_new_tokens=32)
            ms = [1000 * t for t in executor.layer_seconds]
            return {
                "p50_ms": statistics.median(ms),
                "p99_ms": quantile(ms, 0.99),
                "call_p50_ms": 1000 * statistics.median(t for t, _ in runner.latency.everyone),
                "warmups": warmups,
                "ms": ms,
                "steady": steady(client),
                "hedges": runner.hedges - hedges,
                "calls": runner.latency.calls - calls,
            }


def pooled(runs: list[dict]) -> dict:
    """One side's runs as one: every layer's time pooled, counts summed."""
    ms = [t for r in runs for t in r["ms"]]
    return {
        "p50_ms": statistics.median(ms),
        "p99_ms": quantile(ms, 0.99),
        "call_p50_ms": statistics.median(r["call_p50_ms"] for r in runs),
        "warmups": sum(r["warmups"] for r in runs),
        "ms": ms,
        "steady": all(r["steady"] for r in runs),
        "hedges": sum(r["hedges"] for r in runs),
        "calls": sum(r["calls"] for r in runs),
        "p50_ms_each": [r["p50_ms"] for r in runs],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, help="replicas per expert (default: the scheduler's, 2)")
    parser.add_argument("--transport", choices=["direct", "futures"], default="direct")
    parser.add_argument("--blocking", action="store_true", help="a straggle holds the worker")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (3 + i % 7,), generator=g).tolist() for i in range(10)]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_random_mixtral(
            tmp / "hf", mixtral_config(hidden=64, intermediate=128, layers=3, experts=8, vocab=256, heads=4, kv_heads=2)
        )
        nd.shard_checkpoint(tmp / "hf", tmp / "nd")
        # Sides interleaved round by round, layers pooled per side: the first cluster of a
        # process runs slower than later ones, which one clean-then-slow pair would credit to
        # the stragglers' side.
        runs: dict[str, list[dict]] = {"clean": [], "slow": []}
        delay = 0.0
        for _ in range(ROUNDS):
            runs["clean"].append(run(tmp / "nd", prompts, None, args.replicas, args.transport))
            delay = delay or SLOWDOWN * runs["clean"][0]["call_p50_ms"] / 1000
            straggle = {"mode": "straggle", "probability": STRAGGLE_SHARE, "delay": round(delay, 4)}
            runs["slow"].append(
                run(tmp / "nd", prompts, {**straggle, "blocking": args.blocking}, args.replicas, args.transport)
            )
        clean, slow = pooled(runs["clean"]), pooled(runs["slow"])
    ratio = slow["p99_ms"] / clean["p50_ms"]
    extra = slow["hedges"] / max(slow["calls"], 1)
    print(f"command: python {' '.join(sys.argv)}  (load {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)")
    print(f"replicas {args.replicas or 'default (2)'}, {args.transport} transport")
    for name, r in (("fault-free", clean), ("stragglers", slow)):
        print(f"{name}: {r['warmups']} warm-up generations, steady state reached: {r['steady']}")
        print(f"{name}: p50 of each run " + ", ".join(f"{t:.2f} ms" for t in r["p50_ms_each"]))
    print(f"fault-free   call p50 {clean['call_p50_ms']:.2f} ms; stragglers answer {1000 * delay:.1f} ms late")
    print(f"fault-free   p50 {clean['p50_ms']:.2f} ms   p99 {clean['p99_ms']:.2f} ms")
    print(
        f"stragglers   p50 {slow['p50_ms']:.2f} ms   p99 {slow['p99_ms']:.2f} ms   "
        f"extra calls (hedges) {slow['hedges']} of {slow['calls']} ({extra:.1%}; target <= 10%)"
    )
    print(f"p99 with stragglers / fault-free p50 = {ratio:.2f} (target <= 2)")
    for name, r in (("fault-free", clean), ("stragglers", slow)):
        over = sum(t > 2 * clean["p50_ms"] for t in r["ms"])
        print(f"{name}: {over} of {len(r['ms'])} layers ({over / len(r['ms']):.1%}) over 2 x the fault-free p50")
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "args": vars(args),
        "delay_ms": 1000 * delay,
        "ratio": ratio,
        "extra_calls": extra,
        **{f"{name}_{k}": v for name, r in (("clean", clean), ("slow", slow)) for k, v in r.items() if k != "ms"},
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "stragglers.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
