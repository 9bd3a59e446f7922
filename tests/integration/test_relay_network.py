"""Volunteers reached through a relay (relay/comm.py, relay/server.py), on loopback.

Workers listen on `relay://`: they open no port, and everything that reaches them (the
scheduler's RPCs, a client's expert calls over either transport, other workers' transfers)
comes through connections they dialled to the relay. The NAT itself is built with network
namespaces in tests/slow/test_home_nat.py; here the relay's wiring, its TLS blindness and a
volunteer's return after the relay restarts.
"""

from __future__ import annotations

import contextlib
import time

import dask
import pytest
from distributed import Client, Worker
from polling import poll_until
from relay_helpers import RelayThread

import neuro_dask as nd
from neuro_dask.client.cluster import local_cluster
from neuro_dask.relay.comm import RelayConnector

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def through_the_relay(request):
    """These tests take the relayed path (on loopback every hole punch would succeed); the
    punching tests below turn it back on."""
    from neuro_dask.relay import comm

    comm.PATHS.clear()
    punch = "punching" in request.node.name
    with dask.config.set({"neuro.client.relay-punch": punch}):
        yield
    comm.PATHS.clear()


ADDER = "neuro_dask/assets/adder"
PROMPTS = ["12+345=", "999+1=", "7+8="]


def add_relayed_worker(client, scheduler_address, name, relay_port, security=None, preload=True):
    async def start():
        return await Worker(
            scheduler_address,
            nthreads=1,
            name=name,
            protocol="relay",
            host="127.0.0.1",
            port=relay_port,
            security=security,
            preload=["neuro_worker"] if preload else [],
            preload_argv=[["--neuro-no-benchmark"]] if preload else [],
        )

    return client.sync(start)


@contextlib.contextmanager
def relayed_cluster(tmp_path, n_workers=2):
    """A scheduler on loopback TCP, and `n_workers` volunteers that listen only on the relay."""
    with (
        RelayThread() as relay,
        dask.config.set({"neuro.worker.cache-dir": str(tmp_path / "cache")}),
        local_cluster(n_workers=0, processes=False, worker_args=[], dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        workers = [
            add_relayed_worker(client, cluster.scheduler_address, f"home-{i}", relay.port) for i in range(n_workers)
        ]
        try:
            yield relay, cluster, client, workers
        finally:
            for w in workers:
                client.sync(w.close)


def test_tasks_transfers_and_direct_gathers_all_go_through_the_relay(tmp_path):
    with relayed_cluster(tmp_path) as (relay, _, client, (a, b)):
        assert a.address.startswith(f"relay://{relay.address}/") and b.address != a.address
        x = client.submit(lambda v: v + 1, 1, workers=[a.address])
        y = client.submit(lambda v: v * 10, x, workers=[b.address])  # b fetches x from a
        assert client.gather(y, direct=True) == 20  # and the client fetches y from b
        counters = relay.relay.counters
        assert counters.volunteers == 2 and counters.spliced_total >= 2  # b from a, the client from b
        assert set(counters.by_volunteer) == {a.address.rsplit("/", 1)[1], b.address.rsplit("/", 1)[1]}


@pytest.mark.parametrize("transport", ["direct", "futures"])
def test_a_generation_over_relayed_volunteers_equals_the_local_run(tmp_path, transport):
    expected = nd.load(ADDER).generate_text(PROMPTS, max_new_tokens=6)
    with relayed_cluster(tmp_path) as (relay, cluster, client, workers):
        with nd.load(ADDER, client=client, transport=transport) as model:
            got = model.generate_text(PROMPTS, max_new_tokens=6)
            routes = model.executor.routes.routes
            stats = model.stats()
        if transport == "direct":  # the latency book says how each volunteer is reached
            assert stats["latency"]["paths"] == {w.address: "relayed" for w in workers}, stats["latency"]
            # and the client told the scheduler, with its call reports
            feed = cluster.scheduler.extensions["neuro"].feed
            poll_until(
                lambda: all(feed.paths_to(w.address, time.time()) == {"relayed": 1} for w in workers),
                30,
                "each volunteer's path as the client reported it",
            )
    assert got == expected
    assert all(w.startswith("relay://") for ws in routes.values() for w in ws)
    assert relay.relay.counters.bytes_total > 0


def test_a_volunteer_comes_back_through_a_restarted_relay_with_its_address(tmp_path):
    with relayed_cluster(tmp_path, n_workers=1) as (relay, _, client, (w,)):
        listener = w.listener
        address = w.address
        relay.restart()  # each volunteer is told when to come back, within comeback_spread
        poll_until(lambda: listener.reconnects >= 1, timeout=30, what="the volunteer re-registered")
        assert w.address == address
        fut = client.submit(lambda v: v + 1, 41, workers=[address], pure=False)
        assert client.gather(fut, direct=True) == 42


def test_a_named_volunteer_restarted_comes_back_at_the_same_relay_address(tmp_path):
    """Its key is kept in its cache folder (owner-only), so a worker its nanny restarts keeps its
    relay:// address; another name, or no name, gets its own."""
    import stat

    from neuro_dask.relay.worker import RelayedWorker

    def start(name):
        async def go():
            return await RelayedWorker(cluster.scheduler_address, nthreads=1, name=name)

        return client.sync(go)

    with (
        RelayThread() as relay,
        dask.config.set({"neuro.worker.relay": relay.address, "neuro.worker.cache-dir": str(tmp_path / "cache")}),
        local_cluster(n_workers=0, processes=False, worker_args=[], dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        first = start("alice's laptop")
        address = first.address
        client.sync(first.close)
        again = start("alice's laptop")
        other, unnamed = start("bob"), start(None)
        try:
            assert again.address == address and address.startswith(f"relay://{relay.address}/")
            assert len({address, other.address, unnamed.address}) == 3
            assert client.submit(lambda v: v + 1, 1, workers=[again.address]).result(timeout=60) == 2
            [key_file] = (tmp_path / "cache" / "relay-keys").glob("alice*.key")
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        finally:
            for w in (again, other, unnamed):
                client.sync(w.close)


def test_the_relay_refuses_an_unknown_volunteer_at_once(tmp_path):
    from distributed.comm.core import CommClosedError

    with RelayThread() as relay:
        connector = RelayConnector()
        with pytest.raises(CommClosedError, match="no volunteer with this id"):
            relay.run(connector.connect(f"{relay.address}/aaaaaaaaaaaaaaaaaaaa"))
        assert relay.relay.counters.refused_total == 1


def _tap(relay, seen: bytearray) -> None:
    """Keep a copy of every byte the relay splices."""
    original = relay._copy

    async def copy(vid, reader, writer):
        class Tap:
            async def read(self, n):
                chunk = await reader.read(n)
                seen.extend(chunk)
                return chunk

        return await original(vid, Tap(), writer)

    relay._copy = copy


async def _round_trip_through_relay(relay_port: int, security: dict, value: str) -> str:
    """A scheduler, one volunteer on the relay, a client: `value` to the volunteer and back."""
    from distributed import Scheduler

    tls = security["scheduler"] is not None
    async with Scheduler(
        host="127.0.0.1", protocol="tls" if tls else "tcp", dashboard_address=":0", security=security["scheduler"]
    ) as s:
        async with Worker(
            s.address, nthreads=1, protocol="relay", host="127.0.0.1", port=relay_port, security=security["worker"]
        ) as w:
            async with Client(s.address, asynchronous=True, security=security["client"]) as c:
                doubled = c.submit(lambda m: m * 2, value, workers=[w.address])
                return await c.gather(doubled, direct=True)


@pytest.mark.parametrize("tls", [False, True])
def test_with_tls_the_relay_sees_only_ciphertext(tmp_path, tls):
    """The same task with and without TLS: without, the relay copies a marker in the clear (the
    check can fail); with, the handshake runs between the endpoints and the relay, which holds
    no key, never sees it."""
    import asyncio

    from cluster_helpers import make_certs

    from neuro_dask.security.tls import security_for

    marker = "NEURO-RELAY-PLAINTEXT-MARKER"
    certs = make_certs(tmp_path / "certs", workers=1)
    names = {"scheduler": "scheduler", "worker": "worker-1", "client": "client"}
    security = {role: (security_for(role, certs, name) if tls else None) for role, name in names.items()}
    seen = bytearray()
    with RelayThread() as relay:
        _tap(relay.relay, seen)
        assert asyncio.run(_round_trip_through_relay(relay.port, security, marker)) == marker * 2
        assert relay.relay.counters.spliced_total >= 1  # the client's direct gather from the volunteer
    assert len(seen) > 200
    assert (marker.encode() in bytes(seen)) is (not tls)


# ---- hostile peers at the relay -------------------------------------------------------------------


def _raw(relay, line: bytes, wait: float = 5.0) -> bytes:
    """Send one line to the relay; what it answers before it closes (b'' if nothing)."""
    import socket

    host, port = relay.address.split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(line)
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


def test_the_relay_hangs_up_on_lines_it_does_not_know_and_on_silence():
    import socket

    from neuro_dask.relay.protocol import encode

    with RelayThread(header_timeout=0.5) as relay:
        assert _raw(relay, b"GET / HTTP/1.1\r\n\r\n") == b""
        assert _raw(relay, b'{"op":"dial","token":"aaaaaaaaaaaaaaaaaaaaaaaa"}\n') == b""  # the relay's own line
        assert _raw(relay, encode("accept", token="a" * 24)) == b""  # an accept nobody asked for
        host, port = relay.address.split(":")
        with socket.create_connection((host, int(port)), timeout=10) as idle:  # says nothing at all
            assert idle.recv(10) == b""  # closed after header_timeout
        poll_until(lambda: relay.relay.counters.refused_total >= 4, 10, "every refusal counted")
        assert relay.relay.counters.spliced_total == 0


def test_a_second_registration_with_the_same_key_replaces_the_first():
    import secrets
    import socket

    from neuro_dask.relay.protocol import FROM_RELAY, decode, encode

    key = secrets.token_urlsafe(32)
    with RelayThread() as relay:
        host, port = relay.address.split(":")
        first = socket.create_connection((host, int(port)), timeout=10)
        first.sendall(encode("register", key=key))
        vid = decode(first.makefile("rb").readline(), FROM_RELAY)["id"]
        second = socket.create_connection((host, int(port)), timeout=10)
        second.sendall(encode("register", key=key))
        assert decode(second.makefile("rb").readline(), FROM_RELAY)["id"] == vid
        assert first.recv(10) == b""  # the older connection is closed
        assert relay.relay.counters.volunteers == 1
        first.close()
        second.close()


def test_a_caller_that_asks_for_probes_and_sends_garbage_loses_only_its_own_stream(tmp_path):
    """A path's probes are read from a caller the volunteer does not trust: anything but a probe
    line (or silence past the deadline) closes that stream, and the volunteer serves on."""
    import socket

    from neuro_dask.relay.comm import split_location
    from neuro_dask.relay.protocol import FROM_RELAY, ON_STREAM, decode, encode

    with relayed_cluster(tmp_path, n_workers=1) as (relay, _, client, (w,)):
        host, port, vid = split_location(w.address[len("relay://") :])
        for junk in (b"GARBAGE\n", b'{"op":"echo"}\n', b"x" * 5000):
            with socket.create_connection((host, port), timeout=30) as sock:
                sock.sendall(encode("connect", id=vid, probes=2))
                reader = sock.makefile("rb")
                assert decode(reader.readline(), FROM_RELAY).op == "connected"
                sock.sendall(encode("probe"))
                assert decode(reader.readline(), ON_STREAM).op == "echo"  # a real probe is answered
                sock.sendall(junk)
                assert reader.read() == b""  # then the volunteer hung up
        fut = client.submit(lambda v: v * 3, 5, workers=[w.address])
        assert client.gather(fut, direct=True) == 15


# ---- hole punching ------------------------------------------------------------------------------------


def test_hole_punching_refused_by_the_volunteer_falls_back_to_the_relay_and_is_not_retried(tmp_path):
    """(Hole punching itself needs NATs that drop unsolicited packets, as home routers do: on
    loopback the kernel answers them with a reset. tests/slow/test_home_nat.py punches through
    real NAT routers.)"""
    from neuro_dask.relay import comm

    with dask.config.set({"neuro.worker.relay-punch": False}):
        with relayed_cluster(tmp_path, n_workers=1) as (relay, _, client, (w,)):
            before = dict(comm.STATS)
            fut = client.submit(lambda v: v + 1, 1, workers=[w.address])
            assert client.gather(fut, direct=True) == 2
            assert {c.path for c in comm.PATHS.values()} == {"relayed"}
            # the relayed path was measured on the first connection (its round trips, on loopback)
            assert all(0 < c.rtt_ms["relayed"] < 1_000 for c in comm.PATHS.values())
            assert comm.paths()[w.address]["path"] == "relayed"
            assert relay.relay.counters.introduced_total == 0  # the volunteer never answered the introduction
            assert relay.relay.counters.spliced_total >= 1
            assert comm.STATS["punch_failed"] - before["punch_failed"] == 1


def test_a_hostile_relay_cannot_make_a_volunteer_dial_out_without_bound(monkeypatch):
    """A relay is not trusted: one that sends a flood of introductions (each naming an address
    the volunteer would send packets to) gets at most MAX_PUNCHES in flight. The punches are held
    open until every introduction has been read, so the count in flight is the cap's doing."""
    import asyncio

    from polling import async_poll_until

    from neuro_dask.relay import comm, punch
    from neuro_dask.relay.protocol import TO_RELAY, decode, encode

    flood = 50

    async def held_open(local, peer, deadline=punch.PUNCH_DEADLINE):
        await release.wait()
        raise ConnectionError("nobody there")

    async def fake_exchange(relay, line, allowed):
        line(f"0.0.0.0:{40000}")  # what the volunteer would have said
        peer = encode("peer", addr="127.0.0.1:9", lan="192.168.1.9:40000", you="127.0.0.1:10")
        return ("0.0.0.0", 0), decode(peer, allowed | {"peer"})

    monkeypatch.setattr(punch, "simultaneous_open", held_open)
    monkeypatch.setattr(punch, "exchange", fake_exchange)

    async def hostile_relay(reader, writer):
        decode(await reader.readline(), TO_RELAY)  # the registration
        writer.write(encode("registered", id="a" * 20, ping=30))
        for i in range(flood):
            writer.write(encode("introduce", token=f"t{i:03d}" + "x" * 20, probes=0))
        await writer.drain()
        await finished.wait()
        writer.close()

    async def run():
        server = await asyncio.start_server(hostile_relay, "127.0.0.1", 0)
        listener = comm.RelayListener(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", lambda c: None)
        read = []
        introduced = listener._introduced

        async def counting(token, probes):
            read.append(token)
            await introduced(token, probes)

        listener._introduced = counting
        await listener.start()
        await async_poll_until(lambda: len(read) == flood, 30, "every introduction read")
        in_flight = listener.punching
        release.set()
        await async_poll_until(lambda: listener.punching == 0, 30, "the held punches ended")
        finished.set()
        listener.stop()
        server.close()
        return in_flight

    release, finished = asyncio.Event(), asyncio.Event()
    assert asyncio.run(run()) == comm.MAX_PUNCHES
