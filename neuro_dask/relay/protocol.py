"""The relay's header lines: what a volunteer, a caller and the relay say before the bytes flow.

A relay splices two TCP connections that were both dialled *to* it: one from whoever wants to
reach a volunteer, one from the volunteer itself (which sits behind a NAT and can only dial
out). Before splicing, each side sends one JSON line; after it, the relay only copies bytes
(TLS between the endpoints when the network uses TLS: the relay holds no key).

  volunteer control  -> {"op": "register", "key": K}       <- {"op": "registered", "id": I, "ping": s}
                     -> {"op": "ping"}                     <- {"op": "pong"}
                                                           <- {"op": "dial", "token": T, "probes": n}
                                                           <- {"op": "bye", "retry_after": s}
  volunteer data     -> {"op": "accept", "token": T}          (then spliced)
  caller             -> {"op": "connect", "id": I, "probes": n}
                                                           <- {"op": "connected"} (then spliced)
                                                           <- {"op": "refused", "reason": R}

Hole punching (both behind NATs, neither dialable): the relay introduces the two, each learns
the other's public address as the relay saw it (and the address it says it has on its own
LAN), and both dial each other at once from the port they used to reach the relay (a TCP
simultaneous open: each NAT lets the other's packets in as replies to its own). Two machines
behind the same router (the relay saw one public address for both) also try each other's LAN
address, since home routers seldom loop traffic for their own public address back in.

  caller             -> {"op": "punch", "id": I, "lan": "IP:PORT", "probes": n}
                                                           <- {"op": "peer", "addr": A, "lan": L, "you": Y}
  volunteer control                                        <- {"op": "introduce", "token": T, "probes": n}
  volunteer (new)    -> {"op": "introduced", "token": T, "lan": "IP:PORT"}
                                                           <- {"op": "peer", "addr": A, "lan": L, "you": Y}

Measuring a path (`probes` n > 0): on the new stream, before anything else, the caller sends
{"op": "probe"} and the volunteer answers {"op": "echo"}, n times; each is one round trip of
that path, so a caller can time the relayed and the punched path side by side and keep the
faster. The relay passes n on to the volunteer, so nothing else is ever read from a stream
before Dask's (or TLS's) own bytes.

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
MAX_PROBES = 8  # round trips a caller may ask a volunteer to echo on one new stream


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


def _probes(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_PROBES


def _reason(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 200 and v.isprintable()


SCHEMAS: dict[str, dict[str, Any]] = {
    # to the relay
    "register": {"key": _string(KEY_RE)},
    "ping": {},
    "accept": {"token": _string(TOKEN_RE)},
    "connect": {"id": _string(ID_RE), "probes": _probes},
    "punch": {"id": _string(ID_RE), "lan": _endpoint, "probes": _probes},
    "introduced": {"token": _string(TOKEN_RE), "lan": _endpoint},
    # from the relay
    "registered": {"id": _string(ID_RE), "ping": _seconds},
    "pong": {},
    "dial": {"token": _string(TOKEN_RE), "probes": _probes},
    "bye": {"retry_after": _seconds},
    "connected": {},
    "refused": {"reason": _reason},
    "introduce": {"token": _string(TOKEN_RE), "probes": _probes},
    "peer": {"addr": _endpoint, "lan": _endpoint, "you": _endpoint},
    # between the endpoints, on a new stream, before Dask's bytes
    "probe": {},
    "echo": {},
}
TO_RELAY = frozenset({"register", "ping", "accept", "connect", "punch", "introduced"})
ON_STREAM = frozenset({"probe", "echo"})
FROM_RELAY = frozenset(SCHEMAS) - TO_RELAY - ON_STREAM


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


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """ "IP:PORT" or "[IP6]:PORT" -> (IP, PORT)."""
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def punch_candidates(peer: Header) -> list[str]:
    """Where to dial the peer a relay's `peer` line names: its public address, and its LAN
    address too when the relay saw both of us at one public address (one router: it seldom
    loops traffic for its own address back in).

    The relay is not trusted: a LAN address is tried only if it is one (private or link-local,
    not loopback, not ours to name as the public one) with an ephemeral-range port, which every
    socket bound to port 0 gets. A relay that lies can still have us send SYNs to one more
    address than it could before, never to this machine's own services."""
    out = [peer["addr"]]
    lan = peer["lan"]
    if split_endpoint(peer["you"])[0] != split_endpoint(peer["addr"])[0] or lan == peer["addr"]:
        return out
    host, port = split_endpoint(lan)
    ip = ipaddress.ip_address(host)
    if (ip.is_private or ip.is_link_local) and not (ip.is_loopback or ip.is_unspecified) and port >= 1024:
        out.append(lan)
    return out


# A relayed path is taken over a direct one only when clearly faster: two links are rarely
# quicker than one, and on a quiet LAN both round trips are noise-sized.
PATH_MARGIN = 0.2  # relative
PATH_SLACK_MS = 1.0


def faster_path(rtt_ms: dict[str, float]) -> str:
    """Which measured path to keep ("relayed", "punched" or "lan"): the fastest direct one,
    unless the relayed one beats it by PATH_MARGIN and PATH_SLACK_MS."""
    direct = {p: ms for p, ms in rtt_ms.items() if p != "relayed"}
    if not direct:
        return "relayed"
    best = min(direct, key=direct.__getitem__)
    relayed = rtt_ms.get("relayed")
    if relayed is not None and relayed + max(PATH_SLACK_MS, PATH_MARGIN * direct[best]) < direct[best]:
        return "relayed"
    return best
