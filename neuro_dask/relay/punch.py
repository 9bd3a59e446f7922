"""TCP hole punching: two peers behind NATs, introduced by the relay, dial each other at once.

Each side dials the relay from a fresh socket on a port it can reuse; the relay tells each the
other's address as it saw it (the NAT's public address and port for that socket). Both then
dial that address from the same local port at the same time: each side's NAT has just seen its
own outgoing packets to the other, so it lets the other's packets in as their replies (a TCP
simultaneous open, which Linux and the NATs built on it handle). No port is forwarded and the
routers' rules for new inbound connections are never met. Where a NAT changes the port per
destination (a symmetric NAT) it fails, and the caller goes through the relay instead.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from neuro_dask.relay.protocol import MAX_LINE, Header, HeaderError, decode, endpoint, split_endpoint

# Seconds for the introduction and for the simultaneous open, each. A punch that works takes a
# few round trips (the two sides' packets cross within one). The caller tries the relay at the
# same time (relay/comm.py), so a punch that fails costs the first connection this much and no
# more, within the caller's connect timeout (neuro.client.connect-timeout, 3 s).
PUNCH_DEADLINE = 0.75


def _reusable(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setblocking(False)
    return sock


async def exchange(
    relay: tuple[str, int], line: Callable[[str], bytes], allowed: frozenset[str]
) -> tuple[tuple, Header]:
    """Dial the relay from a fresh reusable port, send one header line (`line(our LAN
    endpoint)`), read its one-line answer. Returns (the local address the peer is to be dialled
    from, the answer)."""
    loop = asyncio.get_running_loop()
    family, _, _, _, address = (await loop.getaddrinfo(*relay, type=socket.SOCK_STREAM))[0]
    sock = _reusable(family)
    try:
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        await loop.sock_connect(sock, address)
        local = sock.getsockname()
        await loop.sock_sendall(sock, line(endpoint(local[0], local[1])))
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = await loop.sock_recv(sock, MAX_LINE - len(reply))
            if not chunk:
                raise ConnectionError("the relay hung up before answering")
            reply += chunk
            if len(reply) >= MAX_LINE and not reply.endswith(b"\n"):
                raise HeaderError("the relay's answer is not one line")
        return local, decode(reply, allowed)
    finally:
        sock.close()


async def simultaneous_open(local: tuple, peer: str, deadline: float = PUNCH_DEADLINE) -> socket.socket:
    """Dial `peer` ("IP:PORT") from `local` until it answers or `deadline` seconds pass: the
    first attempts may meet a NAT that has not yet seen its own side's packets."""
    loop = asyncio.get_running_loop()
    host, port = split_endpoint(peer)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    end = loop.time() + deadline
    while True:
        sock = _reusable(family)
        try:
            sock.bind(local[:2])
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), max(0.05, end - loop.time()))
            return sock
        except (TimeoutError, OSError) as exc:
            sock.close()
            if loop.time() >= end:
                raise ConnectionError(f"no simultaneous open with {peer} within {deadline:g} s: {exc!r}") from None
            await asyncio.sleep(0.05)
        except BaseException:  # cancelled: another candidate won
            sock.close()
            raise


async def accept_from(local: tuple, peer: str, deadline: float = PUNCH_DEADLINE) -> socket.socket:
    """Listen on `local` until `peer` ("IP:PORT") connects, for at most `deadline` seconds: the
    volunteer's side of a same-LAN introduction. A simultaneous open needs packets that wait (a
    NAT drops them until its own side has sent); on a LAN the other side's kernel answers an
    early SYN with a reset at once, so there the volunteer listens and the caller dials. Any
    other machine that connects in that window is hung up on."""
    loop = asyncio.get_running_loop()
    host, port = split_endpoint(peer)
    listener = _reusable(socket.AF_INET6 if ":" in host else socket.AF_INET)
    end = loop.time() + deadline
    try:
        listener.bind(local[:2])
        listener.listen(8)
        while True:
            conn, addr = await asyncio.wait_for(loop.sock_accept(listener), max(0.0, end - loop.time()))
            if (addr[0], addr[1]) == (host, port):
                conn.setblocking(False)
                return conn
            conn.close()
    except TimeoutError:
        raise ConnectionError(f"{peer} did not connect within {deadline:g} s") from None
    finally:
        listener.close()


async def first_open(
    local: tuple, candidates: list[str], deadline: float = PUNCH_DEADLINE
) -> tuple[socket.socket, str]:
    """The first candidate to connect (the caller's side); the others are closed."""
    errors = []
    tasks = {asyncio.create_task(simultaneous_open(local, c, deadline)): c for c in candidates}
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is None:
                    return task.result(), tasks.pop(task)
                errors.append(str(task.exception()))
        raise ConnectionError("; ".join(errors) or "no candidate")
    finally:
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, socket.socket):  # connected while another won: not wanted
                result.close()
