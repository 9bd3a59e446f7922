"""Who may ask a hardened scheduler or worker for what (neuro_dask/security/roles.py), the task check
of a hardened worker (guards.refused_function) and the handler table that enforces both
(guards.GuardedHandlers), with peer certificates made by neuro_dask.security.certs."""

from __future__ import annotations

import asyncio

import pytest
from dask._task_spec import DataNode, List, Task

from neuro_dask.client.dispatch.tasks import serve_expert_call
from neuro_dask.security import roles
from neuro_dask.security.certs import as_peercert, create_ca, issue, load_certificate
from neuro_dask.security.events import security_log
from neuro_dask.security.guards import GuardedHandlers, _bind_worker_name, comm_identity, refused_function
from neuro_dask.security.identity import ROLES, PeerIdentity

EVERY_ROLE = (None, *ROLES)
CERT_ROLES = frozenset(ROLES)
NEVER = "never"
CLIENTS = frozenset({"scheduler", "client", "operator"})
OPERATORS = frozenset({"scheduler", "operator"})

# op -> the certificate roles that may use it on a scheduler, or NEVER (refused to everyone):
# the expectations, written independently of roles.py's tables.
SCHEDULER_TABLE: dict[str, frozenset[str] | str] = {
    # a volunteer's worker registering and reporting for itself
    "register-worker": frozenset({"worker"}),
    "heartbeat_worker": frozenset({"worker"}),
    "neuro_experts_loaded": frozenset({"worker"}),
    "neuro_pause": frozenset({"worker"}),
    "register_nanny": frozenset({"worker"}),
    "unregister": frozenset({"worker"}),
    "neuro_volunteer": frozenset({"worker"}) | OPERATORS,
    # what any certificate of the network may ask
    "identity": CERT_ROLES,
    "versions": CERT_ROLES,
    # a client's work: not for worker certificates
    "register-client": CLIENTS,
    "neuro_routes": CLIENTS,
    "neuro_report_calls": CLIENTS,
    "neuro_report_passes": CLIENTS,
    "neuro_report_outcomes": CLIENTS,
    "neuro_unreachable": CLIENTS,
    "neuro_dispute": CLIENTS,
    "neuro_request_begin": CLIENTS,
    "neuro_request_end": CLIENTS,
    "neuro_channels": CLIENTS,
    # trust anchors, publishing, metadata, cluster control, other people's logs and events
    "neuro_trust": OPERATORS,
    "neuro_status": OPERATORS,
    "neuro_publish": OPERATORS,
    "neuro_adopt": OPERATORS,
    "set_metadata": OPERATORS,
    "get_metadata": OPERATORS,
    "events": OPERATORS,
    "who_has": OPERATORS,
    "retire_workers": OPERATORS,
    "restart": OPERATORS,
    "terminate": OPERATORS,
    "get_logs": OPERATORS,
    "dump_state": OPERATORS,
    "connection_stream": OPERATORS,
    # remote code, plugins, raw data, task graphs: nobody
    "run_function": NEVER,
    "broadcast": NEVER,
    "feed": NEVER,
    "register_worker_plugin": NEVER,
    "register_scheduler_plugin": NEVER,
    "register_nanny_plugin": NEVER,
    "scatter": NEVER,
    "update_data": NEVER,
    "gather": NEVER,
    "proxy": NEVER,
    "dump_cluster_state_to_url": NEVER,
    "rebalance": NEVER,
    "replicate": NEVER,
    "publish_put": NEVER,
    # not an operation at all: denied by default
    "no_such_op": NEVER,
}

WORKER_TABLE: dict[str, frozenset[str] | str] = {
    "run": NEVER,
    "run_coroutine": NEVER,
    "plugin-add": NEVER,
    "plugin-remove": NEVER,
    "upload_file": NEVER,
    "update_data": NEVER,
    "actor_execute": NEVER,
    "get_data": NEVER,
    "neuro_assign": frozenset({"scheduler"}),
    "neuro_drop": frozenset({"scheduler"}),
    "terminate": frozenset({"scheduler"}),
    "free_keys": frozenset({"scheduler"}),
    "connection_stream": frozenset({"scheduler"}),
    "neuro_expert": CLIENTS,
    "neuro_expert_share": CLIENTS,
    "neuro_cancel": CLIENTS,
    "neuro_status": frozenset({"worker"}) | OPERATORS,
    "ping": CERT_ROLES,
    "identity": CERT_ROLES,
    "no_such_op": NEVER,
}

NANNY_TABLE: dict[str, frozenset[str] | str] = {
    "run": NEVER,
    "plugin_add": NEVER,
    "instantiate": frozenset({"scheduler"}),
    "kill": frozenset({"scheduler"}),
    "restart": frozenset({"scheduler"}),
    "connection_stream": frozenset({"scheduler"}),
    "close_gracefully": frozenset({"scheduler", "worker"}),
    "identity": CERT_ROLES,
    "no_such_op": NEVER,
}


def _expected(allowed: frozenset[str] | str, role: str | None, roles_required: bool) -> bool:
    if allowed == NEVER:
        return False
    if role is None:
        return not roles_required
    return role in allowed


def _cases(table):
    return [
        pytest.param(
            op,
            role,
            required,
            _expected(allowed, role, required),
            id=f"{op}-{role or 'no-cert'}-{'required' if required else 'optional'}",
        )
        for op, allowed in table.items()
        for role in EVERY_ROLE
        for required in (True, False)
    ]


@pytest.mark.parametrize("op, role, required, allowed", _cases(SCHEDULER_TABLE))
def test_scheduler_decision(op, role, required, allowed):
    decision = roles.scheduler_decision(op, role, roles_required=required)
    assert decision.allowed is allowed
    assert bool(decision.why) is not allowed  # every refusal says why


@pytest.mark.parametrize("op, role, required, allowed", _cases(WORKER_TABLE))
def test_worker_decision(op, role, required, allowed):
    decision = roles.worker_decision(op, role, roles_required=required)
    assert decision.allowed is allowed
    assert bool(decision.why) is not allowed


@pytest.mark.parametrize("op, role, required, allowed", _cases(NANNY_TABLE))
def test_nanny_decision(op, role, required, allowed):
    decision = roles.nanny_decision(op, role, roles_required=required)
    assert decision.allowed is allowed
    assert bool(decision.why) is not allowed


@pytest.mark.parametrize(
    "kind, op, role, allowed",
    [
        # a client's stream carries a client's heartbeats, never a worker's reports or a task graph
        ("client", "heartbeat-client", "client", True),
        ("client", "close-client", "client", True),
        ("client", "update-graph", "client", False),
        ("client", "update-graph", "operator", False),
        ("client", "worker-status-change", "client", False),
        ("client", "subscribe-topic", "client", False),
        ("client", "subscribe-topic", "operator", True),
        # a worker's stream: its keep-alives, its own status and events; no task reports
        ("worker", "keep-alive", "worker", True),
        ("worker", "worker-status-change", "worker", True),
        ("worker", "log-event", "worker", True),
        ("worker", "task-finished", "worker", False),
        ("worker", "heartbeat-client", "worker", False),
        # a stream opened with connection_stream carries nothing a client or worker may send
        ("any", "worker-status-change", "operator", False),
        ("any", "log-event", "client", False),
        ("any", "log-event", "worker", False),
        ("any", "subscribe-topic", "operator", True),
        ("client", "no-such-op", "operator", False),
    ],
)
def test_scheduler_stream_decisions(kind, op, role, allowed):
    decision = roles.stream_decision(roles.SCHEDULER_STREAMS, kind, op, role, roles_required=True, server="scheduler")
    assert decision.allowed is allowed, decision.why


@pytest.mark.parametrize(
    "kind, op, role, allowed",
    [
        ("scheduler", "close", "scheduler", True),
        ("scheduler", "compute-task", "scheduler", True),
        ("scheduler", "close", "client", False),  # a certificate other than the scheduler's on that comm
        ("any", "close", "client", False),
        ("any", "close", "worker", False),
        ("any", "close", "operator", False),
        ("any", "close", "scheduler", True),
        ("any", "worker-status-change", "client", False),
        # when to come back after a scheduler restart: only the scheduler may say
        ("scheduler", "neuro-comeback", "scheduler", True),
        ("scheduler", "neuro-comeback", "client", False),
        ("any", "neuro-comeback", "worker", False),
        ("any", "neuro-comeback", "operator", False),
        ("any", "neuro-comeback", "client", False),
    ],
)
def test_worker_stream_decisions(kind, op, role, allowed):
    decision = roles.stream_decision(roles.WORKER_STREAMS, kind, op, role, roles_required=True, server="worker")
    assert decision.allowed is allowed, decision.why


@pytest.mark.parametrize(
    "decide, op, role, required, words",
    [
        (roles.scheduler_decision, "run_function", "operator", False, "never"),
        (roles.scheduler_decision, "retire_workers", None, True, "certificate"),
        (roles.scheduler_decision, "register-worker", "client", True, "only a worker certificate"),
        (roles.scheduler_decision, "register-client", "worker", True, "certificate is a worker's"),
        (roles.scheduler_decision, "neuro_publish", "client", True, "operator"),
        (roles.scheduler_decision, "no_such_op", "operator", True, "deny by default"),
        (roles.worker_decision, "run", "scheduler", True, "never"),
        (roles.worker_decision, "neuro_assign", "client", True, "only the scheduler"),
        (roles.worker_decision, "neuro_expert", None, True, "certificate"),
    ],
)
def test_refusals_say_why(decide, op, role, required, words):
    decision = decide(op, role, roles_required=required)
    assert not decision.allowed and words in decision.why


def test_a_non_string_op_is_refused():
    assert not roles.scheduler_decision(("neuro_routes",), "operator", roles_required=True).allowed
    assert not roles.scheduler_decision(None, "operator", roles_required=False).allowed


def test_the_tables_cover_every_role_and_each_kind_of_rule():
    assert set(EVERY_ROLE) == {None, "scheduler", "worker", "client", "operator"}
    for table in (roles.SCHEDULER_HANDLERS, roles.WORKER_HANDLERS, roles.NANNY_HANDLERS):
        rules = set(table.values())
        assert NEVER in rules and any(r != NEVER and len(r) == 1 for r in rules)


def test_an_op_classified_twice_is_a_bug_in_the_table():
    with pytest.raises(AssertionError, match="twice"):
        roles._table(a=(NEVER, ("x",)), b=(frozenset({"client"}), ("x",)))


@pytest.mark.parametrize(
    "table",
    [
        roles.SCHEDULER_HANDLERS,
        roles.WORKER_HANDLERS,
        roles.NANNY_HANDLERS,
        *roles.SCHEDULER_STREAMS.values(),
        *roles.WORKER_STREAMS.values(),
    ],
)
def test_every_never_op_is_refused_to_everyone(table):
    for op, rule in table.items():
        if rule == NEVER:
            for role in EVERY_ROLE:
                for required in (True, False):
                    assert not roles.decide(table, op, role, roles_required=required).allowed


def test_self_fields_name_ops_only_workers_use():
    for op in roles.SCHEDULER_SELF_FIELDS:
        assert "worker" in roles.SCHEDULER_HANDLERS[op]


# ---- the task check of a hardened worker --------------------------------------------------------


def _len_task():
    return Task("inner", len, "abc")


@pytest.mark.parametrize(
    "spec, refused",
    [
        (Task("k", serve_expert_call, b"req"), None),
        (Task("k", len, "abc"), "builtins.len"),
        (Task("k", serve_expert_call, _len_task()), "builtins.len"),
        (Task("k", serve_expert_call, b"req", extra=_len_task()), "builtins.len"),
        (Task("k", serve_expert_call, Task("mid", serve_expert_call, _len_task())), "builtins.len"),
        (Task("k", serve_expert_call, Task("mid", serve_expert_call, b"req")), None),
        # A container node runs the tasks inside it: refused, though its own function is Dask's.
        (Task("k", serve_expert_call, List(_len_task())), "dask._task_spec.NestedContainer.to_container"),
        (Task("k", print, "x"), "builtins.print"),
    ],
    ids=["expert", "len", "nested-arg", "nested-kwarg", "two-deep", "nested-expert", "List", "print"],
)
def test_refused_function(spec, refused):
    assert refused_function(spec) == refused


@pytest.mark.parametrize(
    "spec", [DataNode("d", 1), None, "a string", b"bytes", {"k": 1}], ids=["DataNode", "None", "str", "bytes", "dict"]
)
def test_anything_but_a_task_is_refused(spec):
    refused = refused_function(spec)
    assert refused is not None and type(spec).__name__ in refused


def test_a_task_inside_plain_data_is_not_run_and_not_refused():
    # Dask passes plain containers to the function as they are: the inner task is data, never run.
    inner = _len_task()
    assert Task("k", lambda x: x, [inner])() == [inner]
    assert refused_function(Task("k", serve_expert_call, [inner])) is None


def test_a_lambda_is_refused_by_its_name():
    refused = refused_function(Task("k", lambda: 1))
    assert refused is not None and refused.endswith("<lambda>") and __name__ in refused


# ---- the handler table ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peercerts(tmp_path_factory):
    """role -> getpeercert()-shaped dict of a certificate issued by a test CA; names as the role."""
    folder = tmp_path_factory.mktemp("certs")
    create_ca(folder)
    certs = {role: as_peercert(load_certificate(issue(folder, role, role)[0])) for role in ROLES}
    certs["worker-1"] = as_peercert(load_certificate(issue(folder, "worker", "worker-1")[0]))
    return certs


class FakeComm:
    def __init__(self, peercert=None, peer_address="tls://203.0.113.9:40123"):
        self.peer_address = peer_address
        self.extra_info = {"peercert": peercert} if peercert is not None else {}


@pytest.fixture
def events():
    security_log.clear()
    yield security_log
    security_log.clear()


def _worker_handlers(calls):
    def neuro_assign(x):
        calls.append(("neuro_assign", x))
        return x

    def echo(comm, data):
        calls.append(("echo", comm, data))
        return data

    return GuardedHandlers(
        {"echo": echo, "neuro_assign": neuro_assign},
        decide=lambda op, role: roles.worker_decision(op, role, roles_required=True),
    )


def test_the_certificates_name_their_roles(peercerts):
    for role in ROLES:
        assert comm_identity(FakeComm(peercerts[role])) == PeerIdentity(role, role)
    assert comm_identity(FakeComm(peercerts["worker-1"])) == PeerIdentity("worker", "worker-1")
    assert comm_identity(FakeComm()) is None


def test_a_scheduler_certificate_may_assign_experts(peercerts, events):
    calls: list = []
    handlers = _worker_handlers(calls)
    assert handlers["neuro_assign"](FakeComm(peercerts["scheduler"]), x=1) == 1
    assert calls == [("neuro_assign", 1)]
    assert events.events() == []


@pytest.mark.parametrize("role", ["client", "worker", "operator"])
def test_other_certificates_may_not_assign_experts(peercerts, events, role):
    calls: list = []
    handlers = _worker_handlers(calls)
    comm = FakeComm(peercerts[role])
    reply = handlers["neuro_assign"](comm, x=1)
    assert calls == []  # the handler never ran
    assert isinstance(reply, dict) and reply["status"] == "uncaught-error"
    assert "neuro_assign" in reply["exception_text"] and role in reply["exception_text"]
    [event] = events.events()
    assert event.kind == "refused-op"
    assert event.identity == f"{role}:{role}"
    assert event.peer == comm.peer_address
    assert event.detail.startswith("neuro_assign:")


def test_a_client_refusal_is_recorded_with_its_identity_and_address(peercerts, events):
    handlers = _worker_handlers([])
    comm = FakeComm(peercerts["client"], peer_address="tls://198.51.100.4:5555")
    reply = handlers["neuro_assign"](comm, x=1)
    assert reply["status"] == "uncaught-error"
    assert [(e.kind, e.identity, e.peer) for e in events.events()] == [
        ("refused-op", "client:client", "tls://198.51.100.4:5555")
    ]
    assert events.counts == {"refused-op": 1}


@pytest.mark.parametrize("peercert_role, allowed", [("client", True), ("worker", True), (None, False)])
def test_a_handler_that_takes_the_comm_gets_it(peercerts, events, peercert_role, allowed):
    calls: list = []
    handlers = _worker_handlers(calls)
    comm = FakeComm(peercerts[peercert_role] if peercert_role else None)
    reply = handlers["echo"](comm, data=5)
    if allowed:
        assert reply == 5 and calls == [("echo", comm, 5)]
        assert events.events() == []
    else:  # roles required and no certificate
        assert reply["status"] == "uncaught-error" and calls == []
        assert [(e.kind, e.identity) for e in events.events()] == [("refused-op", None)]


def test_a_forged_certificate_dict_has_no_role(peercerts, events):
    forged = dict(peercerts["scheduler"])
    forged["subjectAltName"] = (("URI", "neuro-dask://scheduler/someone-else"),)
    reply = _worker_handlers([])["neuro_assign"](FakeComm(forged), x=1)
    assert reply["status"] == "uncaught-error"
    assert events.events()[0].identity is None


def test_guarded_handlers_look_up_like_a_dict(peercerts, events):
    handlers = _worker_handlers([])
    assert handlers["neuro_assign"].__name__ == "neuro_assign"
    assert set(handlers) == {"echo", "neuro_assign"} and "echo" in handlers and "run" not in handlers
    # An op with no handler at all is still answered by the guard: refused and reported, never
    # a KeyError that distributed would log and drop silently.
    refused = handlers["run"](FakeComm(peercerts["scheduler"]))
    assert refused["status"] == "uncaught-error" and "not an operation" in refused["exception_text"]
    assert handlers["run"] is handlers["no-such-op"]  # one wrapper for all of them: nothing grows per name
    assert handlers["echo"] is handlers["echo"]  # and one per handler: distributed caches by function
    handlers["neuro_drop"] = lambda: "added by a plugin"
    # Added later (as plugins add theirs), guarded too: no certificate, refused.
    assert handlers["neuro_drop"](FakeComm())["status"] == "uncaught-error"


# ---- a worker's name is the name on its certificate ----------------------------------------------


@pytest.mark.parametrize(
    "op, identity, name, expected",
    [
        ("register-worker", PeerIdentity("worker", "worker-1"), "evil", "worker-1"),
        ("register-worker", PeerIdentity("worker", "worker-1"), None, "worker-1"),
        ("register-worker", PeerIdentity("worker", "worker-1"), "worker-1", "worker-1"),
        ("register-worker", PeerIdentity("client", "client"), "evil", "evil"),
        ("register-worker", None, "evil", "evil"),
        ("heartbeat_worker", PeerIdentity("worker", "worker-1"), "evil", "evil"),
    ],
)
def test_bind_worker_name(op, identity, name, expected):
    msg = {"name": name, "address": "tls://203.0.113.9:1"}
    _bind_worker_name(op, identity, msg)
    assert msg["name"] == expected


METRICS = {
    "memory": 1 << 20,
    "cpu": 1.0,
    "managed_bytes": 0,
    "spilled_bytes": {"memory": 0, "disk": 0},
    "bandwidth": {"total": 1e8, "workers": {}, "types": {}},
    "digests_total_since_heartbeat": {},
    "time": 1.0e9,
    "task_counts": {},
}


def _registration(name, address):
    """What distributed 2026.8's worker sends with register-worker."""
    return dict(
        address=address,
        status="init",
        server_id="Worker-1",
        nthreads=1,
        name=name,
        now=1.0e9,
        resources={},
        memory_limit=None,
        metrics=METRICS,
        services={},
        local_directory="/tmp/w",
        versions={"python": "3.11"},
        nanny=None,
        extra={},
        stimulus_id="worker-connect-1",
        pid=42,
    )


def test_register_worker_through_the_guard_takes_the_certificate_name(peercerts, events):
    registered: list = []

    def register_worker(comm, name, address, **_rest):
        registered.append(name)
        return {"status": "OK"}

    def bind(op, identity, msg):
        _bind_worker_name(op, identity, msg)

    handlers = GuardedHandlers(
        {"register-worker": register_worker},
        decide=lambda op, role: roles.scheduler_decision(op, role, roles_required=True),
        check=bind,
    )
    reply = handlers["register-worker"](FakeComm(peercerts["worker-1"]), **_registration("evil", "tls://203.0.113.9:1"))
    assert reply == {"status": "OK"} and registered == ["worker-1"]
    # A client certificate may not register a worker at all.
    # The registration protocol has the handler answer on the comm itself (reply=False): the
    # refusal is written there, in the shape a worker reads, and the comm closed.
    comm = WritableComm(peercerts["client"])
    asyncio.run(handlers["register-worker"](comm, **_registration("evil", "tls://203.0.113.9:2")))
    [refused] = comm.written
    assert refused["status"] == "uncaught-error" and "register-worker" in refused["message"] and comm.closed
    assert registered == ["worker-1"]
    assert [e.identity for e in events.events()] == ["client:client"]


class WritableComm(FakeComm):
    def __init__(self, peercert):
        super().__init__(peercert)
        self.written, self.closed = [], False

    async def write(self, msg):
        self.written.append(msg)

    async def close(self):
        self.closed = True
