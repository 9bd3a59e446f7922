"""How a layer waits for a network that is recovering (client/dispatch/routes.py's RouteWait and
the executor's two waits): a scheduler restart, workers re-registering one by one, a quorum
whose trusted anchor is not back yet. A fake clock and a scripted scheduler, no Dask."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from neuro_dask.client.dispatch.executor import DistributedExecutor, RoutesUnavailableError
from neuro_dask.client.dispatch.routes import ExpertUnavailableError, RouteTable, RouteWait, routed_count
from neuro_dask.errors import NeuroDaskError
from neuro_dask.settings import ClientSettings
from neuro_dask.trust.quorum import QuorumExhaustedError

# ---- RouteWait: the rule ---------------------------------------------------------------------------


def test_a_layer_waits_while_the_network_recovers_and_gives_up_once_it_stops():
    wait = RouteWait(started=0.0, base=20.0, cap=120.0)
    assert not wait.expired(0.0, None)  # the scheduler is away: its routes did not come
    assert not wait.expired(15.0, 0)  # it is back, no worker yet: progress from nothing
    assert not wait.expired(30.0, 4)  # workers re-register: more replicas routed
    assert not wait.expired(49.0, 4)  # no progress for 19 s
    assert wait.expired(50.0, 4)  # 20 s without progress
    stalled = RouteWait(started=0.0, base=20.0, cap=120.0)
    assert not stalled.expired(0.0, 3) and stalled.expired(20.0, 3)  # a network that is not recovering
    slow = RouteWait(started=0.0, base=20.0, cap=120.0)
    assert not any(slow.expired(t, int(t)) for t in range(0, 120, 5))  # progress every 5 s...
    assert slow.expired(120.0, 200)  # ...but never past the cap
    assert slow.waited(120.0) == 120.0


def test_a_scheduler_that_is_away_is_waited_for_up_to_the_cap_not_the_base():
    wait = RouteWait(started=0.0, base=20.0, cap=120.0)
    assert not any(wait.expired(t, None) for t in range(0, 120, 5))  # a long restart: still waiting
    assert wait.expired(120.0, None)  # but not forever


def test_progress_counts_from_the_previous_look_not_the_routes_held_before_a_restart():
    """The failure the soak found: a layer that began its wait holding the old scheduler's full
    table (16 routes) saw the new one fill up from 0 and never passed 16 within 20 s, so it gave
    up 1 s before the network served again. Any change is motion; standing still is not."""
    wait = RouteWait(started=0.0, base=20.0, cap=120.0)
    assert not wait.expired(0.0, 16)  # the routes held when the wait began
    assert not wait.expired(2.0, 8)  # the scheduler shuts down: its workers leave
    assert not wait.expired(5.0, None)  # it is away
    assert not wait.expired(10.0, 0)  # back, empty
    assert not wait.expired(18.0, 3)  # workers come back: progress, though fewer than before
    assert not wait.expired(30.0, 6)
    assert wait.grew(7) and not wait.grew(6) and not wait.grew(5)
    assert not wait.expired(49.0, 6)  # standing still for 19 s
    assert wait.expired(50.0, 6)


def test_the_routed_count_counts_replicas_so_a_second_replica_is_progress():
    one = RouteTable(1, {(0, 0): ("a",), (0, 1): ("a",), (0, 2): ()})
    two = RouteTable(2, {(0, 0): ("a", "b"), (0, 1): ("a",), (0, 2): ()})
    assert routed_count(one) == 2 and routed_count(two) == 3


# ---- the executor's waits, with a fake clock and a scripted scheduler ------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def table(replicas: int, version: int = 1) -> RouteTable:
    """Expert 0 of layer 0 with `replicas` workers."""
    return RouteTable(version, {(0, 0): tuple(f"w{i}" for i in range(replicas))})


def executor(script, clock: Clock, wait: float = 20.0) -> DistributedExecutor:
    """A DistributedExecutor with only what the waits use: `script(now)` is the scheduler's
    answer to a route fetch at that time, a RouteTable or an exception to raise."""
    ex = object.__new__(DistributedExecutor)
    ex.clock, ex.sleep = clock, clock.sleep
    ex.settings = ClientSettings.load(missing_expert_wait=wait)
    ex.model_id = "m"
    ex.client = SimpleNamespace(scheduler=SimpleNamespace(address="tcp://scheduler"))
    ex._layer = threading.local()
    ex.routes = table(0)
    ex.fetches = 0

    def fetch() -> RouteTable:
        ex.fetches += 1
        answer = script(clock.now)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    ex.fetch_routes = fetch
    return ex


def wait_until_served(ex: DistributedExecutor) -> float:
    """Call `_wait_for_routes` as `_run_plain` does until the expert has a route; the time."""
    waited = None
    while not ex.routes.routes.get((0, 0)):
        waited = ex._wait_for_routes(0, [0], waited)
    return ex.clock()


def restart(away_until: float, back_at: float):
    """A scheduler restart: unreachable until `away_until`, then without workers until `back_at`."""

    def script(now: float):
        if now < away_until:
            return OSError("connection refused")
        return table(0) if now < back_at else table(2)

    return script


def test_a_layer_waits_out_a_scheduler_restart_longer_than_missing_expert_wait():
    clock = Clock()
    ex = executor(restart(away_until=30.0, back_at=45.0), clock, wait=20.0)
    assert wait_until_served(ex) >= 45.0


def test_a_scheduler_that_never_comes_back_is_given_up_on_at_the_cap_with_the_reason():
    clock = Clock()
    ex = executor(lambda now: OSError("connection refused"), clock, wait=5.0)
    with pytest.raises(RoutesUnavailableError, match="connection refused") as caught:
        wait_until_served(ex)
    assert 30.0 <= caught.value.waited < 31.0  # 6 x 5 s


def test_a_scheduler_that_forgot_the_model_is_given_up_on_after_missing_expert_wait():
    """It answers, so it is not away: an answer without routes is no progress."""
    clock = Clock()
    ex = executor(lambda now: NeuroDaskError("unknown model 'm'"), clock, wait=5.0)
    with pytest.raises(RoutesUnavailableError, match="unknown model") as caught:
        wait_until_served(ex)
    assert 5.0 <= caught.value.waited < 6.0


def test_a_network_without_the_expert_is_given_up_on_after_missing_expert_wait():
    clock = Clock()
    ex = executor(lambda now: table(0), clock, wait=5.0)
    with pytest.raises(ExpertUnavailableError) as caught:
        wait_until_served(ex)
    assert not isinstance(caught.value, RoutesUnavailableError)
    assert 5.0 <= caught.value.waited < 6.0


def exhausted() -> QuorumExhaustedError:
    return QuorumExhaustedError(0, [0], 2, 2, 0)


def test_routes_that_came_only_after_a_long_wait_count_as_the_scheduler_being_away():
    """Dask's connect retries a closed port until its timeout: one fetch that blocks through a
    10 s restart returns routes as if nothing happened. It counts as the scheduler being away,
    so the wait's clock starts again when the routes come, not when the fetch began."""
    clock = Clock()

    def script(now: float):
        if 1.0 < now < 11.0:  # the restart: this fetch blocks until the scheduler is back
            clock.now = 11.0
            return table(0)
        return table(0) if now < 28.0 else table(2)

    ex = executor(script, clock, wait=20.0)
    ex.routes = table(0)
    assert wait_until_served(ex) >= 28.0  # 17 s after the blocked fetch, 28 s after the wait began


def test_a_wait_begun_by_a_quorum_carries_on_when_the_experts_lose_their_routes():
    """`_run_trusted` passes one wait through both kinds: a wait the quorum began, on a thread
    that has not looked at routes yet, goes on as a wait for routes."""
    clock = Clock()
    ex = executor(lambda now: table(0) if now < 10.0 else table(2), clock, wait=20.0)
    wait = ex._new_wait(clock.now)
    while not ex.routes.routes.get((0, 0)):
        wait = ex._wait_for_routes(0, [0], wait)
    assert 10.0 <= clock.now < 11.0 and wait.waited(clock.now) >= 10.0


def test_an_undecided_quorum_is_asked_again_once_another_replica_joins():
    """After a restart the trusted worker that anchors a quorum may come back last: the two
    replicas that disagree are not the end while the network is still growing."""
    clock = Clock()
    ex = executor(lambda now: table(2) if now < 12.0 else table(3), clock, wait=20.0)
    ex.routes = table(2)
    ex._wait_for_more_replicas(exhausted(), None)
    assert 12.0 <= clock.now < 13.0 and routed_count(ex.routes) == 3


def test_an_undecided_quorum_in_a_network_that_does_not_grow_raises_the_quorum_error():
    clock = Clock()
    ex = executor(lambda now: table(2), clock, wait=5.0)
    ex.routes = table(2)
    with pytest.raises(QuorumExhaustedError):
        ex._wait_for_more_replicas(exhausted(), None)
    assert 5.0 <= clock.now < 6.0


def test_an_undecided_quorum_waits_through_a_scheduler_restart_for_the_replica():
    clock = Clock()

    def script(now: float):
        if now < 25.0:
            return OSError("connection refused")
        return table(1) if now < 30.0 else table(3)

    ex = executor(script, clock, wait=20.0)
    ex.routes = table(2)
    ex._wait_for_more_replicas(exhausted(), None)
    assert 30.0 <= clock.now < 31.0


def test_a_wait_shared_across_retries_keeps_its_cap():
    """A quorum retried after each new replica, failing again each time: the waits together
    stop at the cap, not one cap per retry."""
    clock = Clock()
    ex = executor(lambda now: table(2 + int(now)), clock, wait=5.0)  # a replica a second, forever
    ex.routes = table(2)
    wait = None
    with pytest.raises(QuorumExhaustedError):
        for _ in range(1000):
            wait = ex._wait_for_more_replicas(exhausted(), wait)
    assert 30.0 <= clock.now < 32.0
