"""An open (not hardened) scheduler reads every neuro operation as its typed message too:
a peer's malformed message is answered with the field it got wrong, and nothing runs."""

from __future__ import annotations

import asyncio

from neuro_dask.protocol.messages import ReportLoad, Routes


def test_an_open_scheduler_refuses_malformed_messages_and_serves_well_formed_ones():
    async def check():
        from distributed import Client, Scheduler

        async with Scheduler(port=0, dashboard_address="127.0.0.1:0", preload=["neuro_scheduler"]) as s:
            plugin = s.extensions["neuro"]
            async with Client(s.address, asynchronous=True, set_as_default=False) as client:
                # A hostile client claims a pause for a worker, with a field the message does not take.
                reply = await client.scheduler.neuro_pause(worker="tcp://10.0.0.1:1", paused=True, admin=True)
                assert reply["status"] == "error" and reply["field"] == "admin", reply
                # Load that is not a number would have reached placement's arithmetic.
                reply = await client.scheduler.neuro_report_load(model="m", load=[[0, 1, "lots"]])
                assert reply["status"] == "error" and reply["field"] == "load[0][2]", reply
                # A string where a list of call records goes.
                reply = await client.scheduler.neuro_report_calls(model="m", calls="x" * 10)
                assert reply["status"] == "error" and reply["field"] == "calls", reply
                assert not plugin.paused and plugin.feed.latency_count == 0

                # Well-formed messages reach their methods, through the typed message's own send.
                reply = await Routes("not-published").send(client.scheduler)
                assert reply["status"] == "error" and "not published" in reply["message"]
                reply = await ReportLoad("not-published", ((0, 1, 2.0),)).send(client.scheduler)
                assert reply["status"] == "error" and "not published" in reply["message"]

    asyncio.run(check())
