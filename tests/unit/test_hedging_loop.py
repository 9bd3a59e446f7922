"""The hedging loop both transports share (client/dispatch/transports.py `_Hedging`), on a
scripted in-memory transport: each worker answers after the delay the test gives it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from neuro_dask.client.dispatch.transports import HedgedCall, HedgeView, _Hedging


class Scripted(_Hedging):
    """Delivers every call on the event loop after `delays[worker]` seconds, answering OK."""

    name = "scripted"

    def __init__(self, delays: Mapping[str, float]):
        self.delays = dict(delays)
        self.sent: list[tuple[str, tuple[int, ...]]] = []
        self._setup_latency(None)
        self._setup_hedging()

    async def _deliver(self, worker, msg, rtt):
        self.sent.append((worker, tuple(msg["experts"])))
        await asyncio.sleep(self.delays[worker])  # the scripted round trip, not a wait for a condition
        return {"status": "OK", "experts": list(msg["experts"])}

    async def start(self):
        pass

    async def cancel(self, worker, call_id):
        pass


class Budget:
    def may_hedge(self) -> bool:
        return True

    def count_hedge(self, messages: int = 1) -> None:
        pass


def test_a_late_message_hedges_what_it_can_and_ends_when_the_checker_settles_the_rest():
    # p straggles with units 0 (spot-checked: c has it too, asked already) and 1 (x is free).
    # The hedge for 1 goes out at p's patience; 0 waits for c, whose answer settles it (rule 7),
    # so the call ends when both are in, long before p answers.
    transport = Scripted({"p": 5.0, "c": 0.2, "x": 0.01})
    views: list[HedgeView] = []

    def alternates(view: HedgeView):  # x once, as hedge_targets never picks a host twice
        views.append(view)
        return ((("x", {"experts": [1], "call": "h1"}),) if len(views) == 1 else (), frozenset())

    def settles(view: HedgeView):
        return frozenset({0}) & view.missing if "c" in view.answered.get(0, ()) else frozenset()

    calls = {
        "p": HedgedCall({"experts": [0, 1], "call": "p1"}, 0.05, alternates, settles),
        "c": HedgedCall({"experts": [0], "call": "c1"}, 10.0),
    }

    async def run():
        loop = asyncio.get_running_loop()
        started = loop.time()
        replies = await transport._hedged_all(calls, 30.0, Budget(), None)
        return replies, loop.time() - started

    replies, seconds = asyncio.run(run())
    p = replies["p"]
    assert [w for w, _ in p.parts] == ["x"] and p.settled == {0} and p.abandoned == ("p1",)
    assert views and views[0].missing == {0, 1}
    assert seconds < 2.0  # c's 0.2 s, not p's 5 s; a generous bound for a busy machine
    assert transport.sent == [("p", (0, 1)), ("c", (0,)), ("x", (1,))]


def test_a_late_message_without_settlement_waits_for_the_straggler():
    transport = Scripted({"p": 0.3, "x": 0.01})
    hedges = iter([(("x", {"experts": [1], "call": "h1"}),)])  # x once, then no host is left
    calls = {"p": HedgedCall({"experts": [0, 1], "call": "p1"}, 0.02, lambda view: (next(hedges, ()), frozenset()))}
    replies = asyncio.run(transport._hedged_all(calls, 30.0, Budget(), None))
    assert [w for w, _ in replies["p"].parts] == ["x", "p"]  # 1 from the hedge, 0 only from p itself
    assert replies["p"].settled == frozenset()
