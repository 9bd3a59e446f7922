"""A request's begin and end outlast a scheduler restart.

A request begins and ends with one RPC each to the scheduler (requests.py). While the scheduler
restarts (docs/distributed.md, "restart behaviour") those RPCs fail with OSError: Dask's
CommClosedError on a connection the old scheduler dropped, or a refused connect. A request must
not fail for that when the scheduler is back seconds later, so both are re-sent, with a pause that
doubles (and a jitter, so that every client of a restarted scheduler does not return in the same
instant), until `cap` seconds have passed.

Re-sending is safe. A begin whose reply was lost leaves a lease nobody uses: it expires and is
settled with no work (scheduler/requests.py rule 6). An end whose reply was lost is answered
"unknown request" the second time, which the caller logs. Only OSError is retried: an answer,
even a refusal, is the scheduler's word and is returned as it is.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable
from typing import TypeVar

from neuro_dask.errors import NeuroDaskError

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_PAUSE = 0.1  # seconds before the first re-send
MAX_PAUSE = 2.0  # the pause doubles up to this
JITTER = 0.25  # each pause is stretched by up to this fraction, at random


class SchedulerAwayError(NeuroDaskError, ConnectionError):
    """The scheduler could not be reached for a whole wait: it is down, not restarting."""

    def __init__(self, what: str, scheduler: str, waited: float, why: BaseException):
        self.what, self.scheduler, self.waited, self.why = what, scheduler, waited, why
        super().__init__(
            f"{what}: the scheduler {scheduler} could not be reached for {waited:.1f} s "
            f"({type(why).__name__}: {why}); is it running?"
        )


def pauses(cap: float, rng: Callable[[], float] = random.random):
    """The pauses between re-sends: doubling from FIRST_PAUSE to MAX_PAUSE, each stretched by up
    to JITTER; an endless generator (the caller stops at its cap)."""
    pause = FIRST_PAUSE
    while True:
        yield min(pause * (1.0 + JITTER * rng()), cap)
        pause = min(2 * pause, MAX_PAUSE)


def call_through_restart(
    send: Callable[[], T],
    *,
    what: str,
    scheduler: str,
    cap: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    rng: Callable[[], float] = random.random,
) -> T:
    """`send()`'s reply; re-sent while it raises OSError, for at most `cap` seconds in all, then
    SchedulerAwayError. Any other error is the caller's, at once."""
    start = clock()
    waits = pauses(cap, rng)
    for attempt in itertools.count():
        try:
            return send()
        except OSError as exc:
            waited = clock() - start
            if waited >= cap:
                raise SchedulerAwayError(what, scheduler, waited, exc) from exc
            if attempt == 0:
                log.info("%s: the scheduler %s is away (%s); trying again for up to %.0f s", what, scheduler, exc, cap)
            sleep(min(next(waits), cap - waited))
    raise AssertionError("itertools.count() ended")  # for type checkers: the loop only returns or raises
