"""Model channels: a name ("adder", "mixtral-chat") whose current version can move to a new one
(a federated round's output, a re-quantised checkpoint) without a request being dropped.
Pure: model ids, request ids and times in, decisions out; the scheduler plugin enacts them.

Rules (docs/privacy.md, "New versions"):
1. The first version published on a channel becomes its current one. A later one becomes its
   *candidate*: published (its experts are placed beside the current ones) but not used by
   following clients. A newer candidate replaces an unadopted one, which retires.
2. Adoption makes the candidate current, only once every one of its experts is served (the
   caller says whether it is); the previous current version starts *retiring*.
   Adoption comes from the operator or, with `adoption="vote"`, only from a passed governance
   proposal (an approval waits for readiness, then adopts).
3. Every request leases its model version from begin to end (a lease also ends after
   `lease_seconds`, so a client that died mid-request cannot hold a version forever).
   A request may begin on a retiring version (clients that pinned it keep working while it
   drains) and is told the channel's current version, so a following client switches first.
4. A retiring version is retired (unpublished: its experts dropped from the workers) once it has
   no live lease and `drain_seconds` have passed since it started retiring. A request on a
   retired version is refused with the version to load instead.
5. Votes are read only where `adoption="vote"` and a ledger holds the proposals; each passed
   proposal is read once (the highest proposal id seen is remembered). An approved version is
   adopted only once it is served.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from neuro_dask.errors import NeuroDaskError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ADOPTION_MODES = ("operator", "vote")


class VersionError(NeuroDaskError):
    """A channel operation that the rules refuse (the message says which rule and what to do)."""


class RetiredVersionError(VersionError):
    def __init__(self, model: str, channel: str, current: str | None):
        self.model, self.channel, self.current = model, channel, current
        super().__init__(
            f"model {model} was retired from channel {channel!r}"
            + (f"; its current version is {current}: load that (or nd.follow({channel!r}, client))" if current else "")
        )


def check_channel_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise VersionError(
            f"channel name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


@dataclass
class Channel:
    name: str
    current: str | None = None
    candidate: str | None = None
    approved: str | None = None  # a candidate a vote approved, adopted as soon as it is served
    history: list[str] = field(default_factory=list)  # every version that was current, oldest first

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "current": self.current,
            "candidate": self.candidate,
            "approved": self.approved,
            "history": list(self.history),
        }


@dataclass(frozen=True)
class Lease:
    model: str
    expires: float


class ModelChannels:
    def __init__(self, adoption: str = "operator", lease_seconds: float = 600.0, drain_seconds: float = 30.0):
        if adoption not in ADOPTION_MODES:
            raise VersionError(f"adoption {adoption!r}: one of {', '.join(ADOPTION_MODES)}")
        if lease_seconds <= 0 or drain_seconds < 0:
            raise VersionError(f"lease_seconds ({lease_seconds}) must be > 0 and drain_seconds ({drain_seconds}) >= 0")
        self.adoption = adoption
        self.lease_seconds = float(lease_seconds)
        self.drain_seconds = float(drain_seconds)
        self.channels: dict[str, Channel] = {}
        self.channel_of: dict[str, str] = {}  # model -> its channel
        self.retiring: dict[str, float] = {}  # model -> since when
        self.retired: dict[str, str] = {}  # model -> channel it was retired from
        self.leases: dict[str, Lease] = {}  # request -> lease

    # ---- publishing and adoption (rules 1, 2) --------------------------------------------------

    def publish(self, channel: str, model: str, now: float) -> tuple[str, list[str]]:
        """(the model's role on the channel: current | candidate, models that start retiring)."""
        check_channel_name(channel)
        other = self.channel_of.get(model)
        if other is not None and other != channel:
            raise VersionError(f"model {model} is already on channel {other!r}; a version belongs to one channel")
        if model in self.retired or model in self.retiring:
            raise VersionError(f"model {model} was replaced on channel {channel!r}; publish a new version instead")
        ch = self.channels.setdefault(channel, Channel(channel))
        self.channel_of[model] = channel
        if ch.current is None or ch.current == model:
            ch.current = model
            if not ch.history or ch.history[-1] != model:
                ch.history.append(model)
            return "current", []
        if ch.candidate == model:
            return "candidate", []
        replaced = [ch.candidate] if ch.candidate else []
        for old in replaced:
            self.retiring[old] = now
        ch.candidate, ch.approved = model, None
        return "candidate", replaced

    def adopt(self, channel: str, model: str, ready: bool, now: float, by_vote: bool = False) -> list[str]:
        """Make the candidate current; returns the models that start retiring."""
        ch = self._channel(channel)
        if self.adoption == "vote" and not by_vote:
            raise VersionError(
                f"channel {channel!r}: versions are adopted by governance vote on this network "
                f"(neuro-dask gov propose-version {channel} {model})"
            )
        if ch.current == model:
            return []
        if ch.candidate != model:
            raise VersionError(
                f"model {model} is not the candidate of channel {channel!r} "
                f"(candidate: {ch.candidate}); publish it with --channel {channel} first"
            )
        if not ready:
            raise VersionError(
                f"model {model} is not served yet (some of its experts have no live replica): "
                "adopt it once the workers have loaded it"
            )
        old = ch.current
        ch.current, ch.candidate, ch.approved = model, None, None
        ch.history.append(model)
        if old is not None:
            self.retiring[old] = now
        return [old] if old is not None else []

    def approve(self, channel: str, model: str) -> None:
        """A vote passed: adopt `model` as soon as it is the served candidate (see `due_adoptions`)."""
        ch = self._channel(channel)
        if ch.candidate != model and ch.current != model:
            raise VersionError(f"model {model} is neither candidate nor current on channel {channel!r}")
        if ch.candidate == model:
            ch.approved = model

    def due_adoptions(self) -> list[tuple[str, str]]:
        """(channel, model) approved by a vote and not yet adopted."""
        return [(c.name, c.approved) for c in self.channels.values() if c.approved]

    # ---- requests (rules 3, 4) -----------------------------------------------------------------

    def begin(self, model: str, request: str, now: float) -> dict:
        """Lease `model` for `request`: {"current": the channel's current version, "channel": name}
        ({} and no lease for a model on no channel). Raises RetiredVersionError on a retired version."""
        if model in self.retired:
            channel = self.retired[model]
            raise RetiredVersionError(model, channel, self.channels[channel].current)
        channel = self.channel_of.get(model)
        if channel is None:  # never retired: nothing to lease
            return {}
        self.leases[request] = Lease(model, now + self.lease_seconds)
        return {"channel": channel, "current": self.channels[channel].current}

    def end(self, request: str) -> None:
        self.leases.pop(request, None)

    def live_leases(self, model: str, now: float) -> int:
        return sum(1 for lease in self.leases.values() if lease.model == model and lease.expires > now)

    def retirable(self, now: float) -> list[str]:
        """Retiring versions with no live lease and past their drain time: retire them now."""
        self._expire(now)
        done = [
            m
            for m, since in sorted(self.retiring.items())
            if now - since >= self.drain_seconds and self.live_leases(m, now) == 0
        ]
        for m in done:
            del self.retiring[m]
            self.retired[m] = self.channel_of.pop(m)
        return done

    def status(self, now: float) -> dict:
        return {
            "adoption": self.adoption,
            "channels": {n: c.as_dict() for n, c in sorted(self.channels.items())},
            "retiring": {m: {"since": s, "leases": self.live_leases(m, now)} for m, s in sorted(self.retiring.items())},
            "retired": dict(sorted(self.retired.items())),
        }

    # ---- persistence (the scheduler's state file) -----------------------------------------------

    def to_dict(self) -> dict:
        """Channels, retiring and retired versions; leases are not kept (their requests died with
        the scheduler that held them)."""
        return {
            "channels": {n: c.as_dict() for n, c in sorted(self.channels.items())},
            "retiring": {m: self.channel_of[m] for m in sorted(self.retiring)},
            "retired": dict(sorted(self.retired.items())),
        }

    def restore(self, data: dict, now: float) -> None:
        """Load what `to_dict` wrote; retiring versions start draining again from `now`."""
        for name, ch in data.get("channels", {}).items():
            channel = Channel(
                check_channel_name(name),
                ch.get("current"),
                ch.get("candidate"),
                ch.get("approved"),
                list(ch.get("history", [])),
            )
            self.channels[name] = channel
            for model in {*channel.history, channel.candidate} - {None}:
                self.channel_of[model] = name
        self.retired = {str(m): str(c) for m, c in data.get("retired", {}).items()}
        for model in self.retired:
            self.channel_of.pop(model, None)
        retiring = {str(m): str(c) for m, c in data.get("retiring", {}).items() if m not in self.retired}
        self.channel_of.update(retiring)
        self.retiring = {m: now for m in retiring}

    def _expire(self, now: float) -> None:
        for request in [r for r, lease in self.leases.items() if lease.expires <= now]:
            del self.leases[request]

    def _channel(self, channel: str) -> Channel:
        ch = self.channels.get(channel)
        if ch is None:
            raise VersionError(f"no channel {channel!r} on this scheduler (publish with --channel {channel})")
        return ch


# ---- adoption by vote (rule 5) -----------------------------------------------------------------


def reads_votes(adoption: str, ledger_on: bool) -> bool:
    """Rule 5: passed proposals adopt versions only where votes decide and a ledger holds them."""
    return ledger_on and adoption == "vote"


def last_proposal_seen(seen: int, passed: Iterable[Mapping[str, Any]]) -> int:
    """Rule 5: the highest proposal id read so far (the next read starts after it)."""
    return max([seen, *(int(a["proposal"]) for a in passed)])


def ready_adoptions(due: Iterable[tuple[str, str]], served: Callable[[str], bool]) -> list[tuple[str, str]]:
    """Rule 5: the approved (channel, model) pairs whose model is served: adopt these now."""
    return [(channel, model) for channel, model in due if served(model)]
