"""Stream operations on a hardened server (guards.guard_streams): the stream kind's table decides,
the connection's own worker/client wins over the message's, shapes are checked, refusals are
reported and the stream goes on; `connection_stream` carries nothing a client or worker may send."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from neuro_dask.security import roles
from neuro_dask.security.certs import as_peercert, create_ca, issue, load_certificate
from neuro_dask.security.events import security_log
from neuro_dask.security.guards import _names_itself, guard_streams


@pytest.fixture(scope="module")
def peercerts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    create_ca(folder)
    return {
        name: as_peercert(load_certificate(issue(folder, role, name)[0]))
        for role, name in (
            ("client", "alice"),
            ("worker", "w1"),
            ("worker", "w2"),
            ("operator", "op"),
            ("scheduler", "scheduler"),
        )
    }


@pytest.fixture
def events():
    security_log.clear()
    yield security_log
    security_log.clear()


class StreamComm:
    """A comm whose reads hand out the given batches, then report the peer gone."""

    def __init__(self, batches, peercert=None, peer_address="tls://203.0.113.7:5000"):
        self.batches = list(batches)
        self.peer_address = peer_address
        self.extra_info = {"peercert": peercert} if peercert else {}
        self.closed = False

    async def read(self):
        if not self.batches:
            raise OSError("closed")
        return self.batches.pop(0)

    async def close(self):
        self.closed = True


def _server(calls, kind="worker"):
    def handler(name):
        def record(**kwargs):
            calls.append((name, kwargs))

        return record

    server = SimpleNamespace(
        handlers={"connection_stream": None},
        listeners=[SimpleNamespace(prefix="tls://")],
        stream_handlers={
            op: handler(op) for op in ("worker-status-change", "keep-alive", "close", "heartbeat-client", "log-event")
        },
    )
    return server


def _run(
    server,
    comm,
    extra=None,
    streams=roles.SCHEDULER_STREAMS,
    kind_of=lambda comm, extra: "worker" if "worker" in extra else "client" if "client" in extra else "any",
):
    guard_streams(server, streams, "scheduler", kind_of)
    asyncio.run(server.handle_stream(comm, extra))


def test_a_worker_stream_cannot_change_another_workers_status(peercerts, events):
    calls: list = []
    server = _server(calls)
    comm = StreamComm(
        [
            [
                {"op": "worker-status-change", "worker": "tls://victim:1", "status": "paused", "stimulus_id": "s"},
                {"op": "worker-status-change", "status": "paused", "stimulus_id": "s2"},
            ]
        ],
        peercerts["w1"],
    )
    _run(server, comm, {"worker": "tls://w1:1"})
    # Only the second message ran, and for the stream's own worker.
    assert calls == [("worker-status-change", {"status": "paused", "stimulus_id": "s2", "worker": "tls://w1:1"})]
    [refused] = events.events("refused-op")
    assert "tls://victim:1" in refused.detail and refused.identity == "worker:w1"
    assert comm.closed


def test_a_client_stream_cannot_carry_worker_or_task_operations(peercerts, events):
    calls: list = []
    server = _server(calls)
    comm = StreamComm(
        [
            [
                {"op": "worker-status-change", "status": "paused", "stimulus_id": "s"},
                {"op": "update-graph", "graph": b"..."},
                {"op": "heartbeat-client"},
            ]
        ],
        peercerts["alice"],
    )
    _run(server, comm, {"client": "Client-1"})
    assert calls == [("heartbeat-client", {"client": "Client-1"})]
    details = [e.detail for e in events.events("refused-op")]
    assert any("worker-status-change" in d for d in details) and any("update-graph" in d for d in details)


def test_connection_stream_carries_nothing_a_client_may_send(peercerts, events):
    calls: list = []
    server = _server(calls)
    comm = StreamComm(
        [[{"op": "close"}, {"op": "log-event", "topic": "neuro-trust", "msg": {"forged": True}}]], peercerts["alice"]
    )
    _run(server, comm)
    assert calls == []
    assert len(events.events("refused-op")) == 2


def test_a_worker_stream_message_of_the_wrong_shape_is_refused(peercerts, events):
    calls: list = []
    server = _server(calls)
    comm = StreamComm(
        [
            [
                {"op": "worker-status-change", "status": "dont_reply", "stimulus_id": "s"},
                {"op": "keep-alive", "extra": "x" * 10},
                "not a map",
                {"op": "keep-alive"},
            ]
        ],
        peercerts["w1"],
    )
    _run(server, comm, {"worker": "tls://w1:1"})
    assert calls == [("keep-alive", {"worker": "tls://w1:1"})]
    assert len(events.events("refused-op")) == 3


def test_the_workers_own_scheduler_stream_carries_the_schedulers_instructions(peercerts, events):
    calls: list = []
    server = _server(calls)
    own = StreamComm([[{"op": "close"}]], peercerts["scheduler"])
    stranger = StreamComm([[{"op": "close"}]], peercerts["alice"])
    kind_of = lambda comm, extra: "scheduler" if comm is own else "any"  # noqa: E731
    _run(server, own, streams=roles.WORKER_STREAMS, kind_of=kind_of)
    _run(server, stranger, streams=roles.WORKER_STREAMS, kind_of=kind_of)
    assert calls == [("close", {})]
    [refused] = events.events("refused-op")
    assert refused.identity == "client:alice"


def test_close_stream_ends_the_loop(peercerts):
    calls: list = []
    server = _server(calls)
    comm = StreamComm([[{"op": "close-stream"}, {"op": "keep-alive"}], [{"op": "keep-alive"}]], peercerts["w1"])
    _run(server, comm, {"worker": "tls://w1:1"})
    assert calls == [] and comm.closed


@pytest.mark.parametrize("op, field", sorted(roles.SCHEDULER_SELF_FIELDS.items()))
def test_a_worker_certificate_names_only_its_own_worker(op, field):
    from neuro_dask.security.identity import PeerIdentity

    scheduler = SimpleNamespace(
        workers={"tls://a:1": SimpleNamespace(name="w1"), "tls://b:1": SimpleNamespace(name="w2")}
    )
    w1 = PeerIdentity("worker", "w1")
    assert _names_itself(scheduler, op, w1, {field: "tls://a:1"}) is None
    assert "its own worker" in _names_itself(scheduler, op, w1, {field: "tls://b:1"})
    unknown = _names_itself(scheduler, op, w1, {field: "tls://nobody:1"})
    if op in ("unregister", "heartbeat_worker"):  # an address nobody holds: the scheduler changes nothing
        assert unknown is None
    else:
        assert "its own worker" in unknown
    assert "its own worker" in _names_itself(scheduler, op, w1, {field: ["tls://a:1"]})
