"""The relay: volunteers behind a NAT keep a connection to it; whoever wants them connects to it.

A caller's connection and a volunteer's fresh outbound data connection are spliced: the relay
copies bytes and never reads them (with TLS on the network, it could not: the handshake runs
between the endpoints, over the splice). It runs in the scheduler's process by default (the
scheduler preload) or alone (`neuro-dask relay`). Its decisions are relay/book.py's; its
header lines relay/protocol.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from neuro_dask.relay.book import RelayBook, RelayRefusal
from neuro_dask.relay.protocol import MAX_LINE, TO_RELAY, Header, HeaderError, decode, encode
from neuro_dask.volunteer.comeback import comeback_delays

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 10.0  # seconds a new connection has to say what it is
CHUNK = 1 << 16


@dataclass
class RelayCounters:
    """What /metrics and the dashboard show of a relay."""

    volunteers: int = 0
    spliced_now: int = 0
    spliced_total: int = 0
    refused_total: int = 0
    introduced_total: int = 0  # caller-volunteer pairs introduced for hole punching
    bytes_total: int = 0
    by_volunteer: dict[str, int] = field(default_factory=dict)  # bytes through each connected volunteer's splices


class _Control:
    """A volunteer's control connection: the relay writes dials and pongs to it."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.last_seen = time.monotonic()

    def send(self, line: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(line)


class Relay:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        ping: float = 10.0,
        dial_timeout: float = 10.0,
        comeback_spread: float = 30.0,
        header_timeout: float = HEADER_TIMEOUT,
    ):
        self.host, self.port = host, port
        self.header_timeout = header_timeout
        self.ping = ping
        self.comeback_spread = comeback_spread
        self.book = RelayBook(time.monotonic, dial_timeout=dial_timeout)
        self.counters = RelayCounters()
        self._server: asyncio.AbstractServer | None = None
        self._waiting: dict[str, asyncio.Future] = {}  # dial token -> the volunteer's data connection
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()  # every open connection, closed by stop()
        self._spliced: set[asyncio.StreamWriter] = set()
        self._sweeper: asyncio.Task | None = None

    @property
    def address(self) -> str:
        """host:port volunteers and callers dial (a `relay://` address's location)."""
        return f"{self.host}:{self.port}"

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_LINE * 2)
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = asyncio.create_task(self._sweep())
        log.info("relay listening on %s", self.address)
        return self

    async def stop(self) -> None:
        """Tell each volunteer when to come back (spread over comeback_spread seconds), then close."""
        if self._server is None:
            return
        self._server.close()
        controls = list(self.book.volunteers.values())
        for control, delay in zip(controls, comeback_delays(len(controls), self.comeback_spread), strict=True):
            with contextlib.suppress(Exception):
                control.send(encode("bye", retry_after=round(delay, 3)))
                await control.writer.drain()
        if self._sweeper is not None:
            self._sweeper.cancel()
        # Closing every connection ends its handler; cancelling the handlers instead would have
        # asyncio log each as an error (their tasks belong to the streams' protocol).
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=5)
            for task in late:
                task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None

    # ---- one incoming connection ------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        writer.transport.set_write_buffer_limits(high=4 * CHUNK)
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), self.header_timeout)
                header = decode(line, TO_RELAY)
            except (TimeoutError, HeaderError, ValueError, ConnectionError) as exc:
                self.counters.refused_total += 1
                log.debug("relay: refused a connection from %s: %s", _peer(writer), exc)
                writer.close()
                return
            if header.op == "register":
                await self._serve_volunteer(header["key"], reader, writer)
            elif header.op == "connect":
                await self._serve_caller(header["id"], header["probes"], reader, writer)
            elif header.op == "punch":
                await self._introduce(header, writer)
            elif header.op in ("accept", "introduced"):
                self._answer_dial(header, reader, writer)
                return  # the caller's side splices both, or introduces them
            else:
                writer.close()
        except asyncio.CancelledError:
            writer.close()
        except Exception:  # noqa: BLE001 - one connection's failure never takes the relay down
            log.exception("relay: connection from %s failed", _peer(writer))
            writer.close()
        finally:
            if task is not None:
                self._tasks.discard(task)
            if writer not in self._spliced:  # an accepted connection lives on in its caller's splice
                self._writers.discard(writer)

    async def _serve_volunteer(self, key: str, reader, writer) -> None:
        control = _Control(writer)
        try:
            vid, previous = self.book.register(key, control)
        except RelayRefusal as exc:
            writer.write(encode("refused", reason=str(exc)))
            writer.close()
            return
        if previous is not None:  # the same volunteer again (its router dropped the old one)
            previous.writer.close()
        self.counters.volunteers = len(self.book.volunteers)
        control.send(encode("registered", id=vid, ping=self.ping))
        log.info("relay: volunteer %s connected from %s", vid, _peer(writer))
        try:
            while True:
                line = await asyncio.wait_for(reader.readline(), 3 * self.ping)
                if not line:
                    break
                decode(line, frozenset({"ping"}))
                control.last_seen = time.monotonic()
                control.send(encode("pong"))
        except (TimeoutError, HeaderError, ConnectionError, ValueError) as exc:
            log.info("relay: volunteer %s dropped: %s", vid, exc or type(exc).__name__)
        finally:
            if self.book.unregister(vid, control):
                log.info("relay: volunteer %s gone", vid)
                self.counters.by_volunteer.pop(vid, None)  # a volunteer restarted elsewhere has a new id
            self.counters.volunteers = len(self.book.volunteers)
            writer.close()

    async def _serve_caller(self, vid: str, probes: int, reader, writer) -> None:
        line = lambda token: encode("dial", token=token, probes=probes)  # noqa: E731
        answer = await self._ask_volunteer(vid, writer, line, "accept")
        if answer is None:
            return
        v_reader, v_writer, _ = answer
        writer.write(encode("connected"))  # before any of the volunteer's bytes: the caller reads one line
        await self._splice(vid, (reader, writer), (v_reader, v_writer))

    async def _ask_volunteer(self, vid: str, writer, line, answer_op: str) -> tuple | None:
        """Send the volunteer `line(token)` over its control connection and wait for the fresh
        connection it answers with (its reader, writer and header line); None, the caller told
        why, if the volunteer is not here or does not answer in time."""
        try:
            token = self.book.open_dial(vid, writer)
        except RelayRefusal as exc:
            self.counters.refused_total += 1
            writer.write(encode("refused", reason=str(exc)))
            writer.close()
            return None
        answered: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting[token] = answered
        self.book.volunteers[vid].send(line(token))
        try:
            answer = await asyncio.wait_for(answered, self.book.dial_timeout)
        except TimeoutError:
            answer = None
        finally:
            self._waiting.pop(token, None)
            self.book.dials.pop(token, None)
        if answer is not None and answer[2].op == answer_op:
            return answer
        if answer is not None:  # a dial answered as an introduction, or the reverse
            self._spliced.discard(answer[1])
            self._writers.discard(answer[1])
            answer[1].close()
        self.counters.refused_total += 1
        writer.write(encode("refused", reason="the volunteer did not answer in time"))
        writer.close()
        return None

    async def _introduce(self, punch: Header, writer) -> None:
        """Hole punching: ask the volunteer for a fresh connection, which shows where it is (as
        this relay sees it), tell each the other's public and LAN addresses and its own public
        one, and hang up; they then dial each other at once."""
        line = lambda token: encode("introduce", token=token, probes=punch["probes"])  # noqa: E731
        answer = await self._ask_volunteer(punch["id"], writer, line, "introduced")
        if answer is None:
            return
        _, v_writer, introduced = answer
        self._spliced.discard(v_writer)
        self._writers.add(v_writer)
        caller, volunteer = _peer(writer), _peer(v_writer)
        v_writer.write(encode("peer", addr=caller, lan=punch["lan"], you=volunteer))
        writer.write(encode("peer", addr=volunteer, lan=introduced["lan"], you=caller))
        self.counters.introduced_total += 1
        for w in (writer, v_writer):
            with contextlib.suppress(ConnectionError, OSError):
                await w.drain()
            w.close()
            self._writers.discard(w)

    def _answer_dial(self, header: Header, reader, writer) -> None:
        token = header["token"]
        dial = self.book.take_dial(token)
        answered = self._waiting.get(token)
        if dial is None or answered is None or answered.done():
            self.counters.refused_total += 1
            writer.close()
            return
        self._spliced.add(writer)  # its caller's splice owns it from here
        answered.set_result((reader, writer, header))

    async def _splice(self, vid: str, a, b) -> None:
        self.counters.spliced_now += 1
        self.counters.spliced_total += 1
        self._spliced |= {a[1], b[1]}
        self._writers |= {a[1], b[1]}
        try:
            await asyncio.gather(self._copy(vid, a[0], b[1]), self._copy(vid, b[0], a[1]))
        finally:
            self.counters.spliced_now -= 1
            for writer in (a[1], b[1]):
                writer.close()
                self._spliced.discard(writer)
                self._writers.discard(writer)

    async def _copy(self, vid: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(CHUNK):
                writer.write(chunk)
                self.counters.bytes_total += len(chunk)
                self.counters.by_volunteer[vid] = self.counters.by_volunteer.get(vid, 0) + len(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if writer.can_write_eof():
                    writer.write_eof()
                else:
                    writer.close()

    async def _sweep(self) -> None:
        """Refuse callers whose volunteer never answered (their waits time out on their own;
        this forgets the tokens)."""
        while True:
            await asyncio.sleep(self.book.dial_timeout)
            for _ in self.book.expired():
                self.counters.refused_total += 1


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if not isinstance(peer, tuple):
        return "?"
    host = f"[{peer[0]}]" if ":" in str(peer[0]) else peer[0]
    return f"{host}:{peer[1]}"
