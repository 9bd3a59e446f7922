"""A Dask comm backend for `relay://RELAY_HOST:PORT/ID`: reach a volunteer through the relay it dialled.

A worker started with `--listen-address relay://RELAY_HOST:PORT` (or `protocol="relay"`,
`host=RELAY_HOST`, `port=PORT`) opens no port: its listener keeps one control connection to the
relay and, for every incoming connection the relay announces, dials the relay again and
accepts it there. Its contact address is `relay://RELAY_HOST:PORT/ID`, so the scheduler, clients
(both transports) and other workers reach it with Dask's ordinary `connect`, and nothing else
in Dask or neuro_dask knows. Registered under Dask's comm backend entry point
(`distributed.comm.backends`) and on import.

With TLS configured (connection args carry an `ssl_context`), the TLS handshake runs between
the caller and the volunteer over the splice, with the same certificates and roles as a
direct connection: the relay sees only ciphertext and holds no key.

Before it goes through the relay, a caller tries to reach the volunteer directly by TCP hole
punching (relay/punch.py; `neuro.client.relay-punch`, and the volunteer's
`neuro.worker.relay-punch`); where that fails it takes the relay, and remembers (PATHS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from distributed.comm.core import BaseListener, CommClosedError, Connector, FatalCommClosedError
from distributed.comm.registry import Backend, backends
from distributed.comm.tcp import MAX_BUFFER_SIZE, TCP, TLS
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

from neuro_dask.relay import punch
from neuro_dask.relay.protocol import (
    FROM_RELAY,
    KEY_RE,
    MAX_LINE,
    HeaderError,
    decode,
    encode,
    faster_path,
    punch_candidates,
)
from neuro_dask.volunteer.comeback import reconnect_delay

log = logging.getLogger(__name__)

SCHEME = "relay"
PREFIX = SCHEME + "://"


def split_location(loc: str) -> tuple[str, int, str]:
    """ "host:port/ID" -> (host, port, ID); "host:port" (a listen address) -> (host, port, "")."""
    hostport, _, vid = loc.partition("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"a relay address is relay://HOST:PORT[/ID], got {PREFIX + loc!r}")
    return host.strip("[]"), int(port), vid


async def _dial(host: str, port: int) -> IOStream:
    return await TCPClient().connect(host, port, max_buffer_size=MAX_BUFFER_SIZE)


async def _read_header(stream: IOStream, allowed: frozenset[str]):
    line = await stream.read_until(b"\n", max_bytes=MAX_LINE)
    return decode(bytes(line), allowed)


def _tls_context(connection_args: dict) -> ssl.SSLContext | None:
    ctx = connection_args.get("ssl_context")
    if ctx is None and connection_args.get("require_encryption"):
        raise RuntimeError("encryption required by Dask configuration: a relay address needs a TLS context")
    return ctx


@dataclass
class PathChoice:
    """How this process reaches one volunteer, and the round trips that decided it."""

    path: str  # relayed | punched (through both NATs) | lan (one router, its LAN)
    until: float  # time.monotonic() after which the paths are measured again
    rtt_ms: dict[str, float] = field(default_factory=dict)  # path -> measured round trip


# Which way this process reaches each volunteer: (relay host, port, id) -> PathChoice. The first
# connection measures the relayed and the punched path side by side (PROBES round trips each)
# and keeps the faster (protocol.faster_path); later ones take it without measuring, until
# PATH_MEMORY passes. A failed hole punch costs up to 2 x PUNCH_DEADLINE (1.5 s): not retried.
# Worst case, the first connection waits 2 x PUNCH_DEADLINE + PROBE_DEADLINE (2.5 s), inside the
# direct transport's 3 s connect timeout.
PATHS: dict[tuple[str, int, str], PathChoice] = {}
PATH_MEMORY = 600.0  # seconds
PROBES = 3
PROBE_DEADLINE = 1.0  # seconds for PROBES round trips on a new stream (a relay may lie about probes)
STATS = {"punched": 0, "lan": 0, "relayed": 0, "punch_failed": 0, "measured": 0}
MAX_PUNCHES = 8  # hole punches a volunteer runs at once, whatever its relay asks


def paths() -> dict[str, dict]:
    """{relay:// address: {"path", "rtt_ms"}} for every volunteer this process has reached
    (the latency book and the dashboard's per-client path)."""
    return {
        f"{PREFIX}{host}:{port}/{vid}": {"path": c.path, "rtt_ms": dict(c.rtt_ms)}
        for (host, port, vid), c in list(PATHS.items())
    }


def _punching() -> bool:
    import dask.config

    return bool(dask.config.get("neuro.client.relay-punch", default=True))


async def _probe(stream: IOStream, probes: int) -> float:
    """The fastest of `probes` round trips on a new stream, in ms (nan for none)."""
    best = math.nan
    for _ in range(probes):
        started = time.perf_counter()
        await stream.write(encode("probe"))
        await _read_header(stream, frozenset({"echo"}))
        ms = (time.perf_counter() - started) * 1e3
        best = ms if math.isnan(best) else min(best, ms)
    return best


async def _echo(stream: IOStream, probes: int) -> None:
    """The volunteer's side of _probe."""
    for _ in range(probes):
        await _read_header(stream, frozenset({"probe"}))
        await stream.write(encode("echo"))


class RelayConnector(Connector):
    async def connect(self, address: str, deserialize: bool = True, **connection_args):
        host, port, vid = split_location(address)
        if not vid:
            raise FatalCommClosedError(f"{PREFIX + address} names a relay, not a volunteer (relay://HOST:PORT/ID)")
        ctx = _tls_context(connection_args)
        key = (host, port, vid)
        task = _adopt(key) or asyncio.create_task(self._open(host, port, vid))
        try:
            # Dask cuts each connect attempt at a fifth of its timeout and tries again: a punch or
            # a measurement cut off goes on, and the next attempt takes its stream (_adopt).
            stream = await asyncio.shield(task)
        except asyncio.CancelledError:
            _orphan(key, task)
            raise
        return await _comm(stream, address, ctx, False, deserialize, connection_args)

    async def _open(self, host: str, port: int, vid: str) -> IOStream:
        """A stream to the volunteer: measured on the first connection (and after PATH_MEMORY),
        then along the path that measured fastest."""
        key = (host, port, vid)
        known = PATHS.get(key)
        if known is None or time.monotonic() >= known.until:
            stream, PATHS[key] = await self._measured(host, port, vid)
            return stream
        if known.path != "relayed" and _punching():
            punched = await self._punched(host, port, vid, 0)
            if punched is not None:
                STATS[punched[1]] += 1
                return punched[0]
            STATS["punch_failed"] += 1
            known.path = "relayed"  # until the next measurement
        STATS["relayed"] += 1
        return (await self._relayed(host, port, vid, 0))[0]

    async def _measured(self, host: str, port: int, vid: str) -> tuple[IOStream, PathChoice]:
        """Both paths at once, PROBES round trips on each: the faster stream, the other closed.
        (With punching off, the relayed path alone, timed once for the latency book.)"""
        punching = _punching()
        tries = [self._relayed(host, port, vid, PROBES if punching else 1)]  # one path: its round trip, once
        if punching:
            tries.append(self._punched(host, port, vid, PROBES))
        relayed, *punched = await asyncio.gather(*tries, return_exceptions=True)
        found: dict[str, tuple[IOStream, float]] = {}
        if not isinstance(relayed, BaseException):
            found["relayed"] = relayed
        if punched and isinstance(punched[0], tuple):
            stream, kind, rtt = punched[0]
            found[kind] = (stream, rtt)
        elif punched:
            STATS["punch_failed"] += 1
        if not found:
            raise relayed
        rtt_ms = {kind: round(rtt, 3) for kind, (_, rtt) in found.items()}
        best = faster_path(rtt_ms)
        for kind, (stream, _) in found.items():
            if kind != best:
                stream.close()
        STATS[best] += 1
        STATS["measured"] += 1
        log.info("relay: %s reached %s (round trips, ms: %s)", vid, best, rtt_ms)
        return found[best][0], PathChoice(best, time.monotonic() + PATH_MEMORY, rtt_ms)

    async def _relayed(self, host: str, port: int, vid: str, probes: int) -> tuple[IOStream, float]:
        stream = None
        try:
            stream = await _dial(host, port)
            await stream.write(encode("connect", id=vid, probes=probes))
            reply = await _read_header(stream, frozenset({"connected", "refused"}))
            if reply.op == "refused":
                raise CommClosedError(f"relay {host}:{port} refused {vid}: {reply['reason']}")
            return stream, await _probe(stream, probes)
        except (StreamClosedError, OSError) as exc:
            _close(stream)
            raise CommClosedError(f"relay {host}:{port} for {vid}: {exc}") from exc
        except HeaderError as exc:
            _close(stream)
            raise CommClosedError(f"relay {host}:{port} answered nonsense: {exc}") from exc
        except BaseException:
            _close(stream)
            raise

    async def _punched(self, host: str, port: int, vid: str, probes: int) -> tuple[IOStream, str, float] | None:
        """A direct connection to the volunteer through both NATs (or over the LAN they share),
        its kind and measured round trip; None where none opens (then: the relay)."""
        started = time.perf_counter()
        try:
            local, reply = await asyncio.wait_for(
                punch.exchange(
                    (host, port),
                    lambda lan: encode("punch", id=vid, lan=lan, probes=probes),
                    frozenset({"peer", "refused"}),
                ),
                punch.PUNCH_DEADLINE,
            )
            if reply.op == "refused":
                return None
            sock, where = await punch.first_open(local, punch_candidates(reply))
        except (TimeoutError, OSError, HeaderError) as exc:
            log.info("relay: no hole punched to %s (%s); through the relay", vid, exc)
            return None
        kind = "punched" if where == reply["addr"] else "lan"
        stream = IOStream(sock, max_buffer_size=MAX_BUFFER_SIZE)
        try:
            rtt = await asyncio.wait_for(_probe(stream, probes), PROBE_DEADLINE)
        except (TimeoutError, StreamClosedError, OSError, HeaderError) as exc:
            stream.close()
            log.info("relay: the path punched to %s did not answer its probes (%s)", vid, exc)
            return None
        except BaseException:
            stream.close()
            raise
        log.debug("relay: reached %s directly (%s) in %.0f ms", vid, kind, (time.perf_counter() - started) * 1e3)
        return stream, kind, rtt


# Streams being opened whose connect attempt was cut off: (relay host, port, id) -> tasks. The
# next attempt to the same volunteer adopts one; one nobody adopts is closed after ORPHAN_LIFE.
ORPHANS: dict[tuple[str, int, str], list[asyncio.Task]] = {}
ORPHAN_LIFE = 10.0  # seconds


def _adopt(key: tuple[str, int, str]) -> asyncio.Task | None:
    tasks = ORPHANS.get(key, [])
    while tasks:
        task = tasks.pop(0)
        if not task.done() or (not task.cancelled() and task.exception() is None):
            return task
    ORPHANS.pop(key, None)
    return None


def _orphan(key: tuple[str, int, str], task: asyncio.Task) -> None:
    ORPHANS.setdefault(key, []).append(task)

    def expire() -> None:
        if task in ORPHANS.get(key, []):
            ORPHANS[key].remove(task)
            task.add_done_callback(_close_result)

    asyncio.get_running_loop().call_later(ORPHAN_LIFE, expire)


def _close_result(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


def _close(stream: IOStream | None) -> None:
    if stream is not None:
        stream.close()


async def _comm(stream: IOStream, address: str, ctx, server_side: bool, deserialize: bool, connection_args=None):
    """Dask's own TCP comm over `stream`, or its TLS comm after a handshake between the endpoints."""
    if server_side:  # this volunteer, and whoever the stream comes from
        local, peer = PREFIX + address, "tcp://" + _sockname(stream, peer=True)
    else:
        local, peer = "tcp://" + _sockname(stream), PREFIX + address
    if ctx is None:
        return TCP(stream, local, peer, deserialize)
    try:
        if server_side:
            stream = await stream.start_tls(True, ssl_options=ctx)
            await stream.wait_for_handshake()
        else:
            hostname = (connection_args or {}).get("server_hostname")
            stream = await stream.start_tls(False, ssl_options=ctx, server_hostname=hostname)
    except ssl.SSLError as exc:
        raise FatalCommClosedError(f"TLS with {peer} failed: {exc}") from exc
    except (StreamClosedError, OSError) as exc:
        raise CommClosedError(f"TLS with {peer}: {exc}") from exc
    return TLS(stream, local, peer, deserialize)


def _volunteer_punches() -> bool:
    import dask.config

    return bool(dask.config.get("neuro.worker.relay-punch", default=True))


class RelayListener(BaseListener):
    """Listens by keeping a connection to the relay; see the module docstring."""

    prefix = PREFIX  # Dask's worker logs its listening address with it

    def __init__(self, loc: str, handle_comm, deserialize: bool = True, **connection_args):
        super().__init__()
        self.host, self.port, _ = split_location(loc)
        self.comm_handler = handle_comm
        self.deserialize = deserialize
        self.allow_offload = connection_args.get("allow_offload", True)
        self.ctx = _tls_context(connection_args)
        # proves this listener's claim to its id; kept in a file, the id outlives the process
        self.key = load_or_create_key(connection_args.get("relay_key_file"))
        self.vid = ""
        self.ping = 10.0
        self._control: IOStream | None = None
        self._loop_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopped = False
        self.reconnects = 0
        self.punch = _volunteer_punches()
        self.punching = 0  # hole punches in flight

    async def start(self) -> None:
        """Register with the relay (an unreachable relay fails the worker's start, clearly)."""
        try:
            await self._register()
        except (StreamClosedError, OSError, HeaderError) as exc:
            raise OSError(f"cannot register with the relay at {self.host}:{self.port}: {exc}") from exc
        self._loop_task = asyncio.create_task(self._keep_registered())

    async def _register(self) -> None:
        stream = await _dial(self.host, self.port)
        await stream.write(encode("register", key=self.key))
        reply = await _read_header(stream, frozenset({"registered", "refused"}))
        if reply.op == "refused":
            stream.close()
            raise OSError(f"the relay refused: {reply['reason']}")
        self.vid, self.ping = reply["id"], float(reply["ping"]) or 10.0
        self._control = stream
        log.info("relay: registered at %s", self.contact_address)

    async def _keep_registered(self) -> None:
        attempt = 0
        while not self._stopped:
            retry_after = await self._serve_control()
            if self._stopped:
                return
            delay = retry_after if retry_after is not None else reconnect_delay(attempt)
            log.info("relay: lost the relay at %s; back in %.1f s", self.address_of_relay, delay)
            await asyncio.sleep(delay)
            try:
                await self._register()
                self.reconnects += 1
                attempt = 0
            except (StreamClosedError, OSError, HeaderError) as exc:
                log.info("relay: cannot reach %s yet: %s", self.address_of_relay, exc)
                attempt += 1

    async def _serve_control(self) -> float | None:
        """Answer the relay's dials and keep the connection alive; the relay's retry_after if it
        said goodbye, None if the connection just died."""
        stream = self._control
        pinger = asyncio.create_task(self._pings(stream))
        try:
            while True:
                line = await asyncio.wait_for(stream.read_until(b"\n", max_bytes=MAX_LINE), 3 * self.ping)
                header = decode(bytes(line), FROM_RELAY - {"registered", "connected", "refused"})
                if header.op == "dial":
                    self._spawn(self._accept(header["token"], header["probes"]))
                elif header.op == "introduce":
                    self._spawn(self._introduced(header["token"], header["probes"]))
                elif header.op == "bye":
                    return float(header["retry_after"])
        except (TimeoutError, StreamClosedError, OSError, HeaderError) as exc:
            log.debug("relay control connection ended: %r", exc)
            return None
        finally:
            pinger.cancel()
            stream.close()

    async def _pings(self, stream: IOStream) -> None:
        with contextlib.suppress(StreamClosedError, OSError):
            while True:
                await asyncio.sleep(self.ping)
                await stream.write(encode("ping"))

    async def _accept(self, token: str, probes: int) -> None:
        """The relay announced a caller: dial it back, accept, and hand the comm to Dask."""
        try:
            stream = await _dial(self.host, self.port)
            await stream.write(encode("accept", token=token))
        except (StreamClosedError, OSError) as exc:
            log.info("relay: could not accept a connection: %s", exc)
            return
        await self._serve(stream, probes)

    async def _introduced(self, token: str, probes: int) -> None:
        """The relay introduced a caller for hole punching: dial each other at once."""
        if not self.punch or self.punching >= MAX_PUNCHES:
            # Off, or a relay (not trusted) asking for many at once: each would have this machine
            # send packets to an address the relay names. The caller goes through the relay.
            return
        self.punching += 1
        try:
            await self._punch_back(token, probes)
        finally:
            self.punching -= 1

    async def _punch_back(self, token: str, probes: int) -> None:
        """Dial the caller's public address (and its LAN one, behind the same router) at once;
        serve each that opens (the caller keeps one and closes the rest)."""
        try:
            local, peer = await asyncio.wait_for(
                punch.exchange(
                    (self.host, self.port), lambda lan: encode("introduced", token=token, lan=lan), frozenset({"peer"})
                ),
                punch.PUNCH_DEADLINE,
            )
        except (TimeoutError, OSError, HeaderError) as exc:
            log.info("relay: no introduction for a hole punch: %s", exc)
            return

        async def dial(candidate: str) -> None:
            try:
                if candidate == peer["addr"]:
                    sock = await punch.simultaneous_open(local, candidate)
                else:  # the caller's LAN address: it dials, this side listens (punch.accept_from)
                    sock = await punch.accept_from(local, candidate)
            except OSError as exc:
                log.debug("relay: no hole punched from %s: %s", candidate, exc)
                return
            self._spawn(self._serve(IOStream(sock, max_buffer_size=MAX_BUFFER_SIZE), probes))

        await asyncio.gather(*(dial(c) for c in punch_candidates(peer)))

    async def _serve(self, stream: IOStream, probes: int) -> None:
        """A caller's stream (relayed or punched): its probes answered, TLS if the network uses
        it, then Dask's handshake."""
        try:
            await asyncio.wait_for(_echo(stream, probes), PROBE_DEADLINE)
            comm = await _comm(stream, self.contact_address[len(PREFIX) :], self.ctx, True, self.deserialize)
        except (CommClosedError, FatalCommClosedError) as exc:  # before OSError: they are OSErrors
            log.info("relay: a connection failed its TLS handshake: %s", exc)
            return
        except (TimeoutError, StreamClosedError, OSError, HeaderError) as exc:
            log.debug("relay: a connection closed during its probes: %r", exc)
            stream.close()
            return
        comm.allow_offload = self.allow_offload
        try:
            await self.on_connection(comm)
        except CommClosedError:
            log.info("relay: a connection closed before its handshake completed")
            return
        await self.comm_handler(comm)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stop(self) -> None:
        self._stopped = True
        if self._loop_task is not None:
            self._loop_task.cancel()
        if self._control is not None:
            self._control.close()
        for task in list(self._tasks):
            task.cancel()

    @property
    def encrypted(self) -> bool:
        """TLS between the endpoints (hardened mode then enforces certificate roles)."""
        return self.ctx is not None

    @property
    def address_of_relay(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def listen_address(self) -> str:
        return self.contact_address

    @property
    def contact_address(self) -> str:
        return f"{PREFIX}{self.host}:{self.port}/{self.vid}"


def load_or_create_key(path: str | None) -> str:
    """The relay key in `path` (created, owner-only, if missing or not a key); a fresh one
    without a path."""
    if not path:
        return secrets.token_urlsafe(32)
    file = Path(path)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        key = file.read_text().strip()
        if KEY_RE.match(key):
            return key
    key = secrets.token_urlsafe(32)
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(file.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    os.replace(file.with_suffix(".tmp"), file)
    return key


class RelayBackend(Backend):
    def get_connector(self):
        return RelayConnector()

    def get_listener(self, loc, handle_comm, deserialize, **connection_args):
        return RelayListener(loc, handle_comm, deserialize, **connection_args)

    def get_address_host(self, loc):
        return split_location(loc)[0]

    def get_address_host_port(self, loc):
        host, port, _ = split_location(loc)
        return host, port

    def resolve_address(self, loc):
        return loc

    def get_local_address_for(self, loc):
        host, port, _ = split_location(loc)
        return f"{PREFIX}{host}:{port}"


def _sockname(stream: IOStream, peer: bool = False) -> str:
    with contextlib.suppress(Exception):
        host, port = (stream.socket.getpeername() if peer else stream.socket.getsockname())[:2]
        return f"{host}:{port}"
    return "?"


def register() -> None:
    """Idempotent: Dask finds the backend by its entry point too; this covers an environment
    where the package's entry points are not installed (a source checkout on sys.path)."""
    backends.setdefault(SCHEME, RelayBackend())


register()
