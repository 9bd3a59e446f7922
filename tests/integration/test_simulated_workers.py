"""Simulated volunteers (neuro_dask/testing/simulated.py) through Dask's own add_worker and
remove_worker, with the neuro_scheduler preload: the plugin sees them as it sees real workers, and
a real Client gets routes that name only serving, staked workers, best reputation first.

benchmarks/bench_scale.py measures this set-up with 1,000 workers; here 40 keep it fast."""

from __future__ import annotations

import asyncio
import random

from polling import async_poll_until

from neuro_dask.protocol.messages import ExpertsLoaded
from neuro_dask.scheduler.coordinator import LoadExperts, PublishedModel
from neuro_dask.testing.simulated import (
    disconnect,
    mixtral_shaped_experts,
    register_simulated_worker,
    simulated_capacities,
)


async def _network(s, n: int):
    plugin = s.extensions["neuro"]
    sent = []

    async def send(action) -> None:  # the simulated worker loads at once and reports
        sent.append(action)
        if isinstance(action, LoadExperts):
            plugin.experts_loaded(None, ExpertsLoaded(action.worker, action.model, tuple(action.experts)))

    plugin.send_action = send
    connected = {}
    for i, cap in enumerate(simulated_capacities(n, random.Random(0))):
        task, comm, _ = await register_simulated_worker(s, cap, f"sim-{i}")
        connected[cap.address] = (task, comm)
    return plugin, connected, sent


async def _settle(plugin) -> None:
    await async_poll_until(lambda: not plugin.tasks_in_flight, 60, "the sends of the last decision", interval=0.001)


def test_simulated_workers_join_serve_routes_and_leave_through_dask():
    async def check():
        from distributed import Client, Scheduler

        async with Scheduler(port=0, dashboard_address="127.0.0.1:0", preload=["neuro_scheduler"]) as s:
            plugin, connected, sent = await _network(s, 40)
            assert len(s.workers) == 40 == len(plugin.coordinator.workers)
            assert all(
                s.workers[a].extra["neuro"]["memory_budget"] == plugin.coordinator.workers[a].memory_budget
                for a in connected
            )
            plugin.enact(
                plugin.coordinator.model_published(
                    PublishedModel("mx", "memory://none", mixtral_shaped_experts(layers=4))
                )
            )
            await asyncio.sleep(0)  # poll: one loop turn for the plugin's sends to start
            await _settle(plugin)
            assert sent and not plugin.coordinator.routes("mx").missing

            leaver = next(w for w, keys in plugin.coordinator.placement.assignments().items() if keys)
            bad = next(w for w, keys in plugin.coordinator.placement.assignments().items() if keys and w != leaver)
            async with Client(s.address, asynchronous=True, set_as_default=False) as client:
                first = await client.scheduler.neuro_routes(model="mx")
                assert first["standing"][bad]["routable"] and leaver in first["standing"]
                plugin.reputation.invalid(plugin.identity[bad], "cause-1", 1.0)  # lowest score: routed last
                await disconnect(*connected.pop(leaver))
                await _settle(plugin)
                assert leaver not in s.workers and leaver not in plugin.coordinator.workers
                assert leaver not in plugin.identity
                reply = await client.scheduler.neuro_routes(model="mx")
            assert reply["status"] == "OK" and not reply["missing"] and len(reply["routes"]) == 32
            assert not reply["standing"][bad]["routable"]  # the standing follows the new record
            assert reply["standing"][bad]["score"] < first["standing"][bad]["score"]
            named = {w for _, _, ws in reply["routes"] for w in ws}
            assert leaver not in named and named == set(reply["standing"])
            for _, _, ws in reply["routes"]:
                scores = [reply["standing"][w]["score"] for w in ws]
                assert scores == sorted(scores, reverse=True)
                assert len(ws) >= 2
                if bad in ws:
                    assert ws[-1] == bad

            for task, comm in connected.values():
                comm.abort()
                await task
            assert not s.workers and not plugin.coordinator.workers

    asyncio.run(check())
