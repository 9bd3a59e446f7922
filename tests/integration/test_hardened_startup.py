"""Hardened mode fails loudly: a scheduler or worker that cannot harden itself closes."""

from __future__ import annotations

import asyncio

import pytest
from distributed import Scheduler, Worker
from distributed.core import Status
from polling import async_poll_until

from neuro_dask.security import hardening


@pytest.fixture
def unverified_distributed(monkeypatch):
    monkeypatch.setattr(hardening, "VERIFIED_DISTRIBUTED", ("1999.1.0",))
    yield
    hardening.uninstall()


async def _closes(server, timeout=60.0):
    await async_poll_until(
        lambda: server.status in (Status.closed, Status.closing, Status.failed),
        timeout,
        f"the {type(server).__name__} to close",
    )


def test_a_scheduler_on_an_unverified_distributed_closes_instead_of_running_open(unverified_distributed, caplog):
    async def main():
        scheduler = await Scheduler(
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            preload=["neuro_scheduler"],
            preload_argv=[["--neuro-hardened"]],
        )
        await _closes(scheduler)
        await scheduler.close()

    asyncio.run(main())
    assert not hardening.is_installed()
    assert any("hardened mode could not start" in r.message for r in caplog.records)


def test_a_worker_on_an_unverified_distributed_closes_instead_of_running_open(unverified_distributed, caplog):
    async def main():
        async with Scheduler(host="127.0.0.1", dashboard_address="127.0.0.1:0") as scheduler:
            worker = Worker(
                scheduler.address,
                nthreads=1,
                dashboard=False,
                preload=["neuro_worker"],
                preload_argv=[["--neuro-no-benchmark", "--neuro-hardened"]],
            )
            try:
                await worker
            except Exception:
                pass  # it may fail to start outright, or start and close: either way it must not run
            await _closes(worker)
            await worker.close()

    asyncio.run(main())
    assert not hardening.is_installed()
    assert any("hardened mode could not start" in r.message for r in caplog.records)
