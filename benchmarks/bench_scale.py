"""Does it scale to 1,000 volunteers? Four numbers, measured side by side in one run.

    .venv/bin/python benchmarks/bench_scale.py [--workers 1000] [--quick]

A model shaped like Mixtral-8x7B (32 layers x 8 experts, 3 x 4096 x 14336 parameters per expert,
352 MB at fp16) is placed with 2 replicas on simulated volunteers with budgets of 1 to 12 GiB
(most 2 to 8), speeds 5 to 50 and about 0.6 owners per worker (neuro_dask/testing/simulated.py).
No weights are loaded anywhere: a LoadExperts action is answered as if the worker had loaded.

1. Re-placement on a join or a leave (target <= 50 ms):
   a. the pure Coordinator: worker_left of a worker that hosts experts (they are re-homed),
      worker_joined of a new one, and report_load that makes experts hot (extra replicas);
   b. through Dask: 1,000 simulated workers connect with Dask's own Scheduler.add_worker handler
      (a SimulatedComm in place of the socket: Dask builds the WorkerState, runs the plugin hooks
      and replies), one drops its connection (Dask's remove_worker), a new one joins. Timed: the
      neuro plugin's hook, and Dask's whole handling (call -> reply, drop -> removed).
2. Task throughput, plain Dask vs Dask with the neuro preloads (target: costs <= 10%): two
   in-process clusters in one event loop (a Scheduler and 2 one-thread Workers each; the neuro one
   with `preload=["neuro_scheduler"]` and workers with `neuro_worker --neuro-no-benchmark`),
   tiny tasks through client.map, rounds alternating which cluster goes first; medians.
3. Routes served to a client (target <= 5 ms): a real Client's `scheduler.neuro_routes` round
   trip against the scheduler of 1b, and the handler's own time; a no-op handler's round trip
   on the same connection is the floor. Standings are rebuilt only for workers whose reputation
   record changed, so the same series runs again with every standing rebuilt (the worst case).
4. The dashboard: NetworkTable.update() over the scheduler of 1b (bench_dashboard's method;
   target < 200 ms).

Writes benchmarks/results/scale.json. Timings are this machine's; CI never asserts on them.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

import distributed
import msgpack
from distributed import Client, Scheduler, Worker

from neuro_dask.dashboard import charts
from neuro_dask.scheduler.coordinator import Coordinator, LoadExperts, PublishedModel
from neuro_dask.scheduler.placement import PlacementPolicy, WorkerCapacity
from neuro_dask.testing.simulated import (
    MIXTRAL_EXPERT_BYTES_FP16,
    disconnect,
    mixtral_shaped_experts,
    register_simulated_worker,
    simulated_address,
    simulated_capacities,
)

HERE = Path(__file__).resolve().parent
MODEL = "mixtral-8x7b-shaped"


def inc(x: int) -> int:
    return x + 1


def ms(seconds: float) -> float:
    return 1000.0 * seconds


class GcWatch:
    """Counts full (generation 2) garbage collections and their pauses, through gc.callbacks.

    A full collection walks every tracked object of the process (Dask's scheduler with 1,000
    WorkerStates: hundreds of thousands), so whichever code allocates at that moment pays
    100-300 ms. Samples it landed in are reported apart from the others."""

    def __init__(self):
        self.full, self.pauses, self._started = 0, [], 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.full += 1
            self.pauses.append(time.perf_counter() - self._started)


GC = GcWatch()


class Samples(list):
    """(seconds, a full collection ran during it) pairs."""

    def timed(self, started: float, full_before: int) -> None:
        self.append((time.perf_counter() - started, GC.full != full_before))


def summary(samples) -> dict[str, float]:
    """Median, p95 and max in ms; the max again without the samples a full collection hit."""
    values = sorted(t if isinstance(t, float) else t[0] for t in samples)
    clean = sorted(t[0] for t in samples if not isinstance(t, float) and not t[1]) or values
    return {
        "median_ms": ms(statistics.median(values)),
        "p95_ms": ms(values[int(0.95 * (len(values) - 1))]),
        "max_ms": ms(values[-1]),
        "max_without_full_gc_ms": ms(clean[-1]),
        "full_gc_hits": sum(1 for t in samples if not isinstance(t, float) and t[1]),
        "n": len(values),
    }


# ---- 1a. the pure coordinator ------------------------------------------------------------------


def serve_actions(coordinator: Coordinator, actions) -> None:
    """Every LoadExperts answered at once, as if the worker had loaded."""
    for action in actions:
        if isinstance(action, LoadExperts):
            coordinator.experts_loaded(action.worker, action.model, action.experts)


def hot_load(layers: int, experts: int) -> dict[tuple, float]:
    """Two experts per layer called 10 x as often as the others (hot at the default threshold 2)."""
    return {(MODEL, layer, e): (10.0 if e < 2 else 1.0) for layer in range(layers) for e in range(experts)}


def bench_coordinator(workers: int, churn: int, rng: random.Random) -> dict:
    caps = simulated_capacities(workers, rng)
    c = Coordinator(PlacementPolicy(replicas=2))
    started = time.perf_counter()
    for cap in caps:
        c.worker_joined(cap)
    joins_empty = time.perf_counter() - started
    experts = mixtral_shaped_experts()
    started = time.perf_counter()
    actions = c.model_published(PublishedModel(MODEL, "memory://nowhere", experts))
    publish = time.perf_counter() - started
    serve_actions(c, actions)

    leave, join, leave_idle, moved = Samples(), Samples(), Samples(), []
    for i in range(churn):
        hosting = sorted(a for a, keys in c.placement.assignments().items() if keys)
        idle = sorted(a for a, keys in c.placement.assignments().items() if not keys)
        address = rng.choice(hosting)
        full, started = GC.full, time.perf_counter()
        actions = c.worker_left(address)
        leave.timed(started, full)
        moved.append(sum(len(a.experts) for a in actions if isinstance(a, LoadExperts)))
        serve_actions(c, actions)
        if idle:
            full, started = GC.full, time.perf_counter()
            c.worker_left(rng.choice(idle))
            leave_idle.timed(started, full)
        newcomer = simulated_capacities(1, rng)[0]
        newcomer = WorkerCapacity(
            simulated_address(workers + i), newcomer.memory_budget, newcomer.speed, newcomer.owner
        )
        full, started = GC.full, time.perf_counter()
        actions = c.worker_joined(newcomer)
        join.timed(started, full)
        serve_actions(c, actions)

    load = hot_load(32, 8)
    started = time.perf_counter()
    actions = c.report_load(load)
    hot_first = time.perf_counter() - started
    extra = sum(len(a.experts) for a in actions if isinstance(a, LoadExperts))
    serve_actions(c, actions)
    steady = Samples()
    for _ in range(churn):
        full, started = GC.full, time.perf_counter()
        c.report_load(load)
        steady.timed(started, full)
    started = time.perf_counter()
    c.routes(MODEL)
    routes_core = time.perf_counter() - started
    return {
        "workers": len(c.workers),
        "experts": len(experts),
        "joins_without_model_s": joins_empty,
        "publish_ms": ms(publish),
        "leave_hosting": summary(leave),
        "experts_rehomed_per_leave": statistics.mean(moved),
        "leave_idle": summary(leave_idle),
        "join": summary(join),
        "hot_first_ms": ms(hot_first),
        "hot_extra_replicas": extra,
        "hot_steady": summary(steady),
        "routes_core_ms": ms(routes_core),
    }


# ---- 2. task throughput, plain vs neuro --------------------------------------------------------


async def drain(scheduler) -> None:
    """Wait (polling state) until the scheduler has forgotten every task of the last round."""
    while scheduler.tasks:
        await asyncio.sleep(0.005)


async def throughput_phase(order: list[str], tasks: int, rounds: int, rates: dict[str, list[float]]) -> None:
    """Both clusters up (created in `order`), `rounds` rounds each, alternating which goes first."""
    kw = {"dashboard": False, "dashboard_address": ":0", "port": 0}
    wkw = {"nthreads": 1, "dashboard": False}
    neuro_worker = {"preload": ["neuro_worker"], "preload_argv": ["--neuro-no-benchmark"]}
    clusters = {}
    async with AsyncExitStack() as stack:
        for name in order:
            neuro = name == "neuro"
            s = await stack.enter_async_context(Scheduler(preload=["neuro_scheduler"] if neuro else [], **kw))
            ws = [
                await stack.enter_async_context(Worker(s.address, **wkw, **(neuro_worker if neuro else {})))
                for _ in range(2)
            ]
            assert all(("neuro" in w.extensions) == neuro for w in ws) and ("neuro" in s.extensions) == neuro
            client = await Client(s.address, asynchronous=True, set_as_default=False)
            stack.push_async_callback(client.close)
            clusters[name] = (s, client)
            await client.gather(client.map(inc, range(min(tasks, 500)), pure=False))  # warm-up, not counted
            await drain(s)
        assert len(clusters["neuro"][0].extensions["neuro"].coordinator.workers) == 2
        for r in range(rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                s, client = clusters[name]
                started = time.perf_counter()
                results = await client.gather(client.map(inc, range(tasks), pure=False))
                rates[name].append(tasks / (time.perf_counter() - started))
                assert results[-1] == tasks
                del results
                await drain(s)


async def bench_throughput(tasks: int, rounds: int) -> dict:
    """Half the rounds with the plain cluster created first, half with the neuro one first: in an
    A/A run (two plain clusters) the one created first was ~3% faster."""
    rates: dict[str, list[float]] = {"plain": [], "neuro": []}
    await throughput_phase(["plain", "neuro"], tasks, (rounds + 1) // 2, rates)
    await throughput_phase(["neuro", "plain"], tasks, rounds // 2, rates)
    plain_rate, neuro_rate = statistics.median(rates["plain"]), statistics.median(rates["neuro"])
    return {
        "tasks_per_round": tasks,
        "rounds": rounds,
        "workers_per_cluster": 2,
        "plain_tasks_per_s": plain_rate,
        "neuro_tasks_per_s": neuro_rate,
        "plain_rounds": rates["plain"],
        "neuro_rounds": rates["neuro"],
        "neuro_cost_fraction": 1.0 - neuro_rate / plain_rate,
    }


# ---- 1b, 3, 4. one scheduler with the neuro preload and 1,000 simulated workers ---------------


class Timed:
    """Wraps a callable and keeps the seconds of each call."""

    def __init__(self, fn):
        self.fn, self.times = fn, Samples()
        functools.update_wrapper(self, fn)  # Dask reads a handler's __name__

    def __call__(self, *args, **kwargs):
        full, started = GC.full, time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.times.append((time.perf_counter() - started, GC.full != full))


async def bench_scheduler(workers: int, churn: int, route_calls: int, rng: random.Random, neuro: bool = True) -> dict:
    """1b, 3 and 4 with the neuro preload; with neuro=False only 1b's whole Dask timings, for plain Dask."""
    kw = {"dashboard": False, "dashboard_address": ":0", "port": 0}
    async with Scheduler(preload=["neuro_scheduler"] if neuro else [], **kw) as s:
        plugin = s.extensions.get("neuro")
        sent: Counter = Counter()
        if neuro:

            async def send(action) -> None:  # in place of the rpc to a worker that has no server
                sent[type(action).__name__] += 1
                if isinstance(action, LoadExperts):  # the worker loads and reports, as neuro_worker does
                    plugin.experts_loaded(None, action.worker, action.model, [list(p) for p in action.experts], [])

            plugin._send = send
            plugin.add_worker = add_hook = Timed(plugin.add_worker)
            plugin.remove_worker = remove_hook = Timed(plugin.remove_worker)

        async def settled() -> None:
            while neuro and plugin._tasks:  # the sends of the last decision (polling state)
                await asyncio.sleep(0.001)

        connected: dict[str, tuple] = {}
        register = Samples()
        started = time.perf_counter()
        for i, cap in enumerate(simulated_capacities(workers, rng)):
            full = GC.full
            task, comm, took = await register_simulated_worker(s, cap, f"sim-{i}")
            connected[cap.address] = (task, comm)
            register.append((took, GC.full != full))
        result: dict = {"connect_all_s": time.perf_counter() - started, "register_all": summary(register)}

        if neuro:
            result["join_hook_without_model"] = summary(add_hook.times)
            add_hook.times.clear()
            started = time.perf_counter()
            plugin._enact(
                plugin.coordinator.model_published(PublishedModel(MODEL, "memory://nowhere", mixtral_shaped_experts()))
            )
            result["publish_ms"] = ms(time.perf_counter() - started)
            await asyncio.sleep(0)
            await settled()  # every planned replica has reported loaded
            assert not plugin.coordinator.routes(MODEL).missing

        drop_total, join_total = Samples(), Samples()
        for i in range(churn):
            if neuro:
                planned = plugin.coordinator.placement.assignments()
                address = rng.choice(sorted(a for a, keys in planned.items() if keys))
            else:
                address = rng.choice(sorted(connected))
            full, started = GC.full, time.perf_counter()
            await disconnect(*connected.pop(address))
            drop_total.timed(started, full)
            fresh = simulated_capacities(1, rng)[0]
            fresh = WorkerCapacity(simulated_address(workers + i), fresh.memory_budget, fresh.speed, fresh.owner)
            full = GC.full
            task, comm, took = await register_simulated_worker(s, fresh, f"sim-{workers + i}")
            connected[fresh.address] = (task, comm)
            join_total.append((took, GC.full != full))
            await settled()
        assert len(s.workers) == workers
        result.update({"drop_dask_total": summary(drop_total), "join_dask_total": summary(join_total)})

        if neuro:
            assert len(plugin.coordinator.workers) == workers and not plugin.coordinator.routes(MODEL).missing
            result.update(
                {
                    "remove_hook": summary(remove_hook.times),
                    "add_hook": summary(add_hook.times),
                    "messages_to_workers": dict(sent),
                }
            )
            result.update(await bench_routes(s, route_calls))
            from bench_dashboard import timed  # bench_dashboard's method: 10 updates, median

            result["network_table_ms"] = timed(charts.NetworkTable(plugin))
            result["neuro_workers"] = len(plugin.coordinator.workers)
            plugin.coordinator.models.clear()  # tear-down: no re-planning of 256 experts per leaving worker
        result["scheduler_workers"] = len(s.workers)
        for _task, comm in connected.values():
            comm.abort()
        await asyncio.gather(*(task for task, _ in connected.values()))
        return result


async def bench_routes(s, route_calls: int) -> dict:
    """A real Client's neuro_routes round trips, the handler's own time, and a no-op's round trip."""
    s.handlers["neuro_routes"] = handler = Timed(s.handlers["neuro_routes"])
    s.handlers["bench_noop"] = lambda: "OK"
    client = await Client(s.address, asynchronous=True, set_as_default=False)
    try:
        reply = await client.scheduler.neuro_routes(model=MODEL)
        assert reply["status"] == "OK" and len(reply["routes"]) == 256, reply.get("message")
        handler.times.clear()
        rtt, noop, cold = Samples(), Samples(), Samples()
        plugin = s.extensions["neuro"]
        for _ in range(route_calls):
            full, started = GC.full, time.perf_counter()
            await client.scheduler.bench_noop()
            noop.timed(started, full)
            full, started = GC.full, time.perf_counter()
            await client.scheduler.neuro_routes(model=MODEL)
            rtt.timed(started, full)
        warm_handler = handler.times
        handler.times = Samples()
        for _ in range(route_calls):  # as if every routed worker's reputation changed since the last request
            plugin._standings.clear()
            full, started = GC.full, time.perf_counter()
            await client.scheduler.neuro_routes(model=MODEL)
            cold.timed(started, full)
    finally:
        await client.close()
    return {
        "routes_rtt": summary(rtt),
        "routes_handler": summary(warm_handler),
        "noop_rtt": summary(noop),
        "routes_rtt_standings_rebuilt": summary(cold),
        "routes_handler_standings_rebuilt": summary(handler.times),
        "routes_reply_bytes": len(msgpack.dumps(reply)),
        "routes_workers_named": len(reply["standing"]),
    }


# ---- report ------------------------------------------------------------------------------------


def report(r: dict, command: str) -> list[str]:
    c, s, p, t = r["coordinator"], r["scheduler"], r["plain_scheduler"], r["throughput"]

    def row(measure: str, d: dict | str, target: float | None = None, key: str = "max_without_full_gc_ms") -> str:
        if isinstance(d, str):
            return f"| {measure} | {d} | | | |"
        value = f"{d['median_ms']:.2f} | {d['p95_ms']:.2f} | {d['max_ms']:.2f}"
        if d.get("full_gc_hits"):
            value += f" ({d['max_without_full_gc_ms']:.2f} without the {d['full_gc_hits']} full-GC samples)"
        met = "" if target is None else f"<= {target:g} ms: {'yes' if d[key] <= target else 'NO'}"
        return f"| {measure} | {value} | {met} |"

    n = s["neuro_workers"]
    pauses = sorted(r["gc"]["full_pauses_ms"])
    cost = t["neuro_cost_fraction"]
    return [
        f"command: {command}",
        "",
        "| measure | median ms | p95 ms | max ms | target |",
        "| --- | --- | --- | --- | --- |",
        row(
            f"1a. Coordinator.worker_left, hosting worker ({c['experts_rehomed_per_leave']:.1f} experts re-homed)",
            c["leave_hosting"],
            50,
        ),
        row("1a. Coordinator.worker_left, idle worker", c["leave_idle"], 50),
        row("1a. Coordinator.worker_joined", c["join"], 50),
        f"| 1a. Coordinator.report_load, 64 experts turn hot (+{c['hot_extra_replicas']} replicas) "
        f"| {c['hot_first_ms']:.2f} | | | <= 50 ms: {'yes' if c['hot_first_ms'] <= 50 else 'NO'} |",
        row("1a. Coordinator.report_load, steady", c["hot_steady"], 50),
        row(f"1b. neuro remove_worker hook ({n} workers in Dask)", s["remove_hook"], 50),
        row("1b. neuro add_worker hook", s["add_hook"], 50),
        row("1b. Dask with neuro: connection dropped -> worker removed", s["drop_dask_total"]),
        row("1b. plain Dask: connection dropped -> worker removed", p["drop_dask_total"]),
        row("1b. Dask with neuro: add_worker -> reply", s["join_dask_total"]),
        row("1b. plain Dask: add_worker -> reply", p["join_dask_total"]),
        f"| 2. tasks/s plain Dask / with neuro preloads ({t['tasks_per_round']:,} tasks x {t['rounds']} rounds) "
        f"| {t['plain_tasks_per_s']:,.0f} / {t['neuro_tasks_per_s']:,.0f} | | | |",
        f"| 2. neuro cost, 1 - neuro/plain | {100 * cost:+.1f}% | | | <= 10%: {'yes' if cost <= 0.10 else 'NO'} |",
        row(
            f"3. neuro_routes round trip, real Client ({s['routes_reply_bytes']:,} bytes, "
            f"{s['routes_workers_named']} workers)",
            s["routes_rtt"],
            5,
            key="median_ms",
        ),
        row("3. neuro_routes handler alone", s["routes_handler"]),
        row(
            "3. neuro_routes round trip, every standing rebuilt", s["routes_rtt_standings_rebuilt"], 5, key="median_ms"
        ),
        row("3. neuro_routes handler alone, every standing rebuilt", s["routes_handler_standings_rebuilt"]),
        row("3. no-op handler round trip (floor)", s["noop_rtt"]),
        f"| 4. NetworkTable.update(), {n} workers | {s['network_table_ms']:.1f} | | | < 200 ms: "
        f"{'yes' if s['network_table_ms'] < 200 else 'NO'} |",
        "",
        f"full collections during the run: {len(pauses)}, pauses (ms): " + ", ".join(f"{x:.0f}" for x in pauses),
    ]


async def main(args) -> int:
    gc.callbacks.append(GC)
    rng = random.Random(args.seed)
    quick = args.quick
    churn = 10 if quick else 40
    results = {
        "command": f"python {' '.join(sys.argv)}",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "distributed": distributed.__version__,
            "platform": platform.platform(),
            "load_average_at_start": os.getloadavg(),
        },
        "expert_bytes": MIXTRAL_EXPERT_BYTES_FP16,
        "quick": quick,
    }
    results["throughput"] = await bench_throughput(1_000 if quick else args.tasks, 4 if quick else args.rounds)
    results["coordinator"] = bench_coordinator(args.workers, churn, rng)
    results["scheduler"] = await bench_scheduler(args.workers, churn, 30 if quick else 200, rng)
    results["plain_scheduler"] = await bench_scheduler(args.workers, churn, 0, random.Random(args.seed), neuro=False)
    results["gc"] = {"full_collections": GC.full, "full_pauses_ms": [ms(x) for x in GC.pauses]}
    results["machine"]["load_average_at_end"] = os.getloadavg()
    for line in report(results, results["command"]):
        print(line)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "scale.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1_000)
    parser.add_argument("--tasks", type=int, default=5_000, help="tiny tasks per throughput round")
    parser.add_argument("--rounds", type=int, default=8, help="throughput rounds per cluster")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer tasks, rounds and churn events")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    sys.exit(asyncio.run(main(parser.parse_args())))
