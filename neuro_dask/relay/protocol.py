"""The relay's header lines: what a volunteer, a caller and the relay say before the bytes flow.

A relay splices two TCP connections that were both dialled *to* it: one from whoever wants to
reach a volunteer, one from the volunteer itself (which sits behind a NAT and can only dial
out). Before splicing, each side sends one JSON line; after it, the relay only copies bytes
(TLS between the endpoints when the network uses TLS: the relay holds no key).

  volunteer control  -> {"op": "register", "key": K}       <- {"op": "registered", "id": I, "ping": s}
                     -> {"op": "ping"}                     <- {"op": "pong"}
                                                           <- {"op": "dial", "token": T}
                                                           <- {"op": "bye", "retry_after": s}
  volunteer data     -> {"op": "accept", "token": T}          (then spliced)
  caller             -> {"op": "connect", "id": I}         <- {"op": "connected"} (then spliced)
                                                           <- {"op": "refused", "reason": R}

Hole punching (both behind NATs, neither dialable): the relay introduces the two, each learns
the other's public address as the relay saw it, and both dial each other at once from the port
they used to reach the relay (a TCP simultaneous open: each NAT lets the other's packets in as
replies to its own).

  caller             -> {"op": "punch", "id": I}           <- {"op": "peer", "addr": "IP:PORT"}
  volunteer control                                        <- {"op": "introduce", "token": T, "peer": "IP:PORT"}
  volunteer (new)    -> {"op": "introduced", "token": T}   <- {"op": "peer", "addr": "IP:PORT"}

Every line comes from a peer the relay does not trust (and the relay's lines come from a relay
the endpoints do not trust): each is parsed in full here, bounded in size, and anything else
is refused. Pure: no sockets.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import math
import re
from dataclasses import dataclass
from typing import Any

MAX_LINE = 1024  # bytes, newline included: a header is a few dozen
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{32,128}$")  # the volunteer's secret: token_urlsafe(32)
ID_RE = re.compile(r"^[a-z2-7]{20}$")  # the id the relay derives from it (base32 of a hash)
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
MAX_DELAY = 3600.0  # seconds: no relay sends a volunteer away for longer than an hour


class HeaderError(ValueError):
    """A header line that is not one of the relay protocol's."""


@dataclass(frozen=True)
class Header:
    op: str
    fields: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]


# op -> {field: checker}; every field required, no other field allowed
def _string(pattern: re.Pattern) -> Any:
    return lambda v: isinstance(v, str) and bool(pattern.match(v))


def _seconds(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= MAX_DELAY


def _endpoint(v: Any) -> bool:
    """ "IP:PORT" (IPv6 as [IP]:PORT): an address as the relay saw it, nothing else."""
    if not isinstance(v, str) or len(v) > 64:
        return False
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return False
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        return False
    return True


def _reason(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 200 and v.isprintable()


SCHEMAS: dict[str, dict[str, Any]] = {
    # to the relay
    "register": {"key": _string(KEY_RE)},
    "ping": {},
    "accept": {"token": _string(TOKEN_RE)},
    "connect": {"id": _string(ID_RE)},
    "punch": {"id": _string(ID_RE)},
    "introduced": {"token": _string(TOKEN_RE)},
    # from the relay
    "registered": {"id": _string(ID_RE), "ping": _seconds},
    "pong": {},
    "dial": {"token": _string(TOKEN_RE)},
    "bye": {"retry_after": _seconds},
    "connected": {},
    "refused": {"reason": _reason},
    "introduce": {"token": _string(TOKEN_RE), "peer": _endpoint},
    "peer": {"addr": _endpoint},
}
TO_RELAY = frozenset({"register", "ping", "accept", "connect", "punch", "introduced"})
FROM_RELAY = frozenset(SCHEMAS) - TO_RELAY


def encode(op: str, **fields: Any) -> bytes:
    """One header line; checked as the receiver will check it."""
    line = json.dumps({"op": op, **fields}, separators=(",", ":")).encode() + b"\n"
    decode(line, frozenset({op}))
    return line


def decode(line: bytes, allowed: frozenset[str]) -> Header:
    """A header line -> Header, if it is one of `allowed` ops with exactly its fields."""
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise HeaderError(f"a header is one line of at most {MAX_LINE} bytes")
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError):
        raise HeaderError("a header is a JSON object") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("op"), str):
        raise HeaderError("a header is a JSON object with an op")
    op = raw.pop("op")
    if op not in allowed:
        raise HeaderError(f"op {op[:32]!r} is not allowed here")
    schema = SCHEMAS[op]
    if set(raw) != set(schema):
        raise HeaderError(f"{op} takes exactly {sorted(schema)}")
    for name, check in schema.items():
        if not check(raw[name]):
            raise HeaderError(f"{op}: bad {name}")
    return Header(op, raw)


def volunteer_id(key: str) -> str:
    """The relay address's id for a volunteer's secret key: only the key's holder can claim it,
    across reconnections and relay restarts, and the id does not reveal the key."""
    digest = hashlib.sha256(b"neuro-relay-id\0" + key.encode()).digest()
    return base64.b32encode(digest).decode().lower()[:20]
