"""Attacks on a hardened network over mutual TLS (docs/security.md).

Each attack carries a payload that would create a marker file if any process loaded or ran it;
each test asserts that the file never appears, that the peer was refused, and that the refusal
was reported (a security event naming the peer's address, on the scheduler's Dask event log
when the scheduler is the one refusing).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

import pytest
import torch
from cluster_helpers import hardened_tls_cluster, publish_as_operator
from distributed import Client
from distributed.core import Server, rpc
from distributed.protocol.serialize import ToPickle
from polling import poll_until
from tiny_models import padded_batch

import neuro_dask as nd
from neuro_dask.security.events import security_log
from neuro_dask.security.tls import security_for
from neuro_dask.settings import SecuritySettings


class Payload:
    """Unpickling this opens (creates) `marker`: the proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardened")
    with hardened_tls_cluster(tmp) as (cluster, client, certs):
        yield cluster, client, certs


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a payload ran"


def _events_since(start, kind=None, timeout=30.0):
    """Security events recorded since `start`, waiting until at least one (of `kind`) arrives."""
    return poll_until(
        lambda: [e for e in security_log.events(kind) if e.time >= start],
        timeout,
        f"a security event of kind {kind or 'any'} since {start}",
        interval=0.02,
    )


def _operator_events(network, topic):
    """The scheduler's Dask event log, read as the operator (clients may not read it)."""
    cluster, _, certs = network
    with Client(cluster.scheduler_address, security=security_for("operator", certs)) as operator:
        return operator.get_events(topic)


def _operator_security_events(network, start):
    return poll_until(
        lambda: [e for _, e in _operator_events(network, "neuro-security") if e["time"] >= start],
        30,
        f"a neuro-security event in the scheduler's log since {start}",
    )


def test_a_client_certificate_generates_like_local_on_an_operator_published_model(network, sharded):
    cluster, client, certs = network
    publish_as_operator(cluster.scheduler_address, certs, sharded("qwen3_moe"))
    ids, mask = padded_batch((4, 7), seed=3)
    expected = nd.load(sharded("qwen3_moe")).generate(ids, mask, max_new_tokens=12)
    with nd.load(sharded("qwen3_moe"), client=client) as model:
        assert torch.equal(model.generate(ids, mask, max_new_tokens=12), expected)
    # Task graphs are pickles: the futures transport is refused up front, with what to use instead.
    from neuro_dask.client.dispatch.session import TransportUnavailableError

    with pytest.raises(TransportUnavailableError, match="transport='direct'"):
        nd.load(sharded("qwen3_moe"), client=client, transport="futures")


@pytest.mark.parametrize(
    "make",
    [
        lambda marker: (lambda path: open(path, "w"), str(marker)),  # a cloudpickled lambda
        lambda marker: (tuple, "abc"),  # an allowed constructor: still a task graph, still a pickle
    ],
    ids=["lambda", "tuple"],
)
def test_a_task_graph_from_a_client_is_refused_before_it_is_unpickled(network, marker, make):
    _, client, _ = network
    start = time.time()
    func, arg = make(marker)
    future = client.submit(func, arg, pure=False)
    try:
        events = [e for e in _events_since(start, "plain-data") if e.identity == "client:client"]
        assert events and "frames" in events[0].detail, events
        peers = {e["peer"] for e in _operator_security_events(network, start)}
        assert any(p.startswith("tls://127.0.0.1:") for p in peers), peers
        # Refused at the preamble, before its sub-frames were read: the client's connection is
        # dropped (its unread bytes would leave the stream out of step) and the graph never runs.
        assert future.status != "finished"
    finally:
        future.cancel()
    assert client.sync(client.scheduler.identity)["type"] == "Scheduler"  # the client reconnects


def test_client_run_is_refused_by_the_scheduler_and_by_each_worker(network, marker):
    cluster, client, certs = network
    start = time.time()
    with pytest.raises(Exception, match="refused 'broadcast'"):
        client.run(lambda: open(str(marker), "w"))
    assert any(e.detail.startswith("broadcast:") for e in _events_since(start, "refused-op"))

    # A client that skips the scheduler and asks a worker directly is refused there too.
    from distributed.protocol.pickle import dumps

    worker = next(iter(cluster.scheduler.workers))
    start = time.time()

    async def run_on_worker():
        async with rpc(worker, connection_args=security_for("client", certs).get_connection_args("client")) as r:
            return await r.run(function=dumps(lambda: open(str(marker), "w")))

    with pytest.raises(Exception, match="refused 'run'"):
        client.sync(run_on_worker)
    refused = [e for e in _events_since(start, "refused-op") if e.detail.startswith("run:")]
    assert refused and refused[0].identity == "client:client"


def test_a_crafted_pickle_in_a_heartbeat_is_refused_and_reported(network, marker):
    cluster, client, certs = network
    start = time.time()
    args = security_for("worker", certs, "worker-1").get_connection_args("worker")

    async def heartbeat():
        async with rpc(cluster.scheduler_address, connection_args=args) as r:
            return await r.heartbeat_worker(address="tls://127.0.0.1:1", metrics={"x": ToPickle(Payload(marker))})

    with pytest.raises(OSError):  # refused at the preamble: the connection is dropped unread
        client.sync(heartbeat)
    events = _events_since(start, "plain-data")
    assert any(e.identity == "worker:worker-1" for e in events), events
    assert any(e["kind"] == "plain-data" for e in _operator_security_events(network, start))
    # The certificate names a worker the scheduler knows: the refusal costs it reputation.
    trust = [e for _, e in _operator_events(network, "neuro-trust") if e.get("action") == "security"]
    assert any(e["name"] == "worker-1" for e in trust), trust


def _evil_worker(certs, handler):
    """A TLS peer holding a genuine worker certificate that answers expert calls maliciously."""

    async def start():
        server = Server({"neuro_expert": handler})
        await server.listen("tls://127.0.0.1:0", **security_for("worker", certs, "worker-2").get_listen_args("worker"))
        return server

    return start


def _call_expert(client, address):
    from neuro_dask.client.dispatch.transports import DirectTransport
    from neuro_dask.protocol.wire import encode_request

    transport = DirectTransport(client, connect_timeout=5)
    msg = encode_request("m", 0, {0: torch.ones(2, 4)}, call="c1")
    try:
        return transport.call_many({address: msg}, timeout=10)[address]  # a reply, or the call's error
    finally:
        client.sync(transport.pool.close)


def test_a_crafted_pickle_in_a_result_is_refused_and_the_call_fails(network, marker):
    _, client, certs = network
    server = client.sync(_evil_worker(certs, lambda **msg: {"status": "OK", "data": ToPickle(Payload(marker))}))
    try:
        start = time.time()
        outcome = _call_expert(client, server.address)
        assert isinstance(outcome, Exception), outcome  # a failed call: re-sent elsewhere, the worker skipped
        events = _events_since(start, "plain-data")
        assert any(e.peer == server.address for e in events), events
        assert events[0].identity == "worker:worker-2"
    finally:
        client.sync(server.close)


def test_a_crafted_pickle_in_an_exception_is_refused_and_the_call_fails(network, marker):
    _, client, certs = network
    import pickle

    evil = pickle.dumps(Payload(marker))
    server = client.sync(
        _evil_worker(certs, lambda **msg: {"status": "uncaught-error", "exception": evil, "traceback": evil})
    )
    try:
        start = time.time()
        outcome = _call_expert(client, server.address)
        assert isinstance(outcome, Exception), outcome
        refused = [e for e in _events_since(start, "plain-data") if e.peer == server.address]
        assert refused and refused[0].detail == "an error sent as a pickle", refused
    finally:
        client.sync(server.close)


def test_a_worker_certificate_cannot_connect_as_a_client(network):
    cluster, _, certs = network
    start = time.time()
    # The refusal is the answer to the registration: distributed raises its text at once.
    with pytest.raises(Exception, match="only a client or an operator certificate may use 'register-client'"):
        Client(cluster.scheduler_address, security=security_for("worker", certs, "worker-1"), timeout=30)
    refused = [e for e in _events_since(start, "refused-op") if e.detail.startswith("register-client")]
    assert refused and refused[0].identity == "worker:worker-1"


def test_a_client_certificate_cannot_register_as_a_worker(network):
    cluster, client, certs = network
    start = time.time()
    args = security_for("client", certs).get_connection_args("client")

    async def register():
        async with rpc(cluster.scheduler_address, connection_args=args) as r:
            return await getattr(r, "register-worker")(address="tls://127.0.0.1:9", nthreads=1)

    with pytest.raises(Exception, match="only a worker certificate may use 'register-worker'"):
        client.sync(register)
    assert any(e.identity == "client:client" for e in _events_since(start, "refused-op"))
    assert "tls://127.0.0.1:9" not in cluster.scheduler.workers


def test_a_peer_without_a_certificate_is_refused_at_the_handshake(network):
    cluster, _, certs = network
    host, port = cluster.scheduler_address.removeprefix("tls://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    context.check_hostname = False
    start = time.time()
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            with context.wrap_socket(raw) as tls:
                # TLS 1.3 lets the client finish first; the server's refusal arrives on the first read.
                tls.sendall(b"\0" * 8)
                if not tls.recv(1):
                    raise ConnectionResetError("closed without a reply")
    events = _events_since(start, "tls-handshake")
    assert events and events[0].peer.startswith("tls://127.0.0.1:")


def test_an_oversized_message_is_refused_before_it_is_read(network):
    from neuro_dask.security import hardening

    cluster, client, certs = network
    hardening.install(max_message_bytes=1 << 20)  # already installed: this only lowers the limit
    try:
        start = time.time()
        args = security_for("client", certs).get_connection_args("client")

        async def big_echo():
            async with rpc(cluster.scheduler_address, connection_args=args) as r:
                return await asyncio.wait_for(r.echo(data=b"x" * (4 << 20)), 10)

        with pytest.raises((OSError, ValueError)):  # the connection is dropped unread
            client.sync(big_echo)
        assert _events_since(start, "message-size")
    finally:
        # back to the limit the preloads installed, from neuro.security.max-message-bytes
        hardening.install(max_message_bytes=SecuritySettings.load().max_message_bytes)
