"""The one way tests wait for state: poll a condition until it holds or a deadline passes.

A test that waits a fixed time, or asserts right after an action that takes effect later, breaks
on a busy machine; a poll with a generous deadline costs nothing when the machine is idle and only
fails when the state never arrives. The failure names what was awaited and the last value seen.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


class PollTimeout(AssertionError, TimeoutError):
    """The awaited state never arrived. Both an AssertionError (a test failure, as pytest shows it)
    and a TimeoutError (for callers that expect a timeout)."""


def _never(error: Exception) -> bool:
    return False


class _Poll:
    """The deadline and the last value seen, shared by the sync and the async loop."""

    def __init__(self, timeout: float, what: str, retry_on: Callable[[Exception], bool]):
        self.timeout, self.what, self.retry_on = timeout, what, retry_on
        self.deadline = time.monotonic() + timeout
        self.last: Any = None

    def failed(self, error: Exception) -> None:
        """An exception from the condition: a 'not yet' when `retry_on` says so, else it propagates."""
        if not self.retry_on(error):
            raise error
        self.last = error

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def timeout_error(self) -> PollTimeout:
        return PollTimeout(f"timed out after {self.timeout} s waiting for {self.what} (last: {self.last!r})")


def poll_until(
    condition: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    retry_on: Callable[[Exception], bool] = _never,
) -> Any:
    """Call `condition` until it returns something truthy and return that; at the deadline raise
    PollTimeout naming `what` and the last value. An exception from `condition` propagates (a
    failed assertion inside it fails the test at once) unless `retry_on(exception)` is true."""
    poll = _Poll(timeout, what, retry_on)
    while True:
        try:
            poll.last = condition()
            if poll.last:
                return poll.last
        except Exception as e:  # noqa: BLE001 - `retry_on` decides
            poll.failed(e)
        if poll.expired():
            raise poll.timeout_error()
        time.sleep(interval)  # poll


async def async_poll_until(
    condition: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    interval: float = 0.02,
    retry_on: Callable[[Exception], bool] = _never,
) -> Any:
    """The twin of `poll_until` for code on an event loop: `condition` may be sync or a coroutine
    function, and the wait yields to the loop."""
    poll = _Poll(timeout, what, retry_on)
    while True:
        try:
            value = condition()
            poll.last = await value if inspect.isawaitable(value) else value
            if poll.last:
                return poll.last
        except Exception as e:  # noqa: BLE001 - `retry_on` decides
            poll.failed(e)
        if poll.expired():
            raise poll.timeout_error()
        await asyncio.sleep(interval)  # poll
