"""Calls a client no longer needs (it won a hedge race elsewhere), for a worker to skip."""

from __future__ import annotations

import threading
from collections import OrderedDict


class DropList:
    """Call ids to skip if they have not started. Bounded (oldest forgotten first), since most
    drops arrive after their call already ran and would otherwise accumulate forever."""

    def __init__(self, limit: int = 4096):
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()  # ids are added on the event loop and taken in the compute thread

    def add(self, call: str) -> None:
        with self._lock:
            self._ids[call] = None
            while len(self._ids) > self._limit:
                self._ids.popitem(last=False)

    def take(self, call: str | None) -> bool:
        """True (once) when `call` was dropped."""
        with self._lock:
            if call is None or call not in self._ids:
                return False
            del self._ids[call]
            return True

    def __len__(self) -> int:
        return len(self._ids)
