"""Simulated WAN latency on loopback, and latency-aware routing on a real in-process cluster:
one replica 30 ms away, the other 1 ms; after warm-up most calls go to the close one and the
output is identical to the local model's."""

from __future__ import annotations

import asyncio
import itertools

import dask
import pytest
import torch
from cluster_helpers import neuro_cluster
from polling import poll_until
from tiny_models import padded_batch

import neuro_dask as nd
from neuro_dask.client.dispatch.transports import DirectTransport, HedgedCall
from neuro_dask.protocol.wire import encode_request
from neuro_dask.settings import ClientSettings


def simulated(far: str, near: str, far_s: float = 0.030, near_s: float = 0.001) -> dict:
    return {"delay": 0.0, "jitter": 0.0005, "workers": {far: {"delay": far_s}, near: {"delay": near_s}}}


@pytest.mark.parametrize("transport, trust", [("direct", False), ("futures", False), ("direct", True)])
def test_calls_go_to_the_close_replica_and_output_is_golden(sharded, tmp_path, transport, trust):
    local = nd.load(sharded("mixtral"))
    ids, mask = padded_batch((5, 9), seed=2)
    expected = local.generate(ids, mask, max_new_tokens=12)
    with neuro_cluster(2, replicas=2, tmp_path=tmp_path) as (cluster, client):
        far, near = sorted(client.scheduler_info()["workers"])
        if trust:  # two trusted workers: spot checks only (two newcomers would check each other on every call)
            for w in (far, near):
                client.sync(client.scheduler.neuro_trust, worker=w, trusted=True)
        with dask.config.set(
            {
                "neuro.client.simulated-latency": simulated(far, near),
                "neuro.client.seed": 0,
                "neuro.client.trust": trust,
            }
        ):
            model = nd.load(sharded("mixtral"), client=client, transport=transport)
        try:
            book = model.executor.transport.latency

            def warmed_up() -> bool:  # warm-up: both replicas get measured
                model.generate(ids, mask, max_new_tokens=4)
                return _gap(book, far, near) > 0.02

            def mostly_near() -> tuple[torch.Tensor, dict[str, int]] | None:
                before = dict(book.samples)
                out = model.generate(ids, mask, max_new_tokens=12)
                assert torch.equal(out, expected)  # on every try
                calls = {w: book.samples.get(w, 0) - before.get(w, 0) for w in (far, near)}
                return (out, calls) if calls[near] >= 0.8 * (calls[near] + calls[far]) else None

            # On a busy machine a stall can make one generation's round trips noisy; routing that
            # ignored latency would spread calls evenly on every try, so a retry hides no bug.
            poll_until(warmed_up, 60, "the far replica's estimate to exceed the near one's by 20 ms", interval=0)
            assert _gap(book, far, near) > 0.02  # futures add ~10 ms to both
            out, calls = poll_until(
                mostly_near, 60, "a generation that sends 80% of its calls to the near replica", interval=0
            )
        finally:
            model.close()
    assert torch.equal(out, expected)
    # Exploration (2%) and, with trust on, spot-check replicas still reach the far worker.
    assert calls[near] >= 0.8 * (calls[near] + calls[far]), calls


def test_latency_aware_off_keeps_spreading(sharded, tmp_path):
    with neuro_cluster(2, replicas=2, tmp_path=tmp_path) as (cluster, client):
        far, near = sorted(client.scheduler_info()["workers"])
        with dask.config.set(
            {
                "neuro.client.simulated-latency": simulated(far, near),
                "neuro.client.seed": 0,
                "neuro.client.latency-aware": False,
            }
        ):
            model = nd.load(sharded("mixtral"), client=client)
        try:
            assert model.executor.transport.route_latency is None
            model.generate(*padded_batch((5, 9), seed=2), max_new_tokens=8)
            samples = model.executor.transport.latency.samples
        finally:
            model.close()
    assert samples[far] >= 0.3 * (samples[far] + samples[near]), samples  # still measured, not preferred


def _gap(book, far: str, near: str) -> float:
    """How much slower the far replica looks than the near one (seconds); -inf until both are measured."""
    f, n = book.estimate(far), book.estimate(near)
    return float("-inf") if f is None or n is None else f - n


class _Budget:
    def may_hedge(self) -> bool:
        return True

    def count_hedge(self, messages: int = 1) -> None:
        pass


def test_simulated_delay_never_blocks_the_loop_and_a_close_hedge_wins(sharded, tmp_path):
    with neuro_cluster(2, replicas=2, tmp_path=tmp_path) as (cluster, client):
        far, near = sorted(client.scheduler_info()["workers"])
        with nd.load(sharded("mixtral"), client=client) as model:
            settings = ClientSettings(seed=0, simulated_latency=simulated(far, near, far_s=0.4, near_s=0.002))
            transport = DirectTransport(client, settings=settings)
            rows = {0: torch.randn(1, model.config.hidden_size)}

            def msg(call):
                return encode_request(model.executor.model_id, 0, rows, call=call)

            async def concurrent():
                await transport.start()
                loop = asyncio.get_running_loop()
                started = loop.time()
                ticks = 0

                async def tick():  # the loop keeps running other work while calls wait
                    nonlocal ticks
                    while True:
                        await asyncio.sleep(0.01)  # poll: a ticker proving the loop stays free, not a wait
                        ticks += 1

                ticker = asyncio.ensure_future(tick())
                a, b, c = await asyncio.gather(
                    transport.call(far, msg("x"), 5),
                    transport.call(far, msg("y"), 5),
                    transport.call(near, msg("z"), 5),
                )
                ticker.cancel()
                return loop.time() - started, ticks, (a, b, c)

            def overlapped():
                seconds, ticks, outcomes = client.sync(concurrent)
                assert all(o["status"] == "OK" for o in outcomes)  # on every try
                return (seconds, ticks, outcomes) if seconds < 0.75 and ticks >= 20 else None

            tries = itertools.count()

            def hedge_won():
                n = next(tries)
                primary, alternate = ("primary", "hedge") if n == 0 else (f"primary-{n}", f"hedge-{n}")  # fresh ids
                hedge = HedgedCall(
                    msg(primary), hedge_after=0.05, alternates=lambda view: (((near, msg(alternate)),), frozenset())
                )
                reply = transport.call_hedged({far: hedge}, 5.0, _Budget())[far]
                won = reply.seconds < 0.3 and reply.hedged and [w for w, _ in reply.parts] == [near]
                return (reply, primary) if won else None

            # Queued calls take 800 ms and a blocked loop ticks never, on every try; on a busy
            # machine a stall can slow one try, so the bounds must hold on some try.
            seconds, ticks, outcomes = poll_until(
                overlapped, 60, "two far calls to overlap while the loop ticks", interval=0
            )
            assert all(o["status"] == "OK" for o in outcomes)
            assert 0.4 <= seconds < 0.75  # two 400 ms calls overlapped, not queued behind each other
            assert ticks >= 20
            reply, primary = poll_until(hedge_won, 60, "the hedge to the near worker to win", interval=0)
            transport.close()
    assert reply.hedged and [w for w, _ in reply.parts] == [near]
    assert reply.seconds < 0.3  # the hedge to the close worker won, long before the far answer
    assert reply.abandoned == (primary,)
