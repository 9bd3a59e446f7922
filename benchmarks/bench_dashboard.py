"""The dashboard at scale: every chart's update() with 1,000 workers registered.

    .venv/bin/python benchmarks/bench_dashboard.py [--workers 1000]

A real Dask scheduler with the neuro_scheduler preload, in this process. The workers are
lightweight: registered with the plugin (capacity, reputation, placement, served experts) the
way add_worker and experts_loaded would, without 1,000 worker servers. A model of 32 layers x 64
experts is placed on them with 2 replicas, 2,000 calls and 5,000 trust events are in the feed.
Target (issue: the network page stays responsive): NetworkTable.update() under 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time

from distributed import Scheduler

from neuro_dask.dashboard import charts
from neuro_dask.dashboard.feed import CallRecord
from neuro_dask.scheduler.coordinator import PublishedModel
from neuro_dask.scheduler.placement import WorkerCapacity


def populate(plugin, workers: int, rng: random.Random) -> None:
    c = plugin.coordinator
    for i in range(workers):
        address = f"tcp://10.0.{i // 250}.{i % 250}:9000"
        capacity = WorkerCapacity(address, 8 * 2**30, rng.uniform(5, 50), f"owner{i % 300}")
        c.workers[address], c.serving[address] = capacity, set()
        plugin.identity[address] = f"w{i}"
        plugin.reputation.join(f"w{i}", capacity.owner, trusted=i < 3, now=0.0)
    experts = {(layer, e): 50_000_000 for layer in range(32) for e in range(64)}
    c.model_published(PublishedModel("bench-model", "/nowhere", experts))
    for address, keys in c.placement.assignments().items():
        c.serving[address] = set(keys)
    addresses = list(c.workers)
    plugin.feed.add_calls(
        CallRecord(
            time.time(),
            "bench-model",
            rng.randrange(32),
            4,
            tuple(rng.sample(addresses, 3)),
            rng.uniform(0.002, 0.05),
            5,
            0,
            "ok",
            "direct",
        )
        for _ in range(2_000)
    )
    for i in range(5_000):
        plugin.events.append(
            {
                "time": time.time(),
                "topic": "neuro-trust",
                "action": rng.choice(["invalid", "late"]),
                "worker": rng.choice(addresses),
                "reputation": rng.random(),
                "cause_id": str(i),
            }
        )


def timed(chart, rounds: int = 10) -> float:
    chart.update()  # the first build of the data
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        chart.update()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


async def main(workers: int) -> int:
    async with Scheduler(dashboard_address=None, preload=["neuro_scheduler"], port=0) as scheduler:
        plugin = scheduler.extensions["neuro"]
        started = time.perf_counter()
        populate(plugin, workers, random.Random(0))
        print(f"command: python {' '.join(sys.argv)}")
        print(f"{workers} workers registered and a 32 x 64 model placed in {time.perf_counter() - started:.1f} s")
        for cls in (
            charts.NetworkTable,
            charts.ExpertHeatmap,
            charts.CallStream,
            charts.TrustFeed,
            charts.ReputationChart,
            charts.Economy,
        ):
            ms = timed(cls(plugin))
            note = "  (target < 200 ms)" if cls is charts.NetworkTable else ""
            print(f"{cls.__name__:18s} update() median {ms:7.1f} ms{note}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1_000)
    sys.exit(asyncio.run(main(parser.parse_args().workers)))
