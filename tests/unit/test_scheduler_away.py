"""A request's begin and end outlast a scheduler restart (client/dispatch/scheduler_away.py): an
RPC that fails with OSError is sent again, with doubling, jittered pauses, until a cap; any
answer, a refusal included, is returned at once."""

from __future__ import annotations

import itertools

import pytest
from distributed.comm.core import CommClosedError
from test_executor_protocol import StandInClient, StandInScheduler

from neuro_dask.client.dispatch.requests import PaidRequests, PaymentRefusedError
from neuro_dask.client.dispatch.scheduler_away import (
    FIRST_PAUSE,
    JITTER,
    MAX_PAUSE,
    SchedulerAwayError,
    call_through_restart,
    pauses,
)
from neuro_dask.settings import ClientSettings


class FakeTime:
    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds


def failing(times: int, error: BaseException, reply="ok"):
    calls = itertools.count()

    def send():
        if next(calls) < times:
            raise error
        return reply

    return send


def test_pauses_double_up_to_the_maximum_and_jitter_only_stretches_them():
    plain = list(itertools.islice(pauses(100.0, rng=lambda: 0.0), 7))
    assert plain == [FIRST_PAUSE, 0.2, 0.4, 0.8, 1.6, MAX_PAUSE, MAX_PAUSE]
    stretched = list(itertools.islice(pauses(100.0, rng=lambda: 1.0), 3))
    assert stretched == pytest.approx([p * (1 + JITTER) for p in plain[:3]])
    assert max(itertools.islice(pauses(0.3, rng=lambda: 1.0), 10)) == 0.3  # never past the cap


def test_a_scheduler_back_within_the_cap_answers_the_resent_call():
    t = FakeTime()
    reply = call_through_restart(
        failing(5, CommClosedError("Stream is closed")),
        what="request begin",
        scheduler="tcp://s:1",
        cap=30.0,
        clock=t.clock,
        sleep=t.sleep,
        rng=lambda: 0.0,
    )
    assert reply == "ok" and t.slept == [0.1, 0.2, 0.4, 0.8, 1.6]


def test_a_scheduler_away_past_the_cap_is_a_clear_error_that_names_it():
    t = FakeTime()
    with pytest.raises(SchedulerAwayError, match=r"request end: the scheduler tcp://s:1 .* 5\.0 s .*ConnectionRefused"):
        call_through_restart(
            failing(10**6, ConnectionRefusedError("refused")),
            what="request end",
            scheduler="tcp://s:1",
            cap=5.0,
            clock=t.clock,
            sleep=t.sleep,
        )
    assert t.now == pytest.approx(5.0)  # the last pause is cut to end at the cap, not after it


@pytest.mark.parametrize("error", [ValueError("bad reply"), PaymentRefusedError("a", "r", "no funds")])
def test_anything_but_a_lost_connection_is_raised_at_once(error):
    t = FakeTime()
    with pytest.raises(type(error)):
        call_through_restart(failing(1, error), what="w", scheduler="s", cap=30.0, clock=t.clock, sleep=t.sleep)
    assert t.slept == []


class RestartingScheduler(StandInScheduler):
    """A stand-in scheduler whose first `down` RPCs find it restarting."""

    def __init__(self, down: int):
        super().__init__()
        self.down = down

    def _restarting(self):
        if self.down > 0:
            self.down -= 1
            raise CommClosedError("in <TCP (closed) ConnectionPool.neuro_request_begin>: Stream is closed")

    async def neuro_request_begin(self, **kw):
        self._restarting()
        return await super().neuro_request_begin(**kw)

    async def neuro_request_end(self, request):
        self._restarting()
        return await super().neuro_request_end(request)


def _scope(scheduler, t: FakeTime) -> PaidRequests:
    settings = ClientSettings(account="alice", missing_expert_wait=2.0)
    return PaidRequests(
        StandInClient(scheduler),
        "m",
        settings,
        flush=lambda: None,
        forget=lambda r: None,
        clock=t.clock,
        sleep=t.sleep,
    )


def test_a_request_begun_and_ended_across_a_scheduler_restart_is_begun_once_and_settled():
    scheduler, t = RestartingScheduler(down=3), FakeTime()
    scope = _scope(scheduler, t)
    scope.begin(10)
    assert scope.stamp()["request"] == "req-1" and [k for k, _ in scheduler.sent] == ["begin"]
    scheduler.down = 2
    scope.end()
    assert scope.settlements == [{"request": "req-1", "status": "OK", "tier": "standard", "fee": 3}]
    assert len(t.slept) == 5


def test_a_scheduler_gone_for_good_fails_the_begin_but_never_an_answered_request():
    scheduler, t = RestartingScheduler(down=10**6), FakeTime()
    scope = _scope(scheduler, t)
    with pytest.raises(SchedulerAwayError, match="request begin"):
        scope.begin(10)
    assert scope.stamp() == {} and t.now == pytest.approx(6 * 2.0)  # MAX_WAIT_FACTOR x missing-expert-wait
    scheduler.down = 0
    scope.begin(10)
    scheduler.down = 10**6
    scope.end()  # the answer is the caller's: the end only logs, and the lease settles the request
    assert scope.stamp() == {} and scope.settlements[-1]["status"] == "error"
