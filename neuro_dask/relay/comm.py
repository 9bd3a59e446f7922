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
import secrets
import ssl
import time

from distributed.comm.core import BaseListener, CommClosedError, Connector, FatalCommClosedError
from distributed.comm.registry import Backend, backends
from distributed.comm.tcp import MAX_BUFFER_SIZE, TCP, TLS
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

from neuro_dask.relay import punch
from neuro_dask.relay.book import reconnect_delay
from neuro_dask.relay.protocol import FROM_RELAY, MAX_LINE, HeaderError, decode, encode

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


# Which way this process last reached each volunteer: (relay host, port, id) -> (path, until).
# A failed hole punch is not tried again for a while: each costs up to 2 x PUNCH_DEADLINE (1.5 s).
PATHS: dict[tuple[str, int, str], tuple[str, float]] = {}
PATH_MEMORY = 600.0  # seconds
STATS = {"punched": 0, "relayed": 0, "punch_failed": 0}
MAX_PUNCHES = 8  # hole punches a volunteer runs at once, whatever its relay asks


def _punching() -> bool:
    import dask.config

    return bool(dask.config.get("neuro.client.relay-punch", default=True))


class RelayConnector(Connector):
    async def connect(self, address: str, deserialize: bool = True, **connection_args):
        host, port, vid = split_location(address)
        if not vid:
            raise FatalCommClosedError(f"{PREFIX + address} names a relay, not a volunteer (relay://HOST:PORT/ID)")
        ctx = _tls_context(connection_args)
        key = (host, port, vid)
        path, until = PATHS.get(key, ("", 0.0))
        if _punching() and not (path == "relayed" and time.monotonic() < until):
            # Relayed until a punch proves otherwise: a connect timed out mid-punch (its caller's
            # deadline) must not punch again on every retry.
            PATHS[key] = ("relayed", time.monotonic() + PATH_MEMORY)
            stream = await self._punched(host, port, vid)
            if stream is not None:
                PATHS[key] = ("punched", time.monotonic() + PATH_MEMORY)
                STATS["punched"] += 1
                return await _comm(stream, address, ctx, False, deserialize, connection_args)
            STATS["punch_failed"] += 1
        STATS["relayed"] += 1
        try:
            stream = await _dial(host, port)
            await stream.write(encode("connect", id=vid))
            reply = await _read_header(stream, frozenset({"connected", "refused"}))
        except (StreamClosedError, OSError) as exc:
            raise CommClosedError(f"relay {host}:{port} for {vid}: {exc}") from exc
        except HeaderError as exc:
            raise CommClosedError(f"relay {host}:{port} answered nonsense: {exc}") from exc
        if reply.op == "refused":
            stream.close()
            raise CommClosedError(f"relay {host}:{port} refused {vid}: {reply['reason']}")
        return await _comm(stream, address, ctx, False, deserialize, connection_args)

    async def _punched(self, host: str, port: int, vid: str) -> IOStream | None:
        """A direct connection to the volunteer through both NATs, or None (then: the relay)."""
        started = time.perf_counter()
        try:
            local, reply = await asyncio.wait_for(
                punch.exchange((host, port), encode("punch", id=vid), frozenset({"peer", "refused"})),
                punch.PUNCH_DEADLINE,
            )
            if reply.op == "refused":
                return None
            sock = await punch.simultaneous_open(local, reply["addr"])
        except (TimeoutError, OSError, HeaderError) as exc:
            log.info("relay: no hole punched to %s (%s); through the relay", vid, exc)
            return None
        log.info("relay: reached %s directly (hole punched) in %.0f ms", vid, (time.perf_counter() - started) * 1e3)
        return IOStream(sock, max_buffer_size=MAX_BUFFER_SIZE)


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
        self.key = secrets.token_urlsafe(32)  # proves this listener's claim to its id
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
                    self._spawn(self._accept(header["token"]))
                elif header.op == "introduce":
                    self._spawn(self._introduced(header["token"], header["peer"]))
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

    async def _accept(self, token: str) -> None:
        """The relay announced a caller: dial it back, accept, and hand the comm to Dask."""
        try:
            stream = await _dial(self.host, self.port)
            await stream.write(encode("accept", token=token))
        except (StreamClosedError, OSError) as exc:
            log.info("relay: could not accept a connection: %s", exc)
            return
        await self._serve(stream)

    async def _introduced(self, token: str, peer: str) -> None:
        """The relay introduced a caller for hole punching: dial each other at once."""
        if not self.punch or self.punching >= MAX_PUNCHES:
            # Off, or a relay (not trusted) asking for many at once: each would have this machine
            # send packets to an address the relay names. The caller goes through the relay.
            return
        self.punching += 1
        try:
            await self._punch_back(token, peer)
        finally:
            self.punching -= 1

    async def _punch_back(self, token: str, peer: str) -> None:
        try:
            local, _ = await asyncio.wait_for(
                punch.exchange((self.host, self.port), encode("introduced", token=token), frozenset({"peer"})),
                punch.PUNCH_DEADLINE,
            )
            sock = await punch.simultaneous_open(local, peer)
        except (TimeoutError, OSError, HeaderError) as exc:
            log.info("relay: no hole punched from %s: %s", peer, exc)
            return
        await self._serve(IOStream(sock, max_buffer_size=MAX_BUFFER_SIZE))

    async def _serve(self, stream: IOStream) -> None:
        """A caller's stream (relayed or punched): TLS if the network uses it, then Dask's handshake."""
        try:
            comm = await _comm(stream, self.contact_address[len(PREFIX) :], self.ctx, True, self.deserialize)
        except (CommClosedError, FatalCommClosedError) as exc:
            log.info("relay: a connection failed its TLS handshake: %s", exc)
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
