"""The role x operation matrix of a hardened network, generated from distributed's live tables.

Every request handler and stream handler of a real scheduler (with the neuro_scheduler plugin),
worker (with neuro_worker) and nanny is looked up in roles.py for every kind of peer: no
certificate (over TLS and over TCP), a client, a worker speaking for itself, a worker speaking
for another, the operator, the scheduler. The test fails on any operation the tables do not
classify (a new distributed release cannot open a hole silently), and checks the rules that
must hold for all of them: what is NEVER is refused to everyone, a peer without a certificate
gets nothing over TLS, a worker certificate gets nothing a client uses, and speaks only for
its own worker.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from cluster_helpers import neuro_cluster
from distributed import Nanny

from neuro_dask.security import roles
from neuro_dask.security.guards import _names_itself
from neuro_dask.security.identity import PeerIdentity

PEERS = {  # peer kind -> (role, roles required)
    "no-certificate-tls": (None, True),
    "no-certificate-tcp": (None, False),
    "client": ("client", True),
    "worker": ("worker", True),
    "operator": ("operator", True),
    "scheduler": ("scheduler", True),
}


@pytest.fixture(scope="module")
def live_tables(tmp_path_factory):
    """op tables of a running scheduler and worker with the neuro plugins, and of a nanny."""
    with neuro_cluster(1, tmp_path=tmp_path_factory.mktemp("matrix")) as (cluster, _client):
        scheduler = cluster.scheduler
        worker = next(iter(cluster.workers.values()))
        tables = {
            "scheduler": (set(scheduler.handlers), set(scheduler.stream_handlers)),
            "worker": (set(worker.handlers), set(worker.stream_handlers)),
        }
    nanny = Nanny("tcp://127.0.0.1:1")
    tables["nanny"] = (set(nanny.handlers), set(nanny.stream_handlers))
    return tables


HANDLERS = {"scheduler": roles.SCHEDULER_HANDLERS, "worker": roles.WORKER_HANDLERS, "nanny": roles.NANNY_HANDLERS}
STREAMS = {"scheduler": roles.SCHEDULER_STREAMS, "worker": roles.WORKER_STREAMS, "nanny": roles.NANNY_STREAMS}


def _matrix(live_tables):
    """(server, kind, op, peer) -> Decision for every live op."""
    out = {}
    for server, (handlers, streams) in live_tables.items():
        for op in handlers:
            for peer, (role, required) in PEERS.items():
                out[server, "handler", op, peer] = roles.decide(
                    HANDLERS[server], op, role, roles_required=required, server=server
                )
        for kind, table in STREAMS[server].items():
            for op in streams:
                for peer, (role, required) in PEERS.items():
                    out[server, f"stream:{kind}", op, peer] = roles.decide(
                        table, op, role, roles_required=required, server=server
                    )
    return out


@pytest.mark.parametrize("server", ["scheduler", "worker", "nanny"])
def test_every_live_handler_is_classified(live_tables, server):
    handlers, _ = live_tables[server]
    unclassified = sorted(op for op in handlers if not roles.classified(HANDLERS[server], op))
    assert not unclassified, f"{server} handlers no role table classifies (add them to roles.py): {unclassified}"


@pytest.mark.parametrize("server", ["scheduler", "worker"])
def test_every_live_stream_op_is_classified_for_every_kind_of_stream(live_tables, server):
    _, streams = live_tables[server]
    for kind, table in STREAMS[server].items():
        unclassified = sorted(op for op in streams if not roles.classified(table, op))
        assert not unclassified, f"{server} {kind} streams: unclassified stream ops {unclassified}"


def test_the_nanny_has_no_stream_ops_to_guard(live_tables):
    assert live_tables["nanny"][1] == set()


def test_never_is_refused_to_everyone(live_tables):
    for (server, kind, op, peer), decision in _matrix(live_tables).items():
        table = HANDLERS[server] if kind == "handler" else STREAMS[server][kind.split(":", 1)[1]]
        if table.get(op) == roles.NEVER:
            assert not decision.allowed, (server, kind, op, peer)


def test_no_certificate_over_tls_gets_nothing(live_tables):
    allowed = [
        (s, k, op) for (s, k, op, peer), d in _matrix(live_tables).items() if peer == "no-certificate-tls" and d.allowed
    ]
    assert allowed == []


def test_a_worker_certificate_gets_nothing_a_client_uses(live_tables):
    matrix = _matrix(live_tables)
    for (server, kind, op, peer), decision in matrix.items():
        if peer == "worker" and decision.allowed and server == "scheduler" and kind == "handler":
            assert op in roles.SCHEDULER_HANDLERS and "worker" in roles.SCHEDULER_HANDLERS[op], op
            assert op not in (
                "register-client",
                "neuro_routes",
                "neuro_request_begin",
                "neuro_dispute",
                "neuro_report_outcomes",
                "neuro_trust",
                "set_metadata",
                "get_metadata",
            )


def test_clients_and_workers_get_no_cluster_control_metadata_or_trust_anchors(live_tables):
    matrix = _matrix(live_tables)
    for op in (
        "set_metadata",
        "get_metadata",
        "neuro_trust",
        "neuro_publish",
        "retire_workers",
        "events",
        "connection_stream",
        "update-graph",
    ):
        for peer in ("client", "worker"):
            decision = matrix.get(("scheduler", "handler", op, peer))
            if decision is not None:
                assert not decision.allowed, (op, peer)
    for peer in ("client", "worker", "operator"):
        # Only the scheduler closes a worker, on its own stream; nobody through connection_stream.
        assert not matrix["worker", "handler", "connection_stream", peer].allowed
        assert not matrix["worker", "stream:any", "close", peer].allowed
        assert not matrix["nanny", "handler", "close_gracefully", "client"].allowed
    assert matrix["worker", "stream:scheduler", "close", "scheduler"].allowed


def test_every_op_open_to_clients_or_workers_has_a_schema():
    """What a client or worker may send is validated in full before the handler runs."""
    from neuro_dask.protocol import schemas

    for table in (roles.SCHEDULER_HANDLERS, roles.WORKER_HANDLERS, roles.NANNY_HANDLERS):
        for op, rule in table.items():
            if rule != roles.NEVER and (set(rule) & {"client", "worker"}) and op != "connection_stream":
                assert schemas.has_schema(op), f"{op} is open to clients or workers but has no schema"
    for kind in ("client", "worker"):
        for op, rule in roles.SCHEDULER_STREAMS[kind].items():
            if rule != roles.NEVER and set(rule) & {"client", "worker"}:
                assert schemas.has_schema(op, stream=True), f"stream op {op} has no schema"


@pytest.mark.parametrize("op, field", sorted(roles.SCHEDULER_SELF_FIELDS.items()))
def test_worker_self_and_worker_other(op, field):
    scheduler = SimpleNamespace(
        workers={"tls://self:1": SimpleNamespace(name="w-self"), "tls://other:1": SimpleNamespace(name="w-other")}
    )
    me = PeerIdentity("worker", "w-self")
    assert roles.decide(roles.SCHEDULER_HANDLERS, op, "worker", roles_required=True).allowed
    assert _names_itself(scheduler, op, me, {field: "tls://self:1"}) is None  # worker-self
    assert _names_itself(scheduler, op, me, {field: "tls://other:1"}) is not None  # worker-other
