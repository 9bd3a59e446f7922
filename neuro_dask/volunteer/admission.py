"""What a volunteer's worker admits, drops and reports: the `neuro_worker` preload's rules, pure.

Plain values in (who called, what the owner is doing, what the host loaded), decisions out; the
preload (plugins/neuro_worker.py) enacts them on its Dask worker.

Rules:
1. An expert call is refused while the owner uses the machine ("paused: WHY"); the client
   re-sends it elsewhere. Only then is a call the client dropped refused ("dropped: ...").
2. A caller is named by its certificate (None without one); the scheduler's certificate marks
   the scheduler's own calls (disputes, probes), which need no ticket.
3. A client may drop only its own calls: a dropped call is keyed by the caller's name and the
   call id; a call without an id is never dropped. One cancel message drops at most MAX_CANCELS.
4. A load report lists each failed expert as [layer, expert, why]; the worker's event names at
   most MAX_FAILED_IN_EVENT of them. The precision reported is the host's for the model
   (what `auto` chose), float32 when it has none.
5. Under a nanny, from the main thread, the worker process leaves SIGINT and SIGTERM to the
   nanny (it closes when its nanny says so).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from neuro_dask.protocol.records import PAUSED_PREFIX

MAX_CANCELS = 1000
MAX_FAILED_IN_EVENT = 20
DROPPED = "dropped: the client no longer needs this call"
DEFAULT_PRECISION = "float32"


def paused_refusal(paused: str) -> str | None:
    """Rule 1: the refusal while the owner uses the machine ("" = serving: None)."""
    return f"{PAUSED_PREFIX} {paused}" if paused else None


def caller_of(identity: Any) -> tuple[str | None, bool]:
    """Rule 2: (the calling certificate's name or None, whether the caller is the scheduler)."""
    if identity is None:
        return None, False
    return identity.name, identity.role == "scheduler"


def drop_key(caller: str | None, call: object) -> str | None:
    """Rule 3: the key a dropped call is remembered by (None: the call cannot be dropped)."""
    return None if call is None else f"{caller or ''}\x00{call}"


def cancel_keys(caller: str | None, calls: Iterable[object]) -> list[str | None]:
    """Rule 3: the drop keys of one cancel message's calls, at most MAX_CANCELS."""
    return [drop_key(caller, call) for call in list(calls)[:MAX_CANCELS]]


def expert_pairs(experts: Iterable[Iterable[Any]]) -> list[tuple[int, int]]:
    """[[layer, expert], ...] from the wire as (layer, expert) integer pairs."""
    return [(int(l), int(e)) for l, e in experts]


def failed_list(failed: Mapping[tuple[int, int], str]) -> list[list[Any]]:
    """Rule 4: [layer, expert, why] per expert the host could not load."""
    return [[l, e, why] for (l, e), why in failed.items()]


def reported_precision(host_status: Mapping[str, Any], model: str) -> str:
    """Rule 4: the precision the host computes `model` in."""
    return host_status.get("precision", {}).get(model, DEFAULT_PRECISION)


def leaves_signals_to_nanny(has_nanny: bool, main_thread: bool) -> bool:
    """Rule 5: only the main thread can set signal handlers, and only a nanny's worker should."""
    return has_nanny and main_thread
