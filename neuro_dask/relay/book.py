"""The relay's state and pacing rules: who is registered, which dials wait, when to come back.

Pure: the server (relay/server.py) owns the sockets and asks this book what to do.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from neuro_dask.relay.protocol import volunteer_id


class RelayRefusal(Exception):
    """What the relay tells a caller or volunteer it refuses (the text goes on the wire)."""


@dataclass
class Dial:
    volunteer: str
    caller: Any  # the server's handle of the waiting caller
    created: float


@dataclass
class RelayBook:
    clock: Callable[[], float]
    max_volunteers: int = 10_000
    max_pending_per_volunteer: int = 64
    dial_timeout: float = 10.0
    volunteers: dict[str, Any] = field(default_factory=dict)  # id -> its control connection's handle
    dials: dict[str, Dial] = field(default_factory=dict)  # token -> the dial waiting for its accept

    def register(self, key: str, handle: Any) -> tuple[str, Any]:
        """(the volunteer's id, the control handle it replaces or None). The same key always
        gets the same id: a volunteer that reconnects (its router dropped it, the relay
        restarted) keeps its address, and its newest connection wins."""
        vid = volunteer_id(key)
        previous = self.volunteers.get(vid)
        if previous is None and len(self.volunteers) >= self.max_volunteers:
            raise RelayRefusal("this relay serves as many volunteers as it can")
        self.volunteers[vid] = handle
        return vid, previous

    def unregister(self, vid: str, handle: Any) -> bool:
        """Forget a volunteer's control connection, unless a newer one replaced it."""
        if self.volunteers.get(vid) is handle:
            del self.volunteers[vid]
            return True
        return False

    def open_dial(self, vid: str, caller: Any) -> str:
        """A caller wants volunteer `vid`: the token the volunteer's data connection will bring."""
        if vid not in self.volunteers:
            raise RelayRefusal("no volunteer with this id is connected to this relay")
        if sum(1 for d in self.dials.values() if d.volunteer == vid) >= self.max_pending_per_volunteer:
            raise RelayRefusal("too many connections are waiting for this volunteer")
        token = secrets.token_urlsafe(24)
        self.dials[token] = Dial(vid, caller, self.clock())
        return token

    def take_dial(self, token: str) -> Dial | None:
        """The dial a volunteer's accept answers (once; None if unknown or expired)."""
        dial = self.dials.pop(token, None)
        if dial is None or self.clock() - dial.created > self.dial_timeout:
            return None
        return dial

    def expired(self) -> list[Dial]:
        """Dials no accept answered in time, removed."""
        now = self.clock()
        late = [t for t, d in self.dials.items() if now - d.created > self.dial_timeout]
        return [self.dials.pop(t) for t in late]
