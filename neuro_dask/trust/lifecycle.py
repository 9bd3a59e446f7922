"""A worker's lifecycle as events: joined, paused, resumed, left, crashed, slashed. Pure.

The scheduler plugin hears a worker go in one hook (`SchedulerPlugin.remove_worker`), which
distributed calls alike for a worker that said goodbye and one whose connection simply broke.
What tells them apart is what distributed logged for that worker's address just before the
hook (`Scheduler.get_events(address)`): its `remove-worker` entry carries `expected` (True for a
retirement), and a worker that closes on purpose first reports the status `closing` (or
`closing_gracefully` when retired) and logs `closing-worker`. A worker that was killed, lost
its network or hung until the heartbeat timeout did none of that: it crashed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

LIFECYCLE = ("joined", "paused", "resumed", "left", "crashed", "slashed")

_CLOSING = frozenset({"closing", "closing_gracefully"})
# stimulus ids distributed gives to removals that a worker or its nanny asked for
_GRACEFUL_STIMULI = ("nanny-close", "worker-close-gracefully", "retire-workers", "worker-lifetime")


def departure(dask_events: Iterable[Mapping]) -> str:
    """ "left" or "crashed", from distributed's own events for the departed worker's address
    (oldest first, as `Scheduler.get_events(address)` returns their messages)."""
    announced = False
    for msg in dask_events:
        action = msg.get("action")
        if action == "add-worker":  # an address reused by a new worker: only this one's life counts
            announced = False
        elif action == "worker-status-change" and msg.get("status") in _CLOSING:
            announced = True
        elif action == "closing-worker":
            announced = True
        elif action == "remove-worker":
            if msg.get("expected") or str(msg.get("stimulus_id", "")).startswith(_GRACEFUL_STIMULI):
                announced = True
    return "left" if announced else "crashed"


def lifecycle_action(event: Mapping) -> str | None:
    """The lifecycle name of a plugin event (None: not a lifecycle event). Pause and resume
    come from the idle-only handler ("pause", "resume"), a slash from the ledger ("slash")."""
    action = event.get("action")
    return {
        "joined": "joined",
        "pause": "paused",
        "resume": "resumed",
        "left": "left",
        "crashed": "crashed",
        "slash": "slashed",
    }.get(str(action))
