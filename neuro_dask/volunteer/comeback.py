"""When a volunteer comes back after its scheduler or relay went away: the pacing rules. Pure.

BOINC's `next_rpc_delay`: the server tells each client when to come back, so a restart does not
bring every volunteer back in the same second. Here:
- A scheduler (or relay) that shuts down tells each volunteer a delay, spread evenly over the
  volunteers at `rate` a second and at most `spread` seconds (comeback_delays).
- The volunteer's fresh worker waits for the scheduler with jittered exponential backoff
  (reconnect_delay), then the delay it was told, then registers (volunteer/reconnect.py). Told
  nothing (the scheduler crashed), the backoff's jitter alone spreads them.
- What a worker was told survives its restart in a small note in its cache folder
  (ComebackNote); a note that is not one, or an old one, is ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

COMEBACK_OP = "neuro-comeback"  # the scheduler's stream message to a worker: {"after": seconds}
MAX_DELAY = 3600.0  # seconds: no scheduler sends a volunteer away for longer
NOTE_LIFETIME = 86_400.0  # seconds: an older note is from another day's restart


def comeback_delays(count: int, spread: float, rng: random.Random | None = None) -> list[float]:
    """When each of `count` volunteers should come back, spread evenly over `spread` seconds.
    Shuffled, so no volunteer is always first."""
    rng = rng or random.Random()
    delays = [spread * (i + rng.random()) / max(count, 1) for i in range(count)]
    rng.shuffle(delays)
    return delays


def comeback_spread(count: int, rate: float, cap: float) -> float:
    """Seconds over which `count` volunteers come back at `rate` a second, at most `cap`."""
    return min(cap, count / rate) if rate > 0 else cap


def reconnect_delay(attempt: int, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter for a volunteer waiting for its scheduler or relay:
    half fixed, half random."""
    rng = rng or random.Random()
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return ceiling * (0.5 + 0.5 * rng.random())


def valid_delay(value: object) -> float | None:
    """A delay the scheduler sent (it is trusted, but its message is still data): seconds in
    [0, MAX_DELAY], else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value) if 0 <= value <= MAX_DELAY else None


def read_comeback(fields: object) -> float | None:
    """The `neuro-comeback` stream message's fields (without its op), read as plain data: exactly
    {"after": seconds within [0, MAX_DELAY]}, else None (the message is ignored: the worker
    comes back on its own backoff, as after a crash)."""
    if not isinstance(fields, dict) or set(fields) != {"after"}:
        return None
    return valid_delay(fields["after"])


@dataclass(frozen=True)
class ComebackNote:
    """What a worker that lost its scheduler leaves for the worker its nanny starts next."""

    scheduler: str
    at: float  # time.time() when it was written
    after: float | None = None  # the delay the scheduler told it; None: told nothing

    def to_json(self) -> str:
        return json.dumps({"scheduler": self.scheduler, "at": self.at, "after": self.after})

    @classmethod
    def from_json(cls, text: str, now: float) -> ComebackNote | None:
        """The note, or None if it is not one or is older than NOTE_LIFETIME."""
        try:
            raw = json.loads(text)
        except ValueError:
            return None
        if not isinstance(raw, dict) or set(raw) != {"scheduler", "at", "after"}:
            return None
        at, after = raw["at"], raw["after"]
        if not isinstance(raw["scheduler"], str) or len(raw["scheduler"]) > 256:
            return None
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not 0 <= now - at <= NOTE_LIFETIME:
            return None
        if after is not None and valid_delay(after) is None:
            return None
        return cls(raw["scheduler"], float(at), None if after is None else float(after))


def worker_file(cache_dir: Path, folder: str, name: object, suffix: str) -> Path | None:
    """A named worker's own file in its cache folder (`folder/NAME-HASH.suffix`), which the
    worker its nanny restarts under the same name finds again; None for an unnamed worker."""
    if name is None or str(name) == "":
        return None
    text = str(name)
    label = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:40]
    return Path(cache_dir) / folder / f"{label}-{hashlib.sha256(text.encode()).hexdigest()[:12]}{suffix}"
