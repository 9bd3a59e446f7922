"""Security events: what hardened mode refused, from whom. Pure; listeners forward them.

The scheduler's plugin forwards each event into Dask's event log (topic "neuro-security",
shown on the dashboard's trust page) and counts it against the peer; a worker forwards its
own to the scheduler. The log is bounded: a flood of refusals cannot grow memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

TOPIC = "neuro-security"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecurityEvent:
    kind: str  # pickle | message-size | tls-handshake | role | refused-op | task
    peer: str | None  # the connection's address, as the comm saw it
    detail: str
    identity: str | None = None  # role/name from the peer's certificate, when there is one
    time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SecurityLog:
    def __init__(self, limit: int = 1000, clock: Callable[[], float] = time.time):
        self._events: deque[SecurityEvent] = deque(maxlen=limit)
        self._listeners: list[Callable[[SecurityEvent], None]] = []
        self._lock = threading.Lock()
        self._clock = clock
        self.counts: dict[str, int] = {}

    def record(self, kind: str, peer: str | None, detail: str, identity: str | None = None) -> SecurityEvent:
        event = SecurityEvent(kind, peer, detail[:500], identity, self._clock())
        with self._lock:
            self._events.append(event)
            self.counts[kind] = self.counts.get(kind, 0) + 1
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a broken listener must not turn a refusal into a crash
                log.exception("security event listener failed")
        return event

    def events(self, kind: str | None = None) -> list[SecurityEvent]:
        with self._lock:
            return [e for e in self._events if kind is None or e.kind == kind]

    def subscribe(self, listener: Callable[[SecurityEvent], None]) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def clear(self) -> None:
        with self._lock:
            self._events.clear()
            self.counts.clear()


security_log = SecurityLog()
