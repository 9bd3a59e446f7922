"""A relay in its own thread and event loop, for tests that drive clusters synchronously."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from neuro_dask.relay.server import Relay


class RelayThread:
    """`with RelayThread() as relay:` a started relay on 127.0.0.1 (relay.address); `restart()`
    stops it (each volunteer told when to come back) and starts a fresh one on the same port."""

    def __init__(self, **options):
        self.options = {"ping": 1.0, "comeback_spread": 0.5, **options}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="relay", daemon=True)
        self.relay: Relay | None = None

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> RelayThread:
        self.thread.start()
        self.relay = self.run(Relay(**self.options).start())
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            self.run(self.relay.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def address(self) -> str:
        return self.relay.address

    @property
    def port(self) -> int:
        return self.relay.port

    def restart(self) -> None:
        port = self.relay.port
        self.run(self.relay.stop())
        self.relay = self.run(Relay(**{**self.options, "port": port}).start())
