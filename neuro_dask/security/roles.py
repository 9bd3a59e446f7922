"""Who may ask a hardened scheduler, worker or nanny for what. Pure: operation names in, decisions out.

Deny by default. Every operation a server answers, request handlers and stream operations
alike, is listed below with the certificate roles that may use it, or as NEVER (refused to
everyone, the operator included). An operation that is not listed is refused to everyone: a new
distributed release that adds a handler opens nothing until it is classified here, and
tests/unit/test_role_matrix.py fails on every unclassified handler of the live tables.

Roles come from the peer's TLS certificate (neuro_dask/security/identity.py): scheduler, worker,
client or operator. Over TLS a peer without a neuro_dask identity is refused everything. Over
plain TCP there are no identities: a peer is then allowed whatever is not NEVER (hardened mode
still refuses pickles, remote code, and any message that speaks for someone else on a stream);
docs/security.md says to turn TLS on before opening a port to strangers.

Stream operations arrive on long-lived connections that distributed opens for a purpose: a
client's stream (`register-client`), a worker's stream (`register-worker`), the worker's own
connection to its scheduler, and the generic `connection_stream`. Each kind has its own table:
a client's stream cannot carry a worker's operations, and `connection_stream` is open to the
scheduler (on workers and nannies) and the operator (on the scheduler) only.

Operations marked in SELF_FIELDS name a worker in a message field: a worker certificate may use
them only for the worker registered under its own name (guards.py checks the field).
"""

from __future__ import annotations

from dataclasses import dataclass

NEVER = "never"
CLIENT, WORKER, OPERATOR, SCHEDULER = "client", "worker", "operator", "scheduler"

Rule = frozenset[str] | str  # the roles that may use an operation, or NEVER

_OP = frozenset({OPERATOR, SCHEDULER})  # the operator's certificate, and a scheduler speaking to itself
_CLIENTS = frozenset({CLIENT}) | _OP
_WORKERS = frozenset({WORKER})
_WORKERS_AND_OP = _WORKERS | _OP
_ANYONE = frozenset({CLIENT, WORKER}) | _OP
_SCHEDULER_ONLY = frozenset({SCHEDULER})


def _table(**groups: tuple[Rule, tuple[str, ...]]) -> dict[str, Rule]:
    """op -> rule, from named groups of (rule, ops); an op listed twice is a bug in the table."""
    table: dict[str, Rule] = {}
    for name, (rule, ops) in groups.items():
        for op in ops:
            if op in table:
                raise AssertionError(f"{op!r} is classified twice (again in {name})")
            table[op] = rule
    return table


# ---- the scheduler ---------------------------------------------------------------------------

SCHEDULER_HANDLERS: dict[str, Rule] = _table(
    # Remote code, plugins, raw data stored on or moved through the scheduler, Dask task graphs
    # (a hardened network runs neuro_dask's expert calls, which are plain data, not graphs).
    never=(
        NEVER,
        (
            "run_function",
            "broadcast",
            "feed",
            "register_scheduler_plugin",
            "unregister_scheduler_plugin",
            "register_worker_plugin",
            "unregister_worker_plugin",
            "register_nanny_plugin",
            "unregister_nanny_plugin",
            "dump_cluster_state_to_url",
            "proxy",
            "scatter",
            "update_data",
            "replicate",
            "rebalance",
            "gather",
            "retry",
            "add_keys",
            "shuffle_barrier",
            "shuffle_get",
            "shuffle_get_or_create",
            "shuffle_restrict_task",
            "benchmark_hardware",
            "memory_sampler_start",
            "memory_sampler_stop",
            "publish_put",
            "variable_set",
            "queue_put",
        ),
    ),
    # A volunteer's worker (and its nanny, which holds the same certificate) speaking for itself.
    worker=(
        _WORKERS,
        (
            "register-worker",
            "heartbeat_worker",
            "unregister",
            "register_nanny",
            "neuro_experts_loaded",
            "neuro_pause",
        ),
    ),
    worker_or_operator=(_WORKERS_AND_OP, ("neuro_volunteer", "log_event")),
    # Any certificate of this network: who is this scheduler, and sizes of messages (bounded).
    anyone=(_ANYONE, ("identity", "versions", "echo")),
    # A data scientist's process or the gateway: routes, requests, reports with evidence.
    client=(
        _CLIENTS,
        (
            "register-client",
            "neuro_routes",
            "neuro_request_begin",
            "neuro_request_end",
            "neuro_report_outcomes",
            "neuro_report_load",
            "neuro_report_calls",
            "neuro_report_passes",
            "neuro_unreachable",
            "neuro_dispute",
            "neuro_channels",
            "neuro_ledger_report",
        ),
    ),
    # Publishing, trust anchors, cluster control, introspection and other people's logs.
    operator=(
        _OP,
        (
            "neuro_publish",
            "neuro_adopt",
            "neuro_trust",
            "neuro_status",
            "restart",
            "restart_workers",
            "retire_workers",
            "workers_to_close",
            "terminate",
            "adaptive_target",
            "set_resources",
            "set_restrictions",
            "dump_state",
            "get_cluster_state",
            "get_logs",
            "logs",
            "worker_logs",
            "call_stack",
            "profile",
            "performance_report",
            "amm_handler",
            "check_idle",
            "events",
            "subscribe_worker_status",
            "get_metadata",
            "set_metadata",
            "get_story",
            "get_error_cause",
            "get_runspec",
            "get_task_status",
            "get_task_stream",
            "get_task_stream_index",
            "get_task_prefix_states",
            "has_what",
            "who_has",
            "nbytes",
            "ncores",
            "ncores_running",
            "processing",
            "start_task_metadata",
            "stop_task_metadata",
            "event_clear",
            "event_is_set",
            "event_set",
            "event_wait",
            "multi_lock_acquire",
            "multi_lock_release",
            "publish_delete",
            "publish_get",
            "publish_list",
            "queue_create",
            "queue_get",
            "queue_qsize",
            "semaphore_acquire",
            "semaphore_close",
            "semaphore_refresh_leases",
            "semaphore_register",
            "semaphore_release",
            "semaphore_value",
            "variable_get",
        ),
    ),
    # Opens a stream with no purpose attached: every op on it is checked by SCHEDULER_STREAMS["any"].
    stream=(_OP, ("connection_stream",)),
)

# Stream operations of the scheduler, per kind of stream.
_SCHEDULER_TASK_STREAM_OPS = (
    # A worker reporting on Dask tasks: a hardened network runs none.
    "task-finished",
    "task-erred",
    "release-worker-data",
    "add-keys",
    "long-running",
    "reschedule",
    "steal-response",
    "request-refresh-who-has",
    "update-data",
)
SCHEDULER_STREAMS: dict[str, dict[str, Rule]] = {
    "client": _table(
        client=(_CLIENTS, ("heartbeat-client", "close-client", "client-releases-keys")),
        operator=(
            _OP,
            (
                "subscribe-topic",
                "unsubscribe-topic",
                "client-desires-keys",
                "cancel-keys",
                "report-key",
                "variable_delete",
                "queue-future-release",
                "variable-future-received-confirm",
                "publish_flush_batched_send",
            ),
        ),
        never=(
            NEVER,
            (
                "update-graph",
                *_SCHEDULER_TASK_STREAM_OPS,
                "keep-alive",
                "log-event",
                "worker-status-change",
                "queue_release",
            ),
        ),
    ),
    "worker": _table(
        # `worker` is the stream's own worker (set by the scheduler, never by the message)
        worker=(_WORKERS_AND_OP, ("keep-alive", "log-event", "worker-status-change")),
        never=(
            NEVER,
            (
                *_SCHEDULER_TASK_STREAM_OPS,
                "update-graph",
                "heartbeat-client",
                "close-client",
                "client-releases-keys",
                "subscribe-topic",
                "unsubscribe-topic",
                "client-desires-keys",
                "cancel-keys",
                "report-key",
                "variable_delete",
                "queue-future-release",
                "variable-future-received-confirm",
                "publish_flush_batched_send",
                "queue_release",
            ),
        ),
    ),
    "any": _table(
        operator=(
            _OP,
            (
                "log-event",
                "subscribe-topic",
                "unsubscribe-topic",
                "variable_delete",
                "queue_release",
                "publish_flush_batched_send",
            ),
        ),
        never=(
            NEVER,
            (
                *_SCHEDULER_TASK_STREAM_OPS,
                "update-graph",
                "heartbeat-client",
                "close-client",
                "client-releases-keys",
                "client-desires-keys",
                "cancel-keys",
                "report-key",
                "queue-future-release",
                "variable-future-received-confirm",
                "keep-alive",
                "worker-status-change",
            ),
        ),
    ),
}

# ---- a volunteer's worker --------------------------------------------------------------------

WORKER_HANDLERS: dict[str, Rule] = _table(
    never=(
        NEVER,
        (
            "run",
            "run_coroutine",
            "plugin-add",
            "plugin-remove",
            "plugin_add",
            "plugin_remove",
            "upload_file",
            "actor_execute",
            "actor_attribute",
            "update_data",
            "benchmark_disk",
            "benchmark_memory",
            "benchmark_network",
            "shuffle_inputs_done",
            "shuffle_receive",
            "get_data",
            "gather",
        ),
    ),
    # Expert calls and their bookkeeping: clients (and the scheduler, which recomputes disputed
    # answers and probes reported workers). Tickets and limits are checked by the handlers.
    expert=(_CLIENTS, ("neuro_expert", "neuro_expert_share", "neuro_cancel")),
    anyone=(_ANYONE, ("identity", "versions", "echo", "ping")),
    # The worker's own certificate may read its status (`neuro-dask worker-status`).
    self_or_operator=(_WORKERS_AND_OP, ("neuro_status",)),
    scheduler=(
        _SCHEDULER_ONLY,
        (
            "neuro_assign",
            "neuro_drop",
            "free_keys",
            "terminate",
            "keys",
            "get_monitor_info",
            "dump_state",
            "get_logs",
            "profile",
            "profile_metadata",
            "call_stack",
            "get_story",
            "connection_stream",
        ),
    ),
)

WORKER_STREAMS: dict[str, dict[str, Rule]] = {
    # The connection this worker opened to its own scheduler: the scheduler's instructions.
    "scheduler": _table(
        scheduler=(
            _SCHEDULER_ONLY,
            (
                "acquire-replicas",
                "cancel-compute",
                "close",
                "compute-task",
                "free-keys",
                "refresh-who-has",
                "remove-replicas",
                "remove-worker",
                "steal-request",
                "worker-status-change",
                "neuro-comeback",  # when to come back after this scheduler shuts down
            ),
        ),
        never=(NEVER, ("shuffle-fail",)),
    ),  # P2P shuffles: a hardened network runs none
    # connection_stream (scheduler only, above): the same instructions.
    "any": _table(
        scheduler=(
            _SCHEDULER_ONLY,
            (
                "acquire-replicas",
                "cancel-compute",
                "close",
                "compute-task",
                "free-keys",
                "refresh-who-has",
                "remove-replicas",
                "remove-worker",
                "steal-request",
                "worker-status-change",
                "neuro-comeback",  # when to come back after this scheduler shuts down
            ),
        ),
        never=(NEVER, ("shuffle-fail",)),
    ),
}

# ---- a volunteer's nanny (starts and restarts its worker) -------------------------------------

NANNY_HANDLERS: dict[str, Rule] = _table(
    never=(NEVER, ("run", "plugin_add", "plugin_remove", "plugin-add", "plugin-remove")),
    anyone=(_ANYONE, ("identity", "echo")),
    # The nanny's own worker asks it to close when the worker closes (same certificate name).
    scheduler_or_own_worker=(_SCHEDULER_ONLY | _WORKERS, ("close_gracefully",)),
    scheduler=(
        _SCHEDULER_ONLY,
        ("instantiate", "kill", "restart", "terminate", "get_logs", "dump_state", "connection_stream"),
    ),
)

NANNY_STREAMS: dict[str, dict[str, Rule]] = {"any": {}}

# ---- worker certificates speak for themselves --------------------------------------------------

# op -> the message field that names a worker: a worker certificate may name only its own.
SCHEDULER_SELF_FIELDS: dict[str, str] = {
    "heartbeat_worker": "address",
    "unregister": "address",
    "neuro_experts_loaded": "worker",
    "neuro_pause": "worker",
    "neuro_volunteer": "worker",
}
# ops a worker certificate may use only when it is the server's own certificate name (a worker
# reading its own status, a worker asking its own nanny to close).
OWN_NAME_OPS: frozenset[str] = frozenset({"neuro_status", "close_gracefully"})


@dataclass(frozen=True)
class Decision:
    allowed: bool
    why: str = ""


ALLOW = Decision(True)


def decide(
    table: dict[str, Rule], op: object, role: str | None, *, roles_required: bool, server: str = "server"
) -> Decision:
    """Whether a peer of `role` (None: no identity) may use `op` on a server whose operations are `table`."""
    if not isinstance(op, str):
        return Decision(False, "an operation is named by a string")
    rule = table.get(op)
    if rule is None:
        return Decision(False, f"{op!r} is not an operation this hardened {server} offers (deny by default)")
    if rule == NEVER:
        return Decision(False, f"a hardened {server} never does this for anyone")
    if role is None:
        if roles_required and None not in rule:
            return Decision(False, f"this {server} requires a certificate from its network's CA")
        return ALLOW
    if role in rule:
        return ALLOW
    return Decision(False, f"{_who_may(rule)} may use {op!r}; this peer's certificate is a {role}'s")


def _who_may(rule: frozenset[str]) -> str:
    if rule == _OP:
        return "only the operator's certificate"
    if rule == _SCHEDULER_ONLY:
        return "only the scheduler"
    if rule == _WORKERS:
        return "only a worker certificate"
    named = sorted(r for r in rule if r != SCHEDULER)
    return "only " + " or ".join(("an " if r == OPERATOR else "a ") + r for r in named) + " certificate"


def scheduler_decision(op: object, role: str | None, *, roles_required: bool) -> Decision:
    return decide(SCHEDULER_HANDLERS, op, role, roles_required=roles_required, server="scheduler")


def worker_decision(op: object, role: str | None, *, roles_required: bool) -> Decision:
    return decide(WORKER_HANDLERS, op, role, roles_required=roles_required, server="worker")


def nanny_decision(op: object, role: str | None, *, roles_required: bool) -> Decision:
    return decide(NANNY_HANDLERS, op, role, roles_required=roles_required, server="nanny")


def stream_decision(
    streams: dict[str, dict[str, Rule]], kind: str, op: object, role: str | None, *, roles_required: bool, server: str
) -> Decision:
    """A stream operation on a stream of `kind` ("client", "worker", "scheduler" or "any")."""
    return decide(streams.get(kind, {}), op, role, roles_required=roles_required, server=f"{server} ({kind} stream)")


def classified(table: dict[str, Rule], op: str) -> bool:
    """Whether `op` has a rule in `table` (the matrix test fails on an op that has none)."""
    return op in table
